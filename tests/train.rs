//! The trainer (src/train/trainer.rs) on the tiny Llama fixture with a word-level tokenizer
//! whose 61 ids fit its 96-row vocabulary: a resumed run equals an uninterrupted one bit for
//! bit (dropout and gradient accumulation included), gradient accumulation is token-weighted,
//! every method lowers the loss, non-finite steps are skipped and then stop the run, a failed
//! checkpoint write leaves the previous one usable, bad input fails with errors that name what
//! is wrong, and the GPU follows the CPU's loss curve.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tinytune::io::{SafetensorsFile, Tokenizer};
use tinytune::models::{self, CausalLm};
use tinytune::optim::ScheduleKind;
use tinytune::peft::{
    AdapterKind, BottleneckConfig, Full, HeadOnly, Ia3Config, LoraConfig, LoraSbConfig, LoraXsConfig, MethodConfig, PrefixConfig,
    PromptConfig,
};
use tinytune::train::data::{DataOptions, Dataset};
use tinytune::train::{self, EvalRecord, Observer, OptimizerKind, Quiet, StepRecord, TrainConfig, TrainReport};
use tinytune::{CrossEntropyReduction, Device, Error, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A fresh, empty directory for one test (tests run as threads of one process).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tinytune-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Word-level: lower-cased words and punctuation, EOS `<|endoftext|>` = 0, PAD `<pad>` = 1.
fn tokenizer() -> Tokenizer {
    let t = Tokenizer::from_hf_json(fixture("tokenizer/tiny-words.json")).unwrap();
    assert_eq!((t.eos_id(), t.pad_id()), (Some(0), Some(1)));
    t
}

fn tiny_llama(device: &Device) -> Box<dyn CausalLm> {
    models::load(fixture("tiny-llama"), device).unwrap()
}

/// A small deterministic generator (SplitMix64) for the synthetic sentences.
struct Gen(u64);
impl Gen {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        items[((z ^ (z >> 31)) % items.len() as u64) as usize]
    }
}

/// `{"text"}` lines of 4 to 15 words: a few templates, so a tiny model can learn them.
fn lm_lines(n: usize, seed: u64) -> Vec<String> {
    let mut g = Gen(seed);
    (0..n)
        .map(|_| {
            let animal = g.pick(&["cat", "dog", "bird", "fish"]);
            let mut s = match g.pick(&["short", "mid", "long"]) {
                "short" => format!("the {animal} {} .", g.pick(&["sat", "ran", "slept", "ate"])),
                "mid" => format!(
                    "a {} {animal} {} in the {} .",
                    g.pick(&["big", "small", "red"]),
                    g.pick(&["sat", "swam"]),
                    g.pick(&["box", "pond"])
                ),
                _ => format!(
                    "the {} {animal} sat on the {} , and then it ate the {} food .",
                    g.pick(&["big", "small", "blue"]),
                    g.pick(&["mat", "box"]),
                    g.pick(&["red", "blue"])
                ),
            };
            if g.pick(&["", "", "x"]) == "x" {
                s.push_str(" it slept .");
            }
            serde_json::json!({ "text": s }).to_string()
        })
        .collect()
}

/// `{"text", "label"}` lines: 1 for praise, 0 for complaints.
fn cls_lines(n: usize, seed: u64) -> Vec<String> {
    let mut g = Gen(seed);
    (0..n)
        .map(|i| {
            let positive = i % 2 == 0;
            let subject = g.pick(&["the film", "the movie", "the story", "the acting", "the music", "the plot", "it"]);
            let adverb = g.pick(&["", "very ", "really "]);
            let text = if g.pick(&["was", "verb"]) == "was" {
                let adj = if positive {
                    g.pick(&["good", "great", "wonderful", "lovely"])
                } else {
                    g.pick(&["bad", "awful", "dull", "boring", "poor"])
                };
                format!("{subject} was {adverb}{adj} .")
            } else {
                let verb = if positive { g.pick(&["loved", "liked", "enjoyed"]) } else { "hated" };
                format!("i {adverb}{verb} {} !", subject.replace("the ", "this "))
            };
            serde_json::json!({ "text": text, "label": positive as u32 }).to_string()
        })
        .collect()
}

fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn load_data(path: &Path) -> Dataset {
    let d = Dataset::load(path, &tokenizer(), &DataOptions { seq_len: 24, context: Some(64), ..DataOptions::default() }).unwrap();
    assert!(d.examples().iter().all(|e| !e.ids.contains(&2)), "{}: every word is in the vocabulary (no <unk>)", path.display());
    d
}

/// LoRA of rank `r` on q_proj, v_proj.
fn lora(r: usize, alpha: f64, dropout: f64) -> LoraConfig {
    LoraConfig { r, alpha, dropout, ..LoraConfig::default() }
}

/// LoRA r=2 on q_proj, v_proj; AdamW; linear schedule; checkpoints only at the end.
fn config(out: &Path) -> TrainConfig {
    TrainConfig {
        method: Arc::new(lora(2, 4.0, 0.0)),
        lr: 1e-2,
        batch_size: 4,
        max_steps: Some(6),
        save_every: 1000,
        seed: 7,
        out: out.to_path_buf(),
        ..TrainConfig::default()
    }
}

fn run(cfg: &TrainConfig, train: &Dataset, eval: Option<&Dataset>, obs: &mut dyn Observer) -> tinytune::Result<TrainReport> {
    let mut model = tiny_llama(&Device::Cpu);
    train::train(model.as_mut(), train, eval, cfg, "tiny-llama", &Device::Cpu, obs)
}

/// Records what the trainer reports and stops it after `stop_after` steps (if given).
#[derive(Default)]
struct Recorder {
    stop_after: Option<u64>,
    steps: Vec<StepRecord>,
    evals: Vec<EvalRecord>,
    messages: Vec<String>,
    /// At step `k` (after it), run the action (NaN injection and the like).
    actions: Vec<(u64, Box<dyn FnMut()>)>,
}

impl Observer for Recorder {
    fn on_step(&mut self, r: &StepRecord) {
        self.steps.push(r.clone());
        for (at, f) in &mut self.actions {
            if *at == r.step {
                f();
            }
        }
    }
    fn on_eval(&mut self, r: &EvalRecord) {
        self.evals.push(r.clone());
    }
    fn on_message(&mut self, msg: &str) {
        self.messages.push(msg.to_string());
    }
    fn keep_going(&mut self) -> bool {
        self.stop_after.is_none_or(|k| self.steps.last().is_none_or(|s| s.step < k))
    }
}

/// Every tensor of a safetensors file as f64 values, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f64>)> {
    let f = SafetensorsFile::open(path).unwrap();
    let mut names: Vec<String> = f.names().into_iter().map(str::to_string).collect();
    names.sort();
    names.into_iter().map(|n| (n.clone(), f.load(&n, &Device::Cpu).unwrap().to_vec_f64().unwrap())).collect()
}

