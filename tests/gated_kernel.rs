//! FineGates' gated linear `y = ((x ⊙ z_c) Wᵀ + b) ⊙ z_r` (`Tensor::gated_linear`):
//! - on the CPU, forward against float64 plain loops and the gradients of x, b, z_c, z_r
//!   against central finite differences (f64), with each of b, z_c, z_r present or absent;
//! - on the GPU (both kernel families), forward and every gradient against the CPU composition
//!   `Tensor::gated_linear_reference` on a grid of awkward shapes, f32/f16/bf16 weights,
//!   strided views and gates with closed (0) and fractional entries;
//! - a weight that requires a gradient falls back to the composition and gets `dW`;
//! - the forward is one launch, no separate pass applies a gate (dispatch counts);
//! - bad shapes, dtypes and devices are errors that name the shapes.

mod common;

use common::{check, Dom, Nd, TOL};
use tinytune::backend::gpu::MatmulKernel;
use tinytune::{DType, Device, Error, Result, Rng, Tensor};

/// Which optional operands a case has: (bias, z_c, z_r).
type Parts = (bool, bool, bool);

/// The f64 reference in plain loops; x `[.., k]`, w `[m, k]`.
fn gated_ref(x: &Nd, w: &Nd, bias: Option<&Nd>, zc: Option<&Nd>, zr: Option<&Nd>) -> Nd {
    let k = *x.shape.last().unwrap();
    let m = w.shape[0];
    let n: usize = x.shape[..x.shape.len() - 1].iter().product();
    let mut y = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            let mut v: f64 = (0..k).map(|p| x.data[i * k + p] * zc.map_or(1.0, |z| z.data[p]) * w.data[j * k + p]).sum();
            v += bias.map_or(0.0, |b| b.data[j]);
            y[i * m + j] = v * zr.map_or(1.0, |z| z.data[j]);
        }
    }
    let mut shape = x.shape[..x.shape.len() - 1].to_vec();
    shape.push(m);
    Nd::new(&shape, y)
}

fn normal_nd(shape: &[usize], seed: u64, std: f64) -> Nd {
    let mut rng = common::TestRng::new(seed);
    Nd::new(shape, (0..shape.iter().product()).map(|_| std * rng.normal()).collect())
}

