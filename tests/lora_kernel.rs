//! The fused LoRA linear `y = x W0ᵀ + s·(xd Aᵀ) Bᵀ` (`Tensor::lora_linear`):
//! - on the CPU, forward against float64 plain loops and the gradients of x, xd, A, B against
//!   central finite differences (f64), on small awkward shapes, contiguous and permuted;
//! - on the GPU (both matmul kernel families), forward and every gradient against the CPU
//!   composition `Tensor::lora_linear_reference` on a grid of awkward shapes, f32 and
//!   f16/bf16 base weights, strided views, `xd` a dropout of `x` and `xd` = `x`;
//! - a base weight that requires a gradient falls back to the composition and gets `dW0`;
//! - the backward launches only what the inputs need (dispatch counts on the GPU);
//! - bad shapes, dtypes, devices and scales are errors that name the shapes.

mod common;

use common::{check, Dom, Nd, TOL};
use tinytune::backend::gpu::MatmulKernel;
use tinytune::{DType, Device, Error, Result, Rng, Tensor};

/// The f64 reference `x W0ᵀ + s (xd Aᵀ) Bᵀ` in plain loops; x, xd `[.., k]` (leading axes are
/// rows), w0 `[m, k]`, a `[r, k]`, b `[m, r]`.
fn lora_ref(x: &Nd, xd: &Nd, w0: &Nd, a: &Nd, b: &Nd, s: f64) -> Nd {
    let k = *x.shape.last().unwrap();
    let (m, r) = (w0.shape[0], a.shape[0]);
    let n: usize = x.shape[..x.shape.len() - 1].iter().product();
    let mut y = vec![0.0; n * m];
    for i in 0..n {
        let u: Vec<f64> = (0..r).map(|q| (0..k).map(|p| xd.data[i * k + p] * a.data[q * k + p]).sum()).collect();
        for j in 0..m {
            let base: f64 = (0..k).map(|p| x.data[i * k + p] * w0.data[j * k + p]).sum();
            let low: f64 = (0..r).map(|q| u[q] * b.data[j * r + q]).sum();
            y[i * m + j] = base + s * low;
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

/// (x shape, out, rank): awkward sizes, a rank-3 input, rank 1, one output, one input feature.
const CPU_SHAPES: &[(&[usize], usize, usize)] = &[(&[3, 5], 4, 2), (&[1, 7], 3, 1), (&[4, 1], 6, 3), (&[5, 6], 1, 4), (&[2, 3, 5], 4, 3)];

#[test]
fn cpu_forward_and_gradients_against_loops_and_finite_differences() {
    for (c, &(xs, m, r)) in CPU_SHAPES.iter().enumerate() {
        let k = *xs.last().unwrap();
        let s = 1.75;
        // W0 is a constant of the op (frozen): it enters through the closure, not as an input.
        let w0 = normal_nd(&[m, k], 100 + c as u64, 1.0);
        let w0t = tensor(&w0, DType::F64);
        let (ashape, bshape) = ([r, k], [m, r]);
        let name = format!("lora_linear x {xs:?} out {m} r {r}");
        check(
            &name,
            &[xs, xs, &ashape, &bshape],
            &[Dom::Normal],
            TOL,
            |t| t[0].lora_linear(&t[1], &w0t.to_dtype(t[0].dtype())?, &t[2], &t[3], s),
            |v| lora_ref(&v[0], &v[1], &w0, &v[2], &v[3], s),
        );
        // x used as xd: one input, whose gradient sums both paths.
        check(
            &format!("{name}, xd = x"),
            &[xs, &ashape, &bshape],
            &[Dom::Normal],
            TOL,
            |t| t[0].lora_linear(&t[0], &w0t.to_dtype(t[0].dtype())?, &t[1], &t[2], s),
            |v| lora_ref(&v[0], &v[0], &w0, &v[1], &v[2], s),
        );
    }
}

#[test]
fn cpu_op_equals_the_composition_and_takes_16_bit_base_weights() {
    let (n, k, m, r) = (6, 11, 9, 3);
    let (x, a, b) = (normal_nd(&[n, k], 1, 1.0), normal_nd(&[r, k], 2, 0.3), normal_nd(&[m, r], 3, 1.0));
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let w0 = tensor(&normal_nd(&[m, k], 4, 0.3), dt);
        // The reference sees the weight as stored (rounded to 16 bits).
        let w0nd = Nd::new(&[m, k], w0.to_vec_f64().unwrap());
        let (xt, at, bt) = (tensor(&x, DType::F32), tensor(&a, DType::F32), tensor(&b, DType::F32));
        let y = xt.lora_linear(&xt, &w0, &at, &bt, 0.5).unwrap();
        let want = lora_ref(&x, &x, &w0nd, &a, &b, 0.5);
        assert_eq!(y.shape(), [n, m]);
        common::assert_close("cpu lora_linear", &format!("forward, {dt:?} w0"), &y.to_vec_f64().unwrap(), &want.data, 2e-6);
        let comp = xt.lora_linear_reference(&xt, &w0, &at, &bt, 0.5).unwrap();
        if dt == DType::F32 {
            // The CPU op accumulates the low-rank product into the base one (one rounding
            // order), the composition adds two finished products: equal up to rounding.
            common::assert_close("cpu lora_linear", "fused vs composition", &y.to_vec_f64().unwrap(), &comp.to_vec_f64().unwrap(), 1e-6);
        }
    }
}

#[test]
fn cpu_gradients_only_where_required() {
    let (n, k, m, r) = (4, 5, 3, 2);
    let (x, w0, a, b) = (normal_nd(&[n, k], 5, 1.0), normal_nd(&[m, k], 6, 1.0), normal_nd(&[r, k], 7, 1.0), normal_nd(&[m, r], 8, 1.0));
    let (xt, w0t, at) = (tensor(&x, DType::F64), tensor(&w0, DType::F64), tensor(&a, DType::F64));
    let bt = tensor(&b, DType::F64).requires_grad().unwrap();
    // Only B trains: dB = s gᵀ (x Aᵀ) with g = 1.
    xt.lora_linear(&xt, &w0t, &at, &bt, 3.0).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(xt.grad().is_none() && at.grad().is_none() && w0t.grad().is_none());
    let got = bt.grad().unwrap().to_vec_f64().unwrap();
    for j in 0..m {
        for q in 0..r {
            let want: f64 = (0..n).map(|i| (0..k).map(|p| x.data[i * k + p] * a.data[q * k + p]).sum::<f64>()).sum::<f64>() * 3.0;
            assert!((got[j * r + q] - want).abs() <= 1e-12 * (1.0 + want.abs()), "dB[{j}, {q}]: {} vs {want}", got[j * r + q]);
        }
    }
}

/// A base weight that requires a gradient (full fine-tuning plus LoRA) takes the composition
/// and gets `dW0 = gᵀ x`, on the CPU and on the GPU.
#[test]
fn base_weight_requiring_grad_falls_back_and_gets_its_gradient() {
    let (n, k, m, r) = (5, 7, 4, 2);
    let (x, w0, a, b, wts) = (
        normal_nd(&[n, k], 9, 1.0),
        normal_nd(&[m, k], 10, 1.0),
        normal_nd(&[r, k], 11, 1.0),
        normal_nd(&[m, r], 12, 1.0),
        normal_nd(&[n, m], 13, 1.0),
    );
    let mut devices = vec![Device::Cpu];
    devices.extend(common::gpu_device());
    for dev in devices {
        let up = |nd: &Nd| tensor(nd, DType::F32).to_device(&dev).unwrap();
        let (xt, at, bt, wt) = (up(&x), up(&a).requires_grad().unwrap(), up(&b).requires_grad().unwrap(), up(&wts));
        let w0t = up(&w0).requires_grad().unwrap();
        let y = xt.lora_linear(&xt, &w0t, &at, &bt, 0.5).unwrap();
        common::assert_close(
            "fallback",
            &format!("forward on {dev}"),
            &y.to_vec_f64().unwrap(),
            &lora_ref(&x, &x, &w0, &a, &b, 0.5).data,
            1e-5,
        );
        y.mul(&wt).unwrap().sum_all().unwrap().backward().unwrap();
        let got = w0t.grad().expect("dW0").to_vec_f64().unwrap();
        let want: Vec<f64> = (0..m * k).map(|e| (0..n).map(|i| wts.data[i * m + e / k] * x.data[i * k + e % k]).sum()).collect();
        common::assert_close("fallback", &format!("dW0 on {dev}"), &got, &want, 1e-5);
        assert!(at.grad().is_some() && bt.grad().is_some(), "A and B still get gradients on {dev}");
    }
}

#[test]
fn bad_arguments_are_errors_naming_the_shapes() {
    let f = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let (x, w0, a, b) = (f(&[7, 13]), f(&[5, 13]), f(&[4, 13]), f(&[5, 4]));
    assert!(x.lora_linear(&x, &w0, &a, &b, 1.0).is_ok());
    let cases: [(&str, Result<Tensor>, &[&str]); 6] = [
        ("w0 in", x.lora_linear(&x, &f(&[5, 12]), &a, &b, 1.0), &["w0 [5, 12]", "x [7, 13]"]),
        ("a in", x.lora_linear(&x, &w0, &f(&[4, 12]), &b, 1.0), &["a [4, 12]"]),
        ("b out", x.lora_linear(&x, &w0, &a, &f(&[6, 4]), 1.0), &["b [6, 4]", "w0 [5, 13]"]),
        ("b rank", x.lora_linear(&x, &w0, &a, &f(&[5, 3]), 1.0), &["b [5, 3]", "a [4, 13]"]),
        ("xd", x.lora_linear(&f(&[7, 12]), &w0, &a, &b, 1.0), &["xd [7, 12]"]),
        ("w0 rank", x.lora_linear(&x, &f(&[5, 13, 1]), &a, &b, 1.0), &["w0 [5, 13, 1]"]),
    ];
    for (what, r, needles) in cases {
        let e = r.expect_err(what);
        assert!(matches!(e, Error::Shape { .. }), "{what}: {e:?}");
        let msg = e.to_string();
        for n in needles {
            assert!(msg.contains(n), "{what}: {msg:?} does not name {n}");
        }
    }
    let scalar = Tensor::scalar(1.0, &Device::Cpu).unwrap();
    assert!(matches!(scalar.lora_linear(&scalar, &w0, &a, &b, 1.0), Err(Error::Shape { .. })));
    // dtypes: a 16-bit input, an f64 adapter beside f32 x, a 16-bit weight beside f64 x.
    let x16 = x.to_dtype(DType::F16).unwrap();
    assert!(matches!(x16.lora_linear(&x16, &w0, &a, &b, 1.0), Err(Error::DType { .. })));
    assert!(matches!(x.lora_linear(&x, &w0, &a.to_dtype(DType::F64).unwrap(), &b, 1.0), Err(Error::DTypeMismatch { .. })));
    let x64 = x.to_dtype(DType::F64).unwrap();
    let (a64, b64) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    assert!(x64.lora_linear(&x64, &w0.to_dtype(DType::F64).unwrap(), &a64, &b64, 1.0).is_ok());
    assert!(matches!(x64.lora_linear(&x64, &w0.to_dtype(DType::F16).unwrap(), &a64, &b64, 1.0), Err(Error::DTypeMismatch { .. })));
    for s in [f64::NAN, f64::INFINITY] {
        assert!(matches!(x.lora_linear(&x, &w0, &a, &b, s), Err(Error::InvalidArgument { .. })), "scale {s}");
    }
    // The reference checks the same things.
    assert!(matches!(x.lora_linear_reference(&x, &f(&[5, 12]), &a, &b, 1.0), Err(Error::Shape { .. })));
    if let Some(g) = common::gpu_device() {
        let e = x.lora_linear(&x, &w0.to_device(&g).unwrap(), &a, &b, 1.0).unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { .. }), "{e:?}");
    }
}

