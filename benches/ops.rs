//! Criterion benchmarks of the CPU kernels: matmul (GFLOP/s, reported by criterion as
//! "elements/s" where one element is one flop), softmax and layer norm at model-like shapes
//! (bytes/s), and the one-token products of decoding (`decode_1x…`: one row against a frozen
//! weight of every storage, f32 the reference measured in the same run), attention forward and
//! backward, fused against composed (`attention/…`), the rank-8 products of a LoRA site
//! (`lora_r8_f32/…`), and SmolLM2's linear shapes on 512 rows against a Q4_0 weight with the
//! integer products on and off (`int8_dot/…`, AVX-512 VNNI CPUs). Run
//! `cargo bench --bench ops`; compare with `scripts/bench_reference.py`, which times
//! NumPy/OpenBLAS on the same shapes in the same session.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use tinytune::{DType, Device, Rng, Tensor};

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, DType::F32, &Device::Cpu, rng).unwrap()
}

fn matmul(c: &mut Criterion) {
    let mut rng = Rng::new(0);
    let mut g = c.benchmark_group("matmul_f32");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    // Square products in every transpose case: `nt` is A · Bᵀ with Bᵀ read in place (a view),
    // `tn` is Aᵀ · B, `tt` both.
    for n in [256usize, 512, 1024, 2048] {
        let (a, b) = (randn(&[n, n], &mut rng), randn(&[n, n], &mut rng));
        let (at, bt) = (a.t().unwrap(), b.t().unwrap());
        g.throughput(Throughput::Elements((2 * n * n * n) as u64));
        for (name, x, y) in [("nn", &a, &b), ("nt", &a, &bt), ("tn", &at, &b), ("tt", &at, &bt)] {
            g.bench_with_input(BenchmarkId::new(name, n), &n, |bch, _| bch.iter(|| x.matmul(y).unwrap()));
        }
    }
    g.finish();
    // Every linear shape of SmolLM2-135M (in → out features) on 512 tokens, in the three orders
    // a training step runs it: forward `x Wᵀ`, `dx = dy W`, `dW = dyᵀ x`.
    let mut g = c.benchmark_group("linear_f32");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for (fan_in, fan_out) in [(576usize, 576usize), (576, 192), (576, 1536), (1536, 576)] {
        let (x, w, dy) = (randn(&[512, fan_in], &mut rng), randn(&[fan_out, fan_in], &mut rng), randn(&[512, fan_out], &mut rng));
        let (wt, dyt) = (w.t().unwrap(), dy.t().unwrap());
        g.throughput(Throughput::Elements((2 * 512 * fan_in * fan_out) as u64));
        let shape = format!("{fan_in}x{fan_out}");
        g.bench_function(format!("{shape}/forward"), |bch| bch.iter(|| x.matmul(&wt).unwrap()));
        g.bench_function(format!("{shape}/dx"), |bch| bch.iter(|| dy.matmul(&w).unwrap()));
        g.bench_function(format!("{shape}/dw"), |bch| bch.iter(|| dyt.matmul(&x).unwrap()));
    }
    g.finish();
    // The rank-8 products of a LoRA site (576 → 576) on 512 tokens, as its step runs them:
    // `u = x Aᵀ` ([512, 8]), `dA = (dy B)ᵀ x` ([8, 576]), `dB = dyᵀ u` ([576, 8]).
    let mut g = c.benchmark_group("lora_r8_f32");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let (x, a, dy, dyb, u) = (
        randn(&[512, 576], &mut rng),
        randn(&[8, 576], &mut rng),
        randn(&[512, 576], &mut rng),
        randn(&[512, 8], &mut rng),
        randn(&[512, 8], &mut rng),
    );
    let (at, dybt, dyt) = (a.t().unwrap(), dyb.t().unwrap(), dy.t().unwrap());
    g.throughput(Throughput::Elements((2 * 512 * 576 * 8) as u64));
    g.bench_function("u=x·At", |bch| bch.iter(|| x.matmul(&at).unwrap()));
    g.bench_function("dA=(dyB)t·x", |bch| bch.iter(|| dybt.matmul(&x).unwrap()));
    g.bench_function("dB=dyt·u", |bch| bch.iter(|| dyt.matmul(&u).unwrap()));
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

/// Decoding a token: x [1, k] · Wᵀ with W [n, k] as stored (SmolLM2-135M's MLP up-projection
/// and, for the 256-element K-quants, its down-projection), against f32 W of the same shape.
fn decode_products(c: &mut Criterion) {
    use tinytune::quant::{GgmlType, QFormat};
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("decode");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let formats: [(&str, Option<QFormat>, usize, usize); 10] = [
        ("f32", None, 1536, 576),
        ("q8_0", Some(QFormat::Ggml(GgmlType::Q8_0)), 1536, 576),
        ("q4_0", Some(QFormat::Ggml(GgmlType::Q4_0)), 1536, 576),
        ("q4_1", Some(QFormat::Ggml(GgmlType::Q4_1)), 1536, 576),
        ("q5_0", Some(QFormat::Ggml(GgmlType::Q5_0)), 1536, 576),
        ("nf4", Some(QFormat::Nf4), 1536, 576),
        ("int8", Some(QFormat::Int8), 1536, 576),
        ("f32", None, 576, 1536),
        ("q4_k", Some(QFormat::Ggml(GgmlType::Q4_K)), 576, 1536),
        ("q6_k", Some(QFormat::Ggml(GgmlType::Q6_K)), 576, 1536),
    ];
    for (name, format, n, k) in formats {
        let w = randn(&[n, k], &mut rng);
        let w = match format {
            Some(QFormat::Ggml(t)) if !matches!(t, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q4_K) => {
                // Formats tinytune does not write: blocks of random bytes with sane scales.
                let (bs, ts) = (t.block_size(), t.type_size());
                let mut bytes: Vec<u8> = (0..n * k / bs * ts).map(|i| (i * 2654435761usize >> 7) as u8).collect();
                let scale = half::f16::from_f32(0.01).to_bits().to_le_bytes();
                let at: &[usize] = if t == GgmlType::Q6_K { &[208] } else { &[0, 2] };
                for blk in bytes.chunks_mut(ts) {
                    for &o in at {
                        blk[o..o + 2].copy_from_slice(&scale);
                    }
                }
                Tensor::from_qmatrix(tinytune::quant::QMatrix::from_ggml(t, n, k, bytes).unwrap(), &Device::Cpu).unwrap()
            }
            Some(f) => w.quantize(f).unwrap(),
            None => w,
        };
        let (x, wt) = (randn(&[1, k], &mut rng), w.t().unwrap());
        g.throughput(Throughput::Elements((2 * n * k) as u64));
        g.bench_function(format!("decode_1x{k}x{n}_{name}"), |b| b.iter(|| x.matmul(&wt).unwrap()));
    }
    g.finish();
}

/// `x · Wᵀ` without a gradient at SmolLM2-135M's linear shapes on 512 rows (351 for the
/// classification batch), W in Q4_0: the f32 product that decodes W as it packs it, and the
/// integer one (`TINYTUNE_INT8_DOT`), in the same run. Skipped on CPUs without AVX-512 VNNI.
fn int8_dot(c: &mut Criterion) {
    use tinytune::backend::cpu::qgemm;
    use tinytune::quant::{GgmlType, QFormat};
    if !qgemm::supported() {
        eprintln!("int8_dot: skipped, this CPU has no AVX-512 VNNI");
        return;
    }
    let mut rng = Rng::new(5);
    let mut g = c.benchmark_group("int8_dot");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let _ng = tinytune::no_grad();
    for (m, n, k) in [(512, 1536, 576), (512, 576, 1536), (351, 576, 576), (512, 192, 576)] {
        let w = randn(&[n, k], &mut rng).quantize(QFormat::Ggml(GgmlType::Q4_0)).unwrap().t().unwrap();
        let x = randn(&[m, k], &mut rng);
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for (name, on) in [("f32", false), ("int8", true)] {
            qgemm::set_enabled(on);
            g.bench_function(format!("{m}x{n}x{k}_{name}"), |b| b.iter(|| x.matmul(&w).unwrap()));
        }
    }
    qgemm::set_enabled(false);
    g.finish();
}

/// Causal attention forward + backward of one SmolLM2-135M layer (9 query heads over 3 key/value
/// heads of width 64, batch 1) at T = 128, 512, 2048: the fused CPU kernel (`nn::attention`)
/// against the composed reference (`nn::attention_reference`: K/V repeated, the `[h, T, T]`
/// scores materialised), in the same run.
fn attention_fwd_bwd(c: &mut Criterion) {
    use tinytune::nn::{attention, attention_reference, Mask};
    let mut rng = Rng::new(3);
    let mut g = c.benchmark_group("attention");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(3));
    for t in [128usize, 512, 2048] {
        let q = randn(&[1, 9, t, 64], &mut rng).requires_grad().unwrap();
        let (k, v) = (randn(&[1, 3, t, 64], &mut rng).requires_grad().unwrap(), randn(&[1, 3, t, 64], &mut rng).requires_grad().unwrap());
        let mask = Mask::causal(0, None);
        g.throughput(Throughput::Elements((9 * t * t / 2 * 64 * 2 * 2 * 3) as u64));
        type Attn = fn(&Tensor, &Tensor, &Tensor, &Mask) -> tinytune::Result<Tensor>;
        for (name, f) in [("fused", attention as Attn), ("composed", attention_reference as Attn)] {
            g.bench_with_input(BenchmarkId::new(name, t), &t, |bch, _| {
                bch.iter(|| {
                    let y = f(&q, &k, &v, &mask).unwrap();
                    y.sum_all().unwrap().backward().unwrap();
                    for x in [&q, &k, &v] {
                        x.zero_grad();
                    }
                })
            });
        }
    }
    g.finish();
}