fn tensor(nd: &Nd, dtype: DType) -> Tensor {
    Tensor::from_vec(nd.data.clone(), &nd.shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// The optional operands of `t` (in the order bias, z_c, z_r, those present) as options.
fn opts<T>(t: &[T], parts: Parts) -> (Option<&T>, Option<&T>, Option<&T>) {
    let mut it = t.iter();
    let mut take = |on: bool| if on { it.next() } else { None };
    let b = take(parts.0);
    let c = take(parts.1);
    let r = take(parts.2);
    (b, c, r)
}

const PARTS: [Parts; 5] = [(true, true, true), (false, true, true), (true, false, true), (true, true, false), (false, false, false)];

#[test]
fn cpu_forward_and_gradients_against_loops_and_finite_differences() {
    // (x shape, out): awkward sizes, a rank-3 input, one output, one input feature.
    let shapes: &[(&[usize], usize)] = &[(&[3, 5], 4), (&[1, 7], 3), (&[4, 1], 6), (&[5, 6], 1), (&[2, 3, 5], 4)];
    for (c, &(xs, m)) in shapes.iter().enumerate() {
        let k = *xs.last().unwrap();
        let w = normal_nd(&[m, k], 100 + c as u64, 1.0);
        let wt = tensor(&w, DType::F64);
        for parts in PARTS {
            let mut ins: Vec<&[usize]> = vec![xs];
            let (bs, ks, ms) = ([m], [k], [m]);
            if parts.0 {
                ins.push(&bs);
            }
            if parts.1 {
                ins.push(&ks);
            }
            if parts.2 {
                ins.push(&ms);
            }
            check(
                &format!("gated_linear x {xs:?} out {m} (bias, z_c, z_r) {parts:?}"),
                &ins,
                &[Dom::Normal],
                TOL,
                |t| {
                    let (b, zc, zr) = opts(&t[1..], parts);
                    t[0].gated_linear(&wt.to_dtype(t[0].dtype())?, b, zc, zr)
                },
                |v| {
                    let (b, zc, zr) = opts(&v[1..], parts);
                    gated_ref(&v[0], &w, b, zc, zr)
                },
            );
        }
    }
}

/// Closed gates (exact zeros) keep their exact gradients: `dz_r[j] = Σ_i g ⊙ pre` does not
/// divide by the gate, and `dz_c` is formed before the column gate is applied.
#[test]
fn closed_gates_get_their_gradients() {
    let (n, k, m) = (4, 6, 5);
    let (x, w, b, g) = (normal_nd(&[n, k], 1, 1.0), normal_nd(&[m, k], 2, 1.0), normal_nd(&[m], 3, 1.0), normal_nd(&[n, m], 4, 1.0));
    let zc = Nd::new(&[k], vec![0.0, 1.0, 0.5, 0.0, 0.25, 1.0]);
    let zr = Nd::new(&[m], vec![1.0, 0.0, 0.75, 0.0, 0.5]);
    for dev in std::iter::once(Device::Cpu).chain(common::gpu_device()) {
        let up = |nd: &Nd| tensor(nd, DType::F32).to_device(&dev).unwrap().requires_grad().unwrap();
        let (xt, bt, zct, zrt) = (up(&x), up(&b), up(&zc), up(&zr));
        let wt = tensor(&w, DType::F32).to_device(&dev).unwrap();
        let gt = tensor(&g, DType::F32).to_device(&dev).unwrap();
        xt.gated_linear(&wt, Some(&bt), Some(&zct), Some(&zrt)).unwrap().mul(&gt).unwrap().sum_all().unwrap().backward().unwrap();
        // By hand: pre = (x ⊙ zc) Wᵀ + b, u = (g ⊙ zr) W.
        let pre = gated_ref(&x, &w, Some(&b), Some(&zc), None);
        let dzr: Vec<f64> = (0..m).map(|j| (0..n).map(|i| g.data[i * m + j] * pre.data[i * m + j]).sum()).collect();
        let u = |i: usize, p: usize| (0..m).map(|j| g.data[i * m + j] * zr.data[j] * w.data[j * k + p]).sum::<f64>();
        let dzc: Vec<f64> = (0..k).map(|p| (0..n).map(|i| x.data[i * k + p] * u(i, p)).sum()).collect();
        let dx: Vec<f64> = (0..n * k).map(|e| u(e / k, e % k) * zc.data[e % k]).collect();
        let db: Vec<f64> = (0..m).map(|j| zr.data[j] * (0..n).map(|i| g.data[i * m + j]).sum::<f64>()).collect();
        for (what, t, want) in [("dz_r", &zrt, &dzr), ("dz_c", &zct, &dzc), ("dx", &xt, &dx), ("db", &bt, &db)] {
            common::assert_close("closed gates", &format!("{what} on {dev}"), &t.grad().unwrap().to_vec_f64().unwrap(), want, 1e-5);
        }
        assert!(dzr[1].abs() > 1e-3 && dzc[0].abs() > 1e-3, "the closed gates' gradients are not zero here");
    }
}

#[test]
fn cpu_op_takes_16_bit_and_quantised_weights() {
    let (n, k, m) = (6, 64, 9);
    let x = normal_nd(&[n, k], 1, 1.0);
    let (b, zc, zr) = (normal_nd(&[m], 2, 1.0), normal_nd(&[k], 3, 0.5), normal_nd(&[m], 4, 0.5));
    let w = tensor(&normal_nd(&[m, k], 5, 0.3), DType::F32);
    let weights = [w.to_dtype(DType::F16).unwrap(), w.to_dtype(DType::BF16).unwrap(), w.quantize(tinytune::quant::QFormat::Int8).unwrap()];
    for wq in weights {
        // The reference sees the weight as stored.
        let wnd = Nd::new(&[m, k], wq.to_vec_f64().unwrap());
        let f = |nd: &Nd| tensor(nd, DType::F32);
        let y = f(&x).gated_linear(&wq, Some(&f(&b)), Some(&f(&zc)), Some(&f(&zr))).unwrap();
        let want = gated_ref(&x, &wnd, Some(&b), Some(&zc), Some(&zr));
        common::assert_close("cpu gated_linear", &format!("forward, {:?} weight", wq.dtype()), &y.to_vec_f64().unwrap(), &want.data, 2e-5);
    }
}

/// A weight that requires a gradient (FineGates over full fine-tuning) takes the composition
/// and gets `dW = (g ⊙ z_r)ᵀ (x ⊙ z_c)`, on the CPU and on the GPU.
#[test]
fn weight_requiring_grad_falls_back_and_gets_its_gradient() {
    let (n, k, m) = (5, 7, 4);
    let (x, w, zc, zr, wts) = (
        normal_nd(&[n, k], 9, 1.0),
        normal_nd(&[m, k], 10, 1.0),
        normal_nd(&[k], 11, 1.0),
        normal_nd(&[m], 12, 1.0),
        normal_nd(&[n, m], 13, 1.0),
    );
    for dev in std::iter::once(Device::Cpu).chain(common::gpu_device()) {
        let up = |nd: &Nd| tensor(nd, DType::F32).to_device(&dev).unwrap();
        let (xt, zct, zrt, wt) = (up(&x), up(&zc).requires_grad().unwrap(), up(&zr), up(&wts));
        let w0 = up(&w).requires_grad().unwrap();
        let y = xt.gated_linear(&w0, None, Some(&zct), Some(&zrt)).unwrap();
        common::assert_close(
            "fallback",
            &format!("forward on {dev}"),
            &y.to_vec_f64().unwrap(),
            &gated_ref(&x, &w, None, Some(&zc), Some(&zr)).data,
            1e-5,
        );
        y.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
        let want: Vec<f64> = (0..m * k)
            .map(|e| (0..n).map(|i| wts.data[i * m + e / k] * zr.data[e / k] * x.data[i * k + e % k] * zc.data[e % k]).sum())
            .collect();
        common::assert_close("fallback", &format!("dW on {dev}"), &w0.grad().expect("dW").to_vec_f64().unwrap(), &want, 1e-5);
        assert!(zct.grad().is_some(), "z_c still gets its gradient on {dev}");
    }
}

#[test]
fn bad_arguments_are_errors_naming_the_shapes() {
    let f = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let (x, w, b, zc, zr) = (f(&[7, 13]), f(&[5, 13]), f(&[5]), f(&[13]), f(&[5]));
    assert!(x.gated_linear(&w, Some(&b), Some(&zc), Some(&zr)).is_ok());
    let cases: [(&str, Result<Tensor>, &[&str]); 5] = [
        ("w in", x.gated_linear(&f(&[5, 12]), None, None, None), &["w [5, 12]", "x [7, 13]"]),
        ("bias", x.gated_linear(&w, Some(&f(&[4])), None, None), &["bias [4]"]),
        ("z_c", x.gated_linear(&w, None, Some(&f(&[5])), None), &["z_c [5]", "x [7, 13]"]),
        ("z_r", x.gated_linear(&w, None, None, Some(&f(&[13]))), &["z_r [13]", "w [5, 13]"]),
        ("w rank", x.gated_linear(&f(&[5, 13, 1]), None, None, None), &["w [5, 13, 1]"]),
    ];
    for (what, r, needles) in cases {
        let e = r.expect_err(what);
        assert!(matches!(e, Error::Shape { .. }), "{what}: {e:?}");
        let msg = e.to_string();
        for n in needles {
            assert!(msg.contains(n), "{what}: {msg:?} does not name {n}");
        }
    }
    let x16 = x.to_dtype(DType::F16).unwrap();
    assert!(matches!(x16.gated_linear(&w, None, None, None), Err(Error::DType { .. })));
    assert!(matches!(x.gated_linear(&w, None, Some(&zc.to_dtype(DType::F64).unwrap()), None), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(x.gated_linear_reference(&f(&[5, 12]), None, None, None), Err(Error::Shape { .. })));
    if let Some(g) = common::gpu_device() {
        let e = x.gated_linear(&w, None, Some(&zc.to_device(&g).unwrap()), None).unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { .. }), "{e:?}");
    }
}

// ----- GPU ------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    k: usize,
    m: usize,
    w_dt: DType,
    views: bool,
    parts: Parts,
}

