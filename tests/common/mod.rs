//! The op-test harness: every op is checked
//! 1. forward, in f32, against an independent float64 reference written in plain loops;
//! 2. forward on non-contiguous (permuted) inputs, which must give the same values;
//! 3. backward, in f64, against central finite differences of the op itself, on both
//!    contiguous and non-contiguous leaves.
//!
//! Adding an op's test is one call to [`check`] (or [`unary`]/[`binary`]).
#![allow(dead_code)]

use tinytune::{DType, Device, Result, Tensor};

/// A plain float64 n-d array for reference computations.
#[derive(Debug, Clone)]
pub struct Nd {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Multi-index of linear index `i` in `shape`.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        idx[k] = i % shape[k];
        i /= shape[k];
    }
    idx
}

impl Nd {
    pub fn new(shape: &[usize], data: Vec<f64>) -> Nd {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Nd { shape: shape.to_vec(), data }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    pub fn at(&self, idx: &[usize]) -> f64 {
        let s = strides(&self.shape);
        self.data[idx.iter().zip(&s).map(|(a, b)| a * b).sum::<usize>()]
    }
    /// Element at `idx` of the broadcast of `self` to a shape of rank `idx.len()`.
    pub fn at_broadcast(&self, idx: &[usize]) -> f64 {
        let extra = idx.len() - self.shape.len();
        let own: Vec<usize> = self.shape.iter().enumerate().map(|(i, &d)| if d == 1 { 0 } else { idx[i + extra] }).collect();
        self.at(&own)
    }
    pub fn map(&self, f: impl Fn(f64) -> f64) -> Nd {
        Nd::new(&self.shape, self.data.iter().map(|&v| f(v)).collect())
    }
    /// Element-wise with NumPy broadcasting.
    pub fn zip(&self, o: &Nd, f: impl Fn(f64, f64) -> f64) -> Nd {
        let shape = broadcast(&self.shape, &o.shape);
        let n = shape.iter().product();
        Nd::new(
            &shape,
            (0..n)
                .map(|i| {
                    let idx = unravel(i, &shape);
                    f(self.at_broadcast(&idx), o.at_broadcast(&idx))
                })
                .collect(),
        )
    }
    /// Reduce one axis with `f` over the values along it; the axis is removed.
    pub fn reduce(&self, axis: usize, f: impl Fn(&[f64]) -> f64) -> Nd {
        let mut shape = self.shape.clone();
        let d = shape.remove(axis);
        let n = shape.iter().product();
        let data = (0..n)
            .map(|i| {
                let mut idx = unravel(i, &shape);
                idx.insert(axis, 0);
                let vals: Vec<f64> = (0..d)
                    .map(|j| {
                        idx[axis] = j;
                        self.at(&idx)
                    })
                    .collect();
                f(&vals)
            })
            .collect();
        Nd::new(&shape, data)
    }
    /// Apply `f` to every 1-d slice along `axis` (same length out).
    pub fn along(&self, axis: usize, f: impl Fn(&[f64]) -> Vec<f64>) -> Nd {
        let mut out = self.clone();
        let mut outer = self.shape.clone();
        let d = outer.remove(axis);
        let s = strides(&self.shape);
        for i in 0..outer.iter().product() {
            let mut idx = unravel(i, &outer);
            idx.insert(axis, 0);
            let base: usize = idx.iter().zip(&s).map(|(a, b)| a * b).sum();
            let vals: Vec<f64> = (0..d).map(|j| self.data[base + j * s[axis]]).collect();
            for (j, v) in f(&vals).into_iter().enumerate() {
                out.data[base + j * s[axis]] = v;
            }
        }
        out
    }
}

pub fn broadcast(a: &[usize], b: &[usize]) -> Vec<usize> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            assert!(da == db || da == 1 || db == 1, "reference broadcast {a:?} {b:?}");
            da.max(db)
        })
        .collect()
}

