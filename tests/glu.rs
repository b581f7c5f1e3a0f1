//! The fused gated activation `Tensor::glu` (`act(g) ⊙ u`, SwiGLU and GeGLU; src/kernels/glu.rs)
//! against its composition `act(g).mul(u)` (`Tensor::glu_reference`): forward and both
//! gradients in float64 against a float64 formula, central finite differences on the fused op,
//! the GPU kernel against the CPU one on awkward sizes (and views at an offset), one launch
//! each way on the GPU, and clear errors.

mod common;

use tinytune::kernels::glu::GluAct;
use tinytune::{DType, Device, Tensor};

/// Values spread uniformly over ±`scale` (both tails of σ and tanh at 12).
fn spread(rng: &mut common::TestRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| scale * (2.0 * rng.uniform() - 1.0)).collect()
}

/// `act(x)` and `act'(x)` in float64, written from the definitions (σ, tanh of std).
fn act_f64(act: GluAct, x: f64) -> (f64, f64) {
    match act {
        GluAct::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            (x * s, s + x * s * (1.0 - s))
        }
        GluAct::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let inner = c * (x + 0.044715 * x.powi(3));
            let t = inner.tanh();
            (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x))
        }
    }
}

const ACTS: [GluAct; 2] = [GluAct::Silu, GluAct::GeluTanh];

fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: element {i}: got {g}, want {w}");
    }
}

/// Forward and gradients of the fused op and of the composition, against the formula, in f64,
/// over sizes around the kernel's chunking (1, 7, 16384 ± 1, …) and values in both tails.
#[test]
fn glu_matches_the_formula_and_the_composition_in_f64() {
    let mut rng = common::TestRng::new(1);
    for act in ACTS {
        for shape in [vec![1usize], vec![7], vec![3, 5], vec![2, 8191], vec![16385], vec![4, 3, 33]] {
            let n: usize = shape.iter().product();
            let (gv, uv, wv) = (spread(&mut rng, n, 12.0), spread(&mut rng, n, 3.0), spread(&mut rng, n, 1.0));
            let t = |v: &[f64]| Tensor::from_vec(v.to_vec(), &shape, &Device::Cpu).unwrap().requires_grad().unwrap();
            let want_y: Vec<f64> = gv.iter().zip(&uv).map(|(&g, &u)| act_f64(act, g).0 * u).collect();
            let want_dg: Vec<f64> = (0..n).map(|i| act_f64(act, gv[i]).1 * uv[i] * wv[i]).collect();
            let want_du: Vec<f64> = (0..n).map(|i| act_f64(act, gv[i]).0 * wv[i]).collect();
            let w = Tensor::from_vec(wv.clone(), &shape, &Device::Cpu).unwrap();
            for fused in [true, false] {
                let (g, u) = (t(&gv), t(&uv));
                let y = if fused { g.glu(&u, act) } else { g.glu_reference(&u, act) }.unwrap();
                let what = format!("{act:?} {shape:?} fused={fused}");
                close(&format!("{what} y"), &y.to_vec::<f64>().unwrap(), &want_y, 1e-12);
                y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
                close(&format!("{what} dg"), &g.grad().unwrap().to_vec::<f64>().unwrap(), &want_dg, 1e-12);
                close(&format!("{what} du"), &u.grad().unwrap().to_vec::<f64>().unwrap(), &want_du, 1e-12);
            }
        }
    }
}

