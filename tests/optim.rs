//! Optimizers, schedules and clipping against float64 references written from the PyTorch and
//! Hugging Face formulas; checkpoint resume; the GPU path against the CPU.

mod common;

use std::collections::HashMap;

use common::gpu_device;
use tinytune::optim::{clip_grad_norm, grad_norm, AdamW, AdamWConfig, Optimizer, ParamGroup, Schedule, ScheduleKind, Sgd, SgdConfig};
use tinytune::{DType, Device, Error, Tensor};

/// Deterministic "random" values in about [-1, 1].
fn vals(n: usize, seed: u64) -> Vec<f64> {
    (0..n).map(|i| ((i as f64 + 1.0) * 0.7548776662 + seed as f64 * 0.5698402910).fract() * 2.0 - 1.0).collect()
}

fn tensor(v: &[f64], shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_device(dev).unwrap()
}

fn param(v: &[f64], shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    tensor(v, shape, dtype, dev).requires_grad().unwrap()
}

/// The gradient of parameter `k` at step `s` (shared by the optimizer under test and the reference).
fn grad_vals(k: usize, s: usize, n: usize) -> Vec<f64> {
    vals(n, 100 * k as u64 + s as u64).iter().map(|x| x * (0.2 + 0.3 * k as f64)).collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], abs: f64, rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= abs + rel * w.abs(), "{what}[{i}]: got {g}, want {w} (diff {:e})", (g - w).abs());
    }
}

