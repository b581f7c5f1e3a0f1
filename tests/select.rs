//! Semantic layer selection (src/train/select.rs, our logit-lens reading): the deviations of a
//! language-modelling sample against a plain float64 reading of every latent through the final
//! norm and the LM head (the last one equal to the model's own evaluation loss), the probe's
//! reading of labelled data, the policies, and a run on the chosen layers whose frozen blocks
//! cost no backward kernels (counted by the profiler). The tests share the profiler's global
//! counters, so they run one at a time.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tinytune::io::Tokenizer;
use tinytune::models::{self, CausalLm};
use tinytune::peft::LoraConfig;
use tinytune::train::data::{DataOptions, Dataset};
use tinytune::train::select::{select_layers, LayerPolicy, SelectOptions};
use tinytune::train::{self, LanguageModelling, Quiet, TrainConfig};
use tinytune::Device;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tiny_llama() -> Box<dyn CausalLm> {
    models::load(fixture("tiny-llama"), &Device::Cpu).unwrap()
}

/// `n` lines of the tiny word vocabulary; with `labels`, praise (1) and complaints (0).
fn data(name: &str, n: usize, labels: bool) -> Dataset {
    let (animals, verbs, places) = (["cat", "dog", "bird", "fish"], ["sat", "ran", "slept", "ate"], ["mat", "box", "tree", "pond"]);
    let (good, bad) = (["good", "great", "wonderful", "lovely"], ["bad", "awful", "dull", "boring"]);
    let lines: Vec<String> = (0..n)
        .map(|i| {
            if labels {
                let adj = if i % 2 == 0 { good[(i / 2) % 4] } else { bad[(i / 2) % 4] };
                serde_json::json!({ "text": format!("the {} was very {adj} .", ["film", "movie", "story"][i % 3]), "label": (i % 2 == 0) as u32 })
                    .to_string()
            } else {
                let mut t = format!("the {} {} on the {} .", animals[i % 4], verbs[(i / 4) % 4], places[(i / 3) % 4]);
                for _ in 0..i % 3 {
                    t.push_str(" and then it ate the food .");
                }
                serde_json::json!({ "text": t }).to_string()
            }
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("tinytune-select-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    let tok = Tokenizer::from_hf_json(fixture("tokenizer/tiny-words.json")).unwrap();
    Dataset::load(&p, &tok, &DataOptions { seq_len: 24, context: Some(64), ..DataOptions::default() }).unwrap()
}

#[test]
fn deviations_read_every_latent_through_the_norm_and_the_lm_head() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let model = tiny_llama();
    let lm = data("lm", 20, false);
    let opts = SelectOptions { batch_size: 6, ..SelectOptions::default() };
    let sel = select_layers(model.as_ref(), &lm, &opts, LayerPolicy::Auto, &Device::Cpu).unwrap();
    let layers = model.num_layers();
    assert_eq!((sel.reading, sel.examples, sel.deviations.len(), sel.gains.len()), ("lm-head", 20, layers + 1, layers));
    // The reference: full logits of each latent (normed unless it is the last), log-softmax
    // and the targets' NLL in float64 on the host.
    let (mut sums, mut count) = (vec![0.0f64; layers + 1], 0usize);
    let order: Vec<usize> = (0..lm.len()).collect();
    for chunk in order.chunks(5) {
        let b = lm.batch(chunk, &Device::Cpu).unwrap();
        let h = model.forward_hidden(&b.ids, b.keep.as_ref(), None, true).unwrap();
        let targets = b.targets.to_vec::<i32>().unwrap();
        for (k, hk) in h.all.iter().enumerate() {
            let read = if k == layers { hk.clone() } else { model.decoder().norm.forward(hk).unwrap() };
            let logits = model.lm_head().forward(&read).unwrap().to_vec_f64().unwrap();
            let v = model.vocab_size();
            for (row, &t) in targets.iter().enumerate().filter(|(_, &t)| t != -100) {
                let l = &logits[row * v..(row + 1) * v];
                let m = l.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                let lse = m + l.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                sums[k] += lse - l[t as usize];
            }
        }
        count += targets.iter().filter(|&&t| t != -100).count();
    }
    for (k, (got, s)) in sel.deviations.iter().zip(&sums).enumerate() {
        let want = s / count as f64;
        assert!((got - want).abs() < 1e-4 * want, "D_{k}: {got} vs the reference {want}");
    }
    // The last latent's deviation is the model's own loss on the data.
    let eval = train::evaluate(model.as_ref(), &LanguageModelling, &lm, 4, &Device::Cpu, 0).unwrap();
    assert!(
        (sel.deviations[layers] - eval.loss).abs() < 1e-5 * eval.loss,
        "D_L {} vs the evaluation {}",
        sel.deviations[layers],
        eval.loss
    );
    for (i, g) in sel.gains.iter().enumerate() {
        assert_eq!(*g, sel.deviations[i] - sel.deviations[i + 1]);
    }
    let best = (0..layers).max_by(|a, b| sel.gains[*a].total_cmp(&sel.gains[*b])).unwrap();
    assert_eq!(sel.chosen, (best..layers).collect::<Vec<_>>());
    // A budget above the number of layers names both.
    let e = select_layers(model.as_ref(), &lm, &opts, LayerPolicy::Budget(3), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("a layer budget of 3") && e.contains("2 layers"), "{e}");
    // Labelled data is read by the probe: one finite deviation per latent, the same each run.
    let cls = data("cls", 24, true);
    let a = select_layers(model.as_ref(), &cls, &opts, LayerPolicy::Budget(1), &Device::Cpu).unwrap();
    let b = select_layers(model.as_ref(), &cls, &opts, LayerPolicy::Budget(1), &Device::Cpu).unwrap();
    assert_eq!((a.reading, a.deviations.len(), a.chosen.len()), ("probe", layers + 1, 1));
    assert!(a.deviations.iter().all(|d| d.is_finite() && *d > 0.0), "{:?}", a.deviations);
    assert_eq!(a, b);
}

/// Backward kernels of one training step with LoRA on the given blocks.
fn backward_calls(lm: &Dataset, layers: Option<Vec<usize>>, name: &str) -> u64 {
    let out = std::env::temp_dir().join(format!("tinytune-select-{}-run-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let cfg = TrainConfig {
        method: Arc::new(LoraConfig { r: 2, targets: vec!["all-linear".into()], layers, ..LoraConfig::default() }),
        max_steps: Some(1),
        batch_size: 4,
        eval_before: false,
        save_every: 1000,
        out: out.clone(),
        ..TrainConfig::default()
    };
    let mut model = tiny_llama();
    tinytune::profile::set_enabled(true);
    tinytune::profile::reset();
    train::train(model.as_mut(), lm, None, &cfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap();
    let (rows, _, _) = tinytune::profile::snapshot();
    tinytune::profile::set_enabled(false);
    let _ = std::fs::remove_dir_all(&out);
    rows.iter().filter(|r| r.phase.starts_with("backward")).map(|r| r.calls).sum()
}

/// Frozen blocks below the lowest trained one run no backward kernels: training block 1 alone
/// runs about half the backward kernels of training both; training block 0 alone runs nearly
/// as many as both (its gradient flows back through block 1).
#[test]
fn frozen_blocks_cost_no_backward_kernels() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lm = data("bwd", 8, false);
    let all = backward_calls(&lm, None, "all");
    let first = backward_calls(&lm, Some(vec![0]), "first");
    let last = backward_calls(&lm, Some(vec![1]), "last");
    eprintln!("backward kernels of one step: all blocks {all}, block 0 {first}, block 1 {last}");
    // Counted: both blocks 127 = 3 (loss, LM head) + 2 × 34 (a block passing the gradient
    // down) + 2 × 28 (a block's LoRA gradients); block 1 alone 65 = 3 + 34 + 28.
    assert!(last > 0 && last as f64 <= 0.55 * all as f64, "block 1 alone: {last} backward kernels, both blocks: {all}");
    assert!(first > last && first as f64 >= 0.7 * all as f64, "block 0: {first}, block 1: {last}, both: {all}");
}

/// On the GPU the readings equal the CPU's (the model read on the device, the deviations and
/// the probe's fit on the host from the same latents), so the choice is the same.
#[test]
fn the_gpu_reads_the_layers_as_the_cpu_does() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = common::gpu_device() else { return };
    let opts = SelectOptions { batch_size: 6, ..SelectOptions::default() };
    let on_gpu = models::load(fixture("tiny-llama"), &gpu).unwrap();
    for (name, labels) in [("gpu-lm", false), ("gpu-cls", true)] {
        let d = data(name, 20, labels);
        let cpu = select_layers(tiny_llama().as_ref(), &d, &opts, LayerPolicy::Budget(1), &Device::Cpu).unwrap();
        let got = select_layers(on_gpu.as_ref(), &d, &opts, LayerPolicy::Budget(1), &gpu).unwrap();
        assert_eq!(got.reading, cpu.reading);
        for (k, (a, b)) in cpu.deviations.iter().zip(&got.deviations).enumerate() {
            assert!((a - b).abs() < 1e-4 * a.abs().max(1e-3), "{name}: D_{k} cpu {a} gpu {b}");
        }
        assert_eq!(got.chosen, cpu.chosen, "{name}: the same choice");
    }
}
