//! Frozen weights kept quantised (`tinytune::quant`): the products that read them directly
//! (forward `x · Wᵀ` and backward `g · W`, the fused LoRA linear, embedding lookups) against
//! dequantise-then-compute, on awkward shapes, for every format; LoRA gradients over a
//! quantised base; and the errors for what a quantised tensor cannot do.
//!
//! Bit-identity of the decoders with gguf-py and of NF4 with bitsandbytes is checked in
//! `tests/gguf.rs` and `quant_fixtures_match_gguf_py_and_bitsandbytes` below.

mod common;

use common::TestRng;
use half::f16;
use tinytune::quant::{GgmlType, QFormat, QMatrix};
use tinytune::{DType, Device, Tensor};

/// Where each GGML format keeps its f16 scales (byte offsets in a block).
fn scale_fields(t: GgmlType) -> &'static [usize] {
    match t {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => unreachable!(),
    }
}

/// A matrix of random blocks of `t` (random code bytes, scales of a sane size).
fn random_blocks(t: GgmlType, rows: usize, cols: usize, rng: &mut TestRng) -> QMatrix {
    let blocks = rows * cols / t.block_size();
    let mut data: Vec<u8> = (0..blocks * t.type_size()).map(|_| rng.next_u64() as u8).collect();
    for b in 0..blocks {
        for &at in scale_fields(t) {
            let d = f16::from_f64(0.01 + 0.05 * rng.uniform()).to_bits().to_le_bytes();
            data[b * t.type_size() + at..][..2].copy_from_slice(&d);
        }
    }
    QMatrix::from_ggml(t, rows, cols, data).unwrap()
}

const GGML_FORMATS: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// One matrix of every format, `rows × cols` (cols a multiple of 256, so every format fits).
fn every_format(rows: usize, cols: usize, seed: u64) -> Vec<QMatrix> {
    let mut rng = TestRng::new(seed);
    let mut out: Vec<QMatrix> = GGML_FORMATS.iter().map(|&t| random_blocks(t, rows, cols, &mut rng)).collect();
    let dense: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
    out.push(QMatrix::quantize(QFormat::Nf4, rows, cols, &dense).unwrap());
    out.push(QMatrix::quantize(QFormat::Int8, rows, cols, &dense).unwrap());
    out
}

fn randn(shape: &[usize], rng: &mut TestRng) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
}

fn assert_near(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    let scale = w.iter().fold(1f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!((a - b).abs() <= 2e-5 * scale, "{what}: element {i}: {a} vs {b}");
    }
}

#[test]
fn quantised_products_equal_dequantise_then_matmul_in_both_operand_orders() {
    let mut rng = TestRng::new(1);
    // (rows of A, W rows = out features): one row (decode), a few (the skinny path), awkward
    // and large enough for the blocked path with ragged tiles.
    for (rows, cols) in [(17, 256), (70, 512)] {
        for q in every_format(rows, cols, rows as u64) {
            let name = q.format().name();
            let dense = Tensor::from_vec(q.dequantize(), &[rows, cols], &Device::Cpu).unwrap();
            let w = Tensor::from_qmatrix(q, &Device::Cpu).unwrap();
            assert_eq!(w.dtype(), DType::Quant(w.dtype().quant_format().unwrap()));
            for m in [1, 3, 5, 37, 300] {
                let x = randn(&[m, cols], &mut rng);
                let what = format!("{name} x[{m},{cols}] · Wᵀ[{cols},{rows}]");
                assert_near(&what, &x.matmul(&w.t().unwrap()).unwrap(), &x.matmul(&dense.t().unwrap()).unwrap());
                let g = randn(&[m, rows], &mut rng);
                let what = format!("{name} g[{m},{rows}] · W[{rows},{cols}]");
                assert_near(&what, &g.matmul(&w).unwrap(), &g.matmul(&dense).unwrap());
            }
            // A batch of inputs against one broadcast weight, and a transposed input.
            let x = randn(&[2, 9, cols], &mut rng);
            assert_near(&format!("{name} batched"), &x.matmul(&w.t().unwrap()).unwrap(), &x.matmul(&dense.t().unwrap()).unwrap());
            let xt = randn(&[cols, 11], &mut rng).t().unwrap();
            assert_near(&format!("{name} strided x"), &xt.matmul(&w.t().unwrap()).unwrap(), &xt.matmul(&dense.t().unwrap()).unwrap());
        }
    }
}