/// A small deterministic generator for test data (splitmix64), independent of the engine's RNG.
pub struct TestRng(u64);
impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (1.0 - self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Where an input's values are drawn from.
#[derive(Debug, Clone, Copy)]
pub enum Dom {
    /// Standard normal.
    Normal,
    /// Uniform in [0.5, 2): for log, sqrt, division, powers.
    Positive,
    /// Normal, but at least 0.05 away from 0 (and from the kinks of relu/abs/sign).
    AwayFromZero,
    /// Distinct values (a shuffled, spaced grid): for max/min, where ties have no derivative.
    Distinct,
}

pub fn random_nd(shape: &[usize], dom: Dom, rng: &mut TestRng) -> Nd {
    let n: usize = shape.iter().product();
    let data = match dom {
        Dom::Normal => (0..n).map(|_| rng.normal()).collect(),
        Dom::Positive => (0..n).map(|_| 0.5 + 1.5 * rng.uniform()).collect(),
        Dom::AwayFromZero => (0..n)
            .map(|_| {
                let v = rng.normal();
                if v.abs() < 0.05 {
                    0.05_f64.copysign(v) + v
                } else {
                    v
                }
            })
            .collect(),
        Dom::Distinct => {
            let mut v: Vec<f64> = (0..n).map(|i| (i as f64 - n as f64 / 2.0) * 0.1 + 0.01 * rng.uniform()).collect();
            for i in (1..n).rev() {
                v.swap(i, rng.below(i + 1));
            }
            v
        }
    };
    Nd::new(shape, data)
}

/// A leaf tensor holding `nd`'s values. With `permuted`, the storage is laid out with the
/// axes reversed and the returned tensor is a permuted (non-contiguous) view of the leaf.
/// Returns (view used as the op input, leaf that receives the gradient).
pub fn make_input(nd: &Nd, dtype: DType, permuted: bool, grad: bool) -> (Tensor, Tensor) {
    let t = Tensor::from_vec(nd.data.clone(), &nd.shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    let r = nd.shape.len();
    if !permuted || r < 2 {
        let leaf = if grad { t.requires_grad().unwrap() } else { t };
        return (leaf.clone(), leaf);
    }
    let rev: Vec<usize> = (0..r).rev().collect();
    let stored = t.permute(&rev).unwrap().contiguous().unwrap().detach();
    let leaf = if grad { stored.requires_grad().unwrap() } else { stored };
    (leaf.permute(&rev).unwrap(), leaf)
}

/// Tolerances of one op check.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    /// |f32 result − f64 reference| ≤ fwd · (1 + |reference|)
    pub fwd: f64,
    /// |autograd − finite difference| ≤ grad · (1 + |finite difference|)
    pub grad: f64,
}
pub const TOL: Tol = Tol { fwd: 2e-5, grad: 1e-6 };

pub fn assert_close(name: &str, what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name} {what}: length {} vs {}", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan()) || (g == w);
        assert!(ok, "{name} {what}: element {i}: got {g}, want {w} (tol {tol})");
    }
}

