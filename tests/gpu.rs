//! Every GPU kernel against the CPU kernel (the reference) on random data with awkward shapes:
//! sizes that are not multiples of the tiles, size 1, empty, transposed/narrowed and broadcast
//! (stride-0) inputs. Tolerances are stated per kernel (`Tol`); "exact" means bit for bit.
//!
//! The tests open the software adapter (lavapipe) explicitly, or a hardware one when there is
//! no software adapter. With no adapter at all they print that they skipped and pass — unless
//! `TINYTUNE_REQUIRE_GPU=1` (CI), then they fail.

mod common;

use tinytune::backend::gpu::MatmulKernel;
use tinytune::{CmpOp, CrossEntropyReduction, DType, Device, Error, Result, Rng, RopeLayout, Tensor};

fn gpu() -> Option<Device> {
    common::gpu_device()
}

macro_rules! gpu_or_skip {
    () => {
        match gpu() {
            Some(d) => d,
            None => return,
        }
    };
}

/// `|gpu − cpu| ≤ abs + rel·|cpu|` element-wise (NaNs must match).
#[derive(Clone, Copy, Debug)]
struct Tol {
    abs: f64,
    rel: f64,
}
const EXACT: Tol = Tol { abs: 0.0, rel: 0.0 };
/// Element-wise arithmetic: division may be 2.5 ulp on Vulkan.
const ARITH: Tol = Tol { abs: 1e-7, rel: 1e-6 };
/// Transcendentals (driver exp/log/pow, our erf/tanh), softmax, norms, rope, cross-entropy.
const TRANS: Tol = Tol { abs: 2e-6, rel: 2e-5 };

fn rnd(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, DType::F32, &Device::Cpu, &mut Rng::new(seed)).unwrap().to_device(dev).unwrap()
}

fn pos(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    Tensor::rand_uniform(shape, 0.1, 3.0, DType::F32, &Device::Cpu, &mut Rng::new(seed)).unwrap().to_device(dev).unwrap()
}

fn ids(v: &[u32], shape: &[usize], dev: &Device) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, dev).unwrap()
}

fn close(what: &str, cpu: &Tensor, gpu: &Tensor, tol: Tol) {
    assert_eq!(cpu.shape(), gpu.shape(), "{what}: shape");
    assert_eq!(cpu.dtype(), gpu.dtype(), "{what}: dtype");
    let (a, b) = (cpu.to_vec_f64().unwrap(), gpu.to_vec_f64().unwrap());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let ok = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= tol.abs + tol.rel * x.abs();
        assert!(ok, "{what}: element {i} of {:?}: cpu {x} gpu {y} (tol {tol:?})", cpu.shape());
    }
}

/// Run `f` on the CPU and on the GPU and compare.
fn check(what: &str, g: &Device, tol: Tol, f: impl Fn(&Device) -> Result<Tensor>) {
    let c = f(&Device::Cpu).unwrap_or_else(|e| panic!("{what} on cpu: {e}"));
    let r = f(g).unwrap_or_else(|e| panic!("{what} on gpu: {e}"));
    assert_eq!(r.device(), g, "{what}: result device");
    close(what, &c, &r, tol);
}

#[test]
fn device_selection_and_adapter() {
    let g = gpu_or_skip!();
    let Device::Gpu(dev) = &g else { panic!("not a gpu device") };
    let info = dev.adapter_info();
    eprintln!("adapter: {} ({:?}, {:?}), features {:?}", info.name, info.backend, info.device_type, dev.features());
    assert_ne!(format!("{:?}", info.backend), "Gl", "the GL backend must never be used");
    assert_eq!(Device::from_name("cpu").unwrap(), Device::Cpu);
    assert!(Device::from_name("tpu").is_err());
    if dev.is_software() {
        assert_eq!(Device::from_name("gpu-software").unwrap(), g, "the software device is shared");
    }
    // auto never picks a software adapter.
    let auto = Device::from_name("auto").unwrap();
    assert!(auto == Device::Cpu || matches!(&auto, Device::Gpu(d) if !d.is_software()));
}

#[test]
fn upload_download_every_dtype_and_strided_copies() {
    let g = gpu_or_skip!();
    let f: Vec<f32> = (0..35).map(|i| i as f32 * 0.37 - 5.0).collect();
    let t = Tensor::from_vec(f.clone(), &[5, 7], &g).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), f);
    let h: Vec<half::f16> = f.iter().map(|&v| half::f16::from_f32(v)).collect();
    assert_eq!(Tensor::from_vec(h.clone(), &[5, 7], &g).unwrap().to_vec::<half::f16>().unwrap(), h);
    let b: Vec<half::bf16> = f.iter().map(|&v| half::bf16::from_f32(v)).collect();
    assert_eq!(Tensor::from_vec(b.clone(), &[35], &g).unwrap().to_vec::<half::bf16>().unwrap(), b);
    let u: Vec<u32> = (0..9).map(|i| i * 1_000_003).collect();
    assert_eq!(Tensor::from_vec(u.clone(), &[9], &g).unwrap().to_vec::<u32>().unwrap(), u);
    let s: Vec<i32> = (0..9).map(|i| i * -77 + 3).collect();
    assert_eq!(Tensor::from_vec(s.clone(), &[3, 3], &g).unwrap().to_vec::<i32>().unwrap(), s);
    // Strided views: transpose, narrow (odd offsets of 16-bit data), broadcast, empty.
    for dt in [DType::F32, DType::F16, DType::BF16, DType::I32] {
        check(&format!("transpose {dt:?}"), &g, EXACT, |d| rnd(&[5, 7], 1, d).to_dtype(dt)?.t()?.contiguous());
        check(&format!("narrow {dt:?}"), &g, EXACT, |d| rnd(&[5, 7], 2, d).to_dtype(dt)?.narrow(1, 1, 3)?.contiguous());
        check(&format!("narrow read {dt:?}"), &g, EXACT, |d| rnd(&[5, 7], 2, d).to_dtype(dt)?.narrow(0, 1, 1)?.narrow(1, 3, 3));
        check(&format!("broadcast {dt:?}"), &g, EXACT, |d| rnd(&[3, 1], 3, d).to_dtype(dt)?.broadcast_to(&[2, 3, 4])?.contiguous());
    }
    check("empty", &g, EXACT, |d| rnd(&[0, 3], 4, d).t()?.contiguous());
    check("zeros", &g, EXACT, |d| Tensor::zeros(&[3, 5], DType::F32, d));
    check("full f16", &g, EXACT, |d| Tensor::full(&[7], 2.5, DType::F16, d));
    check("full i32", &g, EXACT, |d| Tensor::full(&[3], -4.0, DType::I32, d));
}

