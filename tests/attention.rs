//! The fused CPU attention (`Tensor::flash_attention`, what `nn::attention` runs on the CPU)
//! against the composed reference `softmax(q kᵀ/√d + bias) v` (`nn::attention_reference`):
//! outputs and the gradients of q, k, v in float64 on awkward shapes (query counts around the
//! 64-row tile, odd head widths, grouped-query heads) and every mask the decoder builds —
//! causal, sliding window, right and left padding (rows that see nothing), a prefix every query
//! sees, queries continuing a KV cache — plus central finite differences on the fused op itself.

mod common;

use tinytune::nn::{attention, attention_reference, Mask};
use tinytune::{DType, Device, Tensor};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| self.next()).collect::<Vec<f64>>(), shape, &Device::Cpu).unwrap()
    }
}

/// One case: `tq` queries at `offset` over `prefix + offset + tq` keys.
struct Case {
    b: usize,
    h: usize,
    hk: usize,
    tq: usize,
    d: usize,
    offset: usize,
    prefix: usize,
    window: Option<usize>,
    causal: bool,
    /// Real length of each row (`None`: no padding); `left`: padding first.
    lengths: Option<Vec<usize>>,
    left: bool,
}

fn mask_of(c: &Case) -> Mask {
    let keep = c.lengths.as_ref().map(|lens| {
        let real = c.offset + c.tq;
        let v: Vec<f64> =
            lens.iter().flat_map(|&n| (0..real).map(move |j| f64::from(u8::from(if c.left { j >= real - n } else { j < n })))).collect();
        Tensor::from_vec(v, &[c.b, real], &Device::Cpu).unwrap()
    });
    let mut m = Mask::causal(c.offset, keep.as_ref()).with_window(c.window);
    m.causal = c.causal;
    m
}

fn check(c: &Case, seed: u64) {
    let mut rng = Lcg(seed);
    let tk = c.prefix + c.offset + c.tq;
    let q = rng.tensor(&[c.b, c.h, c.tq, c.d]).requires_grad().unwrap();
    let k = rng.tensor(&[c.b, c.hk, tk, c.d]).requires_grad().unwrap();
    let v = rng.tensor(&[c.b, c.hk, tk, c.d]).requires_grad().unwrap();
    // The loss weights; zero on padding queries, as a loss ignores them (a row that sees no
    // key has no gradient in the fused kernel, see backend::cpu::attention).
    let mut w = rng.tensor(&[c.b, c.h, c.tq, c.d]).to_vec::<f64>().unwrap();
    if let Some(lens) = &c.lengths {
        let real = c.offset + c.tq;
        for (bi, &n) in lens.iter().enumerate() {
            for i in 0..c.tq {
                let j = c.offset + i;
                if !(if c.left { j >= real - n } else { j < n }) {
                    for hi in 0..c.h {
                        let at = ((bi * c.h + hi) * c.tq + i) * c.d;
                        w[at..at + c.d].iter_mut().for_each(|x| *x = 0.0);
                    }
                }
            }
        }
    }
    let w = Tensor::from_vec(w, &[c.b, c.h, c.tq, c.d], &Device::Cpu).unwrap();
    let mask = mask_of(c);
    let what = format!(
        "b{} h{}/{} tq{} tk{tk} d{} offset{} prefix{} window{:?} causal{} lengths{:?} left{}",
        c.b, c.h, c.hk, c.tq, c.d, c.offset, c.prefix, c.window, c.causal, c.lengths, c.left
    );
    let run = |f: &dyn Fn() -> Tensor| -> (Vec<f64>, Vec<Vec<f64>>) {
        for t in [&q, &k, &v] {
            t.zero_grad();
        }
        let y = f();
        y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = [&q, &k, &v].iter().map(|t| t.grad().unwrap().to_vec::<f64>().unwrap()).collect();
        (y.to_vec::<f64>().unwrap(), grads)
    };
    let (yf, gf) = run(&|| attention(&q, &k, &v, &mask).unwrap());
    let (yr, gr) = run(&|| attention_reference(&q, &k, &v, &mask).unwrap());
    let close = |a: &[f64], b: &[f64], name: &str| {
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-12, "{what}: {name} differs from the composed attention by {worst}");
    };
    close(&yf, &yr, "output");
    for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(gf.iter().zip(&gr)) {
        close(a, b, name);
    }
}