/// Central differences of `Σ w ⊙ glu(g, u)` against the fused op's gradients.
#[test]
fn glu_gradients_match_finite_differences() {
    let mut rng = common::TestRng::new(2);
    let n = 23;
    for act in ACTS {
        let (gv, uv, wv) = (spread(&mut rng, n, 4.0), spread(&mut rng, n, 2.0), spread(&mut rng, n, 1.0));
        let w = Tensor::from_vec(wv, &[n], &Device::Cpu).unwrap();
        let loss = |g: &[f64], u: &[f64]| {
            let (g, u) =
                (Tensor::from_vec(g.to_vec(), &[n], &Device::Cpu).unwrap(), Tensor::from_vec(u.to_vec(), &[n], &Device::Cpu).unwrap());
            g.glu(&u, act).unwrap().mul(&w).unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        let g = Tensor::from_vec(gv.clone(), &[n], &Device::Cpu).unwrap().requires_grad().unwrap();
        let u = Tensor::from_vec(uv.clone(), &[n], &Device::Cpu).unwrap().requires_grad().unwrap();
        g.glu(&u, act).unwrap().mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let (dg, du) = (g.grad().unwrap().to_vec::<f64>().unwrap(), u.grad().unwrap().to_vec::<f64>().unwrap());
        let h = 1e-6;
        for i in 0..n {
            let (mut gp, mut gm) = (gv.clone(), gv.clone());
            gp[i] += h;
            gm[i] -= h;
            let fd = (loss(&gp, &uv) - loss(&gm, &uv)) / (2.0 * h);
            assert!((fd - dg[i]).abs() < 1e-7 * (1.0 + fd.abs()), "{act:?} dg[{i}]: fd {fd} analytic {}", dg[i]);
            let (mut up, mut um) = (uv.clone(), uv.clone());
            up[i] += h;
            um[i] -= h;
            let fd = (loss(&gv, &up) - loss(&gv, &um)) / (2.0 * h);
            assert!((fd - du[i]).abs() < 1e-7 * (1.0 + fd.abs()), "{act:?} du[{i}]: fd {fd} analytic {}", du[i]);
        }
    }
}

/// The f32 CPU kernel (`exp_fast`-based σ and tanh) stays within a few ulp-scaled units of the
/// f64 formula, across both tails.
#[test]
fn glu_f32_is_close_to_the_f64_formula() {
    let mut rng = common::TestRng::new(3);
    let n = 5000;
    for act in ACTS {
        let (gv, uv) = (spread(&mut rng, n, 20.0), spread(&mut rng, n, 3.0));
        let f = |v: &[f64]| Tensor::from_vec(v.iter().map(|&x| x as f32).collect::<Vec<f32>>(), &[n], &Device::Cpu).unwrap();
        let y = f(&gv).glu(&f(&uv), act).unwrap().to_vec::<f32>().unwrap();
        for i in 0..n {
            let (g, u) = (gv[i] as f32 as f64, uv[i] as f32 as f64);
            let want = act_f64(act, g).0 * u;
            assert!((y[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()) * (1.0 + g.abs()), "{act:?} g={g} u={u}: {} vs {want}", y[i]);
        }
    }
}

/// GPU against CPU (f32) on awkward sizes and on views at an offset, forward and backward;
/// one `glu` launch forward and one `glu_backward` backward, nothing else element-wise.
#[test]
fn gpu_glu_matches_cpu_in_one_launch_each_way() {
    if common::gpu_device().is_none() {
        return;
    }
    let gpu = common::gpu_with_kernel(tinytune::backend::gpu::MatmulKernel::Registers);
    let Device::Gpu(dev) = &gpu else { unreachable!() };
    let mut rng = common::TestRng::new(4);
    for act in ACTS {
        for n in [1usize, 255, 256, 257, 3 * 1031] {
            let (gv, uv, wv) = (spread(&mut rng, n + 3, 10.0), spread(&mut rng, n + 3, 2.0), spread(&mut rng, n, 1.0));
            let mut grads = Vec::new();
            for d in [Device::Cpu, gpu.clone()] {
                let mk = |v: &[f64]| {
                    let t = Tensor::from_vec(v.iter().map(|&x| x as f32).collect::<Vec<f32>>(), &[v.len()], &Device::Cpu).unwrap();
                    t.to_device(&d).unwrap().requires_grad().unwrap()
                };
                let (g, u, w) = (mk(&gv), mk(&uv), mk(&wv));
                // Views at offsets 3 and 1 of their buffers.
                let (gs, us) = (g.narrow(0, 3, n).unwrap(), u.narrow(0, 1, n).unwrap());
                let names = ["glu", "glu_backward", "unary"];
                let before = names.map(|k| common::dispatches(dev, k));
                let y = gs.glu(&us, act).unwrap();
                y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
                if d.is_gpu() {
                    let after = names.map(|k| common::dispatches(dev, k));
                    let delta = |i: usize| after[i] - before[i];
                    assert_eq!((delta(0), delta(1)), (1, 1), "{act:?} n={n}: {:?}", dev.kernel_counts());
                    assert_eq!(delta(2), 0, "no separate activation launch");
                }
                grads.push((y.to_vec_f64().unwrap(), g.grad().unwrap().to_vec_f64().unwrap(), u.grad().unwrap().to_vec_f64().unwrap()));
            }
            let ((yc, gc, uc), (yg, gg, ug)) = (&grads[0], &grads[1]);
            close(&format!("{act:?} n={n} y"), yg, yc, 2e-6);
            close(&format!("{act:?} n={n} dg"), gg, gc, 2e-6);
            close(&format!("{act:?} n={n} du"), ug, uc, 2e-6);
            assert!(gg[..3].iter().all(|&v| v == 0.0), "the gate's elements outside the view get no gradient");
        }
    }
}

#[test]
fn glu_errors_name_the_shapes_and_dtypes() {
    let a = Tensor::zeros(&[2, 3], DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(&[3, 2], DType::F32, &Device::Cpu).unwrap();
    let e = a.glu(&b, GluAct::Silu).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
    let c = Tensor::zeros(&[2, 3], DType::F64, &Device::Cpu).unwrap();
    let e = a.glu(&c, GluAct::Silu).unwrap_err().to_string();
    assert!(e.contains("glu") && e.to_lowercase().contains("f64"), "{e}");
    let i = Tensor::from_vec(vec![1u32, 2, 3, 4, 5, 6], &[2, 3], &Device::Cpu).unwrap();
    let e = i.glu(&i, GluAct::GeluTanh).unwrap_err().to_string();
    assert!(e.contains("glu"), "{e}");
}