#[test]
fn casts_between_every_dtype_pair() {
    let g = gpu_or_skip!();
    let dts = [DType::F32, DType::F16, DType::BF16, DType::U32, DType::I32];
    let vals: Vec<f32> = vec![0.0, -0.0, 1.0, -1.5, 2.75, 1e-6, 7e-8, -65504.0, 70000.0, 0.1, 123.456, 3.0e9, -3.0e9, 1.0 / 3.0, 2049.0];
    for &from in &dts {
        for &to in &dts {
            check(&format!("cast {from:?} -> {to:?}"), &g, EXACT, |d| {
                Tensor::from_vec(vals.clone(), &[vals.len()], d)?.to_dtype(from)?.to_dtype(to)
            });
        }
    }
    // Strided source.
    check("cast transposed f32 -> f16", &g, EXACT, |d| rnd(&[3, 5], 9, d).t()?.to_dtype(DType::F16));
}

#[test]
fn unary_ops() {
    let g = gpu_or_skip!();
    type Op = fn(&Tensor) -> Result<Tensor>;
    let any: Vec<(&str, Op)> = vec![
        ("neg", |t| t.neg()),
        ("exp", |t| t.exp()),
        ("sqr", |t| t.sqr()),
        ("abs", |t| t.abs()),
        ("sign", |t| t.sign()),
        ("tanh", |t| t.tanh()),
        ("sigmoid", |t| t.sigmoid()),
        ("erf", |t| t.erf()),
        ("relu", |t| t.relu()),
        ("gelu", |t| t.gelu()),
        ("gelu_tanh", |t| t.gelu_tanh()),
        ("silu", |t| t.silu()),
        ("powf 3", |t| t.powf(3.0)),
        ("powf 2", |t| t.powf(2.0)),
        ("affine", |t| t.affine(-1.5, 0.25)),
        ("clamp", |t| t.clamp(-0.5, 0.7)),
        ("gt", |t| t.gt_scalar(0.1)),
        ("le", |t| t.le_scalar(-0.2)),
        ("eq", |t| t.eq_scalar(0.0)),
        ("ne", |t| t.ne_scalar(0.0)),
        ("recip", |t| t.recip()),
    ];
    let positive: Vec<(&str, Op)> = vec![
        ("log", |t| t.log()),
        ("sqrt", |t| t.sqrt()),
        ("rsqrt", |t| t.rsqrt()),
        ("powf 0.5", |t| t.powf(0.5)),
        ("powf -1.3", |t| t.powf(-1.3)),
    ];
    for (name, f) in any {
        check(name, &g, TRANS, |d| f(&rnd(&[37, 11], 5, d).affine(3.0, 0.0)?.t()?));
        check(&format!("{name} 1"), &g, TRANS, |d| f(&rnd(&[1], 6, d)));
    }
    for (name, f) in positive {
        check(name, &g, TRANS, |d| f(&pos(&[13, 29], 7, d).narrow(1, 3, 20)?));
    }
    // Special values.
    check("specials", &g, TRANS, |d| {
        let x = Tensor::from_vec(vec![0.0f32, -0.0, 1e-30, -20.0, 20.0, 90.0, -90.0], &[7], d)?;
        Tensor::concat(&[&x.tanh()?, &x.sigmoid()?, &x.erf()?, &x.sign()?, &x.gelu()?, &x.silu()?], 0)
    });
}

#[test]
fn binary_ops_with_broadcast_and_strides() {
    let g = gpu_or_skip!();
    type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;
    let ops: Vec<(&str, Op)> = vec![
        ("add", |a, b| a.add(b)),
        ("sub", |a, b| a.sub(b)),
        ("mul", |a, b| a.mul(b)),
        ("div", |a, b| a.div(b)),
        ("max", |a, b| a.maximum(b)),
        ("min", |a, b| a.minimum(b)),
        ("lt", |a, b| a.cmp(b, CmpOp::Lt)),
        ("ge", |a, b| a.cmp(b, CmpOp::Ge)),
        ("eq", |a, b| a.cmp(b, CmpOp::Eq)),
    ];
    for (name, f) in ops {
        check(&format!("{name} broadcast"), &g, ARITH, |d| f(&rnd(&[3, 1, 5], 1, d), &rnd(&[4, 1], 2, d)));
        check(&format!("{name} transposed"), &g, ARITH, |d| f(&rnd(&[6, 9], 3, d).t()?, &rnd(&[9, 6], 4, d)));
        check(&format!("{name} scalar"), &g, ARITH, |d| f(&rnd(&[], 5, d), &rnd(&[2, 3], 6, d)));
        check(&format!("{name} same"), &g, ARITH, |d| {
            let x = rnd(&[300], 7, d);
            f(&x, &x)
        });
    }
}

#[test]
fn where_and_masked_fill() {
    let g = gpu_or_skip!();
    check("where", &g, EXACT, |d| {
        let c = rnd(&[4, 1, 6], 1, d).gt_scalar(0.0)?;
        Tensor::where_cond(&c, &rnd(&[5, 6], 2, d), &rnd(&[4, 5, 1], 3, d))
    });
    check("where u32 cond", &g, EXACT, |d| {
        let c = ids(&[0, 3, 0, 1, 7, 0], &[6], d);
        Tensor::where_cond(&c, &rnd(&[6], 2, d), &rnd(&[6], 3, d))
    });
    check("masked_fill", &g, EXACT, |d| rnd(&[7, 3], 4, d).masked_fill(&rnd(&[3], 5, d).lt_scalar(0.0)?, -1e9));
    check("mask_to_bias", &g, EXACT, |d| Tensor::causal_mask(5, 7, DType::F32, d)?.mask_to_bias());
}

