//! One LoRA training step of the real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to f32):
//! LoRA r=8, α=16 on q_proj and v_proj, batch 4 × 128 tokens, forward + mean next-token
//! cross-entropy (labels = inputs) + backward + AdamW (lr 1e-4, weight decay 0.01) + zero_grad.
//! Two warm-up steps, then the mean of 10. `cargo bench --bench finetune` (after
//! scripts/fetch-assets.sh); `TINYTUNE_DEVICE` picks the device; `TINYTUNE_CHECKPOINTING=1`
//! turns on gradient checkpointing. `scripts/bench_peft.py` measures Python PEFT + PyTorch on
//! the same step, to report ratios measured in the same session.

mod common;

use std::time::Instant;

use tinytune::models;
use tinytune::optim::{AdamW, Optimizer, ParamGroup};
use tinytune::peft::{LoraAdapter, LoraConfig};
use tinytune::{CrossEntropyReduction, Device, Tensor};

fn main() {
    let Some(path) = common::smollm2("finetune") else { return };
    let device = Device::from_env().expect("device");
    let mut model = models::load(&path, &device).expect("model loads");
    let ckpt = std::env::var("TINYTUNE_CHECKPOINTING").is_ok_and(|v| v == "1");
    model.set_gradient_checkpointing(ckpt);
    let cfg = LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, targets: vec!["q_proj".into(), "v_proj".into()], ..LoraConfig::default() };
    let lora = LoraAdapter::attach(model.as_mut(), cfg).expect("lora attaches");
    let params = lora.parameters();
    let trainable: usize = params.iter().map(|(_, t)| t.numel()).sum();
    let mut opt = AdamW::new(vec![ParamGroup::new("lora", params, 1.0, 0.01)]).expect("optimizer");
    let (b, t) = (4usize, 128usize);
    let vocab = model.vocab_size() as u64;
    // Deterministic ids spread over the vocabulary; targets = the next id (labels = inputs).
    let ids: Vec<u32> = (0..(b * t) as u64).map(|i| ((i * 2_654_435_761 + 12_345) % vocab) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| if i % t == t - 1 { -100 } else { ids[i + 1] as i32 }).collect();
    let ids = Tensor::from_vec(ids, &[b, t], &device).unwrap();
    let targets = Tensor::from_vec(targets, &[b, t], &device).unwrap();
    let step = |opt: &mut AdamW| -> f64 {
        let loss = model.forward(&ids, None).unwrap().cross_entropy(&targets, -100, CrossEntropyReduction::Mean).unwrap();
        loss.backward().unwrap();
        opt.step(1e-4).unwrap();
        opt.zero_grad();
        loss.to_scalar().unwrap()
    };
    for _ in 0..2 {
        step(&mut opt);
    }
    device.synchronize().unwrap();
    common::reset_peak();
    let (n, t0) = (10, Instant::now());
    let mut last = 0.0;
    for _ in 0..n {
        last = step(&mut opt);
    }
    device.synchronize().unwrap();
    let s = t0.elapsed().as_secs_f64() / n as f64;
    let gpu_peak = device.memory_stats().map(|m| m.peak_bytes as f64 / (1 << 20) as f64);
    println!(
        "{{\"device\": \"{device}\", \"gradient_checkpointing\": {ckpt}, \"s_per_step\": {s:.3}, \"tokens_per_s\": {:.1}, \"peak_rss_mib\": {:.1}, \"gpu_peak_mib\": {}, \"trainable_params\": {trainable}, \"last_loss\": {last:.4}, \"threads\": {}}}",
        (b * t) as f64 / s,
        common::peak_rss_mib(),
        gpu_peak.map_or("null".to_string(), |v| format!("{v:.1}")),
        rayon::current_num_threads()
    );
}