/// SmolLM2-135M's gated MLP activation on 512 tokens (`silu(g) ⊙ u`, [512, 1536]), forward and
/// forward + backward: the fused op (`Tensor::glu`) against the composition it replaced
/// (`silu` then `mul`), in the same run.
fn glu(c: &mut Criterion) {
    use tinytune::kernels::glu::GluAct;
    let mut rng = Rng::new(4);
    let mut g = c.benchmark_group("glu");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let (gate, up) = (randn(&[512, 1536], &mut rng).requires_grad().unwrap(), randn(&[512, 1536], &mut rng).requires_grad().unwrap());
    g.throughput(Throughput::Elements(512 * 1536));
    type Glu = fn(&Tensor, &Tensor, GluAct) -> tinytune::Result<Tensor>;
    for (name, f) in [("fused", Tensor::glu as Glu), ("composed", Tensor::glu_reference as Glu)] {
        g.bench_function(format!("{name}/forward"), |b| b.iter(|| tinytune::with_no_grad(|| f(&gate, &up, GluAct::Silu)).unwrap()));
        g.bench_function(format!("{name}/forward+backward"), |b| {
            b.iter(|| {
                f(&gate, &up, GluAct::Silu).unwrap().sum_all().unwrap().backward().unwrap();
                gate.zero_grad();
                up.zero_grad();
            })
        });
    }
    g.finish();
}