#[test]
fn reductions_along_every_axis() {
    let g = gpu_or_skip!();
    let sum_tol = Tol { abs: 1e-5, rel: 1e-5 };
    for shape in [vec![3, 70, 5], vec![1, 1, 1], vec![2, 1, 129]] {
        for ax in 0..3isize {
            check(&format!("sum {shape:?} {ax}"), &g, sum_tol, |d| rnd(&shape, 1, d).sum(&[ax], false));
            check(&format!("sum transposed {shape:?} {ax}"), &g, sum_tol, |d| rnd(&shape, 1, d).permute(&[2, 0, 1])?.sum(&[ax], true));
            check(&format!("max {shape:?} {ax}"), &g, EXACT, |d| rnd(&shape, 2, d).max(ax, false));
            check(&format!("min {shape:?} {ax}"), &g, EXACT, |d| rnd(&shape, 3, d).t()?.min(ax, true));
            check(&format!("argmax {shape:?} {ax}"), &g, EXACT, |d| rnd(&shape, 4, d).argmax(ax, false));
            check(&format!("argmin {shape:?} {ax}"), &g, EXACT, |d| rnd(&shape, 5, d).argmin(ax, false));
        }
    }
    // Ties go to the first index; a broadcast input.
    check("argmax ties", &g, EXACT, |d| Tensor::from_vec(vec![1.0f32, 3.0, 3.0, 0.0, 3.0], &[5], d)?.argmax(0, false));
    check("sum broadcast", &g, sum_tol, |d| rnd(&[4, 1], 6, d).broadcast_to(&[4, 300])?.sum(&[1], false));
    check("mean all", &g, sum_tol, |d| rnd(&[17, 33], 7, d).mean_all());
}

#[test]
fn matmul_tiles_batches_and_transposes() {
    gpu_or_skip!();
    // Both kernels, each on a device of its own.
    for kernel in [MatmulKernel::Tiled, MatmulKernel::Registers] {
        let dev = common::own_gpu();
        dev.set_matmul_kernel(kernel);
        eprintln!("matmul kernel {kernel:?}");
        matmul_cases(&Device::Gpu(dev));
    }
}

fn matmul_cases(g: &Device) {
    let g = g.clone();
    let tol = |k: usize| Tol { abs: 2e-6 * k as f64, rel: 2e-5 };
    for (m, k, n) in [(1, 1, 1), (33, 17, 45), (5, 64, 7), (32, 32, 32), (1, 100, 3), (70, 3, 1)] {
        check(&format!("matmul {m}x{k}x{n}"), &g, tol(k), |d| rnd(&[m, k], 1, d).matmul(&rnd(&[k, n], 2, d)));
        check(&format!("matmul A^T {m}x{k}x{n}"), &g, tol(k), |d| rnd(&[k, m], 3, d).t()?.matmul(&rnd(&[k, n], 4, d)));
        check(&format!("matmul B^T {m}x{k}x{n}"), &g, tol(k), |d| rnd(&[m, k], 5, d).matmul(&rnd(&[n, k], 6, d).t()?));
    }
    check("batched", &g, tol(13), |d| rnd(&[3, 2, 9, 13], 7, d).matmul(&rnd(&[3, 2, 13, 6], 8, d)));
    check("broadcast batch", &g, tol(13), |d| rnd(&[4, 9, 13], 9, d).matmul(&rnd(&[13, 6], 10, d)));
    check("batched both transposed", &g, tol(20), |d| {
        rnd(&[2, 20, 9], 11, d).transpose(1, 2)?.matmul(&rnd(&[2, 6, 20], 12, d).transpose(1, 2)?)
    });
    check("k = 0", &g, EXACT, |d| rnd(&[3, 0], 13, d).matmul(&rnd(&[0, 4], 14, d)));
}

#[test]
fn softmax_and_log_softmax() {
    let g = gpu_or_skip!();
    for shape in [vec![7, 200], vec![3, 1], vec![1, 65], vec![2, 3, 70]] {
        check(&format!("softmax {shape:?}"), &g, TRANS, |d| rnd(&shape, 1, d).affine(4.0, 0.0)?.softmax(-1));
        check(&format!("log_softmax {shape:?}"), &g, TRANS, |d| rnd(&shape, 2, d).affine(4.0, 0.0)?.log_softmax(-1));
        check(&format!("softmax axis 0 {shape:?}"), &g, TRANS, |d| rnd(&shape, 3, d).softmax(0));
    }
}

/// Gradients of `loss(inputs)` wrt every input, on both devices.
fn grads(g: &Device, tol: Tol, what: &str, inputs: &[(Vec<usize>, u64)], loss: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let run = |d: &Device| -> Vec<Option<Tensor>> {
        let leaves: Vec<Tensor> = inputs.iter().map(|(s, seed)| rnd(s, *seed, d).requires_grad().unwrap()).collect();
        let l = loss(&leaves).unwrap_or_else(|e| panic!("{what} on {d}: {e}"));
        l.backward().unwrap_or_else(|e| panic!("{what} backward on {d}: {e}"));
        let mut out = vec![Some(l)];
        out.extend(leaves.iter().map(|t| t.grad()));
        out
    };
    let (c, r) = (run(&Device::Cpu), run(g));
    for (i, (c, r)) in c.iter().zip(&r).enumerate() {
        let name = format!("{what}: {}", if i == 0 { "loss".to_string() } else { format!("grad {}", i - 1) });
        match (c, r) {
            (Some(c), Some(r)) => close(&name, c, r, tol),
            (None, None) => {}
            _ => panic!("{name}: a gradient on one device only"),
        }
    }
}