// ----- GPU ------------------------------------------------------------------------------------

/// One GPU comparison: sizes, the base weight's dtype, whether operands are strided views, and
/// whether `xd` is `x` itself or a dropout of it (`x ⊙ mask`, mask in {0, 2}).
#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    k: usize,
    m: usize,
    r: usize,
    w_dt: DType,
    views: bool,
    same: bool,
}

/// Host data of a case: x, W0 (wider than k when `views`: the op reads a narrowed view), A, B,
/// the loss weights and the dropout mask.
struct Data {
    x: Tensor,
    w0: Tensor,
    a: Tensor,
    b: Tensor,
    wts: Tensor,
    mask: Tensor,
}

fn data(c: &Case, seed: u64) -> Data {
    let mut rng = Rng::new(seed);
    let mut rn = |shape: &[usize], std: f64| Tensor::randn(shape, 0.0, std, DType::F32, &Device::Cpu, &mut rng).unwrap();
    let wk = if c.views { c.k + 3 } else { c.k };
    let sk = 1.0 / (c.k as f64).sqrt();
    let (x, w0, a, b, wts) = (
        rn(&[c.n, c.k], 1.0),
        rn(&[c.m, wk], sk).to_dtype(c.w_dt).unwrap(),
        rn(&[c.r, c.k], sk),
        rn(&[c.m, c.r], 1.0),
        rn(&[c.n, c.m], 1.0),
    );
    let mask = rn(&[c.n, c.k], 1.0).gt_scalar(0.0).unwrap().mul_scalar(2.0).unwrap();
    Data { x, w0, a, b, wts, mask }
}