fn case(b: usize, h: usize, hk: usize, tq: usize, d: usize) -> Case {
    Case { b, h, hk, tq, d, offset: 0, prefix: 0, window: None, causal: true, lengths: None, left: false }
}

#[test]
fn fused_attention_equals_the_composed_one_causal_and_grouped() {
    for (i, &(b, h, hk, tq, d)) in
        [(1, 1, 1, 1, 1), (2, 2, 1, 5, 3), (1, 6, 2, 63, 8), (1, 3, 3, 64, 5), (2, 4, 2, 65, 7), (1, 2, 1, 130, 4)].iter().enumerate()
    {
        check(&case(b, h, hk, tq, d), i as u64 + 1);
        check(&Case { causal: false, ..case(b, h, hk, tq, d) }, i as u64 + 11);
    }
}

#[test]
fn fused_attention_equals_the_composed_one_under_every_mask() {
    let cases = [
        Case { window: Some(3), ..case(1, 2, 1, 70, 4) },
        Case { window: Some(1), ..case(2, 2, 2, 9, 3) },
        // Right padding, and left padding whose first rows see no key at all.
        Case { lengths: Some(vec![7, 3]), ..case(2, 4, 2, 7, 5) },
        Case { lengths: Some(vec![66, 2]), left: true, ..case(2, 2, 1, 66, 3) },
        Case { lengths: Some(vec![5, 1]), left: true, causal: false, ..case(2, 2, 2, 5, 3) },
        // A prefix every query sees (prefix tuning), with padding and a window.
        Case { prefix: 3, ..case(1, 3, 1, 6, 4) },
        Case { prefix: 2, lengths: Some(vec![4, 6]), window: Some(2), ..case(2, 2, 1, 6, 3) },
        // Queries continuing a cache: one decoded token, and a chunk past a tile.
        Case { offset: 9, ..case(1, 4, 2, 1, 6) },
        Case { offset: 40, lengths: Some(vec![80, 75]), left: true, ..case(2, 2, 1, 41, 3) },
        Case { offset: 5, prefix: 2, window: Some(4), ..case(1, 2, 2, 3, 4) },
    ];
    for (i, c) in cases.iter().enumerate() {
        check(c, 100 + i as u64);
    }
}

#[test]
fn fused_attention_gradients_match_finite_differences() {
    let mut rng = Lcg(7);
    let (b, h, hk, tq, d) = (1, 2, 1, 5, 3);
    let keep = Tensor::from_vec(vec![0.0f64, 1.0, 1.0, 1.0, 1.0], &[1, 5], &Device::Cpu).unwrap();
    let mask = Mask::causal(0, Some(&keep)).with_window(Some(3));
    let (q, k, v) = (rng.tensor(&[b, h, tq, d]), rng.tensor(&[b, hk, tq, d]), rng.tensor(&[b, hk, tq, d]));
    let w = rng.tensor(&[b, h, tq, d]);
    let f = |q: &Tensor, k: &Tensor, v: &Tensor| attention(q, k, v, &mask).unwrap().mul(&w).unwrap().sum_all().unwrap();
    let inputs = [q.requires_grad().unwrap(), k.requires_grad().unwrap(), v.requires_grad().unwrap()];
    f(&inputs[0], &inputs[1], &inputs[2]).backward().unwrap();
    for which in 0..3 {
        let g = inputs[which].grad().unwrap().to_vec::<f64>().unwrap();
        let base = inputs[which].to_vec::<f64>().unwrap();
        let shape = inputs[which].shape().to_vec();
        for i in 0..base.len() {
            let at = |e: f64| {
                let mut x = base.clone();
                x[i] += e;
                let t = Tensor::from_vec(x, &shape, &Device::Cpu).unwrap();
                let mut args = [q.clone(), k.clone(), v.clone()];
                args[which] = t;
                f(&args[0], &args[1], &args[2]).to_vec::<f64>().unwrap()[0]
            };
            let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!((fd - g[i]).abs() < 1e-7 * (1.0 + fd.abs()), "input {which}[{i}]: grad {} vs finite differences {fd}", g[i]);
        }
    }
}