/// The largest absolute difference of each tensor of two safetensors files that differ.
fn differences(a: &Path, b: &Path) -> Vec<(String, f64)> {
    tensors(a)
        .into_iter()
        .zip(tensors(b))
        .map(|((n, x), (_, y))| (n, x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

/// The lines of `metrics.jsonl` without the wall-clock fields.
fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                for k in ["tokens_per_s", "elapsed_s"] {
                    o.remove(k);
                }
            }
            v
        })
        .collect()
}

fn state(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap()).unwrap()
}

fn report_json(out: &Path) -> Value {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("saved");
    v
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-30)
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one_bit_for_bit() {
    let dir = scratch("resume");
    let lm = write_lines(&dir, "lm.jsonl", &lm_lines(10, 1));
    let lm_eval = write_lines(&dir, "lm-eval.jsonl", &lm_lines(4, 2));
    let cls = write_lines(&dir, "cls.jsonl", &cls_lines(10, 3));
    let cls_eval = write_lines(&dir, "cls-eval.jsonl", &cls_lines(4, 4));
    // LoRA on LM data, and DoRA + a new head on labelled data: dropout on, 2 micro-batches a
    // step, 10 examples in batches of 3 (4 batches an epoch, the last one short), so the 7
    // steps (14 micro-batches) cross epoch boundaries mid-step; the interruption is at a step
    // with no checkpoint due, the resumed part crosses the save at step 5 and an evaluation.
    // The third run batches by length (runs of 2 batches sorted by length, then shuffled).
    for (name, dora, train_path, eval_path, stop, buckets) in
        [("lora", false, &lm, &lm_eval, 3, 0), ("dora-head", true, &cls, &cls_eval, 4, 0), ("lora-buckets", false, &lm, &lm_eval, 3, 2)]
    {
        let (train_set, eval_set) = (load_data(train_path), load_data(eval_path));
        let cfg = |out: PathBuf| TrainConfig {
            method: Arc::new(LoraConfig { dora, targets: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()], ..lora(2, 4.0, 0.1) }),
            batch_size: 3,
            grad_accum: 2,
            length_buckets: buckets,
            max_steps: Some(7),
            eval_every: Some(3),
            save_every: 5,
            warmup_steps: 2,
            weight_decay: 0.01,
            ..config(&out)
        };
        let (a, b) = (dir.join(format!("{name}-straight")), dir.join(format!("{name}-resumed")));
        let straight = run(&cfg(a.clone()), &train_set, Some(&eval_set), &mut Quiet).unwrap();
        assert!(!straight.interrupted && straight.steps == 7 && straight.resumed_from.is_none());

        let mut stopper = Recorder { stop_after: Some(stop), ..Recorder::default() };
        let first = run(&cfg(b.clone()), &train_set, Some(&eval_set), &mut stopper).unwrap();
        assert!(first.interrupted, "{name}: the observer stopped the run");
        assert_eq!((first.steps, first.after.clone(), first.saved.clone()), (stop, None, b.join("checkpoint")));
        assert_eq!(state(&b)["step"], stop, "{name}: the interruption wrote a checkpoint of its step");
        assert!(!b.join("adapter").exists(), "{name}: an interrupted run saves no adapter");
        assert!(stopper.messages.iter().any(|m| m.contains(&format!("stopped at step {stop} of 7"))), "{:?}", stopper.messages);

        let resumed = run(&TrainConfig { resume: true, ..cfg(b.clone()) }, &train_set, Some(&eval_set), &mut Quiet).unwrap();
        assert_eq!((resumed.resumed_from, resumed.steps, resumed.interrupted), (Some(stop), 7, false));

        let (wa, wb) = (
            std::fs::read(a.join("adapter/adapter_model.safetensors")).unwrap(),
            std::fs::read(b.join("adapter/adapter_model.safetensors")).unwrap(),
        );
        assert!(
            wa == wb,
            "{name}: the adapters differ: {:?}",
            differences(&a.join("adapter/adapter_model.safetensors"), &b.join("adapter/adapter_model.safetensors"))
        );
        // The adapter learned something (B moved off its zero init), so equality is not vacuous.
        let trained = tensors(&a.join("adapter/adapter_model.safetensors"));
        assert!(trained.iter().filter(|(n, _)| n.ends_with("lora_B.weight")).all(|(_, v)| v.iter().any(|&x| x != 0.0)));
        assert_eq!(metrics(&a), metrics(&b), "{name}: loss history, learning rates, gradient norms and evaluations");
        assert_eq!(metrics(&a).iter().filter(|v| v.get("step").is_some()).count(), 7);
        assert_eq!(metrics(&a).iter().filter(|v| v.get("eval").is_some()).count(), 1 + 2 + 1, "before, steps 3 and 6, after");
        assert_eq!(report_json(&a), report_json(&b));
        assert_eq!((straight.final_loss, straight.after.clone()), (resumed.final_loss, resumed.after.clone()));
        assert_eq!(straight.before, resumed.before, "the evaluation before training is restored from the checkpoint");
        if dora {
            assert!(straight.after.as_ref().unwrap().accuracy.is_some());
            assert!(trained.iter().any(|(n, _)| n.ends_with("score.weight")));
        }
        let ha: Vec<f64> = state(&a)["history"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
        let hb: Vec<f64> = state(&b)["history"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
        assert_eq!(ha, hb);

        // Resuming a finished run again changes nothing and writes no duplicate lines.
        let again = run(&TrainConfig { resume: true, ..cfg(b.clone()) }, &train_set, Some(&eval_set), &mut Quiet).unwrap();
        assert_eq!((again.resumed_from, again.final_loss), (Some(7), straight.final_loss));
        assert_eq!(metrics(&a), metrics(&b), "{name}: a second resume of a finished run keeps the metrics as they were");
        assert!(std::fs::read(b.join("adapter/adapter_model.safetensors")).unwrap() == wa);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn length_bucketed_batches_are_seeded_permutations_with_less_padding() {
    let dir = scratch("buckets");
    let data = load_data(&write_lines(&dir, "lm.jsonl", &lm_lines(203, 5)));
    let len = |i: usize| data.example(i).ids.len();
    // Positions computed: every batch padded to its longest example.
    let padded = |order: &[usize], b: usize| order.chunks(b).map(|c| c.len() * c.iter().map(|&i| len(i)).max().unwrap()).sum::<usize>();
    for epoch in 0..3 {
        let plain = data.training_order(epoch, 9, 8, 0);
        assert_eq!(plain, data.epoch_order(epoch, 9), "0 buckets: the plain epoch order");
        let bucketed = data.training_order(epoch, 9, 8, 10);
        assert_eq!(bucketed, data.training_order(epoch, 9, 8, 10), "deterministic");
        let mut sorted = bucketed.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..203).collect::<Vec<_>>(), "each example once per epoch");
        assert!(padded(&bucketed, 8) < padded(&plain, 8), "epoch {epoch}: bucketing pads less");
        assert_ne!(bucketed, data.training_order(epoch + 10, 9, 8, 10), "another epoch, another order");
        // Within a batch, the lengths are close: each batch lies inside one sorted run.
        for c in bucketed[..200].chunks(8) {
            let (lo, hi) = (c.iter().map(|&i| len(i)).min().unwrap(), c.iter().map(|&i| len(i)).max().unwrap());
            assert!(hi - lo <= hi / 2 + 2, "a batch of lengths {lo}..{hi}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gradient_accumulation_is_token_weighted() {
    let dir = scratch("accum");
    let path = write_lines(&dir, "lm.jsonl", &lm_lines(12, 5));
    let data = load_data(&path);
    // Full fine-tuning with SGD (its update is proportional to the gradient, unlike Adam's
    // first step), no clipping: 4 examples at once against 2 + 2.
    let cfg = |out: PathBuf, batch_size, grad_accum| TrainConfig {
        method: Arc::new(Full),
        optimizer: OptimizerKind::Sgd,
        lr: 0.05,
        clip: None,
        schedule: ScheduleKind::Constant,
        batch_size,
        grad_accum,
        max_steps: Some(2),
        ..config(&out)
    };
    let (one, two) = (dir.join("4x1"), dir.join("2x2"));
    run(&cfg(one.clone(), 4, 1), &data, None, &mut Quiet).unwrap();
    run(&cfg(two.clone(), 2, 2), &data, None, &mut Quiet).unwrap();
    let (m1, m2) = (metrics(&one), metrics(&two));
    for (a, b) in m1.iter().zip(&m2) {
        for k in ["loss", "grad_norm"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!(rel(x, y) < 1e-6, "step {}: {k} {x} vs {y}", a["step"]);
        }
        assert_eq!(a["tokens"], b["tokens"]);
    }
    let (w1, w2) = (tensors(&one.join("model/model.safetensors")), tensors(&two.join("model/model.safetensors")));
    assert_eq!(w1.len(), w2.len());
    let mut moved = 0.0f64;
    let base: Vec<(String, Vec<f64>)> = tensors(&fixture("tiny-llama/model.safetensors"));
    for ((n, a), (_, b)) in w1.iter().zip(&w2) {
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-6, "{n}: the two updates differ by {worst}");
        if let Some((_, w0)) = base.iter().find(|(m, _)| m == n) {
            moved = moved.max(a.iter().zip(w0).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max));
        }
    }
    assert!(moved > 1e-3, "the weights moved ({moved})");

    // The first step's loss is the mean over all 12+ targets of its 4 examples, not the mean
    // of the two micro-batches' means (which differs here: the halves have unequal lengths).
    let model = tiny_llama(&Device::Cpu);
    let order = data.epoch_order(0, 7);
    let half = |idx: &[usize]| {
        let b = data.batch(idx, &Device::Cpu).unwrap();
        let sum = model.forward(&b.ids, b.keep.as_ref()).unwrap().cross_entropy(&b.targets, -100, CrossEntropyReduction::Sum).unwrap();
        (sum.to_scalar().unwrap(), b.n_target_tokens as f64)
    };
    let ((s1, n1), (s2, n2)) = (half(&order[..2]), half(&order[2..4]));
    assert_ne!(n1, n2, "the micro-batches have different target counts");
    let weighted = (s1 + s2) / (n1 + n2);
    let mean_of_means = (s1 / n1 + s2 / n2) / 2.0;
    let got = m2[0]["loss"].as_f64().unwrap();
    assert!(rel(got, weighted) < 1e-6, "loss {got}, token-weighted {weighted}");
    assert!(rel(got, mean_of_means) > 1e-4, "the check can tell the two apart: {got} vs {mean_of_means}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_method_lowers_the_loss() {
    let dir = scratch("methods");
    let lm = load_data(&write_lines(&dir, "lm.jsonl", &lm_lines(16, 11)));
    let lm_eval = load_data(&write_lines(&dir, "lm-eval.jsonl", &lm_lines(6, 12)));
    // Classification is evaluated on its training examples: a head on a random tiny model has
    // features too weak to generalise from 24 examples, but it must fit them.
    let cls = load_data(&write_lines(&dir, "cls.jsonl", &cls_lines(24, 13)));
    let houlsby = BottleneckConfig { reduction_factor: 4, ..BottleneckConfig::default() };
    let pfeiffer = BottleneckConfig { kind: AdapterKind::Pfeiffer, ..houlsby.clone() };
    let xs = LoraXsConfig { r: 4, targets: vec!["all-linear".into()], ..LoraXsConfig::default() };
    let sb = LoraSbConfig { r: 4, targets: vec!["all-linear".into()], init_examples: 8, ..LoraSbConfig::default() };
    let cases: [(&str, Arc<dyn MethodConfig>, &Dataset, &Dataset, f64); 13] = [
        ("lora", Arc::new(lora(2, 4.0, 0.0)), &lm, &lm_eval, 2e-2),
        ("dora", Arc::new(LoraConfig { dora: true, ..lora(2, 4.0, 0.0) }), &lm, &lm_eval, 2e-2),
        ("full", Arc::new(Full), &lm, &lm_eval, 5e-3),
        ("head", Arc::new(HeadOnly), &cls, &cls, 3e-2),
        ("lora+head", Arc::new(lora(2, 4.0, 0.0)), &cls, &cls, 2e-2),
        ("lora-xs", Arc::new(xs), &lm, &lm_eval, 5e-2),
        ("lora-sb", Arc::new(sb), &lm, &lm_eval, 2e-2),
        ("ia3", Arc::new(Ia3Config::default()), &lm, &lm_eval, 5e-2),
        ("houlsby", Arc::new(houlsby), &lm, &lm_eval, 1e-2),
        ("pfeiffer", Arc::new(pfeiffer), &lm, &lm_eval, 1e-2),
        ("prefix", Arc::new(PrefixConfig { num_virtual_tokens: 4, ..PrefixConfig::default() }), &lm, &lm_eval, 1e-1),
        (
            "prefix-projection",
            Arc::new(PrefixConfig { num_virtual_tokens: 4, prefix_projection: true, encoder_hidden_size: 32 }),
            &lm,
            &lm_eval,
            1e-2,
        ),
        ("prompt", Arc::new(PromptConfig { num_virtual_tokens: 4, ..PromptConfig::default() }), &lm, &lm_eval, 1e-1),
    ];
    for (name, method, train_set, eval_set, lr) in cases {
        let out = dir.join(name);
        let cfg = TrainConfig { method, lr, max_steps: Some(24), schedule: ScheduleKind::Constant, ..config(&out) };
        let mut rec = Recorder::default();
        let r = run(&cfg, train_set, Some(eval_set), &mut rec).unwrap();
        let (before, after) = (r.before.clone().unwrap(), r.after.clone().unwrap());
        let first: f64 = rec.steps[..4].iter().map(|s| s.loss).sum::<f64>() / 4.0;
        let last: f64 = rec.steps[20..].iter().map(|s| s.loss).sum::<f64>() / 4.0;
        eprintln!(
            "{name}: eval {:.4} -> {:.4} (accuracy {:?} -> {:?}); train {first:.4} -> {last:.4}",
            before.loss, after.loss, before.accuracy, after.accuracy
        );
        assert!(after.loss < 0.9 * before.loss, "{name}: held-out loss {} -> {}", before.loss, after.loss);
        assert!(last < 0.9 * first, "{name}: training loss {first} -> {last}");
        assert_eq!(rec.evals.len(), 2, "{name}: evaluated before and after");
        assert_eq!((r.steps, r.skipped_steps), (24, 0));
        if std::ptr::eq(train_set, &cls) {
            let (a0, a1) = (before.accuracy.unwrap(), after.accuracy.unwrap());
            assert!(a1 >= 0.9 && a1 > a0, "{name}: accuracy {a0} -> {a1}");
            let rep = report_json(&out);
            assert_eq!(rep["after"]["accuracy"].as_f64(), Some(a1));
            assert_eq!(rep["before"]["accuracy"].as_f64(), Some(a0));
        } else {
            assert!(before.accuracy.is_none() && after.accuracy.is_none());
        }
        let saved = if name == "full" { out.join("model/model.safetensors") } else { out.join("adapter/adapter_model.safetensors") };
        assert!(saved.exists(), "{name}: {} written", saved.display());
        assert!(std::fs::read_to_string(out.join("loss.svg")).unwrap().starts_with("<svg"));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// GPT-2 (f16 checkpoint, Conv1D linears, tied embeddings) through the trainer: LoRA on c_attn
/// and full fine-tuning (f16 weights trained as f32) both lower the held-out loss, and the
/// saved adapter says fan_in_fan_out.
#[test]
fn gpt2_trains_through_the_trainer() {
    let dir = scratch("gpt2");
    let lm = load_data(&write_lines(&dir, "lm.jsonl", &lm_lines(16, 61)));
    let lm_eval = load_data(&write_lines(&dir, "lm-eval.jsonl", &lm_lines(6, 62)));
    let gpt2_lora = LoraConfig { targets: vec!["c_attn".into()], ..lora(2, 4.0, 0.0) };
    for (name, method, lr) in [("lora", Arc::new(gpt2_lora) as Arc<dyn MethodConfig>, 2e-2), ("full", Arc::new(Full), 5e-3)] {
        let out = dir.join(name);
        let cfg = TrainConfig { method, lr, max_steps: Some(16), schedule: ScheduleKind::Constant, ..config(&out) };
        let mut model = models::load(fixture("tiny-gpt2-f16"), &Device::Cpu).unwrap();
        let r = train::train(model.as_mut(), &lm, Some(&lm_eval), &cfg, "tiny-gpt2", &Device::Cpu, &mut Quiet).unwrap();
        let (before, after) = (r.before.unwrap().loss, r.after.unwrap().loss);
        assert!(after < 0.9 * before, "{name}: held-out loss {before} -> {after}");
        if name == "lora" {
            let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
            assert_eq!(config["fan_in_fan_out"], true);
        } else {
            assert!(out.join("model/model.safetensors").exists());
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The tensor behind a frozen linear weight of `model` (sharing its storage).
fn frozen_weight(model: &mut dyn CausalLm, site: &str) -> Tensor {
    model.linears_mut().into_iter().find(|l| l.name == site).unwrap().weight.clone()
}

fn nan_like(t: &Tensor) -> Tensor {
    Tensor::full(t.shape(), f64::NAN, t.dtype(), t.device()).unwrap()
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let dir = scratch("nan");
    let data = load_data(&write_lines(&dir, "lm.jsonl", &lm_lines(12, 21)));

    // A NaN weight during steps 3 and 4 (put in after step 2, taken out after step 4): both
    // steps are skipped, reported, and training goes on.
    let out = dir.join("transient");
    let mut model = tiny_llama(&Device::Cpu);
    let w = frozen_weight(model.as_mut(), "model.layers.1.mlp.down_proj");
    let good = w.detach().contiguous().unwrap();
    let (w1, w2) = (w.clone(), w.clone());
    let mut rec = Recorder {
        actions: vec![(2, Box::new(move || w1.set_data(&nan_like(&w1)).unwrap())), (4, Box::new(move || w2.set_data(&good).unwrap()))],
        ..Recorder::default()
    };
    let cfg = TrainConfig { max_steps: Some(8), max_bad_steps: 3, ..config(&out) };
    let r = train::train(model.as_mut(), &data, None, &cfg, "tiny-llama", &Device::Cpu, &mut rec).unwrap();
    assert_eq!((r.steps, r.skipped_steps), (8, 2));
    let skipped: Vec<u64> = rec.steps.iter().filter(|s| s.skipped).map(|s| s.step).collect();
    assert_eq!(skipped, [3, 4]);
    assert!(rec.steps.iter().filter(|s| !s.skipped).all(|s| s.loss.is_finite()));
    assert!(rec.messages.iter().any(|m| m.starts_with("step 3:") && m.contains("not finite; step skipped")), "{:?}", rec.messages);
    let m = metrics(&out);
    assert_eq!(m[2]["skipped"], true);
    assert_eq!(m[2]["loss"], Value::Null, "a NaN loss is written as null (valid JSON)");
    assert_eq!(m[4]["skipped"], false);
    assert!(tensors(&out.join("adapter/adapter_model.safetensors")).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));

    // A NaN weight from step 5 on: steps 5, 6, 7 skipped, then a clear error; the checkpoint
    // of step 6 (written during the streak, with the weights of step 4) survives intact.
    let out = dir.join("persistent");
    let mut model = tiny_llama(&Device::Cpu);
    let w = frozen_weight(model.as_mut(), "model.layers.0.self_attn.o_proj");
    let mut rec = Recorder { actions: vec![(4, Box::new(move || w.set_data(&nan_like(&w)).unwrap()))], ..Recorder::default() };
    let cfg = TrainConfig { max_steps: Some(20), save_every: 3, max_bad_steps: 3, ..config(&out) };
    let e = train::train(model.as_mut(), &data, None, &cfg, "tiny-llama", &Device::Cpu, &mut rec).unwrap_err().to_string();
    let ckpt = out.join("checkpoint");
    assert!(
        e.contains("stopped at step 7")
            && e.contains("3 steps in a row")
            && e.contains("non-finite")
            && e.contains(&format!("the last checkpoint (step 6) is in {}", ckpt.display())),
        "{e}"
    );
    assert_eq!(state(&out)["step"], 6);
    let file = ckpt.join(state(&out)["tensors"].as_str().unwrap());
    let saved = tensors(&file);
    assert!(saved.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())), "the surviving checkpoint is finite");
    assert!(saved.iter().any(|(n, _)| n.starts_with("optim/")));
    assert!(!out.join("adapter").exists(), "a failed run saves no adapter");

    // The same with no checkpoint written yet says so.
    let out = dir.join("early");
    let mut model = tiny_llama(&Device::Cpu);
    let w = frozen_weight(model.as_mut(), "model.layers.0.self_attn.o_proj");
    w.set_data(&nan_like(&w)).unwrap();
    let cfg = TrainConfig { max_steps: Some(20), max_bad_steps: 2, ..config(&out) };
    let e = train::train(model.as_mut(), &data, None, &cfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("stopped at step 2: 2 steps in a row") && e.contains("no checkpoint was written yet"), "{e}");

    // A learning rate far too large blows the weights up within a few steps.
    let out = dir.join("huge-lr");
    let mut rec = Recorder::default();
    let cfg = TrainConfig { lr: 1e30, clip: None, max_steps: Some(30), max_bad_steps: 3, ..config(&out) };
    let e = run(&cfg, &data, None, &mut rec).unwrap_err().to_string();
    assert!(e.contains("3 steps in a row had a non-finite loss or gradient"), "{e}");
    assert_eq!(rec.steps.iter().rev().take(3).filter(|s| s.skipped).count(), 3);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_failed_checkpoint_write_keeps_the_previous_checkpoint() {
    let dir = scratch("disk");
    let data_path = write_lines(&dir, "lm.jsonl", &lm_lines(12, 31));
    let data = load_data(&data_path);
    let cfg = |out: PathBuf| TrainConfig { method: Arc::new(lora(2, 4.0, 0.1)), save_every: 2, ..config(&out) };
    let (straight, broken) = (dir.join("straight"), dir.join("broken"));
    run(&cfg(straight.clone()), &data, None, &mut Quiet).unwrap();

    // Stop after the checkpoint of step 2, then make the path of step 4's tensors file a
    // directory (running as root, permissions would not stop the write): the rename fails.
    let r = run(&cfg(broken.clone()), &data, None, &mut Recorder { stop_after: Some(2), ..Recorder::default() }).unwrap();
    assert!(r.interrupted);
    let blocker = broken.join("checkpoint/step-4.safetensors");
    std::fs::create_dir_all(blocker.join("occupied")).unwrap();
    let e = run(&TrainConfig { resume: true, ..cfg(broken.clone()) }, &data, None, &mut Quiet).unwrap_err();
    match &e {
        Error::Io { path, .. } => assert_eq!(Path::new(path), blocker, "{e}"),
        other => panic!("expected an Io error naming {}, got {other}", blocker.display()),
    }
    // The previous checkpoint is intact and no temporary file is left behind.
    let st = state(&broken);
    assert_eq!((st["step"].as_u64(), st["tensors"].as_str()), (Some(2), Some("step-2.safetensors")));
    assert!(!tensors(&broken.join("checkpoint/step-2.safetensors")).is_empty());
    let names: Vec<String> =
        std::fs::read_dir(broken.join("checkpoint")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");

    // Once the disk is writable again, --resume continues from step 2 to the same result.
    std::fs::remove_dir_all(&blocker).unwrap();
    let r = run(&TrainConfig { resume: true, ..cfg(broken.clone()) }, &data, None, &mut Quiet).unwrap();
    assert_eq!((r.resumed_from, r.steps), (Some(2), 6));
    assert!(
        std::fs::read(straight.join("adapter/adapter_model.safetensors")).unwrap()
            == std::fs::read(broken.join("adapter/adapter_model.safetensors")).unwrap()
    );
    assert_eq!(metrics(&straight), metrics(&broken));

    // An output "directory" that is a file.
    let file = dir.join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let e = run(&cfg(file.clone()), &data, None, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains(&file.display().to_string()), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_gives_errors_that_name_the_problem() {
    let dir = scratch("bad");
    let tok = tokenizer();
    let opts = DataOptions { seq_len: 24, context: Some(64), ..DataOptions::default() };
    let lm = load_data(&write_lines(&dir, "lm.jsonl", &lm_lines(8, 41)));
    let cls = load_data(&write_lines(&dir, "cls.jsonl", &cls_lines(8, 42)));

    let e = Dataset::load(fixture("data/empty.jsonl"), &tok, &opts).unwrap_err().to_string();
    assert!(e.contains("empty.jsonl") && e.contains("empty"), "{e}");

    // Labels beyond --num-classes: the error names the line, in the training or the
    // evaluation data (an explicit class count is not silently grown to fit the labels).
    let mut lines = cls_lines(6, 43);
    lines[4] = r#"{"text": "the plot was fine .", "label": 3}"#.into();
    let bad = load_data(&write_lines(&dir, "cls-bad.jsonl", &lines));
    let cfg = TrainConfig { num_classes: Some(3), ..config(&dir.join("o1")) };
    let e = run(&cfg, &bad, None, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("cls-bad.jsonl") && e.contains("line 5") && e.contains("label 3") && e.contains("3 classes"), "{e}");
    let cfg = TrainConfig { num_classes: Some(2), ..config(&dir.join("o2")) };
    let e = run(&cfg, &cls, Some(&bad), &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("cls-bad.jsonl") && e.contains("line 5") && e.contains("2 classes"), "{e}");

    // A head needs labels; labelled data trains one.
    let e = run(&TrainConfig { method: Arc::new(HeadOnly), ..config(&dir.join("o3")) }, &lm, None, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("'head'") && e.contains("label"), "{e}");
    let r =
        run(&TrainConfig { method: Arc::new(HeadOnly), max_steps: Some(2), ..config(&dir.join("o4")) }, &cls, None, &mut Quiet).unwrap();
    assert_eq!(r.steps, 2);
    assert!(dir.join("o4/adapter/adapter_model.safetensors").exists());
    // Labels that are all 0 (a small subset of binary data) still get a 2-class head.
    let zeros: Vec<String> = (0..4).map(|i| format!(r#"{{"text": "the plot was dull{}", "label": 0}}"#, " .".repeat(i + 1))).collect();
    let zeros = load_data(&write_lines(&dir, "zeros.jsonl", &zeros));
    let r =
        run(&TrainConfig { method: Arc::new(HeadOnly), max_steps: Some(1), ..config(&dir.join("o4b")) }, &zeros, None, &mut Quiet).unwrap();
    assert_eq!(r.steps, 1);
    let head = SafetensorsFile::open(dir.join("o4b/adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(head.load("base_model.model.score.weight", &Device::Cpu).unwrap().shape(), [2, 32]);
    let e = run(&config(&dir.join("o5")), &cls, Some(&lm), &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("lm.jsonl") && e.contains("not a classification data set"), "{e}");

    // A resume with settings that change the math names the setting.
    let out = dir.join("o6");
    run(&config(&out), &lm, None, &mut Recorder { stop_after: Some(2), ..Recorder::default() }).unwrap();
    for (cfg, key) in [
        (TrainConfig { lr: 2e-2, ..config(&out) }, "lr"),
        (TrainConfig { max_steps: Some(9), ..config(&out) }, "total_steps"),
        (TrainConfig { method: Arc::new(lora(4, 4.0, 0.0)), ..config(&out) }, "r"),
        (TrainConfig { seed: 8, ..config(&out) }, "seed"),
    ] {
        let e = run(&TrainConfig { resume: true, ..cfg }, &lm, None, &mut Quiet).unwrap_err().to_string();
        assert!(e.contains(&format!("made with {key} = ")) && e.contains("state.json"), "{key}: {e}");
    }
    // The same file, tokenized to other examples (a shorter --seq-len): the data differ.
    let short = Dataset::load(dir.join("lm.jsonl"), &tok, &DataOptions { seq_len: 5, ..opts.clone() }).unwrap();
    assert_eq!(short.len(), lm.len());
    let e = run(&TrainConfig { resume: true, ..config(&out) }, &short, None, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("made with data = "), "{e}");
    let e = run(&TrainConfig { resume: true, ..config(&dir.join("o7")) }, &lm, None, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("cannot resume") && e.contains("o7/checkpoint/state.json"), "{e}");

    // Target modules that match nothing list the valid names.
    let cfg =
        TrainConfig { method: Arc::new(LoraConfig { targets: vec!["qproj".into()], ..lora(2, 4.0, 0.0) }), ..config(&dir.join("o8")) };
    let e = run(&cfg, &lm, None, &mut Quiet).unwrap_err().to_string();
    assert!(
        e.contains("'qproj'") && e.contains("down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj, all-linear"),
        "{e}"
    );

    for (cfg, what) in [
        (TrainConfig { batch_size: 0, ..config(&dir.join("o9")) }, "batch size"),
        (TrainConfig { lr: f64::NAN, ..config(&dir.join("o9")) }, "learning rate"),
        (TrainConfig { max_steps: Some(0), ..config(&dir.join("o9")) }, "max steps"),
    ] {
        let e = run(&cfg, &lm, None, &mut Quiet).unwrap_err().to_string();
        assert!(e.contains(what), "{what}: {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gpu_training_follows_the_cpu() {
    let Some(gpu) = common::gpu_device() else { return };
    let dir = scratch("gpu");
    let data = load_data(&write_lines(&dir, "lm.jsonl", &lm_lines(12, 51)));
    let eval = load_data(&write_lines(&dir, "eval.jsonl", &lm_lines(4, 52)));
    let cfg = |out: PathBuf| TrainConfig {
        method: Arc::new(LoraConfig { targets: vec!["all-linear".into()], ..lora(2, 4.0, 0.0) }),
        max_steps: Some(5),
        ..config(&out)
    };
    let mut curves = Vec::new();
    for (name, dev) in [("cpu", Device::Cpu), ("gpu", gpu)] {
        let out = dir.join(name);
        let mut model = tiny_llama(&dev);
        let mut rec = Recorder::default();
        let r = train::train(model.as_mut(), &data, Some(&eval), &cfg(out.clone()), "tiny-llama", &dev, &mut rec).unwrap();
        curves.push((rec.steps.iter().map(|s| s.loss).collect::<Vec<_>>(), r, tensors(&out.join("adapter/adapter_model.safetensors"))));
    }
    let ((lc, rc, wc), (lg, rg, wg)) = (&curves[0], &curves[1]);
    let worst_loss = lc.iter().zip(lg).map(|(a, b)| rel(*a, *b)).fold(0.0, f64::max);
    eprintln!("gpu vs cpu: loss curves {lc:?} vs {lg:?}, largest relative difference {worst_loss:.2e}");
    for (i, (a, b)) in lc.iter().zip(lg).enumerate() {
        assert!(rel(*a, *b) < 1e-4, "step {}: cpu loss {a}, gpu loss {b}", i + 1);
    }
    assert!(lc[4] < lc[0], "the loss falls: {lc:?}");
    let (ea, eb) = (rc.after.as_ref().unwrap().loss, rg.after.as_ref().unwrap().loss);
    assert!(rel(ea, eb) < 1e-4, "eval after: cpu {ea}, gpu {eb}");
    for ((n, a), (_, b)) in wc.iter().zip(wg) {
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        eprintln!("{n}: largest difference {worst:.2e} (largest value {scale:.3})");
        assert!(worst <= 1e-4 * scale.max(1e-2), "{n}: the gpu adapter differs by {worst} (scale {scale})");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// SmolLM2-135M (Q4_1 GGUF: quantized frozen weights, tied embeddings, 30 blocks) with LoRA and
/// a new head on 12 real movie reviews: the loss on them falls in 6 steps, and a run stopped
/// after step 3 and resumed gives the same adapter bit for bit. (Fetched assets; a few seconds.)
#[test]
fn real_model_lora_head_on_movie_reviews() {
    let (Some(model_path), Some(reviews)) =
        (common::asset("SmolLM2-135M-Instruct.Q4_1.gguf"), common::asset("data/movie_reviews.eval.jsonl"))
    else {
        return;
    };
    let dir = scratch("real");
    let tok = Tokenizer::from_gguf(&model_path).unwrap();
    let all = Dataset::load(&reviews, &tok, &DataOptions { seq_len: 40, context: None, ..DataOptions::default() }).unwrap();
    let data = all.subset(12, 3).unwrap();
    let positive = data.examples().iter().filter(|e| e.label == Some(1)).count();
    assert!((4..=8).contains(&positive), "both classes: {positive} of 12 positive");
    let cfg = |out: PathBuf| TrainConfig {
        method: Arc::new(lora(4, 8.0, 0.1)),
        lr: 3e-3,
        batch_size: 4,
        max_steps: Some(6),
        schedule: ScheduleKind::Constant,
        ..config(&out)
    };
    let run_real = |cfg: &TrainConfig, obs: &mut dyn Observer| {
        let mut model = models::load(&model_path, &Device::Cpu).unwrap();
        train::train(model.as_mut(), &data, Some(&data), cfg, "SmolLM2-135M-Instruct", &Device::Cpu, obs).unwrap()
    };
    let t0 = std::time::Instant::now();
    let (a, b) = (dir.join("straight"), dir.join("resumed"));
    let r = run_real(&cfg(a.clone()), &mut Quiet);
    let (before, after) = (r.before.unwrap(), r.after.unwrap());
    println!(
        "SmolLM2 LoRA + head, 6 steps of 4 of 12 reviews: loss {:.4} -> {:.4}, accuracy {:?} -> {:?} ({:.1} s)",
        before.loss,
        after.loss,
        before.accuracy,
        after.accuracy,
        t0.elapsed().as_secs_f64()
    );
    assert!(after.loss < 0.8 * before.loss, "loss {} -> {}", before.loss, after.loss);
    let stopped = run_real(&cfg(b.clone()), &mut Recorder { stop_after: Some(3), ..Recorder::default() });
    assert!(stopped.interrupted);
    let resumed = run_real(&TrainConfig { resume: true, ..cfg(b.clone()) }, &mut Quiet);
    assert_eq!(resumed.resumed_from, Some(3));
    let file = "adapter/adapter_model.safetensors";
    assert!(
        std::fs::read(a.join(file)).unwrap() == std::fs::read(b.join(file)).unwrap(),
        "{:?}",
        differences(&a.join(file), &b.join(file))
    );
    assert_eq!(metrics(&a), metrics(&b));
    std::fs::remove_dir_all(&dir).ok();
}

/// A caller can drive the loop itself: `Trainer::new`, `step`, `evaluate`, `save` give what
/// `train` gives, bit for bit (CPU), and the evaluation matches `train`'s report.
#[test]
fn a_hand_driven_trainer_equals_train() {
    let dir = scratch("by-hand");
    let lm = load_data(&write_lines(&dir, "lm.jsonl", &lm_lines(12, 71)));
    let lm_eval = load_data(&write_lines(&dir, "lm-eval.jsonl", &lm_lines(4, 72)));
    let cfg = |out: PathBuf| TrainConfig { grad_accum: 2, batch_size: 3, warmup_steps: 1, ..config(&out) };
    let a = cfg(dir.join("train"));
    let report = run(&a, &lm, Some(&lm_eval), &mut Quiet).unwrap();

    let b = cfg(dir.join("by-hand"));
    let mut model = tiny_llama(&Device::Cpu);
    let mut t = train::Trainer::new(model.as_mut(), &lm, Some(&lm_eval), &b, &Device::Cpu).unwrap();
    assert_eq!((t.step_count(), t.total_steps()), (0, 6));
    assert_eq!(t.trainable_parameters(), report.trainable_parameters);
    let mut losses = Vec::new();
    while t.step_count() < t.total_steps() {
        losses.push(t.step().unwrap().loss);
    }
    assert_eq!(Some(*losses.last().unwrap()), report.final_loss);
    let after = t.evaluate(&lm_eval).unwrap();
    assert_eq!(Some(after.loss), report.after.map(|e| e.loss));
    let saved = t.save("tiny-llama").unwrap();
    let tensors = |d: &Path| {
        let f = SafetensorsFile::open(d.join("adapter_model.safetensors")).unwrap();
        let mut names: Vec<String> = f.names().into_iter().map(str::to_string).collect();
        names.sort();
        names.into_iter().map(|n| (n.clone(), f.load(&n, &Device::Cpu).unwrap().to_vec::<f32>().unwrap())).collect::<Vec<_>>()
    };
    assert_eq!(tensors(&saved), tensors(&report.saved), "the same adapter");
    std::fs::remove_dir_all(&dir).ok();
}

/// LoRA-SB's start against a plain reference: the gradient of each site's full weight summed
/// over the first `init_examples` of the seeded order (computed here by making the weights
/// trainable and running the objective), `ΔW = −lr_eff·sign(G)` with `lr_eff = lr / warmup`,
/// and its exact rank-r SVD: `B R A` equals that truncation, `B` and `Aᵀ` have orthonormal
/// columns, `R = diag(S_r)`; only `R` trains (`r²` a site), the base weights are untouched;
/// a run lowers the loss, and a resumed one (the start recomputed) equals an uninterrupted one.
#[test]
fn lora_sb_starts_from_the_sign_of_the_full_gradient() {
    use tinytune::linalg;
    use tinytune::train::{data::DataKind, LanguageModelling, Objective};
    let dir = scratch("lora-sb");
    let lm = load_data(&write_lines(&dir, "lm.jsonl", &lm_lines(16, 21)));
    let lm_eval = load_data(&write_lines(&dir, "lm-eval.jsonl", &lm_lines(6, 22)));
    let (r, examples) = (3, 6);
    let targets = vec!["q_proj".to_string(), "down_proj".to_string()];
    let sb = LoraSbConfig { r, targets: targets.clone(), init_examples: examples, ..LoraSbConfig::default() };
    let cfg = |out: PathBuf| TrainConfig {
        method: Arc::new(sb.clone()),
        lr: 5e-2,
        warmup_steps: 4,
        max_steps: Some(24),
        schedule: ScheduleKind::Constant,
        ..config(&out)
    };
    let c = cfg(dir.join("unused"));
    let mut model = tiny_llama(&Device::Cpu);
    let mut att = train::attach(model.as_mut(), &c, DataKind::Lm, None, &Device::Cpu).unwrap();
    assert!(att.params.is_empty(), "nothing is attached before the gradient is known");
    train::init_from_data(model.as_mut(), &mut att, &c, &lm, &Device::Cpu).unwrap();
    assert_eq!(att.params.len(), 4, "q_proj and down_proj in 2 blocks");
    assert!(att.params.iter().all(|(n, t)| n.ends_with(".lora_sb_R.weight") && t.numel() == r * r && t.requires_grad_flag()));

    // The reference: the sites' weights trainable, the loss over the same examples.
    let mut reference = tiny_llama(&Device::Cpu);
    let sites: Vec<String> =
        reference.linears_mut().iter().filter(|l| targets.iter().any(|t| l.name.ends_with(t.as_str()))).map(|l| l.name.clone()).collect();
    for lin in reference.linears_mut().into_iter().filter(|l| sites.contains(&l.name)) {
        lin.weight = lin.weight.requires_grad().unwrap();
    }
    let order = lm.epoch_order(0, c.seed);
    for chunk in order[..examples].chunks(c.batch_size) {
        LanguageModelling.batch_loss(reference.as_ref(), &lm.batch(chunk, &Device::Cpu).unwrap(), false).unwrap().sum.backward().unwrap();
    }
    let lr_eff = c.lr / c.warmup_steps as f64;
    let mut base = tiny_llama(&Device::Cpu);
    let base_weights: Vec<(String, Vec<f64>)> =
        base.linears_mut().iter().map(|l| (l.name.clone(), l.weight.to_vec_f64().unwrap())).collect();
    for lin in reference.linears_mut().into_iter().filter(|l| sites.contains(&l.name)) {
        let (out, inp) = (lin.out_features(), lin.in_features());
        let g = lin.weight.grad().unwrap().to_vec_f64().unwrap();
        let step: Vec<f64> = g
            .iter()
            .map(|&v| {
                if v > 0.0 {
                    -lr_eff
                } else if v < 0.0 {
                    lr_eff
                } else {
                    0.0
                }
            })
            .collect();
        let svd = linalg::svd(&step, out, inp).unwrap();
        let best = svd.truncate(r).reconstruct();
        let layer = model
            .linears_mut()
            .into_iter()
            .find(|l| l.name == lin.name)
            .map(|l| {
                let a = l.adapters[0].as_any().downcast_ref::<tinytune::peft::loraxs::LoraXsLayer>().unwrap();
                (a.a.to_vec_f64().unwrap(), a.b.to_vec_f64().unwrap(), a.r.to_vec_f64().unwrap(), a.scale)
            })
            .unwrap();
        let (a, b, core, scale) = layer;
        assert_eq!(scale, 1.0, "s = 1");
        for i in 0..r {
            for j in 0..r {
                let want = if i == j { svd.s[i] } else { 0.0 };
                assert!((core[i * r + j] - want).abs() < 1e-6 * svd.s[0], "{}: R[{i},{j}] = {} vs {want}", lin.name, core[i * r + j]);
            }
        }
        let bra = linalg::matmul(&linalg::matmul(&b, &core, out, r, r), &a, out, r, inp);
        let worst = bra.iter().zip(&best).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-5 * lr_eff, "{}: B R A is the rank-{r} truncation of −lr_eff·sign(G) (off by {worst})", lin.name);
        let btb = linalg::matmul(&linalg::transpose(&b, out, r), &b, r, out, r);
        let aat = linalg::matmul(&a, &linalg::transpose(&a, r, inp), r, inp, r);
        for i in 0..r * r {
            let eye = (i % (r + 1) == 0) as u8 as f64;
            assert!((btb[i] - eye).abs() < 1e-5 && (aat[i] - eye).abs() < 1e-5, "{}: BᵀB = A Aᵀ = I", lin.name);
        }
    }
    for lin in model.linears_mut() {
        let w0 = &base_weights.iter().find(|(n, _)| *n == lin.name).unwrap().1;
        assert!(!lin.weight.requires_grad_flag() && lin.weight.grad().is_none(), "{}: the base weight is frozen again", lin.name);
        assert_eq!(&lin.weight.to_vec_f64().unwrap(), w0, "{}: the base weight is unchanged", lin.name);
    }

    // Trained: the loss goes down; a resumed run (start recomputed) equals an uninterrupted one.
    let (a, b) = (dir.join("straight"), dir.join("resumed"));
    let straight = run(&cfg(a.clone()), &lm, Some(&lm_eval), &mut Quiet).unwrap();
    let (before, after) = (straight.before.clone().unwrap().loss, straight.after.clone().unwrap().loss);
    assert!(after < 0.9 * before, "lora-sb: held-out loss {before} -> {after}");
    assert_eq!(straight.trainable_parameters, 4 * r * r);
    let mut stopper = Recorder { stop_after: Some(10), ..Recorder::default() };
    assert!(run(&cfg(b.clone()), &lm, Some(&lm_eval), &mut stopper).unwrap().interrupted);
    run(&TrainConfig { resume: true, ..cfg(b.clone()) }, &lm, Some(&lm_eval), &mut Quiet).unwrap();
    let (pa, pb) = (a.join("adapter/adapter_model.safetensors"), b.join("adapter/adapter_model.safetensors"));
    assert!(std::fs::read(&pa).unwrap() == std::fs::read(&pb).unwrap(), "{:?}", differences(&pa, &pb));
    let config: Value = serde_json::from_str(&std::fs::read_to_string(a.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64(), config["init"].as_str()), (Some("LORA_SB"), Some(3), Some("gradient")));

    // Bad settings name the value.
    let e = train::attach(
        tiny_llama(&Device::Cpu).as_mut(),
        &TrainConfig { method: Arc::new(LoraSbConfig { r: 40, ..sb.clone() }), ..c.clone() },
        DataKind::Lm,
        None,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("rank 40") && e.contains("q_proj"), "{e}");
    let e = train::attach(
        tiny_llama(&Device::Cpu).as_mut(),
        &TrainConfig { method: Arc::new(LoraSbConfig { init_examples: 0, ..sb }), ..c },
        DataKind::Lm,
        None,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("init-examples must be at least 1"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// LoRA-SB's start on the GPU (the sites' gradients through the GPU kernels) against the CPU's:
/// the same `B R A` up to the few gradient entries near 0 whose sign rounding may flip.
#[test]
fn lora_sb_starts_the_same_on_the_gpu() {
    use tinytune::train::data::DataKind;
    let Some(gpu) = common::gpu_device() else { return };
    let dir = scratch("lora-sb-gpu");
    let lm = load_data(&write_lines(&dir, "lm.jsonl", &lm_lines(12, 31)));
    let cfg = TrainConfig {
        method: Arc::new(LoraSbConfig { r: 4, targets: vec!["all-linear".into()], init_examples: 8, ..LoraSbConfig::default() }),
        warmup_steps: 2,
        ..config(&dir)
    };
    let mut starts = Vec::new();
    for dev in [Device::Cpu, gpu] {
        let mut model = tiny_llama(&dev);
        let mut att = train::attach(model.as_mut(), &cfg, DataKind::Lm, None, &dev).unwrap();
        train::init_from_data(model.as_mut(), &mut att, &cfg, &lm, &dev).unwrap();
        let xs = att.method.as_any().downcast_ref::<tinytune::peft::LoraXsAdapter>().unwrap();
        starts.push(xs.layers.iter().map(|l| (l.site.clone(), l.delta_weight().unwrap().to_vec_f64().unwrap())).collect::<Vec<_>>());
    }
    assert_eq!(starts[0].len(), 14);
    for ((site, c), (_, g)) in starts[0].iter().zip(&starts[1]) {
        let norm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = c.iter().zip(g).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
        assert!(norm > 0.0 && diff < 0.05 * norm, "{site}: the GPU's start differs by {diff} (norm {norm})");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// FineGates through the trainer: the sparsity objective joins the step's loss, the gates
/// close towards the target (the step metric `gates/closed` grows from 0), the task loss on
/// held-out data stays finite, and the saved adapter reloads.
#[test]
fn finegates_closes_gates_towards_the_target() {
    use tinytune::peft::FineGatesConfig;
    let dir = scratch("finegates");
    let lm = load_data(&write_lines(&dir, "lm.jsonl", &lm_lines(16, 41)));
    let lm_eval = load_data(&write_lines(&dir, "lm-eval.jsonl", &lm_lines(6, 42)));
    let cfg = TrainConfig {
        method: Arc::new(FineGatesConfig { target_sparsity: 0.4, ..FineGatesConfig::default() }),
        // The gates at 10× (gate_lr_scale): 0.1.
        lr: 1e-2,
        max_steps: Some(30),
        schedule: ScheduleKind::Constant,
        ..config(&dir.join("run"))
    };
    let mut rec = Recorder::default();
    let r = run(&cfg, &lm, Some(&lm_eval), &mut rec).unwrap();
    let closed = |s: &StepRecord| s.metrics.iter().find(|(n, _)| n == "gates/closed").map(|m| m.1).unwrap();
    let sparsity = |s: &StepRecord| s.metrics.iter().find(|(n, _)| n == "gates/sparsity_loss").map(|m| m.1).unwrap();
    let (first, last) = (&rec.steps[0], rec.steps.last().unwrap());
    eprintln!("finegates: closed {} -> {}, sparsity loss {} -> {}", closed(first), closed(last), sparsity(first), sparsity(last));
    assert_eq!(closed(first), 0.0);
    assert!(closed(last) > 0.1, "gates closed after 30 steps: {}", closed(last));
    assert!(sparsity(last) < 0.5 * sparsity(first), "the sparsity objective {} -> {}", sparsity(first), sparsity(last));
    assert!(first.loss > sparsity(first), "the step's loss holds the sparsity term");
    assert!(r.after.unwrap().loss.is_finite());
    let mut model = tiny_llama(&Device::Cpu);
    let loaded = tinytune::peft::format::load(&dir.join("run/adapter"), model.as_mut(), &Device::Cpu).unwrap();
    assert_eq!(loaded.method.name(), "finegates");
    std::fs::remove_dir_all(&dir).ok();
}