#[test]
fn layer_and_rms_norm_forward_and_backward() {
    let g = gpu_or_skip!();
    let tol = Tol { abs: 1e-5, rel: 1e-4 };
    for d in [1usize, 7, 130] {
        check(&format!("layer_norm d={d}"), &g, tol, |dev| {
            rnd(&[5, d], 1, dev).layer_norm(Some(&rnd(&[d], 2, dev)), Some(&rnd(&[d], 3, dev)), 1e-5)
        });
        check(&format!("rms_norm d={d}"), &g, tol, |dev| rnd(&[5, d], 1, dev).t()?.t()?.rms_norm(Some(&rnd(&[d], 2, dev)), 1e-6));
        check(&format!("layer_norm no affine d={d}"), &g, tol, |dev| rnd(&[d, 3], 1, dev).t()?.layer_norm(None, None, 1e-5));
        let w = rnd(&[9, d], 9, &Device::Cpu);
        let wv = w.to_vec::<f32>().unwrap();
        grads(&g, tol, &format!("layer_norm grads d={d}"), &[(vec![9, d], 4), (vec![d], 5), (vec![d], 6)], |t| {
            let ww = Tensor::from_vec(wv.clone(), &[9, d], t[0].device())?;
            t[0].layer_norm(Some(&t[1]), Some(&t[2]), 1e-5)?.mul(&ww)?.sum_all()
        });
        grads(&g, tol, &format!("rms_norm grads d={d}"), &[(vec![d, 4], 7), (vec![d], 8)], |t| {
            let ww = Tensor::from_vec(wv.clone(), &[9, d], t[0].device())?.narrow(0, 0, 4)?;
            t[0].t()?.rms_norm(Some(&t[1]), 1e-6)?.mul(&ww)?.sum_all()
        });
    }
}

#[test]
fn index_select_embedding_gather_scatter() {
    let g = gpu_or_skip!();
    check("index_select axis 0", &g, EXACT, |d| rnd(&[6, 5], 1, d).index_select(0, &ids(&[5, 0, 5, 2], &[4], d)));
    check("index_select axis 1 transposed", &g, EXACT, |d| rnd(&[6, 5], 2, d).t()?.index_select(1, &ids(&[1, 1, 3], &[3], d)));
    check("index_select f16", &g, EXACT, |d| rnd(&[6, 5], 3, d).to_dtype(DType::F16)?.index_select(0, &ids(&[4, 1], &[2], d)));
    check("index_select i32 idx", &g, EXACT, |d| rnd(&[4, 3], 4, d).index_select(0, &Tensor::from_vec(vec![3i32, 0, 3], &[3], d)?));
    check("embedding", &g, EXACT, |d| rnd(&[10, 4], 5, d).embedding(&ids(&[1, 9, 9, 0, 3, 1], &[2, 3], d)));
    check("gather", &g, EXACT, |d| rnd(&[4, 7], 6, d).gather(1, &ids(&[0, 6, 6, 2, 1, 1, 5, 0], &[4, 2], d)));
    check("gather axis 0 transposed", &g, EXACT, |d| rnd(&[7, 4], 7, d).t()?.gather(0, &ids(&[0, 1, 2, 3, 3, 2, 1], &[1, 7], d)));
    // The adjoints through autograd: duplicate indices accumulate in the CPU's order (exact).
    for (what, idx) in [("index_add", vec![2u32, 0, 2, 2, 5]), ("index_add one", vec![1])] {
        let n = idx.len();
        let idx2 = idx.clone();
        grads(&g, EXACT, what, &[(vec![6, 3], 8)], move |t| {
            let w = Tensor::from_vec((0..n * 3).map(|i| i as f32 * 0.5 - 1.0).collect::<Vec<_>>(), &[n, 3], t[0].device())?;
            t[0].index_select(0, &Tensor::from_vec(idx2.clone(), &[n], t[0].device())?)?.mul(&w)?.sum_all()
        });
    }
    grads(&g, EXACT, "scatter_add", &[(vec![3, 5], 9)], |t| {
        let idx = Tensor::from_vec(vec![4u32, 4, 0, 1, 4, 4, 2, 2], &[2, 4], t[0].device())?;
        let w = Tensor::from_vec((0..8).map(|i| i as f32 - 2.5).collect::<Vec<_>>(), &[2, 4], t[0].device())?;
        t[0].gather(1, &idx)?.mul(&w)?.sum_all()
    });
    let e = Tensor::from_vec(vec![1.0f32; 4], &[2, 2], &g).unwrap().index_select(0, &ids(&[2], &[1], &g));
    assert!(matches!(e, Err(Error::IndexOutOfRange { .. })), "{e:?}");
}

#[test]
fn concat_parts() {
    let g = gpu_or_skip!();
    check("concat axis 1", &g, EXACT, |d| {
        Tensor::concat(&[&rnd(&[3, 2], 1, d), &rnd(&[5, 3], 2, d).t()?.narrow(1, 0, 1)?, &rnd(&[3, 4], 3, d)], 1)
    });
    check("concat axis 0 f16", &g, EXACT, |d| {
        Tensor::concat(&[&rnd(&[1, 3], 4, d).to_dtype(DType::F16)?, &rnd(&[2, 3], 5, d).to_dtype(DType::F16)?], 0)
    });
    check("concat u32", &g, EXACT, |d| Tensor::concat(&[&ids(&[1, 2, 3], &[3], d), &ids(&[9], &[1], d)], 0));
}

#[test]
fn rope_both_layouts_and_inverse() {
    let g = gpu_or_skip!();
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        check(&format!("rope {layout:?}"), &g, TRANS, |d| {
            let (c, s) = Tensor::rope_tables(3, 5, 8, 10000.0, DType::F32, d)?;
            rnd(&[2, 3, 5, 8], 1, d).rope(&c, &s, layout)
        });
        check(&format!("rope transposed {layout:?}"), &g, TRANS, |d| {
            let (c, s) = Tensor::rope_tables(0, 5, 6, 10000.0, DType::F32, d)?;
            rnd(&[5, 2, 6], 2, d).transpose(0, 1)?.rope(&c, &s, layout)
        });
        grads(&g, TRANS, &format!("rope grads {layout:?}"), &[(vec![3, 4, 6], 3), (vec![3, 4, 6], 4)], move |t| {
            let (c, s) = Tensor::rope_tables(0, 4, 6, 100.0, DType::F32, t[0].device())?;
            t[0].rope(&c, &s, layout)?.mul(&t[1])?.sum_all()
        });
    }
}