/// `y` and the gradients of the leaves x, A, B under `L = Σ y ⊙ wts`, on `dev`, by the op
/// (`fused`) or by the composition. With `views`, x and B are transposes of their stored leaves
/// and W0 is a narrowed view (row stride k + 3, offset 2: odd for 16-bit storage).
fn run(c: &Case, d: &Data, dev: &Device, fused: bool) -> Vec<(&'static str, Tensor)> {
    let up = |t: &Tensor| t.to_device(dev).unwrap();
    let (x_leaf, a, b_leaf);
    let (x, w0, b);
    if c.views {
        x_leaf = up(&d.x.t().unwrap().contiguous().unwrap()).requires_grad().unwrap();
        x = x_leaf.t().unwrap();
        b_leaf = up(&d.b.t().unwrap().contiguous().unwrap()).requires_grad().unwrap();
        b = b_leaf.t().unwrap();
        w0 = up(&d.w0).narrow(1, 2, c.k).unwrap();
    } else {
        x_leaf = up(&d.x).requires_grad().unwrap();
        x = x_leaf.clone();
        b_leaf = up(&d.b).requires_grad().unwrap();
        b = b_leaf.clone();
        w0 = up(&d.w0);
    }
    a = up(&d.a).requires_grad().unwrap();
    let xd = if c.same { x.clone() } else { x.mul(&up(&d.mask)).unwrap() };
    let s = 2.0 / (c.r as f64).sqrt();
    let y = if fused { x.lora_linear(&xd, &w0, &a, &b, s) } else { x.lora_linear_reference(&xd, &w0, &a, &b, s) }
        .unwrap_or_else(|e| panic!("{c:?} on {dev}: {e}"));
    y.mul(&up(&d.wts)).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |t: &Tensor| t.grad().unwrap_or_else(|| panic!("{c:?}: a leaf got no gradient"));
    let t = |g: Tensor| if c.views { g.t().unwrap() } else { g };
    vec![("y", y.detach()), ("dx", t(grad(&x_leaf))), ("dA", grad(&a)), ("dB", t(grad(&b_leaf)))]
}