/// Check an op: forward against `reference` (float64), non-contiguous inputs, gradients
/// against central differences. `shapes`/`doms` describe the differentiable inputs; anything
/// else the op needs (indices, flags) is captured by the closures.
pub fn check(
    name: &str,
    shapes: &[&[usize]],
    doms: &[Dom],
    tol: Tol,
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Nd]) -> Nd,
) {
    let mut rng = TestRng::new(name.bytes().fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    let nds: Vec<Nd> = shapes.iter().enumerate().map(|(i, s)| random_nd(s, doms[i.min(doms.len() - 1)], &mut rng)).collect();
    let want = reference(&nds);

    // 1 and 2: forward in f32, contiguous and permuted.
    for permuted in [false, true] {
        let ins: Vec<Tensor> = nds.iter().map(|n| make_input(n, DType::F32, permuted, false).0).collect();
        let out = op(&ins).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
        assert_eq!(out.shape(), want.shape.as_slice(), "{name}: output shape");
        assert_eq!(out.dtype(), DType::F32, "{name}: output dtype");
        let what = if permuted { "forward (permuted inputs)" } else { "forward" };
        assert_close(name, what, &out.to_vec_f64().unwrap(), &want.data, tol.fwd);
    }

    // 3: gradients in f64 of L = Σ w ⊙ op(x) with fixed random weights w.
    let w = random_nd(&want.shape, Dom::Normal, &mut rng);
    let wt = Tensor::from_vec(w.data.clone(), &w.shape, &Device::Cpu).unwrap();
    let loss_of = |ins: &[Tensor]| -> Result<Tensor> { op(ins)?.mul(&wt)?.sum_all() };
    for permuted in [false, true] {
        let pairs: Vec<(Tensor, Tensor)> = nds.iter().map(|n| make_input(n, DType::F64, permuted, true)).collect();
        let ins: Vec<Tensor> = pairs.iter().map(|p| p.0.clone()).collect();
        let loss = loss_of(&ins).unwrap_or_else(|e| panic!("{name}: f64 forward failed: {e}"));
        loss.backward().unwrap_or_else(|e| panic!("{name}: backward failed: {e}"));
        for (k, nd) in nds.iter().enumerate() {
            let leaf = &pairs[k].1;
            let got = leaf.grad().unwrap_or_else(|| panic!("{name}: input {k} got no gradient"));
            assert_eq!(got.shape(), leaf.shape(), "{name}: gradient shape of input {k}");
            let got = got.to_vec_f64().unwrap();
            // Finite differences on the values as stored in the leaf.
            let base = leaf.to_vec_f64().unwrap();
            let fd: Vec<f64> = (0..nd.numel())
                .map(|i| {
                    let eval = |delta: f64| {
                        let mut v = base.clone();
                        v[i] += delta;
                        let stored = Tensor::from_vec(v, leaf.shape(), &Device::Cpu).unwrap();
                        let input = if permuted && nd.shape.len() >= 2 {
                            stored.permute(&(0..nd.shape.len()).rev().collect::<Vec<_>>()).unwrap()
                        } else {
                            stored
                        };
                        let mut ins2 = ins.iter().map(|t| t.detach()).collect::<Vec<_>>();
                        ins2[k] = input;
                        loss_of(&ins2).unwrap().to_scalar().unwrap()
                    };
                    let h = 1e-6 * (1.0 + base[i].abs());
                    (eval(h) - eval(-h)) / (2.0 * h)
                })
                .collect();
            let what = format!("gradient of input {k}{}", if permuted { " (permuted)" } else { "" });
            assert_close(name, &what, &got, &fd, tol.grad);
        }
    }
}

/// One-line check of an element-wise unary op.
pub fn unary(name: &str, dom: Dom, op: impl Fn(&Tensor) -> Result<Tensor>, reference: impl Fn(f64) -> f64) {
    for shape in [&[3usize, 4, 5][..], &[1], &[7, 1, 3]] {
        check(name, &[shape], &[dom], TOL, |t| op(&t[0]), |r| r[0].map(&reference));
    }
}

/// One-line check of a broadcasting binary op over several shape pairs.
pub fn binary(name: &str, doms: [Dom; 2], op: impl Fn(&Tensor, &Tensor) -> Result<Tensor>, reference: impl Fn(f64, f64) -> f64) {
    let pairs: [(&[usize], &[usize]); 5] =
        [(&[3, 4], &[3, 4]), (&[3, 1, 5], &[4, 1]), (&[1], &[2, 3]), (&[5, 3], &[3]), (&[2, 1, 3], &[2, 4, 1])];
    for (a, b) in pairs {
        check(name, &[a, b], &doms, TOL, |t| op(&t[0], &t[1]), |r| r[0].zip(&r[1], &reference));
    }
}

/// A GPU device for tests: the software adapter (lavapipe) or else a hardware one. With none,
/// prints that the test skipped and returns `None` — unless `TINYTUNE_REQUIRE_GPU=1` (CI).
pub fn gpu_device() -> Option<Device> {
    match Device::gpu_software().or_else(|_| Device::gpu()) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(std::env::var("TINYTUNE_REQUIRE_GPU").map_or(true, |v| v != "1"), "TINYTUNE_REQUIRE_GPU=1 but no GPU adapter: {e}");
            eprintln!("gpu test skipped: no GPU adapter ({e})");
            None
        }
    }
}