#[test]
fn cross_entropy_forward_and_backward() {
    let g = gpu_or_skip!();
    let targets = [3u32, 0, 99, 7, 3, 1];
    for red in [CrossEntropyReduction::None, CrossEntropyReduction::Mean, CrossEntropyReduction::Sum] {
        grads(&g, TRANS, &format!("cross_entropy {red:?}"), &[(vec![6, 100], 1)], move |t| {
            let y = Tensor::from_vec(targets.to_vec(), &[6], t[0].device())?;
            let l = t[0].affine(3.0, 0.0)?.cross_entropy(&y, -100, red)?;
            if l.rank() == 0 {
                Ok(l)
            } else {
                l.mul(&Tensor::from_vec(vec![1.0f32, -2.0, 0.5, 3.0, 1.0, 0.25], &[6], l.device())?)?.sum_all()
            }
        });
    }
    grads(&g, TRANS, "cross_entropy ignore, i32, transposed", &[(vec![9, 4], 2)], |t| {
        let y = Tensor::from_vec(vec![2i32, -100, 0, 8], &[4], t[0].device())?;
        t[0].t()?.cross_entropy(&y, -100, CrossEntropyReduction::Mean)
    });
    let bad = rnd(&[2, 3], 3, &g).cross_entropy(&ids(&[0, 3], &[2], &g), -100, CrossEntropyReduction::Sum);
    assert!(matches!(bad, Err(Error::IndexOutOfRange { .. })), "{bad:?}");
}

#[test]
fn random_streams_match_the_cpu() {
    let g = gpu_or_skip!();
    for n in [1usize, 3, 4, 5, 1000, 4099] {
        check(&format!("uniform {n}"), &g, EXACT, |d| {
            Tensor::rand_uniform(&[n], 0.0, 1.0, DType::F32, d, &mut Rng { seed: 0x1234_5678_9abc, offset: 77 })
        });
        check(&format!("uniform range {n}"), &g, Tol { abs: 1e-6, rel: 1e-6 }, |d| {
            Tensor::rand_uniform(&[n], -2.0, 5.0, DType::F32, d, &mut Rng { seed: 5, offset: u64::MAX - 3 })
        });
        check(&format!("normal {n}"), &g, Tol { abs: 2e-5, rel: 2e-5 }, |d| Tensor::randn(&[n], 1.0, 2.0, DType::F32, d, &mut Rng::new(9)));
    }
    check("uniform bf16", &g, Tol { abs: 0.0, rel: 1e-2 }, |d| Tensor::rand_uniform(&[33], 0.0, 1.0, DType::BF16, d, &mut Rng::new(3)));
    // Dropout masks are the same bits on both devices.
    for p in [0.1, 0.5, 0.9] {
        check(&format!("dropout {p}"), &g, EXACT, |d| Tensor::ones(&[37, 29], DType::F32, d)?.dropout(p, true, &mut Rng::new(42)));
    }
}

#[test]
fn mlp_gradients_match_the_cpu() {
    let g = gpu_or_skip!();
    let tol = Tol { abs: 1e-5, rel: 1e-4 };
    let inputs = [(vec![8, 16], 1), (vec![16, 32], 2), (vec![32], 3), (vec![32], 4), (vec![32], 5), (vec![32, 10], 6), (vec![10], 7)];
    grads(&g, tol, "mlp", &inputs, |t| {
        let (x, w1, b1, ln_w, ln_b, w2, b2) = (&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6]);
        let h = x.matmul(&w1.affine(0.25, 0.0)?)?.add(b1)?.layer_norm(Some(ln_w), Some(ln_b), 1e-5)?.gelu()?;
        let logits = h.matmul(&w2.affine(0.2, 0.0)?)?.add(b2)?;
        let y = Tensor::from_vec(vec![0u32, 1, 2, 3, 4, 5, 6, 9], &[8], x.device())?;
        let ce = logits.cross_entropy(&y, -100, CrossEntropyReduction::Mean)?;
        let p = logits.softmax(-1)?.max(-1, false)?.mean_all()?;
        let r = h.rms_norm(None, 1e-6)?.silu()?.sqr()?.mean_all()?;
        ce.add(&p)?.add(&r.affine(0.1, 0.0)?)
    });
}

