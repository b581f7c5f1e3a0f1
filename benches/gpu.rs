//! Criterion benchmarks of the GPU kernels: matmul (GFLOP/s, reported by criterion as
//! "elements/s" where one element is one flop), softmax, layer/RMS norm and fused
//! cross-entropy (GB/s of the tensor read and written), and the fused LoRA linear against the
//! composition of plain ops (GFLOP/s of the useful flops, forward and forward + backward).
//!
//! Run `cargo bench --bench gpu`. The device is `TINYTUNE_DEVICE` (default `gpu`, a hardware
//! adapter); `TINYTUNE_DEVICE=gpu-software` runs it on lavapipe at small shapes (lavapipe
//! timings say nothing about real GPUs). `TINYTUNE_MATMUL=tiled|registers` picks the matmul
//! kernel. Every iteration ends with a `synchronize`, so a sample is the GPU time of the op
//! plus one submit/wait.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use tinytune::{CrossEntropyReduction, DType, Device, Rng, Tensor};

/// The bench device and whether it is a software adapter (small shapes then).
fn device() -> Option<(Device, bool)> {
    let name = std::env::var("TINYTUNE_DEVICE").unwrap_or_else(|_| "gpu".into());
    match Device::from_name(&name) {
        Ok(d @ Device::Gpu(_)) => {
            let soft = matches!(&d, Device::Gpu(g) if g.is_software());
            Some((d, soft))
        }
        Ok(_) => {
            eprintln!("benches/gpu: TINYTUNE_DEVICE={name} is not a GPU; skipped");
            None
        }
        Err(e) => {
            eprintln!("benches/gpu: no GPU ({e}); skipped (TINYTUNE_DEVICE=gpu-software for lavapipe)");
            None
        }
    }
}

fn randn(shape: &[usize], dev: &Device, rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, DType::F32, dev, rng).unwrap()
}

fn run(dev: &Device, f: impl Fn() -> Tensor) {
    let t = f();
    dev.synchronize().unwrap();
    drop(t);
}

fn matmul(c: &mut Criterion) {
    let Some((dev, soft)) = device() else { return };
    let mut rng = Rng::new(0);
    let mut g = c.benchmark_group("gpu_matmul_f32");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let sizes: &[usize] = if soft { &[128, 256] } else { &[512, 1024, 2048, 4096] };
    for &n in sizes {
        let (a, b) = (randn(&[n, n], &dev, &mut rng), randn(&[n, n], &dev, &mut rng));
        g.throughput(Throughput::Elements((2 * n * n * n) as u64));
        g.bench_with_input(BenchmarkId::new("nn", n), &n, |bch, _| bch.iter(|| run(&dev, || a.matmul(&b).unwrap())));
        let bt = b.t().unwrap();
        g.bench_with_input(BenchmarkId::new("nt", n), &n, |bch, _| bch.iter(|| run(&dev, || a.matmul(&bt).unwrap())));
    }
    if !soft {
        // A linear layer of a small LLaMA (SmolLM2-135M MLP up-projection) on 512 tokens: x · Wᵀ.
        let (x, w) = (randn(&[512, 576], &dev, &mut rng), randn(&[1536, 576], &dev, &mut rng));
        g.throughput(Throughput::Elements((2 * 512 * 576 * 1536) as u64));
        g.bench_function("linear_512x576x1536", |bch| bch.iter(|| run(&dev, || x.matmul(&w.t().unwrap()).unwrap())));
    }
    g.finish();
}