/// Gates in [0, 1] with about a quarter closed (exact 0) and a quarter fully open.
fn gates(len: usize, rng: &mut Rng) -> Tensor {
    Tensor::rand_uniform(&[len], -0.5, 1.5, DType::F32, &Device::Cpu, rng).unwrap().clamp(0.0, 1.0).unwrap()
}

/// `y` and the gradients of x, b, z_c, z_r under `L = Σ y ⊙ wts`, on `dev`, fused or composed.
/// With `views`, x is the transpose of its stored leaf and W a narrowed view (row stride k + 3,
/// offset 2: odd for 16-bit storage).
fn run(c: &Case, seed: u64, dev: &Device, fused: bool) -> Vec<(String, Tensor)> {
    let mut rng = Rng::new(seed);
    let rn = |shape: &[usize], std: f64, rng: &mut Rng| Tensor::randn(shape, 0.0, std, DType::F32, &Device::Cpu, rng).unwrap();
    let wk = if c.views { c.k + 3 } else { c.k };
    let x = rn(&[c.n, c.k], 1.0, &mut rng);
    let w = rn(&[c.m, wk], 1.0 / (c.k as f64).sqrt(), &mut rng).to_dtype(c.w_dt).unwrap();
    let (b, wts) = (rn(&[c.m], 1.0, &mut rng), rn(&[c.n, c.m], 1.0, &mut rng));
    let (zc, zr) = (gates(c.k, &mut rng), gates(c.m, &mut rng));
    let up = |t: &Tensor| t.to_device(dev).unwrap();
    let (x_leaf, x, w) = if c.views {
        let leaf = up(&x.t().unwrap().contiguous().unwrap()).requires_grad().unwrap();
        let x = leaf.t().unwrap();
        (leaf, x, up(&w).narrow(1, 2, c.k).unwrap())
    } else {
        let leaf = up(&x).requires_grad().unwrap();
        (leaf.clone(), leaf, up(&w))
    };
    let leaf = |t: &Tensor, on: bool| on.then(|| up(t).requires_grad().unwrap());
    let (bt, zct, zrt) = (leaf(&b, c.parts.0), leaf(&zc, c.parts.1), leaf(&zr, c.parts.2));
    let y = if fused {
        x.gated_linear(&w, bt.as_ref(), zct.as_ref(), zrt.as_ref())
    } else {
        x.gated_linear_reference(&w, bt.as_ref(), zct.as_ref(), zrt.as_ref())
    }
    .unwrap_or_else(|e| panic!("{c:?} on {dev}: {e}"));
    y.mul(&up(&wts)).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![("y".to_string(), y.detach())];
    let dx = x_leaf.grad().expect("dx");
    out.push(("dx".into(), if c.views { dx.t().unwrap() } else { dx }));
    for (name, t) in [("db", &bt), ("dz_c", &zct), ("dz_r", &zrt)] {
        if let Some(t) = t {
            out.push((name.into(), t.grad().unwrap_or_else(|| panic!("{c:?}: {name} missing"))));
        }
    }
    out
}

