//! Preference objectives (src/train/preference.rs) on the tiny Llama fixture: the per-row
//! output-layer loss against the plain composition, DPO's loss and gradient against a float64
//! reference built from the plain logits, precomputed reference log-probabilities against the
//! live adapters-off reference, the adapters-off model against the base model, tiny runs in
//! which DPO and a reward model learn the preference, and the errors of bad set-ups.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use tinytune::io::Tokenizer;
use tinytune::models::{self, CausalLm};
use tinytune::peft::{format, Full, LoraConfig};
use tinytune::rng::Rng;
use tinytune::train::data::{Batch, DataKind, DataOptions, Dataset};
use tinytune::train::preference::{self, dpo_pair, DpoConfig, DpoLoss, PreferenceObjective};
use tinytune::train::{self, Quiet, TrainConfig};
use tinytune::{CrossEntropyReduction, DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tinytune-pref-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Word-level: EOS `<|endoftext|>` = 0, PAD `<pad>` = 1.
fn tokenizer() -> Tokenizer {
    Tokenizer::from_hf_json(fixture("tokenizer/tiny-words.json")).unwrap()
}

fn tiny_llama() -> Box<dyn CausalLm> {
    tiny_llama_on(&Device::Cpu)
}

fn tiny_llama_on(device: &Device) -> Box<dyn CausalLm> {
    models::load(fixture("tiny-llama"), device).unwrap()
}

/// Pairs whose chosen completion praises and whose rejected one complains, after a prompt of
/// two to four words (a small deterministic mix).
fn pair_lines(n: usize, seed: usize) -> Vec<String> {
    let subjects = ["the film", "the movie", "the story", "the acting", "the music", "the plot"];
    let good = ["good", "great", "wonderful", "lovely"];
    let bad = ["bad", "awful", "dull", "boring", "poor"];
    (0..n)
        .map(|i| {
            let k = i * 7 + seed * 13;
            let prompt = format!("{} {}", subjects[k % subjects.len()], ["was", "is"][k / 3 % 2]);
            let adverb = ["", " very", " really"][k / 5 % 3];
            let chosen = format!("{adverb} {} .", good[k % good.len()]);
            let rejected = format!("{adverb} {} .", bad[(k / 2) % bad.len()]);
            json!({ "prompt": prompt, "chosen": chosen, "rejected": rejected }).to_string()
        })
        .collect()
}

fn load_pairs(lines: &[String]) -> Dataset {
    let d = Dataset::from_jsonl_str(
        &lines.join("\n"),
        "pairs.jsonl",
        &tokenizer(),
        &DataOptions { seq_len: 24, context: Some(64), ..DataOptions::default() },
    )
    .unwrap();
    assert!(d.examples().iter().all(|e| !e.ids.contains(&2)), "every word is in the vocabulary (no <unk>)");
    d
}

fn lora() -> Arc<LoraConfig> {
    Arc::new(LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, ..LoraConfig::default() })
}

fn config(out: &Path) -> TrainConfig {
    TrainConfig {
        method: lora(),
        lr: 1e-2,
        batch_size: 4,
        max_steps: Some(6),
        save_every: 1000,
        seed: 3,
        out: out.to_path_buf(),
        ..TrainConfig::default()
    }
}

/// Each row's summed log-probability of its targets, in float64 from the plain logits.
fn plain_log_probs(model: &dyn CausalLm, b: &Batch) -> Vec<f64> {
    tinytune::autograd::with_no_grad(|| {
        let logp = model.forward(&b.ids, b.keep.as_ref()).unwrap().to_dtype(DType::F64).unwrap().log_softmax(-1).unwrap();
        let (rows, t, v) = (logp.shape()[0], logp.shape()[1], logp.shape()[2]);
        let (logp, targets) = (logp.to_vec_f64().unwrap(), b.targets.to_vec::<i32>().unwrap());
        (0..rows)
            .map(|r| (0..t).filter(|&p| targets[r * t + p] >= 0).map(|p| logp[(r * t + p) * v + targets[r * t + p] as usize]).sum())
            .collect()
    })
}

