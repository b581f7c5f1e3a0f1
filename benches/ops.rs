//! Criterion benchmarks of the CPU kernels: matmul (GFLOP/s, reported by criterion as
//! "elements/s" where one element is one flop), softmax and layer norm at model-like shapes
//! (bytes/s). Run `cargo bench --bench ops`; compare with `scripts/bench_reference.py`,
//! which times NumPy/OpenBLAS on the same shapes in the same session.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use tinytune::{DType, Device, Rng, Tensor};

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, DType::F32, &Device::Cpu, rng).unwrap()
}

fn matmul(c: &mut Criterion) {
    let mut rng = Rng::new(0);
    let mut g = c.benchmark_group("matmul_f32");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for n in [256usize, 512, 1024, 2048] {
        let (a, b) = (randn(&[n, n], &mut rng), randn(&[n, n], &mut rng));
        g.throughput(Throughput::Elements((2 * n * n * n) as u64));
        g.bench_with_input(BenchmarkId::new("nn", n), &n, |bch, _| bch.iter(|| a.matmul(&b).unwrap()));
        let bt = b.t().unwrap();
        g.bench_with_input(BenchmarkId::new("nt", n), &n, |bch, _| bch.iter(|| a.matmul(&bt).unwrap()));
    }
    // A linear layer of a small LLaMA (SmolLM2-135M MLP up-projection) on 512 tokens: x · Wᵀ.
    let (x, w) = (randn(&[512, 576], &mut rng), randn(&[1536, 576], &mut rng));
    g.throughput(Throughput::Elements((2 * 512 * 576 * 1536) as u64));
    g.bench_function("linear_512x576x1536", |bch| bch.iter(|| x.matmul(&w.t().unwrap()).unwrap()));
    g.finish();
}

fn softmax_and_norms(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("rowwise_f32");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    // Attention scores: batch 4, 9 heads, 256 queries × 256 keys; LM logits: 256 tokens × 49152.
    for (name, shape) in [("softmax_attn_4x9x256x256", vec![4usize, 9, 256, 256]), ("softmax_logits_256x49152", vec![256, 49152])] {
        let x = randn(&shape, &mut rng);
        g.throughput(Throughput::Bytes((x.numel() * 4 * 2) as u64));
        g.bench_function(name, |b| b.iter(|| x.softmax(-1).unwrap()));
    }
    for (rows, d) in [(2048usize, 576usize), (2048, 2048)] {
        let x = randn(&[rows, d], &mut rng);
        let (w, bias) = (randn(&[d], &mut rng), randn(&[d], &mut rng));
        g.throughput(Throughput::Bytes((rows * d * 4 * 2) as u64));
        g.bench_function(format!("layer_norm_{rows}x{d}"), |b| b.iter(|| x.layer_norm(Some(&w), Some(&bias), 1e-5).unwrap()));
        g.bench_function(format!("rms_norm_{rows}x{d}"), |b| b.iter(|| x.rms_norm(Some(&w), 1e-5).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, matmul, softmax_and_norms);
criterion_main!(benches);