#[test]
fn gpu_fused_equals_the_composition_on_awkward_shapes() {
    if common::gpu_device().is_none() {
        return;
    }
    for kernel in [MatmulKernel::Registers, MatmulKernel::Tiled] {
        let g = common::gpu_with_kernel(kernel);
        let mut i = 0;
        for n in [1, 7, 33, 130] {
            for k in [13, 64, 257] {
                for m in [5, 96, 300] {
                    let parts = PARTS[i % PARTS.len()];
                    let views = i % 3 == 1;
                    let w_dt = [DType::F32, DType::F16, DType::BF16][i % 3];
                    let c = Case { n, k, m, w_dt, views, parts };
                    let (want, got) = (run(&c, i as u64, &Device::Cpu, false), run(&c, i as u64, &g, true));
                    // Shared dimensions: y over k; dx over m; db, dz_r over n; dz_c over n·m.
                    for ((name, w), (_, v)) in want.iter().zip(&got) {
                        let kd = match name.as_str() {
                            "y" => k,
                            "dx" => m,
                            "dz_c" => n * m,
                            _ => n,
                        };
                        assert_eq!(v.device(), &g, "{c:?} {name}: device");
                        common::close_product(&format!("{c:?} {name}"), w, v, kd);
                    }
                    i += 1;
                }
            }
        }
        eprintln!("{kernel:?}: {i} shapes");
    }
}