#[test]
fn half_precision_weights_are_decoded_in_the_product_too() {
    let mut rng = TestRng::new(2);
    let w = randn(&[40, 72], &mut rng);
    for dt in [DType::F16, DType::BF16] {
        let wh = w.to_dtype(dt).unwrap();
        let dense = wh.to_dtype(DType::F32).unwrap();
        for m in [1, 2, 50] {
            let x = randn(&[m, 72], &mut rng);
            assert_near(&format!("{dt:?} x·Wᵀ"), &x.matmul(&wh.t().unwrap()).unwrap(), &x.matmul(&dense.t().unwrap()).unwrap());
            let g = randn(&[m, 40], &mut rng);
            assert_near(&format!("{dt:?} g·W"), &g.matmul(&wh).unwrap(), &g.matmul(&dense).unwrap());
        }
        // A narrowed view (offset, row stride ≠ cols) of a half weight.
        let view = wh.narrow(1, 8, 37).unwrap().narrow(0, 3, 30).unwrap();
        for m in [1, 3, 6] {
            let x = randn(&[m, 37], &mut rng);
            let want = x.matmul(&view.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            assert_near(&format!("{dt:?} view, {m} rows"), &x.matmul(&view.t().unwrap()).unwrap(), &want);
        }
    }
}

#[test]
fn lora_over_a_quantised_base_equals_lora_over_its_dequantised_values_with_gradients() {
    let mut rng = TestRng::new(3);
    let (n, k, m, r, s) = (13, 256, 24, 4, 2.0);
    for q in every_format(m, k, 9) {
        let name = q.format().name();
        let dense = Tensor::from_vec(q.dequantize(), &[m, k], &Device::Cpu).unwrap();
        let w = Tensor::from_qmatrix(q, &Device::Cpu).unwrap();
        let x0 = randn(&[n, k], &mut rng);
        let a0 = randn(&[r, k], &mut rng).affine(0.1, 0.0).unwrap();
        let b0 = randn(&[m, r], &mut rng).affine(0.1, 0.0).unwrap();
        let c = randn(&[n, m], &mut rng);
        let run = |w: &Tensor| {
            let (x, a, b) = (x0.requires_grad().unwrap(), a0.requires_grad().unwrap(), b0.requires_grad().unwrap());
            let y = x.lora_linear(&x, w, &a, &b, s).unwrap();
            y.mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
            (y, x.grad().unwrap(), a.grad().unwrap(), b.grad().unwrap())
        };
        let (got, want) = (run(&w), run(&dense));
        assert_near(&format!("{name} lora y"), &got.0, &want.0);
        assert_near(&format!("{name} lora dx"), &got.1, &want.1);
        assert_near(&format!("{name} lora dA"), &got.2, &want.2);
        assert_near(&format!("{name} lora dB"), &got.3, &want.3);
    }
}

#[test]
fn lora_gradients_over_a_quantised_base_match_finite_differences() {
    // The loss L = Σ c ⊙ lora_linear(x; W_q, A, B) in f32 through the quantised kernels,
    // against central differences of the same function in f64 with W = dequant(W_q).
    let mut rng = TestRng::new(4);
    let (n, k, m, r, s) = (5, 64, 6, 2, 1.5);
    let wq = QMatrix::quantize(QFormat::Nf4, m, k, &(0..m * k).map(|_| rng.normal() as f32).collect::<Vec<_>>()).unwrap();
    let w64: Vec<f64> = wq.dequantize().iter().map(|&v| v as f64).collect();
    let w = Tensor::from_qmatrix(wq, &Device::Cpu).unwrap();
    let x: Vec<f64> = (0..n * k).map(|_| rng.normal()).collect();
    let a: Vec<f64> = (0..r * k).map(|_| rng.normal()).collect();
    let b: Vec<f64> = (0..m * r).map(|_| rng.normal()).collect();
    let c: Vec<f64> = (0..n * m).map(|_| rng.normal()).collect();
    let loss64 = |a: &[f64], b: &[f64]| {
        let mut l = 0.0;
        for i in 0..n {
            let u: Vec<f64> = (0..r).map(|q| (0..k).map(|p| x[i * k + p] * a[q * k + p]).sum()).collect();
            for j in 0..m {
                let base: f64 = (0..k).map(|p| x[i * k + p] * w64[j * k + p]).sum();
                let low: f64 = (0..r).map(|q| u[q] * b[j * r + q]).sum();
                l += c[i * m + j] * (base + s * low);
            }
        }
        l
    };
    let t = |v: &[f64], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let (xt, at, bt, ct) =
        (t(&x, &[n, k]), t(&a, &[r, k]).requires_grad().unwrap(), t(&b, &[m, r]).requires_grad().unwrap(), t(&c, &[n, m]));
    xt.lora_linear(&xt, &w, &at, &bt, s).unwrap().mul(&ct).unwrap().sum_all().unwrap().backward().unwrap();
    let (ga, gb) = (at.grad().unwrap().to_vec_f64().unwrap(), bt.grad().unwrap().to_vec_f64().unwrap());
    let fd = |v: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
        let h = 1e-5;
        let (mut p, mut q) = (v.to_vec(), v.to_vec());
        p[i] += h;
        q[i] -= h;
        (f(&p) - f(&q)) / (2.0 * h)
    };
    for i in 0..r * k {
        let want = fd(&a, i, &|a| loss64(a, &b));
        assert!((ga[i] - want).abs() <= 1e-3 * (1.0 + want.abs()), "dA[{i}]: {} vs {want}", ga[i]);
    }
    for i in 0..m * r {
        let want = fd(&b, i, &|b| loss64(&a, b));
        assert!((gb[i] - want).abs() <= 1e-3 * (1.0 + want.abs()), "dB[{i}]: {} vs {want}", gb[i]);
    }
}

