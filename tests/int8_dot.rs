//! The integer products (`TINYTUNE_INT8_DOT`, `tinytune::backend::cpu::qgemm`): a product
//! with a Q4_0/Q4_1/Q8_0 weight recorded without a gradient multiplies the weight as stored by
//! the activations rounded to int8 per block of 32; with a gradient it stays f32. The tests
//! take turns (the switch is process-wide), in a process of their own.

mod common;

use std::sync::Mutex;

use tinytune::backend::cpu::qgemm;
use tinytune::quant::{GgmlType, QFormat};
use tinytune::{Device, Tensor};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n as u64).map(|i| tinytune::rng::normal_at(seed, 0, i) as f32).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
}

/// `x` with every block of 32 along its last axis rounded as the kernel rounds it:
/// `sx = max|x|/127`, `x ≈ sx · round(x/sx)` (ties to even).
fn rounded(x: &Tensor) -> Tensor {
    let v: Vec<f32> = x
        .to_vec::<f32>()
        .unwrap()
        .chunks(32)
        .flat_map(|b| {
            let s = b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            b.iter().map(move |&v| if s > 0.0 { (v * (1.0 / s)).round_ties_even() * s } else { 0.0 }).collect::<Vec<_>>()
        })
        .collect();
    Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap()
}

fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    let scale = w.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    g.iter().zip(&w).map(|(a, b)| (a - b).abs() / scale).fold(0.0, f64::max)
}

static SWITCH: Mutex<()> = Mutex::new(());

#[test]
fn products_without_a_gradient_use_int8_activations_and_with_one_stay_f32() {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    if !qgemm::supported() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI, so the integer path never runs");
        return;
    }
    qgemm::set_enabled(true);
    for t in [GgmlType::Q4_0, GgmlType::Q8_0] {
        let (n, k) = (40, 96);
        let w = randn(&[n, k], 1).affine(0.05, 0.0).unwrap().quantize(QFormat::Ggml(t)).unwrap();
        let dense = w.to_dtype(tinytune::DType::F32).unwrap();
        // Batched activations, 2 × 9 rows (more than the few rows decoding takes unpacked).
        let x = randn(&[2, 9, k], 2);
        let f32_product = x.matmul(&dense.t().unwrap()).unwrap();

        // Without a gradient: the product of the rounded activations, to f32 rounding.
        let got = tinytune::with_no_grad(|| x.matmul(&w.t().unwrap())).unwrap();
        let want = rounded(&x).matmul(&dense.t().unwrap()).unwrap();
        assert!(max_rel(&got, &want) < 1e-5, "{t}: {} from the rounded activations' product", max_rel(&got, &want));
        let err = max_rel(&got, &f32_product);
        assert!(err > 0.0 && err < 0.02, "{t}: the integer product is {err} from the f32 one");

        // The LoRA linear of evaluation takes it too.
        let (a, b) = (randn(&[4, k], 3).affine(0.1, 0.0).unwrap(), randn(&[n, 4], 4).affine(0.1, 0.0).unwrap());
        let got = tinytune::with_no_grad(|| x.lora_linear(&x, &w, &a, &b, 2.0)).unwrap();
        let lora = x.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap().affine(2.0, 0.0).unwrap();
        let want = want.add(&lora).unwrap();
        assert!(max_rel(&got, &want) < 1e-5, "{t} lora: {}", max_rel(&got, &want));

        // With a gradient the forward is the f32 one (the same decoding product as ever).
        let xg = x.requires_grad().unwrap();
        let y = xg.matmul(&w.t().unwrap()).unwrap();
        assert!(max_rel(&y, &f32_product) < 1e-6, "{t}: with a gradient the product moved by {}", max_rel(&y, &f32_product));
    }
    qgemm::set_enabled(false);
    let x = randn(&[9, 64], 5);
    let w = randn(&[16, 64], 6).quantize(QFormat::Ggml(GgmlType::Q8_0)).unwrap();
    let dense = w.to_dtype(tinytune::DType::F32).unwrap();
    let off = tinytune::with_no_grad(|| x.matmul(&w.t().unwrap())).unwrap();
    assert!(max_rel(&off, &x.matmul(&dense.t().unwrap()).unwrap()) < 1e-6, "switched off, the product is f32 again");
}

/// The real SmolLM2-135M (Q4_1 linears, Q8_0 embedding and head) with int8 activations: its
/// mean NLL of the reference text stays near transformers' f32 one (tests/real_model.rs holds
/// the f32 path to 1e-3; int8 activations measured +0.005). Greedy answers are not compared:
/// the rounding can flip a near tie (the reference chat prompt's first token flips), as it can
/// in llama.cpp, which rounds activations the same way.
#[test]
fn smollm2_with_int8_activations_stays_near_transformers() {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    if !qgemm::supported() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI");
        return;
    }
    let Some(path) = common::asset("SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let path_ref = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path_ref).unwrap()).unwrap();
    let ids = |k: &str| r[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    let device = Device::Cpu;
    let model = tinytune::models::load(&path, &device).unwrap();
    qgemm::set_enabled(true);
    let nll = tinytune::models::sequence_nll(model.as_ref(), &[ids("text_ids")], 1, &device).unwrap().mean_nll();
    qgemm::set_enabled(false);
    let f32_nll = tinytune::models::sequence_nll(model.as_ref(), &[ids("text_ids")], 1, &device).unwrap().mean_nll();
    let want = r["mean_nll"].as_f64().unwrap();
    eprintln!("mean NLL: int8 activations {nll}, f32 {f32_nll}, transformers {want}");
    assert!(nll != f32_nll, "the integer path did not run");
    assert!((nll - want).abs() < 0.02, "mean NLL with int8 activations {nll} vs transformers' f32 {want}");
}