/// The forward is one launch of the gated kernel, no elementwise pass beside it; the backward
/// runs the gated kernel once for dx (z_c in its epilogue when z_c needs no gradient).
#[test]
fn gpu_launches_only_what_is_needed() {
    if common::gpu_device().is_none() {
        return;
    }
    let count = |g: &Device| -> (u64, u64, u64) {
        let Device::Gpu(d) = g else { unreachable!() };
        let c = d.kernel_counts();
        let n = |prefix: &str| c.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, c)| c.dispatches).sum::<u64>();
        (n("gated"), n("matmul"), c.iter().map(|(_, c)| c.dispatches).sum())
    };
    let (n, k, m) = (9, 20, 11);
    let mut rng = Rng::new(3);
    let cpu = |s: &[usize], rng: &mut Rng| Tensor::randn(s, 0.0, 1.0, DType::F32, &Device::Cpu, rng).unwrap();
    let (x, w, b, zc, zr) = (cpu(&[n, k], &mut rng), cpu(&[m, k], &mut rng), cpu(&[m], &mut rng), gates(k, &mut rng), gates(m, &mut rng));
    for (need_zc, dx_launches) in [(false, 1), (true, 1)] {
        let g = common::gpu_with_kernel(MatmulKernel::Registers);
        let up = |t: &Tensor| t.to_device(&g).unwrap();
        let (xt, wt, bt) = (up(&x).requires_grad().unwrap(), up(&w), up(&b));
        let zct = if need_zc { up(&zc).requires_grad().unwrap() } else { up(&zc) };
        let zrt = up(&zr).requires_grad().unwrap();
        let before = count(&g);
        let y = xt.gated_linear(&wt, Some(&bt), Some(&zct), Some(&zrt)).unwrap();
        let after = count(&g);
        assert_eq!((after.0 - before.0, after.1 - before.1, after.2 - before.2), (1, 0, 1), "forward: one gated launch and nothing else");
        y.sum_all().unwrap().backward().unwrap();
        let end = count(&g);
        assert_eq!(end.0 - after.0, dx_launches, "backward: the gated kernel once for dx (z_c needs a gradient: {need_zc})");
        assert_eq!(end.1 - after.1, 0, "backward: no plain matmul");
        assert!(xt.grad().is_some() && zrt.grad().is_some() && zct.grad().is_some() == need_zc);
    }
}