/// Where scripts/fetch-assets.sh puts the real-model assets.
pub fn assets_dir() -> std::path::PathBuf {
    tinytune::io::assets_dir()
}

/// The path of a fetched asset, or `None` (printing why) when it has not been fetched; with
/// `TINYTUNE_REQUIRE_ASSETS=1` (CI) a missing asset is a failure.
pub fn asset(name: &str) -> Option<std::path::PathBuf> {
    let p = assets_dir().join(name);
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("TINYTUNE_REQUIRE_ASSETS").as_deref() != Ok("1"),
        "{} is missing and TINYTUNE_REQUIRE_ASSETS=1: run scripts/fetch-assets.sh",
        p.display()
    );
    println!("skipped: run scripts/fetch-assets.sh ({} not found)", p.display());
    None
}

/// The tiny Llama fixture with the word-level tokenizer fixture (61 ids < its 96-row
/// vocabulary), as a model directory `dir/model` that the CLI and `Tokenizer::for_model` read.
pub fn tiny_model_dir(dir: &std::path::Path) -> std::path::PathBuf {
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixtures.join("tiny-llama").join(f), m.join(f)).unwrap();
    }
    std::fs::copy(fixtures.join("tokenizer/tiny-words.json"), m.join("tokenizer.json")).unwrap();
    std::fs::copy(fixtures.join("tokenizer/tiny-words_config.json"), m.join("tokenizer_config.json")).unwrap();
    m
}

/// `|gpu − cpu| ≤ abs + rel·|cpu|` for a product result, with the matmul tolerance of
/// tests/gpu.rs (2e-6·K per unit-sized product term, 2e-5 relative), K the result's shared
/// dimension and the product-term size estimated from the reference: the rms of a sum of K
/// random-signed terms is √K times theirs, so abs = 2e-6·√K·rms(cpu).
#[allow(dead_code)]
pub fn close_product(what: &str, cpu: &Tensor, gpu: &Tensor, kdim: usize) {
    assert_eq!(cpu.shape(), gpu.shape(), "{what}: shape");
    let (a, b) = (cpu.to_vec_f64().unwrap(), gpu.to_vec_f64().unwrap());
    let rms = (a.iter().map(|v| v * v).sum::<f64>() / a.len().max(1) as f64).sqrt();
    let abs = 2e-6 * (kdim as f64).sqrt() * rms.max(1e-30);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= abs + 2e-5 * x.abs(), "{what}: element {i} of {:?}: cpu {x} gpu {y} (abs tol {abs:e})", cpu.shape());
    }
}

/// Dispatches of the kernel entry point `name` recorded on `dev` so far.
#[allow(dead_code)]
pub fn dispatches(dev: &tinytune::GpuDevice, name: &str) -> u64 {
    dev.kernel_counts().iter().filter(|(k, _)| *k == name).map(|(_, c)| c.dispatches).sum()
}

/// A GPU device of its own, so that its counters (transfers, dispatches, memory) see only the
/// calling test: the software adapter when there is one, else the hardware one. Call it after
/// a GPU was found.
#[allow(dead_code)]
pub fn own_gpu() -> tinytune::GpuDevice {
    use tinytune::backend::gpu::AdapterKind;
    tinytune::GpuDevice::new(AdapterKind::Software)
        .or_else(|_| tinytune::GpuDevice::new(AdapterKind::Hardware))
        .expect("an adapter (one was found before)")
}

/// A GPU device of its own (see [`own_gpu`]) running `kernel` (both matmul kernel families are
/// tested wherever the adapter is).
#[allow(dead_code)]
pub fn gpu_with_kernel(kernel: tinytune::backend::gpu::MatmulKernel) -> Device {
    let dev = own_gpu();
    dev.set_matmul_kernel(kernel);
    Device::Gpu(dev)
}