/// The GPU op against the CPU composition, forward and the gradients of x, A and B.
fn compare(c: &Case, g: &Device, seed: u64) {
    let d = data(c, seed);
    let want = run(c, &d, &Device::Cpu, false);
    let got = run(c, &d, g, true);
    // Shared dimensions: y sums over in + r; dx over out + r (and in, r through xd); dA over
    // n; dB over n.
    let kdims = [c.k + c.r, c.m + c.r, c.n, c.n];
    for (((name, w), (_, v)), kd) in want.iter().zip(&got).zip(kdims) {
        assert_eq!(v.device(), g, "{c:?} {name}: device");
        common::close_product(&format!("{c:?} {name}"), w, v, kd);
    }
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
                    // Ranks cycle through {1, 4, 8, 16}; every shape is run with xd = x (the
                    // fused input gradient) and f32 and f16 base weights; a third of them as
                    // strided views; bf16 and a separate dropout xd on a share of them.
                    let r = [1, 4, 8, 16][i % 4];
                    let views = i % 3 == 1;
                    for w_dt in [DType::F32, DType::F16] {
                        compare(&Case { n, k, m, r, w_dt, views, same: true }, &g, i as u64);
                    }
                    if i % 3 == 0 {
                        compare(&Case { n, k, m, r, w_dt: DType::BF16, views: !views, same: true }, &g, 1000 + i as u64);
                    }
                    if i % 2 == 0 {
                        compare(&Case { n, k, m, r, w_dt: DType::F32, views, same: false }, &g, 2000 + i as u64);
                    }
                    i += 1;
                }
            }
        }
        eprintln!("{kernel:?}: {i} shapes");
    }
}