#[test]
fn fused_attention_in_f32_is_close_to_f64() {
    let c = Case { lengths: Some(vec![100, 37]), ..case(2, 6, 2, 100, 16) };
    let mut rng = Lcg(3);
    let tk = c.tq;
    let (q, k, v) = (rng.tensor(&[c.b, c.h, c.tq, c.d]), rng.tensor(&[c.b, c.hk, tk, c.d]), rng.tensor(&[c.b, c.hk, tk, c.d]));
    let mask = mask_of(&c);
    let want = attention_reference(&q, &k, &v, &mask).unwrap().to_vec::<f64>().unwrap();
    let f32_ = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let mask32 = Mask::causal(0, mask.keep.as_ref().map(f32_).as_ref());
    let got = attention(&f32_(&q), &f32_(&k), &f32_(&v), &mask32).unwrap().to_vec::<f32>().unwrap();
    let worst = got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-5, "f32 fused attention differs from f64 by {worst}");
}

#[test]
fn fused_attention_refuses_bad_shapes() {
    let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let spec = tinytune::tensor::AttnSpec { scale: 1.0, causal: true, offset: 0, window: None, keep: None, starts: None };
    assert!(t(&[1, 3, 4, 8]).flash_attention(&t(&[1, 2, 4, 8]), &t(&[1, 2, 4, 8]), &spec).is_err(), "3 heads over 2 kv heads");
    assert!(t(&[1, 2, 5, 8]).flash_attention(&t(&[1, 2, 4, 8]), &t(&[1, 2, 4, 8]), &spec).is_err(), "fewer keys than queries");
    let bad_keep = tinytune::tensor::AttnSpec { keep: Some(vec![true; 3]), ..spec.clone() };
    let e = t(&[1, 2, 4, 8]).flash_attention(&t(&[1, 2, 4, 8]), &t(&[1, 2, 4, 8]), &bad_keep).err().unwrap().to_string();
    assert!(e.contains("keep"), "{e}");
}

/// The WGSL kernels (`shaders/attention.wgsl`) against the CPU kernel on the same f32 inputs:
/// outputs and the gradients of q, k, v, under every mask and on awkward shapes (lavapipe when
/// there is no GPU).
#[test]
fn fused_attention_on_the_gpu_equals_the_cpu() {
    let Some(gpu) = common::gpu_device() else { return };
    let cases = [
        case(1, 1, 1, 1, 1),
        case(2, 6, 2, 65, 8),
        Case { causal: false, ..case(1, 3, 3, 70, 5) },
        Case { window: Some(3), lengths: Some(vec![70, 9]), ..case(2, 4, 2, 70, 16) },
        Case { lengths: Some(vec![66, 2]), left: true, ..case(2, 2, 1, 66, 3) },
        Case { prefix: 3, lengths: Some(vec![4, 6]), ..case(2, 2, 1, 6, 7) },
        Case { offset: 40, lengths: Some(vec![80, 75]), left: true, ..case(2, 2, 1, 41, 3) },
        Case { offset: 9, ..case(1, 4, 2, 1, 256) },
        case(1, 2, 1, 130, 200),
        // A window of 0 sees nothing (every row the mean of the values); a huge one everything.
        Case { window: Some(0), ..case(1, 2, 1, 5, 4) },
        Case { window: Some(usize::MAX), causal: false, ..case(1, 2, 2, 6, 4) },
        // No padding: dK/dV visit only the queries that can see each key (a window bounds them
        // from above, causality from below), with a cache offset and a prefix.
        Case { window: Some(5), offset: 7, ..case(1, 4, 2, 70, 8) },
        Case { window: Some(3), causal: false, ..case(2, 2, 1, 66, 4) },
        Case { prefix: 3, offset: 2, ..case(1, 3, 1, 67, 5) },
    ];
    for (n, c) in cases.iter().enumerate() {
        let mut rng = Lcg(500 + n as u64);
        let tk = c.prefix + c.offset + c.tq;
        let f32_ = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (q, k, v) =
            (f32_(rng.tensor(&[c.b, c.h, c.tq, c.d])), f32_(rng.tensor(&[c.b, c.hk, tk, c.d])), f32_(rng.tensor(&[c.b, c.hk, tk, c.d])));
        let w = f32_(rng.tensor(&[c.b, c.h, c.tq, c.d]));
        let mut results = Vec::new();
        for dev in [Device::Cpu, gpu.clone()] {
            let up = |t: &Tensor| t.to_device(&dev).unwrap().requires_grad().unwrap();
            let (q, k, v) = (up(&q), up(&k), up(&v));
            let m = mask_of(c);
            let keep = m.keep.as_ref().map(|t| t.to_dtype(DType::F32).unwrap().to_device(&dev).unwrap());
            let mut mask = Mask::causal(c.offset, keep.as_ref()).with_window(c.window);
            mask.causal = c.causal;
            let y = attention(&q, &k, &v, &mask).unwrap();
            y.mul(&w.to_device(&dev).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            results.push([y, q.grad().unwrap(), k.grad().unwrap(), v.grad().unwrap()].map(|t| t.to_vec_f64().unwrap()));
        }
        for (part, (a, b)) in ["y", "dq", "dk", "dv"].iter().zip(results[1].iter().zip(&results[0])) {
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f64::max);
            assert!(worst < 2e-5, "case {n}: GPU {part} differs from the CPU's by {worst}");
        }
    }
}