#[test]
fn memory_is_counted_and_limits_are_errors() {
    gpu_or_skip!();
    let dev = common::own_gpu();
    let d = Device::Gpu(dev.clone());
    let s0 = dev.memory_stats();
    assert_eq!(s0.live_bytes, 0);
    let a = Tensor::zeros(&[1000], DType::F32, &d).unwrap();
    let s1 = dev.memory_stats();
    assert!(s1.live_bytes >= 4000 && s1.live_bytes <= 5000, "{s1:?}");
    drop(a);
    let s2 = dev.memory_stats();
    assert_eq!(s2.live_bytes, 0);
    assert!(s2.pooled_bytes >= 4000 && s2.peak_bytes >= 4000, "{s2:?}");
    let _b = Tensor::zeros(&[990], DType::F32, &d).unwrap();
    assert_eq!(dev.memory_stats().reuses, 1, "same size class reused");
    assert_eq!(dev.memory_stats().allocations, s1.allocations);
    // Too big for one binding: an error, not a panic.
    let limit = dev.limits().max_storage_buffer_binding_size.min(dev.limits().max_buffer_size);
    let big = Tensor::zeros(&[(limit / 4 + 1) as usize], DType::F32, &d);
    assert!(matches!(big, Err(Error::GpuAllocation { .. })), "{big:?}");
    // Mixed devices and f64 are errors.
    let c = Tensor::zeros(&[3], DType::F32, &Device::Cpu).unwrap();
    let m = Tensor::zeros(&[3], DType::F32, &d).unwrap().add(&c);
    assert!(matches!(m, Err(Error::DeviceMismatch { .. })), "{m:?}");
    let f = Tensor::zeros(&[3], DType::F64, &d);
    assert!(matches!(f, Err(Error::Unsupported { .. })), "{f:?}");
    // Traffic counters: one broadcast add of 1000 elements reads 2·1000 and writes 1000 words.
    let x = Tensor::ones(&[10, 100], DType::F32, &d).unwrap().add(&Tensor::ones(&[100], DType::F32, &d).unwrap()).unwrap();
    let counts = dev.kernel_counts();
    let bin = counts.iter().find(|(k, _)| *k == "binary").expect("binary counted").1;
    assert_eq!((bin.dispatches, bin.bytes_read, bin.bytes_written), (1, 8000, 4000));
    // Unique bytes: each bound buffer once — the [100] row is requested 10 times, read once.
    assert_eq!((bin.unique_read, bin.unique_written), (4400, 4000));
    assert!(counts.iter().any(|(k, c)| *k == "fill" && c.dispatches >= 2), "{counts:?}");
    drop(x);
    // A product's tiles re-read its operands; its unique bytes are the operands and the output.
    // (requested read, unique read, unique written, dispatches) of the matmul kernels so far.
    let matmul_totals = || {
        dev.kernel_counts()
            .iter()
            .filter(|(n, _)| n.starts_with("matmul"))
            .fold((0, 0, 0, 0), |s, (_, c)| (s.0 + c.bytes_read, s.1 + c.unique_read, s.2 + c.unique_written, s.3 + c.dispatches))
    };
    let was = matmul_totals();
    let (a, b) = (Tensor::ones(&[64, 48], DType::F32, &d).unwrap(), Tensor::ones(&[48, 80], DType::F32, &d).unwrap());
    let y = a.matmul(&b).unwrap();
    let now = matmul_totals();
    assert_eq!(now.3 - was.3, 1, "one product launch");
    assert_eq!((now.1 - was.1, now.2 - was.2), (4 * (64 * 48 + 48 * 80), 4 * 64 * 80));
    assert!(now.0 - was.0 > now.1 - was.1, "the tiles re-read the operands");
    drop(y);
    // A lost device: errors from then on, no hang.
    dev.destroy();
    let lost = Tensor::zeros(&[3], DType::F32, &d).and_then(|t| t.to_vec::<f32>());
    assert!(matches!(lost, Err(Error::DeviceLost(_))), "{lost:?}");
}

#[test]
fn fused_adamw_step_matches_the_cpu() {
    use tinytune::backend::{AdamWStep, CpuStorage, Storage};
    use tinytune::layout::Layout;
    let g = gpu_or_skip!();
    let n = 1000;
    let host = |seed: u64, scale: f32| -> Vec<f32> {
        let t = rnd(&[n], seed, &Device::Cpu);
        t.to_vec::<f32>().unwrap().iter().map(|x| x * scale).collect()
    };
    let (p, gr, m) = (host(1, 1.0), host(2, 0.1), host(3, 0.01));
    let v: Vec<f32> = host(4, 0.01).iter().map(|x| x * x).collect();
    let h = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 7 };
    let run = |d: &Device| -> Vec<Vec<f32>> {
        let up = |x: &Vec<f32>| Storage::from_cpu(d, CpuStorage::F32(x.clone())).unwrap();
        // The parameter is read through a transposed layout of a [40, 25] buffer.
        let pl = Layout::contiguous(&[40, 25]).transpose(0, 1).unwrap();
        let gl = Layout::contiguous(&[25, 40]);
        let (po, mo, vo) = up(&p).adamw_step(&pl, &up(&gr), &gl, &up(&m), &up(&v), &h).unwrap();
        [po, mo, vo]
            .iter()
            .map(|s| match s.to_cpu(&Layout::contiguous(&[n])).unwrap() {
                CpuStorage::F32(x) => x,
                o => panic!("{o:?}"),
            })
            .collect()
    };
    let (c, r) = (run(&Device::Cpu), run(&g));
    for (k, (c, r)) in c.iter().zip(&r).enumerate() {
        for (i, (a, b)) in c.iter().zip(r).enumerate() {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-3), "adamw output {k} element {i}: cpu {a} gpu {b}");
        }
    }
}

#[test]
fn empty_and_degenerate_shapes() {
    let g = gpu_or_skip!();
    check("softmax of no rows", &g, EXACT, |d| rnd(&[0, 5], 1, d).softmax(-1));
    check("sum over an empty axis", &g, EXACT, |d| rnd(&[3, 0], 2, d).sum(&[1], false));
    check("matmul m = 0", &g, EXACT, |d| rnd(&[0, 4], 3, d).matmul(&rnd(&[4, 2], 4, d)));
    check("binary empty", &g, EXACT, |d| rnd(&[2, 0, 3], 5, d).add(&rnd(&[3], 6, d)));
    check("layer_norm no rows", &g, EXACT, |d| rnd(&[0, 8], 7, d).layer_norm(None, None, 1e-5));
    check("index_select none", &g, EXACT, |d| rnd(&[4, 3], 8, d).index_select(0, &ids(&[], &[0], d)));
    check("rank 0 unary", &g, TRANS, |d| rnd(&[], 9, d).exp());
    check("rank 0 sum", &g, EXACT, |d| rnd(&[], 10, d).sum_all());
    check("size-1 axes with odd strides", &g, EXACT, |d| {
        rnd(&[1, 5, 1], 11, d).permute(&[2, 1, 0])?.broadcast_to(&[3, 5, 1])?.contiguous()
    });
}

#[test]
fn many_ops_batch_and_pool_reuse() {
    // More than one batch of recorded passes between sync points, with buffers freed and
    // reused from the pool while earlier passes are still unsubmitted.
    let g = gpu_or_skip!();
    check("long chain", &g, TRANS, |d| {
        let mut x = rnd(&[33, 17], 1, d);
        for i in 0..150 {
            x = x.mul_scalar(0.99)?.add(&rnd(&[17], 100 + i, d))?.tanh()?;
        }
        Ok(x)
    });
}