#[test]
fn embedding_lookup_decodes_only_the_rows_it_picks() {
    for q in every_format(9, 256, 5) {
        let dense = q.dequantize();
        let table = Tensor::from_qmatrix(q, &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(vec![3u32, 0, 8, 3], &[2, 2], &Device::Cpu).unwrap();
        let e = table.embedding(&ids).unwrap();
        assert_eq!((e.shape(), e.dtype()), (&[2, 2, 256][..], DType::F32));
        let got = e.to_vec::<f32>().unwrap();
        for (slot, &id) in [3usize, 0, 8, 3].iter().enumerate() {
            assert_eq!(got[slot * 256..(slot + 1) * 256], dense[id * 256..(id + 1) * 256]);
        }
    }
}

#[test]
fn a_quantised_tensor_says_what_it_cannot_do() {
    let w = randn(&[4, 64], &mut TestRng::new(6)).quantize(QFormat::Nf4).unwrap();
    assert_eq!(w.storage_bytes(), 4 * 64 / 2 + 4 + 4 + 4);
    let e = w.requires_grad().unwrap_err().to_string();
    assert!(e.contains("requires_grad"), "{e}");
    let e = w.t().unwrap().contiguous().unwrap_err().to_string();
    assert!(e.contains("nf4") && e.contains("[4, 64]"), "{e}");
    let e = w.add(&w).unwrap_err().to_string();
    assert!(e.contains("f32 or f64"), "{e}");
    let e = Tensor::zeros(&[2, 64], w.dtype(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("quantise"), "{e}");
    let e = randn(&[4, 48], &mut TestRng::new(7)).quantize(QFormat::Nf4).unwrap_err().to_string();
    assert!(e.contains("blocks of 64") && e.contains("[4, 48]"), "{e}");
    // Dequantising gives the values the kernels read.
    let d = w.to_dtype(DType::F32).unwrap();
    let eye: Vec<f32> = (0..64 * 64).map(|i| if i / 64 == i % 64 { 1.0 } else { 0.0 }).collect();
    let x = Tensor::from_vec(eye, &[64, 64], &Device::Cpu).unwrap();
    assert_near("identity product", &x.matmul(&w.t().unwrap()).unwrap(), &d.t().unwrap());
}

/// `tests/fixtures/quant/reference.safetensors` (scripts/make_quant_fixtures.py): tensors of
/// any dtype as raw little-endian bytes.
fn fixture() -> std::collections::HashMap<String, Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant/reference.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(name, view)| (name, view.data().to_vec())).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn quant_fixtures_match_gguf_py_and_bitsandbytes() {
    use tinytune::quant::nf4;
    let fx = fixture();
    // Every GGML block format decodes bit for bit as gguf-py does.
    for t in GGML_FORMATS {
        let blocks = fx[&format!("{}.blocks", t.name())].clone();
        let want = f32s(&fx[&format!("{}.values", t.name())]);
        let got = QMatrix::from_ggml(t, 3, 512, blocks).unwrap().dequantize();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{}: element {i}: {g} vs gguf-py {w}", t.name());
        }
    }
    // NF4: codes, scales and the double quantisation equal bitsandbytes' on the CPU.
    let x = f32s(&fx["nf4.input"]);
    assert_eq!(nf4::dynamic_code().as_slice(), f32s(&fx["nf4.dynamic_code"]).as_slice(), "dynamic code");
    let (codes, absmax) = nf4::quantize_nf4_single(&x);
    assert_eq!(absmax, f32s(&fx["nf4.absmax"]), "absmax");
    let packed: Vec<u8> = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    assert_eq!(packed, fx["nf4.codes"], "NF4 codes");
    let (packed2, dq) = nf4::quantize(&x);
    assert_eq!(packed2, packed);
    assert_eq!(dq.q, fx["nf4dq.absmax_q"], "double-quantised scales");
    assert_eq!(dq.scale, f32s(&fx["nf4dq.absmax_scale"]), "scales of the scales");
    let offset = f32s(&fx["nf4dq.offset"])[0];
    assert!((dq.offset - offset).abs() <= f32::EPSILON * offset, "offset {} vs {offset}", dq.offset);
    let got = QMatrix::quantize(QFormat::Nf4, 8, 512, &x).unwrap().dequantize();
    let want = f32s(&fx["nf4dq.values"]);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "NF4 element {i}: {g} vs bitsandbytes {w}");
    }
}

