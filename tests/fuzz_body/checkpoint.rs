// Shared body of the `checkpoint` fuzz target (fuzz/) and its smoke run
// (tests/fuzz_parsers.rs): bytes as a training checkpoint (state.json, then the tensors file
// `step-1.safetensors`; see `two_parts`) resumed by a LoRA run on the tiny Llama, exactly and
// weights-only, must resume or give an error, never a panic; a resumed run must then take a
// step without a panic.

include!("shared.rs");

use std::sync::Arc;

use tinytune::io::Tokenizer;
use tinytune::peft::LoraConfig;
use tinytune::train::data::{DataOptions, Dataset};
use tinytune::train::{TrainConfig, Trainer};
use tinytune::{models, Device};

/// The data of the run the seeds were made with (`tests/fuzz_parsers.rs` makes them so).
pub fn dataset() -> &'static Dataset {
    static DATA: std::sync::OnceLock<Dataset> = std::sync::OnceLock::new();
    DATA.get_or_init(|| {
        let tok = Tokenizer::for_model(tiny_model_dir()).expect("the tokenizer fixture");
        let lines = ["the cat sat on the mat .", "the dog ran in the box .", "a bird slept under the tree .", "the fish ate the food ."];
        let text: String = lines.iter().map(|l| format!("{{\"text\": \"{l}\"}}\n")).collect();
        Dataset::from_jsonl_str(&text, "fuzz.jsonl", &tok, &DataOptions { seq_len: 16, ..DataOptions::default() }).expect("the data")
    })
}

/// The run's settings: LoRA r=2, 3 steps, checkpoints every step, writing to `out`.
pub fn config(out: std::path::PathBuf) -> TrainConfig {
    TrainConfig {
        method: Arc::new(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, ..LoraConfig::default() }),
        lr: 1e-2,
        batch_size: 2,
        max_steps: Some(3),
        save_every: 1,
        out,
        ..TrainConfig::default()
    }
}

pub fn run(data: &[u8]) {
    let (state, tensors) = two_parts(data);
    let out = scratch("checkpoint");
    let dir = out.join("checkpoint");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("state.json"), state);
    let _ = std::fs::write(dir.join("step-1.safetensors"), tensors);
    for weights_only in [false, true] {
        let Ok(mut model) = models::load(fixtures().join("tiny-llama"), &Device::Cpu) else { return };
        let cfg = TrainConfig { resume: !weights_only, resume_weights_only: weights_only, ..config(out.clone()) };
        if let Ok(mut t) = Trainer::new(model.as_mut(), dataset(), None, &cfg, &Device::Cpu) {
            if t.step_count() < t.total_steps() {
                let _ = t.step();
            }
        }
    }
}