#[test]
fn matmul_with_16_bit_weights_dequantised_in_the_kernel() {
    use tinytune::backend::Storage;
    use tinytune::layout::Layout;
    gpu_or_skip!();
    for kernel in [MatmulKernel::Tiled, MatmulKernel::Registers] {
        let dev = common::own_gpu();
        dev.set_matmul_kernel(kernel);
        let g = Device::Gpu(dev);
        for dt in [DType::F16, DType::BF16] {
            let (x, w) = (rnd(&[9, 21], 1, &Device::Cpu), rnd(&[7, 21], 2, &Device::Cpu).to_dtype(dt).unwrap());
            // Reference: the weight converted to f32 on the CPU, x · wᵀ.
            let want = x.matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            let up = |t: &Tensor| Storage::from_cpu(&g, to_host(t)).unwrap();
            let (xs, ws) = (up(&x), up(&w));
            let wl = Layout::contiguous(&[7, 21]).transpose(0, 1).unwrap();
            let out = xs.matmul(&Layout::contiguous(&[9, 21]), &ws, &wl).unwrap();
            let got = Tensor::from_vec(
                match out.to_cpu(&Layout::contiguous(&[9, 7])).unwrap() {
                    tinytune::backend::CpuStorage::F32(v) => v,
                    o => panic!("{o:?}"),
                },
                &[9, 7],
                &Device::Cpu,
            )
            .unwrap();
            close(&format!("matmul x · {dt:?}ᵀ ({kernel:?})"), &want, &got, Tol { abs: 1e-5, rel: 1e-5 });
        }
    }
}

fn to_host(t: &Tensor) -> tinytune::backend::CpuStorage {
    use tinytune::backend::CpuStorage;
    match t.dtype() {
        DType::F32 => CpuStorage::F32(t.to_vec().unwrap()),
        DType::F16 => CpuStorage::F16(t.to_vec().unwrap()),
        DType::BF16 => CpuStorage::BF16(t.to_vec().unwrap()),
        d => panic!("{d:?}"),
    }
}

#[test]
fn gradients_of_elementwise_reduction_and_view_ops() {
    let g = gpu_or_skip!();
    let tol = Tol { abs: 1e-5, rel: 1e-4 };
    type Op = fn(&Tensor) -> Result<Tensor>;
    let unary: Vec<(&str, Op)> = vec![
        ("exp", |t| t.exp()),
        ("tanh", |t| t.tanh()),
        ("sigmoid", |t| t.sigmoid()),
        ("erf", |t| t.erf()),
        ("gelu", |t| t.gelu()),
        ("gelu_tanh", |t| t.gelu_tanh()),
        ("silu", |t| t.silu()),
        ("relu", |t| t.relu()),
        ("abs", |t| t.abs()),
        ("sqr", |t| t.sqr()),
        ("log", |t| t.sqr()?.add_scalar(0.5)?.log()),
        ("sqrt", |t| t.sqr()?.add_scalar(0.5)?.sqrt()),
        ("rsqrt", |t| t.sqr()?.add_scalar(0.5)?.rsqrt()),
        ("recip", |t| t.sqr()?.add_scalar(0.5)?.recip()),
        ("powf", |t| t.sqr()?.add_scalar(0.5)?.powf(1.7)),
        ("clamp", |t| t.clamp(-0.3, 0.4)),
        ("softmax axis 0", |t| t.softmax(0)),
        ("log_softmax", |t| t.log_softmax(-1)),
        ("max", |t| t.max(1, false)),
        ("min", |t| t.min(0, true)),
        ("mean", |t| t.mean(&[0], false)),
        ("transpose+narrow", |t| t.t()?.narrow(0, 1, 3)?.contiguous()),
        ("concat+split", |t| Tensor::concat(&[&t.narrow(1, 0, 2)?, &t.exp()?.narrow(1, 2, 3)?], 1)),
    ];
    for (name, f) in unary {
        grads(&g, tol, name, &[(vec![6, 5], 1), (vec![6, 5], 2)], move |t| {
            let y = f(&t[0])?;
            // A random cotangent of y's shape, made from the second input.
            let w = t[1]
                .detach()
                .flatten_all()?
                .narrow(0, 0, y.numel())?
                .reshape(&y.shape().iter().map(|&d| d as isize).collect::<Vec<_>>())?;
            y.mul(&w)?.sum_all()
        });
    }
    type Bin = fn(&Tensor, &Tensor) -> Result<Tensor>;
    let binary: Vec<(&str, Bin)> = vec![
        ("add", |a, b| a.add(b)),
        ("sub", |a, b| a.sub(b)),
        ("mul", |a, b| a.mul(b)),
        ("div", |a, b| a.div(&b.sqr()?.add_scalar(1.0)?)),
        ("maximum", |a, b| a.maximum(b)),
        ("minimum", |a, b| a.minimum(b)),
        ("matmul", |a, b| a.matmul(&b.t()?)),
    ];
    for (name, f) in binary {
        // Broadcast: [4, 1, 3] with [5, 3] → [4, 5, 3]; the gradients are summed back.
        grads(&g, tol, &format!("{name} broadcast"), &[(vec![4, 1, 3], 3), (vec![5, 3], 4)], move |t| f(&t[0], &t[1])?.sqr()?.sum_all());
    }
}

#[test]
fn matmul_batch_beyond_one_launch() {
    let g = gpu_or_skip!();
    // 70000 tiny products: more batches than one launch may have workgroups along z.
    check("batch 70000", &g, Tol { abs: 1e-6, rel: 1e-5 }, |d| rnd(&[70000, 1, 2], 1, d).matmul(&rnd(&[70000, 2, 1], 2, d)));
}

#[test]
fn a_few_training_steps_follow_the_cpu() {
    // SGD on a small MLP classifier: the loss curve on the GPU follows the CPU's.
    let g = gpu_or_skip!();
    let train = |d: &Device| -> Vec<f64> {
        let x = rnd(&[32, 12], 1, d);
        let y = Tensor::from_vec((0..32u32).map(|i| i % 5).collect::<Vec<_>>(), &[32], d).unwrap();
        let w1 = rnd(&[12, 24], 2, d).mul_scalar(0.3).unwrap().requires_grad().unwrap();
        let w2 = rnd(&[24, 5], 3, d).mul_scalar(0.3).unwrap().requires_grad().unwrap();
        let mut rng = Rng::new(7);
        (0..8)
            .map(|_| {
                let h = x.matmul(&w1).unwrap().rms_norm(None, 1e-6).unwrap().silu().unwrap().dropout(0.1, true, &mut rng).unwrap();
                let loss = h.matmul(&w2).unwrap().cross_entropy(&y, -100, CrossEntropyReduction::Mean).unwrap();
                loss.backward().unwrap();
                for w in [&w1, &w2] {
                    w.set_data(&w.detach().sub(&w.grad().unwrap().mul_scalar(0.5).unwrap()).unwrap()).unwrap();
                    w.zero_grad();
                }
                loss.to_scalar().unwrap()
            })
            .collect()
    };
    let (c, r) = (train(&Device::Cpu), train(&g));
    assert!(c.last() < c.first(), "the loss goes down: {c:?}");
    for (i, (a, b)) in c.iter().zip(&r).enumerate() {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "step {i}: cpu {a} gpu {b}\ncpu {c:?}\ngpu {r:?}");
    }
}