/// One launch forward and three backward (statistics, dQ, dK/dV), nothing of the composed
/// path (no softmax, no score matmul), whatever the mask.
#[test]
fn gpu_attention_launches_one_kernel_forward_and_three_backward() {
    if common::gpu_device().is_none() {
        return;
    }
    let g = common::gpu_with_kernel(tinytune::backend::gpu::MatmulKernel::Registers);
    let Device::Gpu(dev) = &g else { unreachable!() };
    let mut rng = Lcg(9);
    let up = |t: Tensor| t.to_dtype(DType::F32).unwrap().to_device(&g).unwrap().requires_grad().unwrap();
    let (q, k, v) = (up(rng.tensor(&[2, 4, 7, 8])), up(rng.tensor(&[2, 2, 7, 8])), up(rng.tensor(&[2, 2, 7, 8])));
    let keep = Tensor::from_vec(vec![1.0f32; 14], &[2, 7], &g).unwrap();
    let mask = Mask::causal(0, Some(&keep)).with_window(Some(4));
    let count = |name: &str| common::dispatches(dev, name);
    let y = attention(&q, &k, &v, &mask).unwrap();
    assert_eq!(count("attn_fwd"), 1);
    y.sum_all().unwrap().backward().unwrap();
    for (name, n) in [("attn_fwd", 1), ("attn_bwd_prep", 1), ("attn_bwd_dq", 1), ("attn_bwd_dkv", 1), ("softmax_rows", 0)] {
        assert_eq!(count(name), n, "{name} launches: {:?}", dev.kernel_counts());
    }
    assert!(dev.kernel_counts().iter().all(|(k, _)| !k.starts_with("matmul")), "no score products: {:?}", dev.kernel_counts());
}

/// No queries: an empty output and zero gradients for the keys and values on both devices
/// (the GPU's pooled buffers are not left as they were).
#[test]
fn fused_attention_with_no_queries_gives_zero_gradients() {
    let mut devices = vec![Device::Cpu];
    devices.extend(common::gpu_device());
    for dev in devices {
        // Fill the pool with non-zero buffers of the sizes about to be asked for.
        for _ in 0..4 {
            drop(Tensor::full(&[32], 14.0, DType::F32, &dev).unwrap().add_scalar(1.0).unwrap());
        }
        let mut rng = Lcg(11);
        let up = |t: Tensor| t.to_dtype(DType::F32).unwrap().to_device(&dev).unwrap().requires_grad().unwrap();
        let (q, k, v) = (up(rng.tensor(&[1, 1, 0, 8])), up(rng.tensor(&[1, 1, 4, 8])), up(rng.tensor(&[1, 1, 4, 8])));
        let y = attention(&q, &k, &v, &Mask::causal(4, None)).unwrap();
        assert_eq!(y.shape(), &[1, 1, 0, 8]);
        y.sum_all().unwrap().backward().unwrap();
        for t in [&k, &v] {
            if let Some(g) = t.grad() {
                assert!(g.to_vec_f64().unwrap().iter().all(|&x| x == 0.0), "{dev}: {:?}", g.to_vec_f64().unwrap());
            }
        }
    }
}