/// The LoRA `B` matrices set to small random values, so the policy differs from its reference.
fn perturb(params: &[(String, Tensor)], seed: u64) {
    let mut rng = Rng::new(seed);
    for (name, t) in params.iter().filter(|(n, _)| n.contains("lora_B")) {
        let v = Tensor::randn(t.shape(), 0.0, 0.3, DType::F32, &Device::Cpu, &mut rng).unwrap().to_device(t.device()).unwrap();
        t.set_data(&v).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

fn grads(params: &[(String, Tensor)]) -> Vec<Vec<f64>> {
    params.iter().map(|(n, t)| t.grad().unwrap_or_else(|| panic!("{n}: no gradient")).to_vec_f64().unwrap()).collect()
}

fn zero_grads(params: &[(String, Tensor)]) {
    for (_, t) in params {
        t.zero_grad();
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what}[{i}]: {g} vs {w} (scale {scale})");
    }
}

#[test]
fn per_row_output_layer_loss_matches_the_composition() {
    let model = tiny_llama();
    let head = model.lm_head();
    let d = head.in_features();
    let mut rng = Rng::new(11);
    let x = Tensor::randn(&[3, 5, d], 0.0, 1.0, DType::F32, &Device::Cpu, &mut rng).unwrap();
    // Row 1 has no target at all (its value is 0); the others some.
    let t: Vec<i32> = vec![5, -100, 7, 8, -100, -100, -100, -100, -100, -100, 3, 4, 9, -100, 60];
    let targets = Tensor::from_vec(t, &[3, 5], &Device::Cpu).unwrap();
    let weights = Tensor::from_vec(vec![0.7f32, -1.3, 2.1], &[3], &Device::Cpu).unwrap();
    let plain = {
        let x = x.detach().requires_grad().unwrap();
        let rows = head.forward(&x).unwrap().cross_entropy(&targets, -100, CrossEntropyReduction::None).unwrap().sum(&[1], false).unwrap();
        rows.mul(&weights).unwrap().sum_all().unwrap().backward().unwrap();
        (rows.to_vec_f64().unwrap(), x.grad().unwrap().to_vec_f64().unwrap())
    };
    assert_eq!(plain.0[1], 0.0);
    for chunk in [1, 2, 3, 64] {
        let x = x.detach().requires_grad().unwrap();
        let rows = tinytune::nn::linear_cross_entropy_rows_chunked(head, &x, &targets, -100, chunk).unwrap();
        assert_eq!(rows.shape(), &[3]);
        rows.mul(&weights).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(&format!("rows, chunks of {chunk}"), &rows.to_vec_f64().unwrap(), &plain.0, 1e-5);
        assert_close(&format!("∂/∂x, chunks of {chunk}"), &x.grad().unwrap().to_vec_f64().unwrap(), &plain.1, 1e-5);
    }
    // Shapes that cannot be right name the layer.
    let bad = tinytune::nn::linear_cross_entropy_rows(head, &x, &targets.reshape(&[15]).unwrap(), -100).unwrap_err().to_string();
    assert!(bad.contains("lm_head") && bad.contains("[rows, T"), "{bad}");
}

#[test]
fn dpo_loss_and_gradient_match_a_float64_reference() {
    let data = load_pairs(&pair_lines(5, 1));
    for cfg in [
        DpoConfig::default(),
        DpoConfig { beta: 0.5, loss: DpoLoss::Sigmoid, label_smoothing: 0.1 },
        DpoConfig { beta: 0.2, loss: DpoLoss::Ipo, label_smoothing: 0.0 },
    ] {
        let mut model = tiny_llama();
        let tc = TrainConfig { preference: PreferenceObjective::Dpo(cfg), ..config(Path::new("unused")) };
        let att = train::attach(model.as_mut(), &tc, DataKind::Preference, None, &Device::Cpu).unwrap();
        perturb(&att.params, 5);
        let b = data.batch(&[0, 1, 2, 3, 4], &Device::Cpu).unwrap();
        let n = 5;
        let out = att.objective.batch_loss(model.as_ref(), &b, true).unwrap();
        out.sum.backward().unwrap();
        let got = grads(&att.params);
        zero_grads(&att.params);

        // The float64 reference: log-probabilities from the plain logits with the adapters on
        // and off, the loss and each row's coefficient ∂ℓ/∂log p in closed form.
        let policy = plain_log_probs(model.as_ref(), &b);
        let reference = tinytune::nn::with_adapters_off(|| plain_log_probs(model.as_ref(), &b));
        let counts: Vec<usize> = {
            let t = b.ids.shape()[1];
            b.targets.to_vec::<i32>().unwrap().chunks(t).map(|r| r.iter().filter(|&&x| x >= 0).count()).collect()
        };
        let pairs: Vec<_> =
            (0..n).map(|i| dpo_pair(&cfg, policy[i], policy[n + i], reference[i], reference[n + i], counts[i], counts[n + i])).collect();
        let loss: f64 = pairs.iter().map(|p| p.loss).sum();
        assert!(
            (out.sum.to_scalar().unwrap() - loss).abs() < 2e-5 * loss.abs().max(1.0),
            "{cfg:?}: {} vs {loss}",
            out.sum.to_scalar().unwrap()
        );
        assert!(pairs.iter().any(|p| p.reward_chosen != 0.0), "the perturbed policy differs from its reference");
        let metric = |k: &str| out.metrics.iter().find(|(m, _)| *m == k).unwrap().1;
        let margins: f64 = pairs.iter().map(|p| p.reward_chosen - p.reward_rejected).sum();
        assert!((metric("rewards/margins") - margins).abs() < 1e-4 * margins.abs().max(1.0), "{cfg:?}");
        assert_eq!(out.correct, Some(pairs.iter().filter(|p| p.reward_chosen > p.reward_rejected).count()));

        // The gradient: Σ_rows (∂ℓ/∂log p_row) ∇ log p_row through the plain composition.
        let coef: Vec<f32> = pairs.iter().map(|p| p.d_chosen as f32).chain(pairs.iter().map(|p| p.d_rejected as f32)).collect();
        let nll = model.forward(&b.ids, b.keep.as_ref()).unwrap().cross_entropy(&b.targets, -100, CrossEntropyReduction::None).unwrap();
        let logp = nll.sum(&[1], false).unwrap().neg().unwrap();
        logp.mul(&Tensor::from_vec(coef, &[2 * n], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        let want = grads(&att.params);
        for ((name, _), (g, w)) in att.params.iter().zip(got.iter().zip(&want)) {
            assert_close(&format!("{cfg:?} {name}"), g, w, 1e-4);
        }
    }
}

#[test]
fn precomputed_reference_equals_the_live_one_and_adapters_off_equals_the_base() {
    let mut data = load_pairs(&pair_lines(6, 2));
    let base = tiny_llama();
    let mut model = tiny_llama();
    let att = train::attach(model.as_mut(), &config(Path::new("unused")), DataKind::Preference, None, &Device::Cpu).unwrap();
    perturb(&att.params, 9);
    let idx = [4, 0, 2];
    let b = data.batch(&idx, &Device::Cpu).unwrap();
    // The adapters-off model is the base model, to the bit.
    let off = preference::reference_log_probs(model.as_ref(), &b).unwrap();
    let plain_base = tinytune::autograd::with_no_grad(|| preference::sequence_log_probs(base.as_ref(), &b).unwrap().to_vec_f64().unwrap());
    assert_eq!(off, plain_base);
    let on = tinytune::autograd::with_no_grad(|| preference::sequence_log_probs(model.as_ref(), &b).unwrap().to_vec_f64().unwrap());
    assert_ne!(on, off, "the adapters change the policy");

    let live = att.objective.batch_loss(model.as_ref(), &b, false).unwrap();
    live.sum.backward().unwrap();
    let live_grads = grads(&att.params);
    zero_grads(&att.params);
    // One pass before training, computed on the base model (nothing attached).
    let values = preference::compute_reference_log_probs(base.as_ref(), &data, 4, &Device::Cpu, &mut |_, _| {}).unwrap();
    data.set_reference_log_probs(&values).unwrap();
    let b = data.batch(&idx, &Device::Cpu).unwrap();
    assert!(b.reference.is_some());
    let pre = att.objective.batch_loss(model.as_ref(), &b, false).unwrap();
    pre.sum.backward().unwrap();
    // Equal to rounding: the pass before training batches the pairs differently (by length),
    // and a row's sums depend on the padded width of its batch in the last bits.
    let (p, l) = (pre.sum.to_scalar().unwrap(), live.sum.to_scalar().unwrap());
    assert!((p - l).abs() < 1e-6 * l.abs(), "{p} vs {l}");
    for ((name, _), (g, w)) in att.params.iter().zip(grads(&att.params).iter().zip(&live_grads)) {
        assert_close(name, g, w, 1e-5);
    }
}

fn metric(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

#[test]
fn dpo_and_a_reward_model_learn_the_preference() {
    let dir = scratch("learn");
    let train_set = load_pairs(&pair_lines(24, 3));
    let eval_set = load_pairs(&pair_lines(8, 4));
    for (name, objective, lr) in
        [("dpo", PreferenceObjective::Dpo(DpoConfig::default()), 2e-2), ("reward", PreferenceObjective::Reward, 2e-2)]
    {
        let out = dir.join(name);
        let cfg = TrainConfig { preference: objective, lr, max_steps: Some(18), ..config(&out) };
        let mut model = tiny_llama();
        let report = train::train(model.as_mut(), &train_set, Some(&eval_set), &cfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap();
        let (before, after) = (report.before.unwrap(), report.after.unwrap());
        let m = |r: &train::EvalRecord, k: &str| r.metrics.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("{name}: no {k}")).1;
        eprintln!(
            "{name}: loss {:.4} -> {:.4}, margin {:.4} -> {:.4}, preferred {:.3} -> {:.3}",
            before.loss,
            after.loss,
            m(&before, "rewards/margins"),
            m(&after, "rewards/margins"),
            m(&before, "rewards/accuracies"),
            m(&after, "rewards/accuracies")
        );
        assert!(after.loss < before.loss, "{name}: the loss falls");
        assert!(m(&after, "rewards/margins") > m(&before, "rewards/margins") + 0.1, "{name}: the margin grows");
        assert!(m(&after, "rewards/accuracies") >= 0.875, "{name}: the chosen completion wins on held-out pairs");
        assert_eq!(after.units, 8, "{name}: the mean is over pairs");
        if name == "dpo" {
            // Policy = reference at the start: every implicit reward is 0 and the loss is log 2.
            assert!((before.loss - std::f64::consts::LN_2).abs() < 1e-6, "{}", before.loss);
            assert_eq!(m(&before, "rewards/margins"), 0.0);
        }
        // The step lines and evaluations carry the metrics TRL users read.
        let lines: Vec<Value> =
            std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let step = lines.iter().find(|l| l.get("step").is_some() && l.get("eval").is_none()).unwrap();
        for k in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"] {
            metric(step, k);
        }
        let picture = std::fs::read_to_string(out.join("rewards.svg")).unwrap();
        assert!(picture.contains("rewards/margins") && picture.contains("<svg"), "{name}: rewards.svg");
        if name == "reward" {
            // Saved as an adapter with a one-output head; reloaded, it ranks the held-out pairs.
            let mut fresh = tiny_llama();
            let loaded = format::load(&report.saved, fresh.as_mut(), &Device::Cpu).unwrap();
            let head = loaded.head.unwrap();
            assert_eq!(head.num_classes(), 1);
            let s = preference::reward_scores(fresh.as_ref(), &head, &eval_set, 3, &Device::Cpu, &mut |_, _| {}).unwrap();
            let wins = s.chunks(2).filter(|p| p[0] > p[1]).count();
            assert_eq!(wins as f64 / 8.0, m(&after, "rewards/accuracies"), "the reloaded model scores as the trained one");
        } else {
            metric(step, "logps/chosen");
        }
    }
}

#[test]
fn full_fine_tuning_needs_the_reference_computed_first() {
    let dir = scratch("full");
    let mut train_set = load_pairs(&pair_lines(8, 5));
    let cfg = TrainConfig { method: Arc::new(Full), lr: 1e-4, max_steps: Some(1), ..config(&dir) };
    let mut model = tiny_llama();
    let e = train::train(model.as_mut(), &train_set, None, &cfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("--precompute-ref-log-probs") && e.contains("pairs.jsonl"), "{e}");
    let values = preference::compute_reference_log_probs(model.as_ref(), &train_set, 4, &Device::Cpu, &mut |_, _| {}).unwrap();
    train_set.set_reference_log_probs(&values).unwrap();
    let report = train::train(model.as_mut(), &train_set, None, &cfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap();
    assert!((report.final_loss.unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "the first step starts at log 2");
}

#[test]
fn preference_settings_that_cannot_be_right_are_refused() {
    let dir = scratch("bad");
    let train_set = load_pairs(&pair_lines(8, 6));
    let bad = [
        DpoConfig { beta: 0.0, ..DpoConfig::default() },
        DpoConfig { label_smoothing: 0.5, ..DpoConfig::default() },
        DpoConfig { loss: DpoLoss::Ipo, label_smoothing: 0.1, ..DpoConfig::default() },
    ];
    for d in bad {
        let cfg = TrainConfig { preference: PreferenceObjective::Dpo(d), ..config(&dir) };
        let mut model = tiny_llama();
        let e = train::train(model.as_mut(), &train_set, None, &cfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap_err().to_string();
        assert!(e.contains("--beta") || e.contains("--label-smoothing"), "{d:?}: {e}");
    }
    // DPO trains the language model: a head-only method cannot.
    let cfg = TrainConfig { method: Arc::new(tinytune::peft::HeadOnly), ..config(&dir) };
    let mut model = tiny_llama();
    let e = train::train(model.as_mut(), &train_set, None, &cfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("head alone"), "{e}");
    // Language-modelling data under a preference objective's batch: an error, not a panic.
    let lm = Dataset::from_jsonl_str(r#"{"text": "the cat sat ."}"#, "lm.jsonl", &tokenizer(), &DataOptions::default()).unwrap();
    let mut model = tiny_llama();
    let att = train::attach(model.as_mut(), &config(&dir), DataKind::Preference, None, &Device::Cpu).unwrap();
    let e = att.objective.batch_loss(model.as_ref(), &lm.batch(&[0], &Device::Cpu).unwrap(), false).err().unwrap().to_string();
    assert!(e.contains("preference pairs"), "{e}");
}

/// DPO's and the reward model's loss and gradients on the GPU against the CPU's, and the
/// per-row output-layer loss with its chunks.
#[test]
fn preference_objectives_on_the_gpu_follow_the_cpu() {
    let Some(gpu) = common::gpu_device() else { return };
    let data = load_pairs(&pair_lines(5, 7));
    for objective in [PreferenceObjective::Dpo(DpoConfig::default()), PreferenceObjective::Reward] {
        let mut out = Vec::new();
        for device in [Device::Cpu, gpu.clone()] {
            let mut model = tiny_llama_on(&device);
            let cfg = TrainConfig { preference: objective, ..config(Path::new("unused")) };
            let att = train::attach(model.as_mut(), &cfg, DataKind::Preference, None, &device).unwrap();
            perturb(&att.params, 21);
            let b = data.batch(&[3, 1, 4, 0, 2], &device).unwrap();
            let loss = att.objective.batch_loss(model.as_ref(), &b, true).unwrap();
            loss.sum.backward().unwrap();
            out.push((loss.sum.to_scalar().unwrap(), grads(&att.params), loss.correct));
        }
        let (cpu, gpu_out) = (&out[0], &out[1]);
        assert!((cpu.0 - gpu_out.0).abs() < 1e-4 * cpu.0.abs().max(1.0), "{objective:?}: loss {} vs {}", cpu.0, gpu_out.0);
        assert_eq!(cpu.2, gpu_out.2, "{objective:?}: preferred pairs");
        for (i, (c, g)) in cpu.1.iter().zip(&gpu_out.1).enumerate() {
            assert_close(&format!("{objective:?} gradient {i}"), g, c, 2e-3);
        }
    }
    // The per-row loss through the output layer, in chunks that leave a short last one.
    let model = tiny_llama_on(&gpu);
    let cpu_model = tiny_llama();
    let b = data.batch(&[0, 1, 2], &Device::Cpu).unwrap();
    let d = model.lm_head().in_features();
    let (rows, t) = (b.ids.shape()[0], b.ids.shape()[1]);
    let x = Tensor::randn(&[rows, t, d], 0.0, 1.0, DType::F32, &Device::Cpu, &mut Rng::new(4)).unwrap();
    let cpu = tinytune::nn::linear_cross_entropy_rows_chunked(cpu_model.lm_head(), &x, &b.targets, -100, 5).unwrap().to_vec_f64().unwrap();
    let on_gpu = tinytune::nn::linear_cross_entropy_rows_chunked(
        model.lm_head(),
        &x.to_device(&gpu).unwrap(),
        &b.targets.to_device(&gpu).unwrap(),
        -100,
        5,
    )
    .unwrap()
    .to_vec_f64()
    .unwrap();
    assert_close("rows on the GPU", &on_gpu, &cpu, 1e-4);
}

/// The log-probability of generated completions (ids as sampled, rows of different lengths in
/// one padded batch) against each sequence scored alone from the plain logits.
#[test]
fn completion_log_probs_match_each_sequence_alone() {
    let model = tiny_llama();
    let prompt = vec![3u32, 5, 9];
    let completions = vec![vec![10u32, 13, 16, 0], vec![37], vec![4, 30, 35, 38, 57, 0]];
    let got = preference::completion_log_probs(model.as_ref(), &prompt, &completions, &Device::Cpu).unwrap();
    for (c, g) in completions.iter().zip(&got) {
        let seq: Vec<u32> = prompt.iter().chain(c).copied().collect();
        let logp = model
            .forward(&Tensor::from_vec(seq.clone(), &[1, seq.len()], &Device::Cpu).unwrap(), None)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .log_softmax(-1)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        let v = model.vocab_size();
        let want: f64 = c.iter().enumerate().map(|(j, &t)| logp[(prompt.len() + j - 1) * v + t as usize]).sum();
        assert!((g - want).abs() < 1e-4 * want.abs().max(1.0), "{c:?}: {g} vs {want}");
    }
    assert!(preference::completion_log_probs(model.as_ref(), &[], &completions, &Device::Cpu).is_err());
}

#[test]
fn grpo_advantages_and_loss_against_plain_references() {
    use tinytune::train::grpo::{completion_loss, group_advantages};
    // Two groups of two and one of four, by hand: (r − mean) / (sample std + 1e-4).
    let got = group_advantages(&[1.0, 2.0, 0.5, 0.5], 2);
    let s = (0.5f64).sqrt(); // the sample std of {1, 2}
    let want = [-0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0.0, 0.0];
    assert_close("advantages", &got, &want, 1e-12);
    let r = [0.1, 0.9, 0.4, 0.6];
    let (mean, var) = (0.5, (0.16 + 0.16 + 0.01 + 0.01) / 3.0);
    let want: Vec<f64> = r.iter().map(|x| (x - mean) / (f64::sqrt(var) + 1e-4)).collect();
    assert_close("advantages of four", &group_advantages(&r, 4), &want, 1e-12);
    // At the reference the penalty is 0 and the loss −A; its gradient by central differences.
    let (lp, rf) = (vec![-1.2, -0.3, -4.0], vec![-1.0, -0.5, -3.5]);
    let (l0, _, kl0) = completion_loss(0.7, &rf, &rf, 0.04);
    assert!((l0 + 0.7).abs() < 1e-15 && kl0 == 0.0);
    let (_, grad, kl) = completion_loss(0.7, &lp, &rf, 0.04);
    assert!(kl > 0.0, "k3 is positive away from the reference");
    for t in 0..3 {
        let e = 1e-6;
        let (mut up, mut dn) = (lp.clone(), lp.clone());
        up[t] += e;
        dn[t] -= e;
        // The value's own derivative: the ratio term's value is −A whatever ℓ (its gradient,
        // −A/n per token, comes from exp(ℓ − sg(ℓ))), so add it to the differenced penalty.
        let num = (completion_loss(0.7, &up, &rf, 0.04).0 - completion_loss(0.7, &dn, &rf, 0.04).0) / (2.0 * e) - 0.7 / 3.0;
        assert!((grad[t] - num).abs() < 1e-8, "token {t}: {} vs {num}", grad[t]);
    }
}

#[test]
fn grpo_raises_the_mean_reward_of_a_reward_model() {
    let dir = scratch("grpo");
    // A reward model first: it learns to prefer praise.
    let pairs = load_pairs(&pair_lines(24, 8));
    let rcfg = TrainConfig { preference: PreferenceObjective::Reward, lr: 2e-2, max_steps: Some(18), ..config(&dir.join("rm")) };
    let mut m = tiny_llama();
    let rm = train::train(m.as_mut(), &pairs, None, &rcfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap();
    let reward =
        Arc::new(tinytune::train::RewardModel::load(&fixture("tiny-llama"), &rm.saved, 1, &Device::Cpu, Default::default()).unwrap());
    // Prompts alone: the pairs' prompts.
    let prompts: Vec<String> =
        pair_lines(32, 9).iter().map(|l| json!({ "prompt": serde_json::from_str::<Value>(l).unwrap()["prompt"] }).to_string()).collect();
    let opts = DataOptions { seq_len: 24, context: Some(64), ..DataOptions::default() };
    let all = Dataset::from_jsonl_str(&prompts.join("\n"), "prompts.jsonl", &tokenizer(), &opts).unwrap();
    assert_eq!((all.kind(), all.len()), (DataKind::Prompts, 32));
    let (train_set, eval_set) = all.split_holdout(tinytune::train::data::Holdout::Count(8), 0).unwrap();
    let g = tinytune::train::GrpoConfig { group: 8, beta: 0.04, max_new_tokens: 4, temperature: 1.0, eos: Some(0) };
    let cfg = TrainConfig {
        preference: PreferenceObjective::Grpo(g),
        reward_model: Some(reward.clone()),
        lr: 3e-2,
        batch_size: 4,
        max_steps: Some(40),
        seed: 6,
        ..config(&dir.join("grpo"))
    };
    let mut model = tiny_llama();
    let report = train::train(model.as_mut(), &train_set, Some(&eval_set), &cfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap();
    let m = |r: &train::EvalRecord, k: &str| r.metrics.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("no {k}")).1;
    let (before, after) = (report.before.unwrap(), report.after.unwrap());
    eprintln!(
        "grpo: reward {:.4} -> {:.4}, kl {:.4} -> {:.4}",
        m(&before, "reward"),
        m(&after, "reward"),
        m(&before, "kl"),
        m(&after, "kl")
    );
    assert_eq!(m(&before, "kl"), 0.0, "the policy starts as its reference");
    assert!(m(&after, "reward") > m(&before, "reward") + 0.05, "the mean reward rises");
    assert!(m(&after, "kl") > 0.0);
    assert_eq!(after.units, 8 * 8, "the mean is over the completions");
    let picture = std::fs::read_to_string(dir.join("grpo/rewards.svg")).unwrap();
    assert!(picture.contains("mean reward of the samples") && picture.contains("KL from the reference"));

    // Prompt-only data needs GRPO and a reward; GRPO needs prompt-only data; the reward reads
    // the policy's tokens.
    let e = train::train(tiny_llama().as_mut(), &train_set, None, &config(&dir.join("e1")), "t", &Device::Cpu, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--objective grpo or ppo with --reward-model"), "{e}");
    let e = train::train(
        tiny_llama().as_mut(),
        &pairs,
        None,
        &TrainConfig { out: dir.join("e2"), ..cfg.clone() },
        "t",
        &Device::Cpu,
        &mut Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("prompts alone"), "{e}");
    let gpt2 = models::load(fixture("tiny-gpt2-f16"), &Device::Cpu).unwrap();
    if gpt2.vocab_size() != tiny_llama().vocab_size() {
        let e = reward.check_policy(gpt2.as_ref()).unwrap_err().to_string();
        assert!(e.contains("share the policy's base") && e.contains("adapter"), "{e}");
    }
    let bad = TrainConfig { preference: PreferenceObjective::Grpo(tinytune::train::GrpoConfig { group: 1, ..g }), ..cfg.clone() };
    let e =
        train::train(tiny_llama().as_mut(), &train_set, None, &TrainConfig { out: dir.join("e3"), ..bad }, "t", &Device::Cpu, &mut Quiet)
            .unwrap_err()
            .to_string();
    assert!(e.contains("--num-generations"), "{e}");
}

/// GRPO's loss and gradients on the GPU against the CPU's. Near-greedy sampling (temperature
/// 1e-3) draws the same completions on both devices; the LoRA matrices are perturbed so that
/// the policy differs from its reference and the KL term has a value and a gradient.
#[test]
fn grpo_on_the_gpu_follows_the_cpu() {
    let Some(gpu) = common::gpu_device() else { return };
    let dir = scratch("grpo-gpu");
    let pairs = load_pairs(&pair_lines(12, 10));
    let rcfg = TrainConfig { preference: PreferenceObjective::Reward, lr: 2e-2, max_steps: Some(6), ..config(&dir.join("rm")) };
    let rm = train::train(tiny_llama().as_mut(), &pairs, None, &rcfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap();
    let lines = "{\"prompt\": \"the film was\"}\n{\"prompt\": \"the plot is\"}\n";
    let prompts = Dataset::from_jsonl_str(lines, "p.jsonl", &tokenizer(), &DataOptions::default()).unwrap();
    let g = tinytune::train::GrpoConfig { group: 3, beta: 0.5, max_new_tokens: 5, temperature: 1e-3, eos: Some(0) };
    let mut out = Vec::new();
    for device in [Device::Cpu, gpu.clone()] {
        let reward =
            Arc::new(tinytune::train::RewardModel::load(&fixture("tiny-llama"), &rm.saved, 1, &device, Default::default()).unwrap());
        let cfg = TrainConfig { preference: PreferenceObjective::Grpo(g), reward_model: Some(reward), ..config(Path::new("unused")) };
        let mut model = tiny_llama_on(&device);
        let att = train::attach(model.as_mut(), &cfg, DataKind::Prompts, None, &device).unwrap();
        perturb(&att.params, 31);
        let b = prompts.batch(&[0, 1], &device).unwrap();
        let loss = att.objective.batch_loss(model.as_ref(), &b, false).unwrap();
        loss.sum.backward().unwrap();
        let metric = |k: &str| loss.metrics.iter().find(|(n, _)| *n == k).unwrap().1;
        out.push((loss.sum.to_scalar().unwrap(), grads(&att.params), metric("reward"), metric("kl")));
    }
    let (c, g_) = (&out[0], &out[1]);
    assert!(c.3 > 0.0, "the perturbed policy is away from its reference");
    assert!((c.0 - g_.0).abs() < 1e-3 * c.0.abs().max(1e-3), "loss {} vs {}", c.0, g_.0);
    assert!((c.2 - g_.2).abs() < 1e-3 * c.2.abs().max(1.0), "reward {} vs {}", c.2, g_.2);
    for (i, (a, b)) in c.1.iter().zip(&g_.1).enumerate() {
        assert_close(&format!("GRPO gradient {i}"), b, a, 5e-3);
    }
}

/// A reward model of the tiny Llama trained on the praise/complaint pairs (few steps).
fn reward_model_dir(dir: &Path, steps: u64) -> PathBuf {
    let pairs = load_pairs(&pair_lines(24, 8));
    let rcfg = TrainConfig { preference: PreferenceObjective::Reward, lr: 2e-2, max_steps: Some(steps), ..config(&dir.join("rm")) };
    train::train(tiny_llama().as_mut(), &pairs, None, &rcfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap().saved
}

fn prompt_set(n: usize, seed: usize) -> Dataset {
    let prompts: Vec<String> =
        pair_lines(n, seed).iter().map(|l| json!({ "prompt": serde_json::from_str::<Value>(l).unwrap()["prompt"] }).to_string()).collect();
    let opts = DataOptions { seq_len: 24, context: Some(64), ..DataOptions::default() };
    Dataset::from_jsonl_str(&prompts.join("\n"), "prompts.jsonl", &tokenizer(), &opts).unwrap()
}

#[test]
fn ppo_raises_the_mean_reward_of_a_reward_model() {
    let dir = scratch("ppo");
    let rm = reward_model_dir(&dir, 18);
    let reward = Arc::new(tinytune::train::RewardModel::load(&fixture("tiny-llama"), &rm, 1, &Device::Cpu, Default::default()).unwrap());
    let (train_set, eval_set) = prompt_set(32, 9).split_holdout(tinytune::train::data::Holdout::Count(8), 0).unwrap();
    let p = tinytune::train::PpoConfig { max_new_tokens: 4, eos: Some(0), ..Default::default() };
    let cfg = TrainConfig {
        preference: PreferenceObjective::Ppo(p),
        reward_model: Some(reward.clone()),
        lr: 2e-2,
        batch_size: 8,
        max_steps: Some(PPO_STEPS),
        seed: 6,
        ..config(&dir.join("ppo"))
    };
    let mut model = tiny_llama();
    let report = train::train(model.as_mut(), &train_set, Some(&eval_set), &cfg, "tiny-llama", &Device::Cpu, &mut Quiet).unwrap();
    let (before, after) = (report.before.unwrap(), report.after.unwrap());
    let m = |r: &train::EvalRecord, k: &str| r.metric(k).unwrap_or_else(|| panic!("no {k}"));
    eprintln!(
        "ppo: reward {:.4} -> {:.4}, kl {:.4} -> {:.4}, value loss {:.4} -> {:.4}",
        m(&before, "reward"),
        m(&after, "reward"),
        m(&before, "kl"),
        m(&after, "kl"),
        m(&before, "value_loss"),
        m(&after, "value_loss")
    );
    assert_eq!(m(&before, "kl"), 0.0, "the policy starts as its reference");
    assert!(m(&after, "reward") > m(&before, "reward") + 0.05, "the mean reward rises");
    assert!(m(&after, "kl") != 0.0);
    assert!(m(&after, "value_loss").is_finite());
    assert_eq!(after.units, 8, "one completion per prompt");
    // The value head is trained (it is in the checkpoint) but not part of the saved adapter.
    let state = std::fs::read_to_string(dir.join("ppo/checkpoint/state.json")).unwrap();
    let v: Value = serde_json::from_str(&state).unwrap();
    let tensors = std::fs::read(dir.join("ppo/checkpoint").join(v["tensors"].as_str().unwrap())).unwrap();
    let names = safetensors::SafeTensors::deserialize(&tensors).unwrap().names().into_iter().map(str::to_string).collect::<Vec<String>>();
    assert!(names.iter().any(|n| n == "param/value_head.weight"), "{names:?}");
    let saved = std::fs::read(report.saved.join("adapter_model.safetensors")).unwrap();
    assert!(!safetensors::SafeTensors::deserialize(&saved).unwrap().names().iter().any(|n| n.contains("value_head")));
    let picture = std::fs::read_to_string(dir.join("ppo/rewards.svg")).unwrap();
    assert!(picture.contains("mean reward of the samples") && picture.contains("KL from the reference"));
}

const PPO_STEPS: u64 = 12;

/// One PPO step runs `epochs` updates on one rollout: with one update the ratio is exactly 1
/// and nothing is clipped; with four at a large learning rate the later updates move the
/// policy past the clip range. The rollout's own metrics (reward, KL) are the same either way.
#[test]
fn ppo_updates_reuse_one_rollout() {
    let dir = scratch("ppo-epochs");
    let rm = reward_model_dir(&dir, 4);
    let reward = Arc::new(tinytune::train::RewardModel::load(&fixture("tiny-llama"), &rm, 1, &Device::Cpu, Default::default()).unwrap());
    let prompts = prompt_set(8, 3);
    let mut seen = Vec::new();
    for epochs in [1, 4] {
        let p = tinytune::train::PpoConfig { max_new_tokens: 4, eos: Some(0), epochs, ..Default::default() };
        let cfg = TrainConfig {
            preference: PreferenceObjective::Ppo(p),
            reward_model: Some(reward.clone()),
            lr: 0.3,
            clip: None,
            batch_size: 8,
            max_steps: Some(1),
            ..config(&dir.join(format!("e{epochs}")))
        };
        let mut model = tiny_llama();
        let mut t = train::Trainer::new(model.as_mut(), &prompts, None, &cfg, &Device::Cpu).unwrap();
        let r = t.step().unwrap();
        let m = |k: &str| r.metrics.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("no {k}")).1;
        seen.push((m("clipfrac"), m("reward"), m("kl")));
    }
    assert_eq!(seen[0].0, 0.0, "one update: the ratio is 1");
    assert!(seen[1].0 > 0.0, "later updates clip: {seen:?}");
    assert_eq!((seen[0].1, seen[0].2), (seen[1].1, seen[1].2), "the same rollout");
    assert_eq!(seen[0].2, 0.0, "sampled by the policy at its reference");
}

/// The reward reads the policy's ids as its training data read: a classifier's labelled texts
/// have no EOS (a final one is dropped), a reward model's pairs end with one (it is added), and
/// both are cut to the length they were trained on.
#[test]
fn reward_models_read_sequences_as_they_were_trained() {
    use tinytune::peft::{ClassifierHead, Pooling};
    let d = tiny_llama().hidden_size();
    let head = |n| ClassifierHead::new(d, n, Pooling::Last, &mut Rng::new(n as u64), &Device::Cpu).unwrap();
    let score = |rm: &tinytune::train::RewardModel, ids: &[u32]| rm.score(&[ids.to_vec()], &Device::Cpu).unwrap()[0];
    let classifier = tinytune::train::RewardModel::new(tiny_llama(), head(2), 1, "cls").unwrap().reading(Some(0), Some(4));
    assert_eq!(score(&classifier, &[5, 6, 7, 0]), score(&classifier, &[5, 6, 7]));
    assert_ne!(score(&classifier, &[5, 6, 7]), score(&classifier, &[5, 6, 8]));
    assert_eq!(score(&classifier, &[5, 6, 7, 8, 9]), score(&classifier, &[5, 6, 7, 8]), "cut to 4 tokens");
    let rm = tinytune::train::RewardModel::new(tiny_llama(), head(1), 0, "rm").unwrap().reading(Some(0), None);
    assert_eq!(score(&rm, &[5, 6, 7]), score(&rm, &[5, 6, 7, 0]));
    let plain = tinytune::train::RewardModel::new(tiny_llama(), head(1), 0, "rm").unwrap();
    assert_ne!(score(&plain, &[5, 6, 7]), score(&plain, &[5, 6, 7, 0]), "without a known EOS the ids are read as they are");
    // Rows of different lengths in one call score as each alone.
    let both = rm.score(&[vec![5, 6], vec![5, 6, 7, 8, 9]], &Device::Cpu).unwrap();
    assert!((both[0] - score(&rm, &[5, 6])).abs() < 1e-5 && (both[1] - score(&rm, &[5, 6, 7, 8, 9])).abs() < 1e-5, "{both:?}");
}

/// PPO's loss and gradients (policy and value head) on the GPU against the CPU's, on the same
/// near-greedy rollout, the policy perturbed away from its reference.
#[test]
fn ppo_on_the_gpu_follows_the_cpu() {
    let Some(gpu) = common::gpu_device() else { return };
    let dir = scratch("ppo-gpu");
    let rm = reward_model_dir(&dir, 6);
    let lines = "{\"prompt\": \"the film was\"}\n{\"prompt\": \"the plot is\"}\n";
    let prompts = Dataset::from_jsonl_str(lines, "p.jsonl", &tokenizer(), &DataOptions::default()).unwrap();
    let p = tinytune::train::PpoConfig { max_new_tokens: 5, temperature: 1e-3, eos: Some(0), ..Default::default() };
    let mut out = Vec::new();
    for device in [Device::Cpu, gpu.clone()] {
        let reward = Arc::new(tinytune::train::RewardModel::load(&fixture("tiny-llama"), &rm, 1, &device, Default::default()).unwrap());
        let cfg = TrainConfig { preference: PreferenceObjective::Ppo(p), reward_model: Some(reward), ..config(Path::new("unused")) };
        let mut model = tiny_llama_on(&device);
        let att = train::attach(model.as_mut(), &cfg, DataKind::Prompts, None, &device).unwrap();
        perturb(&att.params, 31);
        let b = prompts.batch(&[0, 1], &device).unwrap();
        att.objective.set_update(Some(0));
        let loss = att.objective.batch_loss(model.as_ref(), &b, false).unwrap();
        loss.sum.backward().unwrap();
        att.objective.set_update(None);
        let metric = |k: &str| loss.metrics.iter().find(|(n, _)| *n == k).unwrap().1;
        out.push((loss.sum.to_scalar().unwrap(), grads(&att.params), metric("reward"), metric("kl"), metric("value_loss")));
    }
    let (c, g) = (&out[0], &out[1]);
    assert!(c.3 != 0.0, "the perturbed policy is away from its reference");
    assert!((c.0 - g.0).abs() < 1e-3 * c.0.abs().max(1e-2), "loss {} vs {}", c.0, g.0);
    assert!((c.2 - g.2).abs() < 1e-3 * c.2.abs().max(1.0), "reward {} vs {}", c.2, g.2);
    assert!((c.4 - g.4).abs() < 1e-3 * c.4.abs().max(1e-3), "value loss {} vs {}", c.4, g.4);
    for (i, (a, b)) in c.1.iter().zip(&g.1).enumerate() {
        assert_close(&format!("PPO gradient {i}"), b, a, 5e-3);
    }
}

/// PPO's advantages, returns and clipped losses on fixed numbers worked by hand.
#[test]
fn ppo_arithmetic_on_fixed_numbers() {
    use tinytune::train::ppo::{gae, policy_loss, token_rewards, value_loss, PpoConfig};
    let c = PpoConfig::default();
    assert_eq!((c.kl_coef, c.cliprange, c.vf_coef, c.gamma, c.lam, c.epochs), (0.05, 0.2, 0.1, 1.0, 0.95, 4));
    // Whitening: mean 0, unbiased variance 1; a single value is only centred.
    let mut w = vec![1.0, 2.0, 3.0, 6.0];
    tinytune::train::ppo::whiten(&mut w);
    let sd = (14.0f64 / 3.0 + 1e-8).sqrt();
    assert_close("whitened", &w, &[-2.0 / sd, -1.0 / sd, 0.0, 3.0 / sd], 1e-12);
    let mut one = vec![5.0];
    tinytune::train::ppo::whiten(&mut one);
    assert_eq!(one, vec![0.0]);
    assert_close("rewards", &token_rewards(2.0, &[-1.0, -2.0], &[-1.5, -2.0], 0.05), &[-0.025, 2.0], 1e-15);
    // δ = (−0.1, −0.1, 0.7); A₂ = 0.7, A₁ = −0.1 + 0.95·0.7, A₀ = −0.1 + 0.95·A₁; R = A + V.
    let (adv, ret) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.4, 0.3], 1.0, 0.95);
    assert_close("advantages", &adv, &[0.43675, 0.565, 0.7], 1e-12);
    assert_close("returns", &ret, &[0.93675, 0.965, 1.0], 1e-12);
    // Ratio 1.5: with A = 1 the clip (1.2) binds and stops the gradient; with A = −1 it does not.
    let up = 1.5f64.ln();
    let (l, g) = policy_loss(up, 0.0, 1.0, 0.2);
    assert!((l + 1.2).abs() < 1e-12 && g == 0.0);
    let (l, g) = policy_loss(up, 0.0, -1.0, 0.2);
    assert!((l - 1.5).abs() < 1e-12 && (g - 1.5).abs() < 1e-12);
    let e = 1e-6;
    let num = (policy_loss(up + e, 0.0, -1.0, 0.2).0 - policy_loss(up - e, 0.0, -1.0, 0.2).0) / (2.0 * e);
    assert!((g - num).abs() < 1e-6);
    assert_eq!(policy_loss(-0.3, -0.3, 0.7, 0.2), (-0.7, -0.7));
    // Value: the unclipped error is larger; inside the clip both agree; outside, the clipped
    // branch wins and passes no gradient.
    let (l, g) = value_loss(1.0, 0.5, 0.6, 0.2);
    assert!((l - 0.08).abs() < 1e-12 && (g - 0.4).abs() < 1e-12);
    let (l, g) = value_loss(0.4, 0.5, 1.0, 0.2);
    assert!((l - 0.18).abs() < 1e-12 && (g + 0.6).abs() < 1e-12);
    let (l, g) = value_loss(0.0, 0.5, -1.0, 0.2);
    assert!((l - 0.845).abs() < 1e-12 && g == 0.0);
}

/// The scores a classifier and the zero-shot labels give on the GPU (float64 softmax on the
/// host, where f64 has kernels) against the CPU's.
#[test]
fn class_probabilities_and_label_scores_on_the_gpu() {
    let Some(gpu) = common::gpu_device() else { return };
    let lines = "{\"text\": \"the film was good .\", \"label\": 1}\n{\"text\": \"it was dull\", \"label\": 0}\n";
    let data = Dataset::from_jsonl_str(lines, "c.jsonl", &tokenizer(), &DataOptions::default()).unwrap();
    let mut out = Vec::new();
    for device in [Device::Cpu, gpu.clone()] {
        let model = tiny_llama_on(&device);
        let head =
            tinytune::peft::ClassifierHead::new(model.hidden_size(), 3, tinytune::peft::Pooling::Last, &mut Rng::new(2), &device).unwrap();
        let p = train::class_probabilities(model.as_ref(), &head, &data, 2, &device).unwrap();
        let (s, q) = train::label_scores(model.as_ref(), &[3, 29, 35], &[vec![37], vec![42, 57]], &device).unwrap();
        out.push((p.concat(), s, q));
    }
    assert_close("class probabilities", &out[1].0, &out[0].0, 1e-4);
    assert_close("label log-likelihoods", &out[1].1, &out[0].1, 1e-4);
    assert_close("label probabilities", &out[1].2, &out[0].2, 1e-4);
}