/// Decoding a frozen weight's rows to f32, as the GEMM does while packing: a SmolLM2 MLP
/// matrix (576 × 1536, the down projection) in six formats, elements per second.
fn dequant_rows(c: &mut Criterion) {
    use tinytune::quant::{GgmlType, QMatrix};
    let mut g = c.benchmark_group("dequant_rows");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let (rows, cols) = (576usize, 1536usize);
    for (name, ty) in [
        ("q4_0", GgmlType::Q4_0),
        ("q4_1", GgmlType::Q4_1),
        ("q5_0", GgmlType::Q5_0),
        ("q8_0", GgmlType::Q8_0),
        ("q4_k", GgmlType::Q4_K),
        ("q6_k", GgmlType::Q6_K),
    ] {
        let bytes = rows * cols / ty.block_size() * ty.type_size();
        // Small positive f16 scales everywhere (0x2000 ≈ 2^-7 in every 16-bit word).
        let data: Vec<u8> = (0..bytes).map(|i| if i % 2 == 0 { 0x00 } else { 0x20 }).collect();
        let q = QMatrix::from_ggml(ty, rows, cols, data).unwrap();
        let mut out = vec![0f32; cols];
        g.throughput(Throughput::Elements((rows * cols) as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                for r in 0..rows {
                    q.decode(r, 0, &mut out);
                }
                out[0]
            })
        });
    }
    g.finish();
}

criterion_group!(benches, matmul, softmax_and_norms, decode_products, int8_dot, attention_fwd_bwd, glu, dequant_rows);
criterion_main!(benches);