/// Every format on the GPU (both matmul kernel families) against the CPU kernels on the same
/// blocks: the products in both operand orders, the fused LoRA linear with its gradients, the
/// fused gated linear, `to_dtype`, embedding lookups and the way back to the host. The GPU
/// holds the blocks as stored (bytes counted), so a decoder bug shows as a wrong value here.
#[test]
fn quantised_weights_on_the_gpu_equal_the_cpu_kernels() {
    use common::{close_product, gpu_device, gpu_with_kernel};
    use tinytune::backend::gpu::MatmulKernel;
    if gpu_device().is_none() {
        return;
    }
    let mut rng = TestRng::new(11);
    for kernel in [MatmulKernel::Tiled, MatmulKernel::Registers] {
        let g = gpu_with_kernel(kernel);
        // rows × cols of W: ragged against the 32-wide tiles, cols a whole number of every block.
        for (rows, cols) in [(37, 256), (5, 512)] {
            for q in every_format(rows, cols, 100 + rows as u64) {
                let name = format!("{} [{rows}, {cols}] ({kernel:?})", q.format().name());
                let cpu_bytes = q.bytes();
                let w = Tensor::from_qmatrix(q.clone(), &Device::Cpu).unwrap();
                let wg = w.to_device(&g).unwrap();
                assert_eq!(wg.dtype(), w.dtype(), "{name}: dtype on the GPU");
                // The blocks as stored plus an 8-word header (NF4: its 256-entry code table
                // too), each part padded to whole words.
                let extra = wg.storage_bytes() as isize - cpu_bytes as isize - 32 - if q.format() == QFormat::Nf4 { 1024 } else { 0 };
                assert!((0..8).contains(&extra), "{name}: {} bytes on the GPU, {cpu_bytes} on the CPU", wg.storage_bytes());
                // Back to the host: the same matrix, byte for byte.
                assert_eq!(*wg.to_device(&Device::Cpu).unwrap().qmatrix().unwrap(), q, "{name}: read back");
                // Decoded on the device: the CPU decoder's values (a fused multiply-add may
                // move the last bit).
                let dense = w.to_dtype(DType::F32).unwrap();
                assert_near(&format!("{name} to_dtype"), &wg.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap(), &dense);
                let h = wg.to_dtype(DType::F16).unwrap();
                assert_eq!(h.dtype(), DType::F16);
                for m in [1, 6, 45] {
                    let x = randn(&[m, cols], &mut rng);
                    let got = x.to_device(&g).unwrap().matmul(&wg.t().unwrap()).unwrap().to_device(&Device::Cpu).unwrap();
                    close_product(&format!("{name} x[{m}]·Wᵀ"), &x.matmul(&w.t().unwrap()).unwrap(), &got, cols);
                    let gy = randn(&[m, rows], &mut rng);
                    let got = gy.to_device(&g).unwrap().matmul(&wg).unwrap().to_device(&Device::Cpu).unwrap();
                    close_product(&format!("{name} g[{m}]·W"), &gy.matmul(&w).unwrap(), &got, rows);
                }
                // The fused LoRA linear over the quantised base, forward and backward.
                let (n, r, s) = (7, 4, 2.0);
                let (x0, a0, b0, c) =
                    (randn(&[n, cols], &mut rng), randn(&[r, cols], &mut rng), randn(&[rows, r], &mut rng), randn(&[n, rows], &mut rng));
                let run = |d: &Device, w: &Tensor| {
                    let up = |t: &Tensor| t.to_device(d).unwrap().requires_grad().unwrap();
                    let (x, a, b) = (up(&x0), up(&a0), up(&b0));
                    let y = x.lora_linear(&x, w, &a, &b, s).unwrap();
                    y.mul(&c.to_device(d).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
                    [y, x.grad().unwrap(), a.grad().unwrap(), b.grad().unwrap()].map(|t| t.to_device(&Device::Cpu).unwrap())
                };
                let (want, got) = (run(&Device::Cpu, &w), run(&g, &wg));
                for (i, part) in ["y", "dx", "dA", "dB"].iter().enumerate() {
                    close_product(&format!("{name} lora {part}"), &want[i], &got[i], cols.max(rows));
                }
                // The gated linear (FineGates) over the quantised base.
                let zc = Tensor::from_vec((0..cols).map(|i| (i % 3) as f32 * 0.5).collect::<Vec<f32>>(), &[cols], &Device::Cpu).unwrap();
                let x = randn(&[n, cols], &mut rng);
                let want = x.gated_linear(&w, None, Some(&zc), None).unwrap();
                let got = x.to_device(&g).unwrap().gated_linear(&wg, None, Some(&zc.to_device(&g).unwrap()), None).unwrap();
                close_product(&format!("{name} gated"), &want, &got.to_device(&Device::Cpu).unwrap(), cols);
                // Embedding rows decoded on the device.
                let ids = Tensor::from_vec(vec![3u32, 0, (rows - 1) as u32, 3], &[4], &Device::Cpu).unwrap();
                let got = wg.embedding(&ids.to_device(&g).unwrap()).unwrap().to_device(&Device::Cpu).unwrap();
                assert_near(&format!("{name} embedding"), &got, &w.embedding(&ids).unwrap());
            }
        }
        // An index out of range is an error on the device too.
        let wg = Tensor::from_qmatrix(every_format(4, 256, 1).remove(0), &Device::Cpu).unwrap().to_device(&g).unwrap();
        let bad = Tensor::from_vec(vec![4u32], &[1], &Device::Cpu).unwrap().to_device(&g).unwrap();
        let e = wg.embedding(&bad).unwrap_err().to_string();
        assert!(e.contains("4"), "{e}");
    }
}