fn rowwise(c: &mut Criterion) {
    let Some((dev, soft)) = device() else { return };
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("gpu_rowwise_f32");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let (rows, vocab, d) = if soft { (64usize, 1024usize, 256usize) } else { (256, 49152, 2048) };
    let x = randn(&[rows, vocab], &dev, &mut rng);
    g.throughput(Throughput::Bytes((x.numel() * 4 * 2) as u64));
    g.bench_function(format!("softmax_{rows}x{vocab}"), |b| b.iter(|| run(&dev, || x.softmax(-1).unwrap())));
    let y = Tensor::from_vec((0..rows as u32).map(|i| i * 7 % vocab as u32).collect::<Vec<_>>(), &[rows], &dev).unwrap();
    g.throughput(Throughput::Bytes((x.numel() * 4) as u64));
    g.bench_function(format!("cross_entropy_fwd_{rows}x{vocab}"), |b| {
        b.iter(|| run(&dev, || x.cross_entropy(&y, -100, CrossEntropyReduction::Sum).unwrap()))
    });
    let xg = x.requires_grad().unwrap();
    g.throughput(Throughput::Bytes((x.numel() * 4 * 3) as u64));
    g.bench_function(format!("cross_entropy_fwd_bwd_{rows}x{vocab}"), |b| {
        b.iter(|| {
            let l = xg.cross_entropy(&y, -100, CrossEntropyReduction::Sum).unwrap();
            l.backward().unwrap();
            let gr = xg.grad().unwrap();
            xg.zero_grad();
            dev.synchronize().unwrap();
            drop(gr);
        })
    });
    let nrows = if soft { 64 } else { 2048 };
    let h = randn(&[nrows, d], &dev, &mut rng);
    let (w, bias) = (randn(&[d], &dev, &mut rng), randn(&[d], &dev, &mut rng));
    g.throughput(Throughput::Bytes((nrows * d * 4 * 2) as u64));
    g.bench_function(format!("layer_norm_{nrows}x{d}"), |b| b.iter(|| run(&dev, || h.layer_norm(Some(&w), Some(&bias), 1e-5).unwrap())));
    g.bench_function(format!("rms_norm_{nrows}x{d}"), |b| b.iter(|| run(&dev, || h.rms_norm(Some(&w), 1e-5).unwrap())));
    g.finish();
}

/// `x.lora_linear(xd, w0, a, b, s)` or its reference composition.
type LoraFn = fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, f64) -> tinytune::Result<Tensor>;

/// The LoRA linear `y = x W0ᵀ + s (x Aᵀ) Bᵀ` on SmolLM2-135M shapes (512 tokens, d = 576,
/// q/v projections 576 → 576 and the MLP up-projection 576 → 1536, rank 8): the fused op
/// (`Tensor::lora_linear`) against the composition (`Tensor::lora_linear_reference`), forward
/// and forward + backward (x, A and B get gradients, W0 is frozen; the loss is Σy for both).
/// Flops counted: forward `2n·in·out + 2n·r·(in + out)`; backward adds `2n·in·out + 4n·r·(in + out)`.
fn lora(c: &mut Criterion) {
    let Some((dev, _soft)) = device() else { return };
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("gpu_lora");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let (n, r, s) = (512usize, 8usize, 2.0);
    for (k, m) in [(576usize, 576usize), (576, 1536)] {
        let x = randn(&[n, k], &dev, &mut rng).requires_grad().unwrap();
        let w0 = Tensor::randn(&[m, k], 0.0, 0.04, DType::F32, &dev, &mut rng).unwrap();
        let a = Tensor::randn(&[r, k], 0.0, 0.04, DType::F32, &dev, &mut rng).unwrap().requires_grad().unwrap();
        let b = Tensor::randn(&[m, r], 0.0, 0.1, DType::F32, &dev, &mut rng).unwrap().requires_grad().unwrap();
        let low = 2 * n * r * (k + m);
        let fwd = 2 * n * k * m + low;
        let paths: [(&str, LoraFn); 2] = [("fused", Tensor::lora_linear), ("unfused", Tensor::lora_linear_reference)];
        for (name, f) in paths {
            g.throughput(Throughput::Elements(fwd as u64));
            g.bench_function(format!("{name}_fwd_{n}x{k}x{m}_r{r}"), |bch| {
                bch.iter(|| run(&dev, || tinytune::with_no_grad(|| f(&x, &x, &w0, &a, &b, s).unwrap())))
            });
            g.throughput(Throughput::Elements((2 * fwd + low) as u64));
            g.bench_function(format!("{name}_fwd_bwd_{n}x{k}x{m}_r{r}"), |bch| {
                bch.iter(|| {
                    f(&x, &x, &w0, &a, &b, s).unwrap().sum_all().unwrap().backward().unwrap();
                    let grads = [x.grad(), a.grad(), b.grad()];
                    for t in [&x, &a, &b] {
                        t.zero_grad();
                    }
                    dev.synchronize().unwrap();
                    drop(grads);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, matmul, rowwise, lora);
criterion_main!(benches);