/// Frozen weights in f16/bf16 meet f32 activations in `Tensor::matmul` on both devices: the
/// GPU reads the half-precision weights in the kernel, the CPU converts them; the gradient of
/// the f32 operand flows through the same mixed product.
#[test]
fn matmul_with_half_precision_weights() {
    let gpu = gpu_or_skip!();
    let mut rng = Rng::new(11);
    for dt in [DType::F16, DType::BF16] {
        let x = Tensor::randn(&[5, 2, 19], 0.0, 1.0, DType::F32, &Device::Cpu, &mut rng).unwrap();
        let w = Tensor::randn(&[13, 19], 0.0, 0.5, DType::F32, &Device::Cpu, &mut rng).unwrap().to_dtype(dt).unwrap();
        let want = x.matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap().to_vec::<f32>().unwrap();
        for dev in [Device::Cpu, gpu.clone()] {
            let xd = x.to_device(&dev).unwrap().requires_grad().unwrap();
            let y = xd.matmul(&w.to_device(&dev).unwrap().t().unwrap()).unwrap();
            assert_eq!(y.dtype(), DType::F32);
            let got = y.to_vec::<f32>().unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{dt:?} on {dev}: {a} vs {b}");
            }
            y.sum_all().unwrap().backward().unwrap();
            // d Σy / dx[.., p] = Σ_j W[j, p] for every row.
            let col_sums = w.to_dtype(DType::F32).unwrap().sum(&[0], false).unwrap().to_vec::<f32>().unwrap();
            let grad = xd.grad().unwrap().to_vec::<f32>().unwrap();
            assert_eq!(grad.len(), 5 * 2 * 19);
            for (i, g) in grad.iter().enumerate() {
                assert!((g - col_sums[i % 19]).abs() <= 1e-4 * (1.0 + col_sums[i % 19].abs()), "{dt:?} grad on {dev}: {g}");
            }
        }
    }
}

/// The methods built on the block's sites — (IA)³ at linear inputs and outputs, bottleneck
/// adapters at attn.out / mlp.out, prefix tuning at attn.kv — give the CPU's logits and gradients on the GPU, on both
/// model families.
#[test]
fn site_methods_follow_the_cpu() {
    use tinytune::models::{self, CausalLm};
    use tinytune::peft::{AdapterKind as Kind, BottleneckConfig, Ia3Config, Method, MethodConfig, PrefixConfig, PromptConfig};
    let g = gpu_or_skip!();
    let fixture = |name: &str| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    for base in ["tiny-llama", "tiny-gpt2-f16"] {
        let configs: [(&str, Box<dyn MethodConfig>, f64); 6] = [
            ("ia3", Box::new(Ia3Config::default()), 1.0),
            ("houlsby", Box::new(BottleneckConfig { kind: Kind::Houlsby, reduction_factor: 8, ..Default::default() }), 0.0),
            ("pfeiffer", Box::new(BottleneckConfig { kind: Kind::Pfeiffer, reduction_factor: 8, ..Default::default() }), 0.0),
            ("prefix", Box::new(PrefixConfig { num_virtual_tokens: 3, ..Default::default() }), 0.0),
            ("prefix-projection", Box::new(PrefixConfig { num_virtual_tokens: 3, prefix_projection: true, encoder_hidden_size: 16 }), 0.0),
            ("prompt", Box::new(PromptConfig { num_virtual_tokens: 3, ..Default::default() }), 0.0),
        ];
        for (name, cfg, mean) in configs {
            let run = |dev: &Device| -> (Vec<f32>, Vec<Vec<f32>>) {
                let mut model: Box<dyn CausalLm> = models::load(fixture(base), dev).unwrap();
                let m: Box<dyn Method> = cfg.attach(model.as_mut(), 2).unwrap();
                for (i, (_, p)) in m.parameters().iter().enumerate() {
                    let v = Tensor::randn(p.shape(), mean, 0.3, DType::F32, &Device::Cpu, &mut Rng::new(i as u64)).unwrap();
                    p.set_data(&v.to_device(dev).unwrap()).unwrap();
                }
                let ids = ids(&[3, 17, 5, 9, 22, 1, 7, 7, 30, 2, 0, 0], &[2, 6], dev);
                let keep = Tensor::from_vec(vec![1f32, 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0.], &[2, 6], dev).unwrap();
                let logits = model.forward(&ids, Some(&keep)).unwrap();
                let targets = Tensor::from_vec(vec![17i32, 5, 9, 22, 1, -100, 7, 30, 2, -100, -100, -100], &[2, 6], dev).unwrap();
                logits.cross_entropy(&targets, -100, CrossEntropyReduction::Mean).unwrap().backward().unwrap();
                let grads = m.parameters().iter().map(|(_, p)| p.grad().unwrap().to_vec::<f32>().unwrap()).collect();
                (logits.to_vec::<f32>().unwrap(), grads)
            };
            let ((lc, gc), (lg, gg)) = (run(&Device::Cpu), run(&g));
            let tol = Tol { abs: 2e-5, rel: 1e-4 };
            let near = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| ((x - y).abs() as f64) <= tol.abs + tol.rel * (*x as f64).abs());
            assert!(near(&lc, &lg), "{base} {name}: logits");
            for (i, (c, r)) in gc.iter().zip(&gg).enumerate() {
                assert!(near(c, r), "{base} {name}: gradient of parameter {i}");
            }
        }
    }
}