/// PyTorch's AdamW on one parameter in float64.
struct RefAdam {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl RefAdam {
    fn new(p: Vec<f64>) -> RefAdam {
        let n = p.len();
        RefAdam { p, m: vec![0.0; n], v: vec![0.0; n], t: 0 }
    }
    fn step(&mut self, g: &[f64], lr: f64, wd: f64, c: AdamWConfig) {
        self.t += 1;
        let (bc1, bc2) = (1.0 - c.beta1.powi(self.t), 1.0 - c.beta2.powi(self.t));
        for (((p, m), v), &g) in self.p.iter_mut().zip(&mut self.m).zip(&mut self.v).zip(g) {
            *p *= 1.0 - lr * wd;
            *m = c.beta1 * *m + (1.0 - c.beta1) * g;
            *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
            // PyTorch: denom = √v/√(1 − β2ᵗ) + eps; p −= lr/(1 − β1ᵗ) · m/denom.
            let denom = v.sqrt() / bc2.sqrt() + c.eps;
            *p -= lr / bc1 * *m / denom;
        }
    }
}

/// Parameter layout of the AdamW tests: (name, shape, group, gets a gradient at step s).
struct Spec {
    name: &'static str,
    shape: &'static [usize],
    group: usize,
    has_grad: fn(usize) -> bool,
}

const SPECS: [Spec; 4] = [
    Spec { name: "body.w", shape: &[3, 4], group: 0, has_grad: |_| true },
    // Skips step 1: its own step count (bias correction) falls behind the others'.
    Spec { name: "body.b", shape: &[4], group: 0, has_grad: |s| s != 1 },
    Spec { name: "head.w", shape: &[2, 5], group: 1, has_grad: |_| true },
    // Never gets a gradient: untouched, no state.
    Spec { name: "head.unused", shape: &[6], group: 1, has_grad: |_| false },
];
/// (lr_scale, weight_decay) of the two groups.
const GROUPS: [(f64, f64); 2] = [(1.0, 0.01), (0.1, 0.3)];
const LRS: [f64; 5] = [1e-2, 3e-2, 2e-2, 5e-3, 1e-2];

fn adamw_vs_reference(dtype: DType, dev: &Device, abs: f64, rel: f64) {
    let c = AdamWConfig::default();
    let params: Vec<Tensor> =
        SPECS.iter().enumerate().map(|(k, s)| param(&vals(s.shape.iter().product(), k as u64), s.shape, dtype, dev)).collect();
    let groups = (0..2)
        .map(|gi| {
            let ps = SPECS.iter().zip(&params).filter(|(s, _)| s.group == gi).map(|(s, p)| (s.name.to_string(), p.clone())).collect();
            ParamGroup::new(format!("g{gi}"), ps, GROUPS[gi].0, GROUPS[gi].1)
        })
        .collect();
    let mut opt = AdamW::new(groups).unwrap();
    let mut refs: Vec<RefAdam> = params.iter().map(|p| RefAdam::new(p.to_vec_f64().unwrap())).collect();
    for (s, &lr) in LRS.iter().enumerate() {
        for (k, (spec, p)) in SPECS.iter().zip(&params).enumerate() {
            let n = p.numel();
            if (spec.has_grad)(s) {
                let g = grad_vals(k, s, n);
                p.set_grad(Some(tensor(&g, spec.shape, dtype, dev))).unwrap();
                let (scale, wd) = GROUPS[spec.group];
                refs[k].step(&g, lr * scale, wd, c);
            } else {
                p.set_grad(None).unwrap();
            }
        }
        opt.step(lr).unwrap();
        opt.zero_grad();
        assert!(params.iter().all(|p| p.grad().is_none()), "zero_grad clears every gradient");
    }
    for (k, (spec, p)) in SPECS.iter().zip(&params).enumerate() {
        assert_eq!(p.device(), dev, "{} stays on its device", spec.name);
        assert_close(spec.name, &p.to_vec_f64().unwrap(), &refs[k].p, abs, rel);
    }
    // The untouched parameter kept its exact values and has no state.
    assert_eq!(params[3].to_vec_f64().unwrap(), tensor(&vals(6, 3), &[6], dtype, &Device::Cpu).to_vec_f64().unwrap());
    assert_eq!(opt.param_steps("head.unused"), None);
    assert_eq!(opt.param_steps("body.w"), Some(5));
    assert_eq!(opt.param_steps("body.b"), Some(4));
    let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    assert_eq!(state.len(), 9, "three parameters with state, three entries each: {:?}", state.keys().collect::<Vec<_>>());
    assert!(!state.keys().any(|k| k.starts_with("head.unused")));
    for (k, spec) in SPECS.iter().enumerate().take(3) {
        let m = &state[&format!("{}.exp_avg", spec.name)];
        assert_eq!((m.shape(), m.dtype(), m.device()), (spec.shape, dtype, dev));
        assert_close(&format!("{}.exp_avg", spec.name), &m.to_vec_f64().unwrap(), &refs[k].m, abs, rel);
        let v = &state[&format!("{}.exp_avg_sq", spec.name)];
        assert_close(&format!("{}.exp_avg_sq", spec.name), &v.to_vec_f64().unwrap(), &refs[k].v, abs * 1e-2, rel);
        assert_eq!(state[&format!("{}.step", spec.name)].to_vec::<u32>().unwrap(), vec![refs[k].t as u32]);
    }
}

#[test]
fn adamw_matches_pytorch_formulas_f32() {
    adamw_vs_reference(DType::F32, &Device::Cpu, 1e-6, 1e-5);
}

#[test]
fn adamw_matches_pytorch_formulas_f64() {
    adamw_vs_reference(DType::F64, &Device::Cpu, 1e-14, 1e-12);
}

#[test]
fn adamw_steps_a_real_backward_and_checks_its_inputs() {
    let dev = Device::Cpu;
    let w = param(&[1.0, -2.0, 3.0], &[3], DType::F32, &dev);
    let x = tensor(&[0.5, 0.25, -1.0], &[3], DType::F32, &dev);
    let mut opt = AdamW::with_defaults(vec![("w".into(), w.clone())]).unwrap();
    w.mul(&x).unwrap().sum_all().unwrap().backward().unwrap();
    opt.step(0.1).unwrap();
    // First Adam step: m̂/√v̂ = sign(g), so p ← p(1 − 0.1·0.01) − 0.1·sign(x) (up to eps).
    let want: Vec<f64> = [1.0, -2.0, 3.0].iter().zip([0.5, 0.25, -1.0]).map(|(p, g): (&f64, f64)| p * 0.999 - 0.1 * g.signum()).collect();
    assert_close("w", &w.to_vec_f64().unwrap(), &want, 1e-6, 1e-6);

    // Bad hyper-parameters and groups are errors that say what is wrong.
    let bad = AdamW::with_config(vec![], AdamWConfig { beta1: 1.0, ..Default::default() }).unwrap_err();
    assert!(bad.to_string().contains("beta1"), "{bad}");
    let dup = AdamW::new(vec![
        ParamGroup::new("a", vec![("w".into(), w.clone())], 1.0, 0.0),
        ParamGroup::new("b", vec![("w".into(), x.requires_grad().unwrap())], 1.0, 0.0),
    ])
    .unwrap_err();
    assert!(dup.to_string().contains("\"w\" appears twice"), "{dup}");
    let same = AdamW::new(vec![ParamGroup::new("a", vec![("w".into(), w.clone()), ("w2".into(), w.clone())], 1.0, 0.0)]).unwrap_err();
    assert!(same.to_string().contains("same tensor"), "{same}");
    let neg = AdamW::new(vec![ParamGroup::new("a", vec![], 1.0, -0.1)]).unwrap_err();
    assert!(neg.to_string().contains("weight_decay"), "{neg}");
    let view = param(&vals(6, 0), &[2, 3], DType::F32, &dev).t().unwrap();
    let strided = AdamW::with_defaults(vec![("v".into(), view)]).unwrap_err();
    assert!(strided.to_string().contains("strided view"), "{strided}");
    let ints = Tensor::from_vec(vec![1i32, 2], &[2], &dev).unwrap();
    assert!(AdamW::with_defaults(vec![("i".into(), ints)]).is_err());
    assert!(opt.step(f64::NAN).unwrap_err().to_string().contains("learning rate"));
    // A frozen tensor (no requires_grad) is never stepped, even with a gradient set by hand.
    let frozen = tensor(&[1.0, 2.0], &[2], DType::F32, &dev);
    frozen.set_grad(Some(tensor(&[1.0, 1.0], &[2], DType::F32, &dev))).unwrap();
    let mut opt = AdamW::with_defaults(vec![("f".into(), frozen.clone())]).unwrap();
    opt.step(0.1).unwrap();
    assert_eq!(frozen.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
    assert!(opt.state_tensors().unwrap().is_empty());
    // set_grad rejects a gradient that does not fit.
    assert!(matches!(frozen.set_grad(Some(tensor(&[1.0], &[1], DType::F32, &dev))), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(frozen.set_grad(Some(tensor(&[1.0, 1.0], &[2], DType::F64, &dev))), Err(Error::DTypeMismatch { .. })));
}

/// PyTorch's SGD on one parameter in float64.
fn sgd_reference(p: &mut [f64], buf: &mut Option<Vec<f64>>, g: &[f64], lr: f64, wd: f64, c: SgdConfig) {
    let mut d: Vec<f64> = g.iter().zip(p.iter()).map(|(g, p)| g + wd * p).collect();
    if c.momentum != 0.0 {
        let b = match buf.take() {
            None => d.clone(),
            Some(b) => b.iter().zip(&d).map(|(b, d)| c.momentum * b + (1.0 - c.dampening) * d).collect(),
        };
        d = if c.nesterov { d.iter().zip(&b).map(|(d, b)| d + c.momentum * b).collect() } else { b.clone() };
        *buf = Some(b);
    }
    for (p, d) in p.iter_mut().zip(&d) {
        *p -= lr * d;
    }
}

#[test]
fn sgd_matches_pytorch_formulas() {
    let configs = [
        SgdConfig::default(),
        SgdConfig { momentum: 0.9, ..Default::default() },
        SgdConfig { momentum: 0.8, dampening: 0.25, nesterov: false },
        SgdConfig { momentum: 0.9, dampening: 0.0, nesterov: true },
    ];
    for (dtype, abs, rel) in [(DType::F32, 1e-6, 1e-5), (DType::F64, 1e-14, 1e-12)] {
        for c in configs {
            let dev = Device::Cpu;
            let a = param(&vals(12, 1), &[3, 4], dtype, &dev);
            let b = param(&vals(5, 2), &[5], dtype, &dev);
            let groups = vec![
                ParamGroup::new("decay", vec![("a".into(), a.clone())], 1.0, 0.05),
                ParamGroup::new("fast", vec![("b".into(), b.clone())], 2.0, 0.0),
            ];
            let mut opt = Sgd::new(groups, c).unwrap();
            let (mut ra, mut rb) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
            let (mut ba, mut bb) = (None, None);
            for (s, &lr) in LRS.iter().enumerate() {
                let (ga, gb) = (grad_vals(0, s, 12), grad_vals(1, s, 5));
                // The gradient of `a` arrives transposed (a strided view), as matmul backward makes them.
                let ga_t = tensor(&ga, &[3, 4], dtype, &dev).t().unwrap().contiguous().unwrap().t().unwrap();
                assert!(!ga_t.is_contiguous());
                a.set_grad(Some(ga_t)).unwrap();
                b.set_grad(Some(tensor(&gb, &[5], dtype, &dev))).unwrap();
                opt.step(lr).unwrap();
                sgd_reference(&mut ra, &mut ba, &ga, lr, 0.05, c);
                sgd_reference(&mut rb, &mut bb, &gb, 2.0 * lr, 0.0, c);
            }
            let what = format!("{dtype:?} {c:?}");
            assert_close(&format!("a {what}"), &a.to_vec_f64().unwrap(), &ra, abs, rel);
            assert_close(&format!("b {what}"), &b.to_vec_f64().unwrap(), &rb, abs, rel);
            let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
            if c.momentum == 0.0 {
                assert!(state.is_empty(), "plain SGD keeps no state");
            } else {
                assert_close(
                    &format!("a.momentum_buffer {what}"),
                    &state["a.momentum_buffer"].to_vec_f64().unwrap(),
                    &ba.unwrap(),
                    abs,
                    rel,
                );
                assert_close(
                    &format!("b.momentum_buffer {what}"),
                    &state["b.momentum_buffer"].to_vec_f64().unwrap(),
                    &bb.unwrap(),
                    abs,
                    rel,
                );
            }
        }
    }
    let bad = Sgd::new(vec![], SgdConfig { momentum: 0.0, dampening: 0.0, nesterov: true }).unwrap_err();
    assert!(bad.to_string().contains("Nesterov"), "{bad}");
}

#[test]
fn schedules_match_hugging_face_formulas() {
    let close = |got: f64, want: f64, what: &str| assert!((got - want).abs() < 1e-12, "{what}: got {got}, want {want}");
    let c = Schedule::new(ScheduleKind::Constant, 10, 0).unwrap();
    for (s, want) in [(0, 0.0), (1, 0.2), (5, 1.0), (9, 1.8), (10, 2.0), (11, 2.0), (1_000_000, 2.0)] {
        close(c.lr_at(2.0, s), want, &format!("constant step {s}"));
    }
    let l = Schedule::new(ScheduleKind::Linear, 10, 110).unwrap();
    for (s, want) in [(0, 0.0), (5, 0.5), (10, 1.0), (35, 0.75), (60, 0.5), (109, 0.01), (110, 0.0), (500, 0.0)] {
        close(l.lr_at(1.0, s), want, &format!("linear step {s}"));
    }
    let cos = Schedule::new(ScheduleKind::Cosine, 10, 110).unwrap();
    let quarter = 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2); // progress 1/4: ½(1 + cos(π/4))
    for (s, want) in [(0, 0.0), (4, 0.4), (10, 1.0), (35, quarter), (60, 0.5), (85, 1.0 - quarter), (110, 0.0), (111, 0.0), (300, 0.0)] {
        close(cos.lr_at(1.0, s), want, &format!("cosine step {s}"));
    }
    // No warm-up: the first step already has the full rate.
    let nw = Schedule::new(ScheduleKind::Linear, 0, 4).unwrap();
    let got: Vec<f64> = (0..6).map(|s| nw.lr_at(1.0, s)).collect();
    assert_eq!(got, vec![1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
    assert_eq!(Schedule::constant().lr_at(3e-4, 0), 3e-4);
    // Names.
    assert_eq!(ScheduleKind::from_name("Cosine").unwrap(), ScheduleKind::Cosine);
    assert_eq!("linear".parse::<ScheduleKind>().unwrap(), ScheduleKind::Linear);
    assert_eq!(ScheduleKind::Constant.to_string(), "constant");
    let e = ScheduleKind::from_name("exponential").unwrap_err().to_string();
    assert!(e.contains("\"exponential\"") && e.contains("constant, linear, cosine"), "{e}");
    let e = Schedule::new(ScheduleKind::Cosine, 20, 10).unwrap_err().to_string();
    assert!(e.contains("warm-up 20"), "{e}");
    assert!(Schedule::new(ScheduleKind::Linear, 0, 0).is_err());
}

#[test]
fn clip_grad_norm_matches_torch() {
    let dev = Device::Cpu;
    let a = param(&vals(12, 1), &[4, 3], DType::F32, &dev);
    let b = param(&vals(40_000, 2), &[40_000], DType::F32, &dev); // more than one host block
    let c = param(&vals(3, 3), &[3], DType::F64, &dev);
    let none = param(&vals(2, 4), &[2], DType::F32, &dev); // no gradient: skipped
    let ga = vals(12, 5).iter().map(|x| 3.0 * x).collect::<Vec<_>>();
    let gb = vals(40_000, 6).iter().map(|x| 0.01 * x).collect::<Vec<_>>();
    let gc = vec![1.0, -2.0, 0.5];
    let set = |scale: f64| {
        let s = |v: &[f64]| v.iter().map(|x| x * scale).collect::<Vec<_>>();
        // `a`'s gradient is a transposed view: the norm reads it through its layout.
        a.set_grad(Some(tensor(&s(&ga), &[3, 4], DType::F32, &dev).t().unwrap())).unwrap();
        b.set_grad(Some(tensor(&s(&gb), &[40_000], DType::F32, &dev))).unwrap();
        c.set_grad(Some(tensor(&s(&gc), &[3], DType::F64, &dev))).unwrap();
    };
    let params = [a.clone(), b.clone(), c.clone(), none.clone()];
    // The reference reads the stored (f32-rounded) gradients in a's row-major order.
    let rounded = |v: &[f64]| v.iter().map(|&x| x as f32 as f64).collect::<Vec<_>>();
    let ga_t: Vec<f64> = (0..12).map(|i| ga[(i % 3) * 4 + i / 3]).collect();
    let sq = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
    let want = (sq(&rounded(&ga_t)) + sq(&rounded(&gb)) + sq(&gc)).sqrt();
    set(1.0);
    let before: Vec<Vec<f64>> = params[..3].iter().map(|p| p.grad().unwrap().to_vec_f64().unwrap()).collect();
    let n = grad_norm(&params).unwrap();
    assert!((n - want).abs() <= 1e-12 * want, "grad_norm {n} vs {want}");
    assert_eq!(grad_norm(&params).unwrap().to_bits(), n.to_bits(), "the same bits every time");
    // Below max_norm: the norm comes back and no gradient changes.
    let n = clip_grad_norm(&params, want * 1.5).unwrap();
    assert!((n - want).abs() <= 1e-12 * want);
    for (p, b) in params.iter().zip(&before) {
        assert_eq!(&p.grad().unwrap().to_vec_f64().unwrap(), b, "unclipped gradients are untouched");
    }
    // Above: scaled by max/(norm + 1e-6); the returned norm is the one before clipping.
    let max = want / 4.0;
    let n = clip_grad_norm(&params, max).unwrap();
    assert!((n - want).abs() <= 1e-12 * want);
    let coef = max / (want + 1e-6);
    for (k, (p, b)) in params.iter().zip(&before).enumerate() {
        let scaled: Vec<f64> = b.iter().map(|x| x * coef).collect();
        let tol = if k == 2 { 1e-15 } else { 3e-7 };
        assert_close(&format!("clipped grad {k}"), &p.grad().unwrap().to_vec_f64().unwrap(), &scaled, 1e-12, tol);
    }
    assert!(none.grad().is_none());
    let after = grad_norm(&params).unwrap();
    assert!((after - max).abs() <= 1e-6 * max, "norm after clipping {after} vs {max}");
    // A NaN (or Inf) norm comes back as is, and nothing is scaled.
    set(1.0);
    let mut g = ga.clone();
    g[4] = f64::NAN;
    a.set_grad(Some(tensor(&g, &[4, 3], DType::F32, &dev))).unwrap();
    assert!(clip_grad_norm(&params, 1e-3).unwrap().is_nan());
    assert_eq!(b.grad().unwrap().to_vec_f64().unwrap(), before[1], "a NaN norm scales nothing");
    g[4] = f64::INFINITY;
    a.set_grad(Some(tensor(&g, &[4, 3], DType::F32, &dev))).unwrap();
    assert_eq!(clip_grad_norm(&params, 1e-3).unwrap(), f64::INFINITY);
    assert_eq!(b.grad().unwrap().to_vec_f64().unwrap(), before[1]);
    // No gradients at all: norm 0. A non-positive max_norm is an error.
    assert_eq!(grad_norm(std::slice::from_ref(&none)).unwrap(), 0.0);
    assert!(clip_grad_norm(&params, 0.0).unwrap_err().to_string().contains("max_norm"));
}

/// The parameters and optimizers of the resume test: the same names and groups every time.
fn resume_setup(vals_of: &dyn Fn(usize) -> Vec<f64>, sgd: bool) -> (Vec<Tensor>, Box<dyn Optimizer>) {
    let shapes: [&[usize]; 3] = [&[4, 3], &[5], &[2, 2]];
    let ps: Vec<Tensor> = shapes.iter().enumerate().map(|(k, s)| param(&vals_of(k), s, DType::F32, &Device::Cpu)).collect();
    let groups = vec![
        ParamGroup::new("body", vec![("w".into(), ps[0].clone()), ("b".into(), ps[1].clone())], 1.0, 0.01),
        ParamGroup::new("head", vec![("h".into(), ps[2].clone())], 3.0, 0.0),
    ];
    let opt: Box<dyn Optimizer> = if sgd {
        Box::new(Sgd::new(groups, SgdConfig { momentum: 0.9, dampening: 0.1, nesterov: false }).unwrap())
    } else {
        Box::new(AdamW::new(groups).unwrap())
    };
    (ps, opt)
}

fn resume_step(ps: &[Tensor], opt: &mut dyn Optimizer, s: usize) {
    for (k, p) in ps.iter().enumerate() {
        // `b` has no gradient at steps 0 and 3: no state at the checkpoint after step 0, and
        // its step count differs from the others' later.
        let g = (!(k == 1 && (s == 0 || s == 3))).then(|| tensor(&grad_vals(k, s, p.numel()), p.shape(), DType::F32, &Device::Cpu));
        p.set_grad(g).unwrap();
    }
    let sched = Schedule::new(ScheduleKind::Cosine, 2, 8).unwrap();
    opt.step(sched.lr_at(0.05, s as u64)).unwrap();
    opt.zero_grad();
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// Through the host, as a checkpoint file would: fresh tensors, no shared storage.
fn host_copy(t: &Tensor) -> Tensor {
    match t.dtype() {
        DType::U32 => Tensor::from_vec(t.to_vec::<u32>().unwrap(), t.shape(), &Device::Cpu).unwrap(),
        _ => Tensor::from_vec(t.to_vec::<f32>().unwrap(), t.shape(), &Device::Cpu).unwrap(),
    }
}

#[test]
fn resume_from_exported_state_is_bitwise_equal_to_an_uninterrupted_run() {
    let init = |k: usize| vals([12, 5, 4][k], 10 + k as u64);
    for sgd in [false, true] {
        let (ps, mut opt) = resume_setup(&init, sgd);
        for s in 0..8 {
            resume_step(&ps, opt.as_mut(), s);
        }
        for stop in [1, 4] {
            let (ps2, mut opt2) = resume_setup(&init, sgd);
            for s in 0..stop {
                resume_step(&ps2, opt2.as_mut(), s);
            }
            let saved_params: Vec<Vec<f64>> = ps2.iter().map(|p| p.to_vec_f64().unwrap()).collect();
            let saved: HashMap<String, Tensor> = opt2.state_tensors().unwrap().iter().map(|(n, t)| (n.clone(), host_copy(t))).collect();
            if !sgd {
                assert_eq!(saved.contains_key("b.exp_avg"), stop > 1, "state only for parameters that took a step");
            }
            drop((ps2, opt2));
            let (ps3, mut opt3) = resume_setup(&|k| saved_params[k].clone(), sgd);
            opt3.load_state(&saved).unwrap();
            for s in stop..8 {
                resume_step(&ps3, opt3.as_mut(), s);
            }
            for (k, (a, b)) in ps.iter().zip(&ps3).enumerate() {
                assert_eq!(bits(a), bits(b), "sgd={sgd} stop={stop}: parameter {k} after resume");
            }
            let (sa, sb) = (opt.state_tensors().unwrap(), opt3.state_tensors().unwrap());
            assert_eq!(sa.iter().map(|(n, _)| n).collect::<Vec<_>>(), sb.iter().map(|(n, _)| n).collect::<Vec<_>>());
            for ((n, a), (_, b)) in sa.iter().zip(&sb) {
                assert_eq!(a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap(), "sgd={sgd} stop={stop}: state {n}");
            }
        }
    }
}

#[test]
fn load_state_names_the_bad_entry_and_keeps_the_old_state() {
    let init = |k: usize| vals([12, 5, 4][k], 10 + k as u64);
    let (ps, mut opt) = resume_setup(&init, false);
    for s in 0..3 {
        resume_step(&ps, opt.as_mut(), s);
    }
    let good: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    let before: Vec<(String, Vec<f64>)> = opt.state_tensors().unwrap().iter().map(|(n, t)| (n.clone(), t.to_vec_f64().unwrap())).collect();
    let err_of = |opt: &mut Box<dyn Optimizer>, m: HashMap<String, Tensor>| opt.load_state(&m).unwrap_err().to_string();

    let mut missing = good.clone();
    missing.remove("w.exp_avg_sq");
    let e = err_of(&mut opt, missing);
    assert!(e.contains("\"w.exp_avg_sq\" is missing"), "{e}");

    let mut shape = good.clone();
    shape.insert("h.exp_avg".into(), Tensor::zeros(&[4], DType::F32, &Device::Cpu).unwrap());
    let e = err_of(&mut opt, shape);
    assert!(e.contains("\"h.exp_avg\"") && e.contains("[4]") && e.contains("[2, 2]"), "{e}");

    let mut dtype = good.clone();
    dtype.insert("h.exp_avg".into(), Tensor::zeros(&[2, 2], DType::F64, &Device::Cpu).unwrap());
    let e = err_of(&mut opt, dtype);
    assert!(e.contains("\"h.exp_avg\"") && e.contains("F64"), "{e}");

    let mut step = good.clone();
    step.insert("h.step".into(), Tensor::from_vec(vec![1.0f32], &[], &Device::Cpu).unwrap());
    let e = err_of(&mut opt, step);
    assert!(e.contains("\"h.step\""), "{e}");

    let mut extra = good.clone();
    extra.insert("lm_head.exp_avg".into(), Tensor::zeros(&[1], DType::F32, &Device::Cpu).unwrap());
    let e = err_of(&mut opt, extra);
    assert!(e.contains("lm_head.exp_avg") && e.contains("exp_avg_sq"), "{e}");

    let after: Vec<(String, Vec<f64>)> = opt.state_tensors().unwrap().iter().map(|(n, t)| (n.clone(), t.to_vec_f64().unwrap())).collect();
    assert_eq!(before, after, "a failed load changes nothing");
    // An empty map is a valid state (nothing stepped yet).
    opt.load_state(&HashMap::new()).unwrap();
    assert!(opt.state_tensors().unwrap().is_empty());

    let (_ps, mut sgd) = resume_setup(&init, true);
    let e = sgd.load_state(&good).unwrap_err().to_string();
    assert!(e.contains("momentum_buffer"), "{e}");
}

#[test]
fn gpu_adamw_and_sgd_match_the_cpu() {
    let Some(gpu) = gpu_device() else { return };
    let c = AdamWConfig::default();
    for sgd in [false, true] {
        let mut runs = Vec::new();
        for dev in [Device::Cpu, gpu.clone()] {
            let ps: Vec<Tensor> = [(&[40usize, 25][..], 0u64), (&[7][..], 1)]
                .iter()
                .map(|(s, seed)| param(&vals(s.iter().product(), *seed), s, DType::F32, &dev))
                .collect();
            let groups = vec![
                ParamGroup::new("a", vec![("w".into(), ps[0].clone())], 1.0, 0.01),
                ParamGroup::new("b", vec![("b".into(), ps[1].clone())], 0.5, 0.1),
            ];
            let mut opt: Box<dyn Optimizer> = if sgd {
                Box::new(Sgd::new(groups, SgdConfig { momentum: 0.9, ..Default::default() }).unwrap())
            } else {
                Box::new(AdamW::with_config(groups, c).unwrap())
            };
            for (s, &lr) in LRS.iter().enumerate() {
                for (k, p) in ps.iter().enumerate() {
                    p.set_grad(Some(tensor(&grad_vals(k, s, p.numel()), p.shape(), DType::F32, &dev))).unwrap();
                }
                opt.step(lr).unwrap();
            }
            for p in &ps {
                assert_eq!(p.device(), &dev);
            }
            let state = opt.state_tensors().unwrap();
            for (n, t) in &state {
                let want = if n.ends_with(".step") { Device::Cpu } else { dev.clone() };
                assert_eq!(t.device(), &want, "state {n}");
            }
            let mut vals: Vec<Vec<f64>> = ps.iter().map(|p| p.to_vec_f64().unwrap()).collect();
            vals.extend(state.iter().map(|(_, t)| t.to_vec_f64().unwrap()));
            runs.push(vals);
        }
        for (k, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "sgd={sgd} tensor {k} element {i}: cpu {x} gpu {y}");
            }
        }
    }
}

#[test]
fn gpu_updates_and_clipping_stay_on_the_device() {
    if gpu_device().is_none() {
        return;
    }
    // A private device, so the transfer counters see only this test.
    let g = common::own_gpu();
    let dev = Device::Gpu(g.clone());
    let n = 4096;
    let w = param(&vals(n, 1), &[64, 64], DType::F32, &dev);
    let b = param(&vals(64, 2), &[64], DType::F32, &dev);
    let (gw, gb) = (grad_vals(0, 0, n), grad_vals(1, 0, 64));
    let (tw, tb) = (tensor(&gw, &[64, 64], DType::F32, &dev), tensor(&gb, &[64], DType::F32, &dev));
    let mut adam = AdamW::with_defaults(vec![("w".into(), w.clone()), ("b".into(), b.clone())]).unwrap();
    let mut sgd = Sgd::new(vec![ParamGroup::new("all", vec![("w".into(), w.clone())], 1.0, 0.0)], SgdConfig::default()).unwrap();
    let params = [w.clone(), b.clone()];
    let want_norm = (gw.iter().chain(&gb).map(|&x| (x as f32 as f64).powi(2)).sum::<f64>()).sqrt();

    let s0 = g.memory_stats();
    for _ in 0..3 {
        w.set_grad(Some(tw.clone())).unwrap();
        b.set_grad(Some(tb.clone())).unwrap();
        adam.step(1e-2).unwrap();
        sgd.step(1e-2).unwrap();
        // set_data with a value on the same device shares or copies it there.
        b.set_data(&b.mul_scalar(1.0).unwrap()).unwrap();
    }
    let s1 = g.memory_stats();
    assert_eq!((s1.bytes_uploaded, s1.bytes_downloaded), (s0.bytes_uploaded, s0.bytes_downloaded), "no host transfers in steps");
    assert!(s1.dispatches > s0.dispatches);
    // Clipping reads back one scalar (4 bytes) and uploads nothing.
    let norm = clip_grad_norm(&params, want_norm / 2.0).unwrap();
    let s2 = g.memory_stats();
    assert_eq!(s2.bytes_uploaded, s1.bytes_uploaded);
    assert_eq!(s2.bytes_downloaded - s1.bytes_downloaded, 4, "one f32 read back");
    assert!((norm - want_norm).abs() <= 1e-5 * want_norm, "gpu norm {norm} vs {want_norm}");
    let clipped = grad_norm(&params).unwrap();
    assert!((clipped - want_norm / 2.0).abs() <= 1e-5 * want_norm, "norm after clipping {clipped}");

    // The values after the GPU steps equal the same steps on the CPU.
    let wc = param(&vals(n, 1), &[64, 64], DType::F32, &Device::Cpu);
    let bc = param(&vals(64, 2), &[64], DType::F32, &Device::Cpu);
    let mut adam_c = AdamW::with_defaults(vec![("w".into(), wc.clone()), ("b".into(), bc.clone())]).unwrap();
    let mut sgd_c = Sgd::new(vec![ParamGroup::new("all", vec![("w".into(), wc.clone())], 1.0, 0.0)], SgdConfig::default()).unwrap();
    for _ in 0..3 {
        wc.set_grad(Some(tensor(&gw, &[64, 64], DType::F32, &Device::Cpu))).unwrap();
        bc.set_grad(Some(tensor(&gb, &[64], DType::F32, &Device::Cpu))).unwrap();
        adam_c.step(1e-2).unwrap();
        sgd_c.step(1e-2).unwrap();
    }
    assert_close("w gpu vs cpu", &w.to_vec_f64().unwrap(), &wc.to_vec_f64().unwrap(), 1e-9, 1e-6);
    assert_close("b gpu vs cpu", &b.to_vec_f64().unwrap(), &bc.to_vec_f64().unwrap(), 1e-9, 1e-6);
}
