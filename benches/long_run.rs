//! A long run with live memory sampled: 5,000 LoRA steps on the tiny Llama fixture (dropout,
//! gradient accumulation, an evaluation every 500 steps, a checkpoint every 100: the whole
//! trainer), the resident memory read every 250 steps. Memory must stay flat: after the first
//! 500 steps (allocator and caches warm) it may grow by at most 2 MiB, which covers the
//! in-memory loss history (16 bytes a step, 72 KiB here) many times over; a leak of one small
//! tensor a step (≥ 1 KiB) would be ~5 MiB. The bench exits non-zero past the bound.
//! `cargo bench --bench long_run`; under `cargo test --all-targets` it runs 300 steps.

use std::path::PathBuf;
use std::sync::Arc;

use tinytune::io::Tokenizer;
use tinytune::models;
use tinytune::peft::LoraConfig;
use tinytune::train::data::{DataOptions, Dataset};
use tinytune::train::{self, Observer, StepRecord, TrainConfig};
use tinytune::Device;

/// Resident memory now (Linux `/proc/self/statm`), MiB.
fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<f64>().ok()).map_or(f64::NAN, |pages| pages * 4096.0 / (1024.0 * 1024.0))
}

struct Sampler {
    every: u64,
    samples: Vec<(u64, f64)>,
}

impl Observer for Sampler {
    fn on_step(&mut self, r: &StepRecord) {
        if r.step % self.every == 0 {
            self.samples.push((r.step, rss_mib()));
        }
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let steps: u64 = if bench { 5000 } else { 300 };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tok = Tokenizer::from_hf_json(root.join("tokenizer/tiny-words.json")).expect("tokenizer");
    let (animals, places) = (["cat", "dog", "bird", "fish"], ["mat", "box", "tree", "pond"]);
    let line =
        |i: usize| format!("{{\"text\": \"the {} sat on the {} . and then it ate the food .\"}}\n", animals[i % 4], places[(i / 4) % 4]);
    let text: String = (0..48).map(line).collect();
    let opts = DataOptions { seq_len: 24, ..DataOptions::default() };
    let train_set = Dataset::from_jsonl_str(&text, "long-run.jsonl", &tok, &opts).expect("data");
    let eval_set = Dataset::from_jsonl_str(&(48..56).map(line).collect::<String>(), "long-run-eval.jsonl", &tok, &opts).expect("data");
    let out = std::env::temp_dir().join(format!("tinytune-long-run-{}", std::process::id()));
    let cfg = TrainConfig {
        method: Arc::new(LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, targets: vec!["all-linear".into()], ..LoraConfig::default() }),
        lr: 1e-3,
        batch_size: 4,
        grad_accum: 2,
        max_steps: Some(steps),
        eval_every: Some(500),
        save_every: 100,
        out: out.clone(),
        ..TrainConfig::default()
    };
    let mut model = models::load(root.join("tiny-llama"), &Device::Cpu).expect("model");
    let mut sampler = Sampler { every: if bench { 250 } else { 50 }, samples: Vec::new() };
    let t0 = std::time::Instant::now();
    let report =
        train::train(model.as_mut(), &train_set, Some(&eval_set), &cfg, "tiny-llama", &Device::Cpu, &mut sampler).expect("the run");
    let secs = t0.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&out).ok();
    println!(
        "long run: {} steps in {secs:.1} s ({:.2} ms/step); eval loss {:.4} -> {:.4}",
        report.steps,
        1e3 * secs / steps as f64,
        report.before.as_ref().map_or(f64::NAN, |e| e.loss),
        report.after.as_ref().map_or(f64::NAN, |e| e.loss)
    );
    println!("{:>6}  {:>9}", "step", "RSS MiB");
    for (s, m) in &sampler.samples {
        println!("{s:>6}  {m:>9.2}");
    }
    let warm = steps / 10;
    let base = sampler.samples.iter().find(|(s, _)| *s >= warm).map_or(f64::NAN, |p| p.1);
    let last = sampler.samples.last().map_or(f64::NAN, |p| p.1);
    let growth = last - base;
    const BOUND_MIB: f64 = 2.0;
    println!("memory from step {warm} to {steps}: {base:.2} -> {last:.2} MiB ({growth:+.2} MiB; bound {BOUND_MIB} MiB)");
    if bench && !(growth <= BOUND_MIB) {
        eprintln!("long run: memory grew {growth:.2} MiB, past the bound of {BOUND_MIB} MiB");
        std::process::exit(1);
    }
}