#[test]
fn gpu_rank_3_input_and_degenerate_sizes() {
    if common::gpu_device().is_none() {
        return;
    }
    let g = common::gpu_with_kernel(MatmulKernel::Tiled);
    let (x, w0, a, b) =
        (normal_nd(&[2, 5, 13], 20, 1.0), normal_nd(&[7, 13], 21, 0.3), normal_nd(&[3, 13], 22, 0.3), normal_nd(&[7, 3], 23, 1.0));
    let up = |nd: &Nd| tensor(nd, DType::F32).to_device(&g).unwrap();
    let y = up(&x).lora_linear(&up(&x), &up(&w0), &up(&a), &up(&b), 1.5).unwrap();
    assert_eq!(y.shape(), [2, 5, 7]);
    common::assert_close("rank 3", "forward", &y.to_vec_f64().unwrap(), &lora_ref(&x, &x, &w0, &a, &b, 1.5).data, 1e-5);
    // No rows, rank 0 (plain x W0ᵀ), no input features (y = 0).
    for (n, k, m, r) in [(0, 4, 3, 2), (3, 4, 5, 0), (3, 0, 5, 2)] {
        let (x, w0, a, b) =
            (normal_nd(&[n, k], 24, 1.0), normal_nd(&[m, k], 25, 1.0), normal_nd(&[r, k], 26, 1.0), normal_nd(&[m, r], 27, 1.0));
        let y = up(&x).lora_linear(&up(&x), &up(&w0), &up(&a), &up(&b), 2.0).unwrap();
        assert_eq!(y.shape(), [n, m]);
        common::assert_close(
            "degenerate",
            &format!("{n}x{k}x{m} r {r}"),
            &y.to_vec_f64().unwrap(),
            &lora_ref(&x, &x, &w0, &a, &b, 2.0).data,
            1e-5,
        );
    }
}

/// The forward is one fused launch after the small `xd Aᵀ` matmul; the backward launches the
/// fused input-gradient kernel only when x (= xd) needs a gradient, and plain matmuls for what
/// else is needed: nothing is computed for inputs that do not require a gradient.
#[test]
fn gpu_launches_only_what_is_needed() {
    if common::gpu_device().is_none() {
        return;
    }
    let count = |g: &Device| -> (u64, u64) {
        let Device::Gpu(d) = g else { unreachable!() };
        let c = d.kernel_counts();
        let n = |prefix: &str| c.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, c)| c.dispatches).sum::<u64>();
        (n("lora"), n("matmul"))
    };
    let (n, k, m, r) = (9, 20, 11, 4);
    let d = data(&Case { n, k, m, r, w_dt: DType::F32, views: false, same: true }, 5);
    // (x requires grad, A requires grad, B requires grad, xd = x) → backward (lora, matmul).
    let cases = [
        ((true, true, true, true), (1, 3)),   // fused dx (with g B inside), dA, dB
        ((false, true, true, true), (0, 3)),  // g B, dA, dB
        ((false, false, true, true), (0, 1)), // dB
        ((false, true, false, true), (0, 2)), // g B, dA
        ((true, false, false, true), (1, 1)), // fused dx (g B inside)
        ((true, true, true, false), (0, 5)),  // dx, g B, dxd, dA, dB
    ];
    for ((gx, ga, gb, same), want) in cases {
        let g = common::gpu_with_kernel(MatmulKernel::Registers);
        let up = |t: &Tensor, rg: bool| {
            let t = t.to_device(&g).unwrap();
            if rg {
                t.requires_grad().unwrap()
            } else {
                t
            }
        };
        let (x, w0, a, b) = (up(&d.x, gx), up(&d.w0, false), up(&d.a, ga), up(&d.b, gb));
        let xd = if same { x.clone() } else { x.mul(&up(&d.mask, false)).unwrap() };
        let y = x.lora_linear(&xd, &w0, &a, &b, 0.5).unwrap();
        assert_eq!(count(&g), (1, 1), "forward: one fused launch after the u matmul");
        y.sum_all().unwrap().backward().unwrap();
        let (l, mm) = count(&g);
        assert_eq!((l - 1, mm - 1), want, "backward launches (lora, matmul) with x {gx}, A {ga}, B {gb}, xd = x {same}");
        assert_eq!((x.grad().is_some(), a.grad().is_some(), b.grad().is_some()), (gx, ga, gb));
        assert!(w0.grad().is_none());
    }
}
