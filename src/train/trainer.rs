//! The training loop: methods attached, batches in a seeded order, token-weighted gradient
//! accumulation, clipping, a scheduled optimizer step on the trainable tensors only,
//! evaluation, metrics, checkpoints that resume to the same result.
//!
//! ```text
//! for step in start..total:
//!     for each of grad_accum micro-batches (a continuous stream over seeded epoch orders):
//!         loss_μ = Σ CE(targets of μ) / (targets in the whole step)   → backward (grads add up)
//!     loss = Σ_μ loss_μ   (the mean over every target of the step, as one big batch)
//!     if loss or ‖g‖ is not finite: skip the step (stop after max_bad_steps in a row)
//!     clip ‖g‖ to `clip`; optimizer.step(schedule(step)); zero grads
//! ```
//!
//! Everything random is a pure function of the seed and a counter — the data order of epoch
//! `e` is `epoch_order(e, seed)`, the dropout masks of micro-batch `μ` are stream `(site, μ)`
//! — so a checkpoint holds the trainable tensors, the optimizer's moments, the step and the
//! micro-batch counter, and a resumed run repeats the uninterrupted one bit for bit (CPU).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::data::{DataKind, Dataset};
use super::grpo::{Grpo, RewardModel};
use super::objective::{Classification, LanguageModelling, Objective};
use super::plot;
use super::ppo::Ppo;
use super::preference::{Dpo, DpoConfig, PreferenceObjective, RewardModelling};
use crate::autograd::with_no_grad;
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::io::safetensors::SafetensorsFile;
use crate::models::CausalLm;
use crate::optim::{clip_grad_norm, grad_norm, AdamW, Optimizer, ParamGroup, Schedule, ScheduleKind, Sgd, SgdConfig};
use crate::peft::{format, ClassifierHead, LoraConfig, Method, MethodConfig, Pooling};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Which optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    AdamW,
    /// SGD with momentum 0.9.
    Sgd,
}

/// Every setting of a run (the CLI's flags and `--config` file keys).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// What is trained: a method's config (`LoraConfig`, `Ia3Config`, `Full`, `HeadOnly`, ...;
    /// its seed is `seed`). With labelled data a new classification head trains too.
    pub method: Arc<dyn MethodConfig>,
    /// How a classification head pools the hidden states.
    pub pooling: Pooling,
    /// Classes of a new head (default: the largest label in the data + 1).
    pub num_classes: Option<usize>,
    /// What preference pairs train: DPO (default) or a reward model; prompt-only data: GRPO.
    pub preference: PreferenceObjective,
    /// The reward of an online method (GRPO).
    pub reward_model: Option<Arc<RewardModel>>,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (default: `epochs` passes over the data).
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Length-bucketed batches: runs of this many batches of the epoch order sorted by length
    /// (see [`Dataset::training_order`]); 0: off.
    pub length_buckets: usize,
    pub warmup_steps: u64,
    pub schedule: ScheduleKind,
    /// Decoupled weight decay of the matrices (norm weights, biases and vectors get none).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub clip: Option<f64>,
    pub seed: u64,
    pub gradient_checkpointing: bool,
    /// Evaluate every this many steps (and always before and after).
    pub eval_every: Option<u64>,
    /// Write a checkpoint every this many steps (and at the end).
    pub save_every: u64,
    /// Stop when this many steps in a row have a non-finite loss or gradient.
    pub max_bad_steps: usize,
    /// Evaluate before the first step (the "before" of the report).
    pub eval_before: bool,
    /// Where checkpoints, the adapter, metrics and the loss picture go.
    pub out: PathBuf,
    /// Continue from the last checkpoint in `out`: its trainable tensors, optimizer state,
    /// step and data position, after checking its checksum and that its settings are these.
    pub resume: bool,
    /// Start a new run (step 0, a fresh optimizer, these settings) from the trainable tensors
    /// of the checkpoint in `out` only. For a checkpoint that cannot be resumed exactly (other
    /// settings, no optimizer state, an older format).
    pub resume_weights_only: bool,
    /// A training loss that grows a hundredfold over the first step's (or an evaluation whose
    /// perplexity is infinite) stops the run with an error naming the step and the last
    /// checkpoint; `false` only warns (once) and goes on.
    pub stop_on_divergence: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Arc::new(LoraConfig::default()),
            pooling: Pooling::Last,
            num_classes: None,
            preference: PreferenceObjective::Dpo(DpoConfig::default()),
            reward_model: None,
            optimizer: OptimizerKind::AdamW,
            lr: 2e-4,
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            length_buckets: 0,
            warmup_steps: 0,
            schedule: ScheduleKind::Linear,
            weight_decay: 0.0,
            clip: Some(1.0),
            seed: 0,
            gradient_checkpointing: false,
            eval_every: None,
            save_every: 100,
            max_bad_steps: 5,
            eval_before: true,
            out: PathBuf::from("tinytune-out"),
            resume: false,
            resume_weights_only: false,
            stop_on_divergence: true,
        }
    }
}

impl TrainConfig {
    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument { op: "finetune", msg });
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch size and gradient accumulation must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate must be positive, got {}", self.lr));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs must be at least 1 (or give max steps)".into());
        }
        if self.max_steps == Some(0) {
            return bad("max steps must be at least 1".into());
        }
        if self.save_every == 0 {
            return bad("save_every must be at least 1".into());
        }
        if self.resume && self.resume_weights_only {
            return bad("resume and resume_weights_only exclude each other (the second starts a new run from the weights)".into());
        }
        if self.eval_every == Some(0) {
            return bad("eval_every must be at least 1 (leave it out to evaluate only before and after)".into());
        }
        if self.clip.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return bad("clip must be positive".into());
        }
        match &self.preference {
            PreferenceObjective::Dpo(d) => d.validate()?,
            PreferenceObjective::Grpo(g) => g.validate()?,
            PreferenceObjective::Ppo(p) => p.validate()?,
            PreferenceObjective::Reward => {}
        }
        Ok(())
    }

    /// The settings that must not change across a resume (they change the math), with the
    /// schedule's length `total_steps` (the learning rate of every step depends on it).
    fn fingerprint(&self, train: &Dataset, total_steps: u64, model_id: &str) -> Value {
        let mut v = json!({
            "method": self.method.name(), "seed": self.seed,
            "batch_size": self.batch_size, "grad_accum": self.grad_accum, "lr": self.lr, "schedule": format!("{:?}", self.schedule),
            "warmup": self.warmup_steps, "weight_decay": self.weight_decay, "clip": self.clip, "optimizer": format!("{:?}", self.optimizer),
            "pooling": format!("{:?}", self.pooling), "total_steps": total_steps, "examples": train.len(),
            // What the examples are (file content, tokenizer, seq_len, packing all change the
            // token ids) and which base model they train: a path as typed would say neither.
            "data": format!("{:016x}", data_hash(train)), "model": model_id,
        });
        if matches!(train.kind(), DataKind::Preference | DataKind::Prompts) {
            v["preference"] = json!(format!("{:?}", self.preference));
        }
        // Only when on, so that runs from before the option resume as they were.
        if self.length_buckets >= 2 {
            v["length_buckets"] = json!(self.length_buckets);
        }
        // The method's own settings sit beside the trainer's, by their names (`r`, `alpha`, ...).
        if let Value::Object(m) = self.method.fingerprint() {
            v.as_object_mut().expect("an object").extend(m);
        }
        v
    }
}

/// The schedule's length: `max_steps`, else `epochs` passes over the data. Sizes that cannot
/// be right are refused before anything is allocated for them: an accumulation longer than an
/// epoch (one step would count some examples twice: the same gradient as a shorter
/// accumulation, at more cost) and a step count that overflows.
fn total_steps(cfg: &TrainConfig, examples: usize, batches_per_epoch: u64) -> Result<u64> {
    let bad = |msg: String| Err(Error::InvalidArgument { op: "finetune", msg });
    if cfg.grad_accum as u64 > batches_per_epoch {
        return bad(format!(
            "grad_accum {} × batch_size {} is more than the {examples} training examples: one optimizer step would count \
             some examples twice; use grad_accum ≤ {batches_per_epoch} (or a smaller batch size)",
            cfg.grad_accum, cfg.batch_size
        ));
    }
    let total = match cfg.max_steps {
        Some(n) => n,
        None => match (cfg.epochs as u64).checked_mul(batches_per_epoch) {
            Some(micro) => micro.div_ceil(cfg.grad_accum as u64),
            None => {
                return bad(format!(
                    "epochs {} × {batches_per_epoch} batches per epoch overflows the step count: give fewer epochs or max_steps",
                    cfg.epochs
                ))
            }
        },
    };
    if total > MAX_STEPS {
        return bad(format!(
            "{total} optimizer steps (epochs {} × {batches_per_epoch} batches / grad_accum {}, or max_steps) is more than any run takes \
             (at most {MAX_STEPS}): give fewer epochs or max_steps",
            cfg.epochs, cfg.grad_accum
        ));
    }
    Ok(total.max(1))
}

/// More steps than any run takes (a billion; at a millisecond a step, twelve days): a larger
/// count is a typo or an overflow, refused instead of running for ever.
const MAX_STEPS: u64 = 1_000_000_000;

/// The classes of a new head when none are given: the largest label + 1 of either data set
/// (at least 2: a small subset of binary data may hold only 0s). Every class below it must
/// have an example, so that one stray label (100000 among 0s and 1s) is an error naming its
/// line rather than a head of 100,001 classes.
fn inferred_classes(train: &Dataset, eval: Option<&Dataset>) -> Result<Option<usize>> {
    let sets: Vec<&Dataset> = std::iter::once(train).chain(eval).collect();
    let labelled = || sets.iter().flat_map(|d| d.examples().iter().filter_map(move |e| e.label.map(|l| (l, e.line, d.path()))));
    let Some((max, line, path)) = labelled().max_by_key(|&(l, ..)| l) else { return Ok(None) };
    let n = (max as usize + 1).max(2);
    let present: std::collections::BTreeSet<u32> = labelled().map(|(l, ..)| l).collect();
    if n > 2 && present.len() < n {
        let missing = (0..max).find(|l| !present.contains(l)).unwrap_or(0);
        return Err(Error::Format {
            path: path.to_string(),
            msg: format!(
                "line {line}: label {max} implies {n} classes, but no example has label {missing} ({} distinct labels in all): \
                 fix the label, or give the number of classes (--num-classes) if the head should have {n} outputs",
                present.len()
            ),
        });
    }
    Ok(Some(n))
}

/// FNV-1a over bytes.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The checksum of a checkpoint file: FNV-1a over 8-byte little-endian words (then the tail
/// bytes), as 16 hex digits. It detects corruption (flipped bytes, truncation), not tampering.
fn checksum(bytes: &[u8]) -> String {
    let mut words = bytes.chunks_exact(8);
    let h =
        words.by_ref().fold(FNV_START, |h, w| (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(0x0000_0100_0000_01B3));
    format!("{:016x}", fnv(h, words.remainder()))
}

const CHECKSUM_KIND: &str = "fnv1a-64 over u64 words";

/// A hash of every example's token ids, loss mask and label.
fn data_hash(d: &Dataset) -> u64 {
    d.examples().iter().fold(FNV_START, |h, e| {
        let h = e.ids.iter().fold(h, |h, id| fnv(h, &id.to_le_bytes()));
        let h = e.is_target.iter().fold(h, |h, &t| fnv(h, &[t as u8]));
        let h = e.rejected.iter().fold(h, |h, r| {
            let h = r.ids.iter().fold(fnv(h, b"rejected"), |h, id| fnv(h, &id.to_le_bytes()));
            r.is_target.iter().fold(h, |h, &t| fnv(h, &[t as u8]))
        });
        let h = e.reference.iter().fold(h, |h, (c, r)| fnv(fnv(h, &c.to_le_bytes()), &r.to_le_bytes()));
        fnv(h, &e.label.map_or(u32::MAX, |l| l).to_le_bytes())
    })
}

/// The base model's identity: its config and a sample of every weight (the first and last
/// 16 values), hashed, before any method is attached.
fn model_hash(model: &mut dyn CausalLm) -> Result<String> {
    let mut h = fnv(FNV_START, model.config_json().to_string().as_bytes());
    let mut sample = Vec::new();
    model.visit_parameters(&mut |_, t| {
        // A quantised matrix is read through its first and last rows (the same values the
        // flattened view would give, decoded).
        let t = &match t.dtype() {
            crate::DType::Quant(_) if t.shape()[0] > 0 => {
                let r = t.shape()[0];
                Tensor::concat(
                    &[&t.narrow(0, 0, 1)?.to_dtype(crate::DType::F32)?, &t.narrow(0, r - 1, 1)?.to_dtype(crate::DType::F32)?],
                    0,
                )?
            }
            _ => t.clone(),
        };
        let flat = t.flatten_all()?;
        let n = flat.numel();
        for (start, len) in [(0, n.min(16)), (n.saturating_sub(16), n.min(16))] {
            sample.extend(flat.narrow(0, start, len)?.to_vec_f64()?);
        }
        Ok(())
    })?;
    for v in sample {
        h = fnv(h, &v.to_le_bytes());
    }
    Ok(format!("{h:016x}"))
}

/// One optimizer step, as reported and written to `metrics.jsonl`.
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// 1-based count of optimizer steps taken or skipped.
    pub step: u64,
    pub total_steps: u64,
    /// Fractional epoch reached.
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Real tokens in the step.
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// The step was skipped (non-finite loss or gradient).
    pub skipped: bool,
    /// The objective's own metrics, means over the step's units (DPO's `rewards/margins`, ...).
    pub metrics: Vec<(String, f64)>,
}

/// An evaluation on the held-out data.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRecord {
    pub step: u64,
    /// Mean negative log-likelihood per target token (LM) or per example (classification).
    pub loss: f64,
    /// Classification accuracy.
    pub accuracy: Option<f64>,
    pub examples: usize,
    /// What `loss` is the mean over: the target tokens scored (LM), the examples or the pairs.
    pub units: usize,
    /// The objective's own metrics, means over the units (DPO's `rewards/margins`, ...).
    pub metrics: Vec<(String, f64)>,
}

impl EvalRecord {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }

    /// The objective's metric `name` (`rewards/margins`, `kl`, ...), if it has one.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|(n, _)| n == name).map(|m| m.1)
    }
}

/// Receives progress (the CLI draws a progress bar from it) and may stop a run early.
pub trait Observer {
    fn on_start(&mut self, _start_step: u64, _total_steps: u64) {}
    fn on_step(&mut self, _r: &StepRecord) {}
    fn on_eval(&mut self, _r: &EvalRecord) {}
    /// An evaluation of `examples` held-out examples begins (at `step`).
    fn on_eval_start(&mut self, _step: u64, _examples: usize) {}
    /// `done` of the evaluation's `examples` are scored (after each batch).
    fn on_eval_progress(&mut self, _done: usize, _examples: usize) {}
    fn on_message(&mut self, _msg: &str) {}
    /// Asked after every step (after its checkpoint, if one is due): `false` stops the run
    /// there, as an interruption (Ctrl-C) would, but cleanly: a checkpoint of that step is
    /// written and [`train`] returns a report with `interrupted` set, without the final
    /// evaluation or the adapter. `resume` then continues exactly where it stopped (the
    /// schedule still runs to the configured total).
    fn keep_going(&mut self) -> bool {
        true
    }
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: u64,
    pub skipped_steps: u64,
    pub before: Option<EvalRecord>,
    pub after: Option<EvalRecord>,
    pub final_loss: Option<f64>,
    pub trainable_parameters: usize,
    /// Where the result was saved: the adapter directory or (full) the model directory.
    pub saved: PathBuf,
    pub resumed_from: Option<u64>,
    /// The observer stopped the run before the last step ([`Observer::keep_going`]): `saved`
    /// is then the checkpoint directory, `after` is `None`.
    pub interrupted: bool,
}

/// The method attached to a model, the objective (with its classification head), and their
/// trainable tensors.
pub struct Attached {
    pub method: Box<dyn Method>,
    pub objective: Box<dyn Objective>,
    /// Every trainable tensor by name (adapter keys without the PEFT prefix, `score.weight`,
    /// or checkpoint names for full fine-tuning).
    pub params: Vec<(String, Tensor)>,
}

/// Attach `cfg.method` to `model`; the objective follows the data (labelled: classification
/// with a new head; otherwise language modelling).
pub fn attach(
    model: &mut dyn CausalLm,
    cfg: &TrainConfig,
    kind: DataKind,
    num_classes: Option<usize>,
    device: &Device,
) -> Result<Attached> {
    let reward = kind == DataKind::Preference && cfg.preference == PreferenceObjective::Reward;
    if (kind == DataKind::Lm || (kind == DataKind::Preference && !reward)) && cfg.method.head_only() {
        return Err(Error::InvalidArgument {
            op: "finetune",
            msg: format!(
                "method '{}' trains a head alone: the data needs {{\"text\", \"label\"}} lines (or preference pairs for a reward model)",
                cfg.method.name()
            ),
        });
    }
    let method = cfg.method.attach(model, cfg.seed)?;
    let objective: Box<dyn Objective> = match kind {
        DataKind::Classification => {
            let n = cfg.num_classes.or(num_classes).unwrap_or(2);
            let h = ClassifierHead::new(model.hidden_size(), n, cfg.pooling, &mut Rng::new(crate::peft::mix(cfg.seed, 0xC1A55)), device)?;
            Box::new(Classification { head: h })
        }
        DataKind::Lm => Box::new(LanguageModelling),
        DataKind::Preference => match cfg.preference {
            PreferenceObjective::Dpo(d) => Box::new(Dpo { cfg: d, live_reference: !method.saves_model() }),
            PreferenceObjective::Reward => {
                let h =
                    ClassifierHead::new(model.hidden_size(), 1, cfg.pooling, &mut Rng::new(crate::peft::mix(cfg.seed, 0x5E3A2D)), device)?;
                Box::new(RewardModelling { head: h })
            }
            PreferenceObjective::Grpo(_) | PreferenceObjective::Ppo(_) => {
                return Err(Error::InvalidArgument {
                    op: "finetune",
                    msg: "GRPO and PPO train on prompts alone ({\"prompt\"} lines), not on pairs".into(),
                })
            }
        },
        DataKind::Prompts => match (&cfg.preference, &cfg.reward_model) {
            (PreferenceObjective::Grpo(g), Some(r)) => {
                r.check_policy(model)?;
                Box::new(Grpo::new(*g, r.clone(), cfg.seed))
            }
            (PreferenceObjective::Ppo(p), Some(r)) => {
                r.check_policy(model)?;
                Box::new(Ppo::new(*p, r.clone(), model.hidden_size(), cfg.seed, device)?)
            }
            _ => {
                return Err(Error::InvalidArgument {
                    op: "finetune",
                    msg: "prompt-only data ({\"prompt\"} lines) trains online: --objective grpo or ppo with --reward-model".into(),
                })
            }
        },
    };
    let mut params = method.parameters();
    params.extend(objective.parameters());
    model.set_gradient_checkpointing(cfg.gradient_checkpointing);
    Ok(Attached { method, objective, params })
}

/// Initialise a method that starts from the task's gradient ([`Method::gradient_init`]:
/// LoRA-SB), before any optimizer exists: its sites' weights become trainable for a moment,
/// the objective's gradient is summed over the first `examples` of epoch 0's seeded order (no
/// dropout), the weights are restored untouched, and the method receives the gradients with
/// `lr_eff = lr / warmup` (the first warm-up step's rate; `lr` without warm-up). `attached.params`
/// then holds the method's new tensors. Nothing happens for other methods.
pub fn init_from_data(
    model: &mut dyn CausalLm,
    attached: &mut Attached,
    cfg: &TrainConfig,
    train: &Dataset,
    device: &Device,
) -> Result<()> {
    let Some(init) = attached.method.gradient_init() else { return Ok(()) };
    let mut saved = Vec::new();
    for lin in model.linears_mut().into_iter().filter(|l| init.sites.contains(&l.name)) {
        let w = lin.weight.clone();
        lin.weight = w.to_dtype(crate::peft::trainable_dtype(w.dtype()))?.requires_grad()?;
        saved.push((lin.name.clone(), w));
    }
    let accumulate = |model: &mut dyn CausalLm| -> Result<Vec<(String, Tensor)>> {
        let order = train.epoch_order(0, cfg.seed);
        let n = init.examples.min(order.len());
        attached.method.set_training(false);
        for chunk in order[..n].chunks(cfg.batch_size.max(1)) {
            let b = train.batch(chunk, device)?;
            attached.objective.set_step(0);
            // The sign of the sum is all the start reads: no normalisation needed.
            attached.objective.batch_loss(model, &b, false)?.sum.backward()?;
        }
        let mut grads = Vec::new();
        for lin in model.linears_mut().into_iter().filter(|l| init.sites.contains(&l.name)) {
            if let Some(g) = lin.weight.grad() {
                grads.push((lin.name.clone(), g));
            }
        }
        Ok(grads)
    };
    let grads = accumulate(model);
    // The base weights come back as they were (never trained), and the head's gradient goes.
    for lin in model.linears_mut() {
        if let Some((_, w)) = saved.iter().find(|(n, _)| *n == lin.name) {
            lin.weight = w.clone();
        }
    }
    for (_, t) in attached.objective.parameters() {
        t.zero_grad();
    }
    let lr_eff = cfg.lr / cfg.warmup_steps.max(1) as f64;
    attached.method.init_from_gradients(model, &grads?, lr_eff)?;
    let mut params = attached.method.parameters();
    params.extend(attached.objective.parameters());
    attached.params = params;
    Ok(())
}

/// Mean loss (and accuracy) of `model` on `data` under `objective`, without gradients or
/// dropout.
pub fn evaluate(
    model: &dyn CausalLm,
    objective: &dyn Objective,
    data: &Dataset,
    batch_size: usize,
    device: &Device,
    step: u64,
) -> Result<EvalRecord> {
    evaluate_observed(model, objective, data, batch_size, device, step, &mut |_, _| {})
}

/// [`evaluate`], calling `progress(examples_done, examples)` after each batch (a progress bar).
pub fn evaluate_observed(
    model: &dyn CausalLm,
    objective: &dyn Objective,
    data: &Dataset,
    batch_size: usize,
    device: &Device,
    step: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalRecord> {
    with_no_grad(|| {
        let (mut total, mut count, mut correct) = (0.0, 0usize, None::<usize>);
        let mut metrics = Vec::new();
        let order = data.by_length();
        let mut done = 0;
        for chunk in order.chunks(batch_size.max(1)) {
            let b = data.batch(chunk, device)?;
            let loss = objective.batch_loss(model, &b, true)?;
            total += loss.sum.to_scalar()?;
            count += objective.units(model, &b);
            add_metrics(&mut metrics, &loss.metrics, 1.0);
            if let Some(c) = loss.correct {
                correct = Some(correct.unwrap_or(0) + c);
            }
            done += chunk.len();
            progress(done, data.len());
        }
        if count == 0 {
            return Err(Error::InvalidArgument { op: "evaluate", msg: format!("{}: no targets to evaluate", data.path()) });
        }
        Ok(EvalRecord {
            step,
            loss: total / count as f64,
            accuracy: correct.map(|c| c as f64 / data.len() as f64),
            examples: data.len(),
            units: count,
            metrics: metrics.into_iter().map(|(k, v)| (k, v / count as f64)).collect(),
        })
    })
}

/// Adds `scale ×` each of `part`'s metrics into `into` (by name, in first-seen order).
fn add_metrics(into: &mut Vec<(String, f64)>, part: &[(&'static str, f64)], scale: f64) {
    for &(k, v) in part {
        match into.iter_mut().find(|(n, _)| n == k) {
            Some(e) => e.1 += scale * v,
            None => into.push((k.to_string(), scale * v)),
        }
    }
}

/// Weight decay applies to matrices; vectors (norm weights, biases, DoRA magnitudes, IA³'s
/// `(out, 1)` scales: at most one axis longer than 1) get none.
fn param_groups(params: &[(String, Tensor)], weight_decay: f64, method: &dyn Method) -> Vec<ParamGroup> {
    // A method's own rate for some of its tensors (FineGates' gates), without decay.
    let (scaled, params): (Vec<_>, Vec<_>) = params.iter().cloned().partition(|(n, _)| method.lr_scale(n) != 1.0);
    let (matrices, vectors): (Vec<_>, Vec<_>) = params.into_iter().partition(|(_, t)| t.shape().iter().filter(|&&d| d > 1).count() >= 2);
    let mut groups = vec![ParamGroup::new("decay", matrices, 1.0, weight_decay)];
    if !vectors.is_empty() {
        groups.push(ParamGroup::new("no_decay", vectors, 1.0, 0.0));
    }
    if let Some((first, _)) = scaled.first() {
        let scale = method.lr_scale(first);
        groups.push(ParamGroup::new("method_rate", scaled, scale, 0.0));
    }
    groups
}

const CHECKPOINT_DIR: &str = "checkpoint";
const STATE_FILE: &str = "state.json";
const CHECKPOINT_FORMAT: &str = "tinytune checkpoint 2";
const LOCK_FILE: &str = ".tinytune.lock";

/// Saved training state (`checkpoint/state.json` beside `checkpoint/step-N.safetensors`).
struct State {
    step: u64,
    micro: u64,
    skipped: u64,
    bad_streak: usize,
    history: Vec<(f64, f64)>,
    evals: Vec<EvalRecord>,
    before: Option<EvalRecord>,
    /// A divergence was reported (warn mode warns once).
    diverged: bool,
}

impl State {
    fn new() -> State {
        State { step: 0, micro: 0, skipped: 0, bad_streak: 0, history: Vec::new(), evals: Vec::new(), before: None, diverged: false }
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io { path: path.display().to_string(), msg: e.to_string() }
}

fn eval_json(e: &EvalRecord) -> Value {
    let mut v = json!({ "step": e.step, "loss": e.loss, "accuracy": e.accuracy, "examples": e.examples, "units": e.units });
    for (k, m) in &e.metrics {
        v[k] = finite_or_null(*m);
    }
    v
}

/// The names of the metrics [`eval_json`] and the step lines carry besides the fixed fields.
const OBJECTIVE_METRICS: [&str; 13] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "reward",
    "reward_std",
    "kl",
    "completion_length",
    "clipfrac",
    "policy_loss",
    "value_loss",
];

fn eval_from(v: &Value) -> Option<EvalRecord> {
    Some(EvalRecord {
        step: v.get("step")?.as_u64()?,
        loss: v.get("loss")?.as_f64()?,
        accuracy: v.get("accuracy").and_then(Value::as_f64),
        examples: v.get("examples")?.as_u64()? as usize,
        units: v.get("units").and_then(Value::as_u64).unwrap_or(0) as usize,
        metrics: OBJECTIVE_METRICS.iter().filter_map(|k| Some((k.to_string(), v.get(*k)?.as_f64()?))).collect(),
    })
}

/// Write the checkpoint of `state`: the tensors file first, then `state.json` naming it (each
/// atomically), then remove older tensor files and the temporary files of writes a killed run
/// left. A crash at any point leaves a complete checkpoint: the previous one or the new one.
fn save_checkpoint(out: &Path, st: &State, params: &[(String, Tensor)], opt: &dyn Optimizer, fingerprint: &Value) -> Result<()> {
    let dir = out.join(CHECKPOINT_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let mut tensors: Vec<(String, Tensor)> = params.iter().map(|(n, t)| (format!("param/{n}"), t.detach())).collect();
    tensors.extend(opt.state_tensors()?.into_iter().map(|(n, t)| (format!("optim/{n}"), t)));
    let file = format!("step-{}.safetensors", st.step);
    let bytes = crate::io::safetensors::serialize(&tensors, None)?;
    crate::io::write_atomic(&dir.join(&file), &bytes)?;
    let optimizer_entries = tensors.iter().filter(|(n, _)| n.starts_with("optim/")).count();
    let state = json!({
        "format": CHECKPOINT_FORMAT,
        "tensors": file,
        "checksum": { "kind": CHECKSUM_KIND, "value": checksum(&bytes), "bytes": bytes.len() },
        "optimizer_entries": optimizer_entries,
        "step": st.step,
        "micro_batches": st.micro,
        "skipped": st.skipped,
        "bad_streak": st.bad_streak,
        "history": st.history,
        "evals": st.evals.iter().map(eval_json).collect::<Vec<_>>(),
        "before": st.before.as_ref().map(eval_json),
        "diverged": st.diverged,
        "config": fingerprint,
    });
    crate::io::write_atomic(&dir.join(STATE_FILE), serde_json::to_string_pretty(&state).unwrap_or_default().as_bytes())?;
    for entry in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let old = name.starts_with("step-") && name.ends_with(".safetensors") && name != file;
        let stray = name.starts_with('.') && name.contains(".tmp-");
        if old || stray {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// How much of a checkpoint a run takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Take {
    /// Everything, checked: the run continues exactly.
    All,
    /// The trainable tensors only (a new run starts from them).
    Weights,
}

/// Load the checkpoint in `out` into `params` (and, with [`Take::All`], `opt`); the saved
/// state. Every part must prove itself: the tensors file's checksum, the settings fingerprint
/// (equal to this run's), every optimizer entry, a step within the schedule. Anything missing
/// or different is an error naming it, never a silent re-initialisation.
fn load_checkpoint(
    out: &Path,
    params: &[(String, Tensor)],
    opt: &mut dyn Optimizer,
    fingerprint: &Value,
    (total, grad_accum): (u64, u64),
    take: Take,
) -> Result<State> {
    let dir = out.join(CHECKPOINT_DIR);
    let spath = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&spath).map_err(|e| io_err(&spath, format!("cannot resume: {e}")))?;
    let ferr = |msg: String| Error::Format { path: spath.display().to_string(), msg };
    let weights_only = "; --resume-weights-only starts a new run from its weights alone";
    let v: Value = serde_json::from_str(&text).map_err(|e| ferr(format!("not valid JSON: {e}")))?;
    let format = v.get("format").and_then(Value::as_str).unwrap_or("none");
    if format != CHECKPOINT_FORMAT && take == Take::All {
        return Err(ferr(format!("format '{format}', this tinytune resumes '{CHECKPOINT_FORMAT}' (with checksums) exactly{weights_only}")));
    }
    if take == Take::All {
        let saved = v.get("config").ok_or_else(|| {
            ferr(format!("no settings fingerprint ('config'): cannot check this run's settings against it{weights_only}"))
        })?;
        for (k, want) in fingerprint.as_object().into_iter().flatten() {
            if saved.get(k) != Some(want) {
                return Err(ferr(format!(
                    "the checkpoint was made with {k} = {}, this run has {k} = {want}: resume with the same settings (or a new --out){weights_only}",
                    saved.get(k).unwrap_or(&Value::Null)
                )));
            }
        }
    }
    let file = v.get("tensors").and_then(Value::as_str).ok_or_else(|| ferr("no 'tensors' entry".into()))?;
    if file.contains(['/', '\\']) || file.starts_with('.') {
        return Err(ferr(format!("'tensors' = '{file}' must name a file in {}", dir.display())));
    }
    let tpath = dir.join(file);
    // One map serves the checksum and the tensors (a full fine-tune's file is gigabytes).
    let bytes = crate::io::safetensors::map(&tpath).map_err(|e| match e {
        Error::Io { path, msg } => Error::Io { path, msg: format!("cannot resume: {msg}") },
        e => e,
    })?;
    match v.get("checksum").and_then(|c| c.get("value")).and_then(Value::as_str) {
        Some(want) => {
            let got = checksum(&bytes);
            if got != want {
                return Err(Error::Format {
                    path: tpath.display().to_string(),
                    msg: format!(
                        "checksum {got} differs from {want} in {STATE_FILE} ({} bytes, {} expected): the file is damaged",
                        bytes.len(),
                        v["checksum"].get("bytes").and_then(Value::as_u64).map_or("?".into(), |b| b.to_string())
                    ),
                });
            }
        }
        None if take == Take::All => return Err(ferr(format!("no checksum of {file}{weights_only}"))),
        None => {}
    }
    let st = SafetensorsFile::from_map(&tpath, bytes)?;
    let dev = params.first().map(|(_, t)| t.device().clone()).unwrap_or(Device::Cpu);
    for (name, p) in params {
        let t = st.load(&format!("param/{name}"), &dev)?;
        if t.shape() != p.shape() {
            return Err(ferr(format!("param/{name} has shape {:?} in the checkpoint, the model has {:?}", t.shape(), p.shape())));
        }
        p.set_data(&t.to_dtype(p.dtype())?)?;
    }
    if take == Take::Weights {
        return Ok(State::new());
    }
    let mut optim = HashMap::new();
    for n in st.names() {
        if let Some(k) = n.strip_prefix("optim/") {
            optim.insert(k.to_string(), st.load(n, &dev)?);
        }
    }
    let want = v.get("optimizer_entries").and_then(Value::as_u64).ok_or_else(|| ferr("missing 'optimizer_entries'".into()))?;
    if optim.len() as u64 != want {
        return Err(ferr(format!("{file} holds {} optimizer state entries, {STATE_FILE} says {want}{weights_only}", optim.len())));
    }
    opt.load_state(&optim)?;
    let num = |k: &str| v.get(k).and_then(Value::as_u64).ok_or_else(|| ferr(format!("missing '{k}'")));
    let step = num("step")?;
    if step > total {
        return Err(ferr(format!("step {step} is beyond this run's {total} steps")));
    }
    // Every step takes grad_accum micro-batches, skipped or not.
    let (micro, skipped, bad_streak) = (num("micro_batches")?, num("skipped")?, num("bad_streak")?);
    if Some(micro) != step.checked_mul(grad_accum) || skipped > step || bad_streak > skipped {
        return Err(ferr(format!(
            "inconsistent counters: step {step}, micro_batches {micro} (grad_accum {grad_accum}), skipped {skipped}, bad_streak {bad_streak}"
        )));
    }
    Ok(State {
        step,
        micro,
        skipped,
        bad_streak: bad_streak as usize,
        history: v
            .get("history")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect())
            .unwrap_or_default(),
        evals: v.get("evals").and_then(Value::as_array).map(|a| a.iter().filter_map(eval_from).collect()).unwrap_or_default(),
        before: v.get("before").and_then(eval_from),
        diverged: v.get("diverged").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// The lock of an output directory: one run writes to it at a time. It is an advisory lock on
/// `.tinytune.lock` (holding the owner's process id), which the system releases when the
/// process ends however it ends, so a crashed run leaves no stale lock behind.
pub struct OutLock {
    _file: std::fs::File,
}

impl OutLock {
    /// Lock `out` (created if missing), or fail at once naming the process that holds it.
    pub fn acquire(out: &Path) -> Result<OutLock> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
        let path = out.join(LOCK_FILE);
        let mut f =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| io_err(&path, e))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut owner = String::new();
                let _ = f.read_to_string(&mut owner);
                let owner = owner.trim();
                let who = if owner.is_empty() { "another process".to_string() } else { format!("process {owner}") };
                return Err(Error::InvalidArgument {
                    op: "finetune",
                    msg: format!(
                        "{} is in use by another run ({who} holds {}): wait for it, or give another output directory",
                        out.display(),
                        path.display()
                    ),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path, format!("cannot lock: {e}"))),
        }
        let _ = f.set_len(0).and_then(|_| f.rewind()).and_then(|_| writeln!(f, "{}", std::process::id()));
        // Whoever held the directory before is gone: a temporary file of its writes (a run
        // killed mid-write leaves one; nothing can clean up after SIGKILL) is garbage now.
        for dir in [out.to_path_buf(), out.join(CHECKPOINT_DIR)] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                // Only write_atomic's own names: `.NAME.tmp-PID`.
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours = name.starts_with('.')
                    && name.rsplit_once(".tmp-").is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|c| c.is_ascii_digit()));
                if ours {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(OutLock { _file: f })
    }
}

/// A fine-tuning run that a caller drives step by step; [`train`] is its loop with progress,
/// metrics, evaluations, checkpoints and the saved result.
///
/// ```text
/// let mut t = Trainer::new(model, &train_set, Some(&eval_set), &cfg, &device)?;  // attach, optimizer, resume
/// while t.step_count() < t.total_steps() {
///     let r = t.step()?;                 // one optimizer step over grad_accum micro-batches
///     if r.step % 10 == 0 { t.evaluate(&eval_set)?; t.save_checkpoint()?; }
/// }
/// t.save("base model name")?;            // the adapter (or the model) in the PEFT layout
/// ```
pub struct Trainer<'a> {
    model: &'a mut dyn CausalLm,
    cfg: &'a TrainConfig,
    train: &'a Dataset,
    device: Device,
    /// The method and objective attached, and every trainable tensor.
    pub attached: Attached,
    opt: Box<dyn Optimizer>,
    schedule: Schedule,
    fingerprint: Value,
    st: State,
    total: u64,
    batches_per_epoch: u64,
    orders: HashMap<u64, Vec<usize>>,
    started: Instant,
    /// Held for the run: no second run writes to the same output directory.
    _lock: OutLock,
}

impl<'a> Trainer<'a> {
    /// Check the settings and the data, attach the method (and a head for labelled data),
    /// build the optimizer and schedule; with `cfg.resume`, continue from the checkpoint in
    /// `cfg.out`. `eval` is only checked here (labels, kind), not evaluated.
    pub fn new(
        model: &'a mut dyn CausalLm,
        train: &'a Dataset,
        eval: Option<&Dataset>,
        cfg: &'a TrainConfig,
        device: &Device,
    ) -> Result<Trainer<'a>> {
        cfg.validate()?;
        if train.is_empty() {
            return Err(Error::InvalidArgument { op: "finetune", msg: format!("{}: no training examples", train.path()) });
        }
        let kind = train.kind();
        // An explicit class count is binding (a label beyond it is an error naming its line);
        // otherwise the head is sized for the largest label of either data set, and at least
        // 2 (a small subset of binary data may hold only 0s).
        let classes = match cfg.num_classes {
            Some(n) => Some(n),
            None => inferred_classes(train, eval)?,
        };
        if let Some(n) = classes.filter(|_| kind == DataKind::Classification) {
            // The head, its gradient and two AdamW moments, before any of it is allocated.
            let bytes = 16 * n as u128 * model.hidden_size() as u128;
            crate::mem::check_available(&format!("a classification head of {n} classes × hidden size {}", model.hidden_size()), bytes)?;
            train.check_labels(n)?;
            if let Some(e) = eval {
                e.check_labels(n)?;
            }
        }
        if let Some(e) = eval.filter(|e| e.kind() != kind) {
            return Err(Error::InvalidArgument {
                op: "finetune",
                msg: format!("{}: evaluation data is {:?}, training data is {:?}", e.path(), e.kind(), kind),
            });
        }
        let model_id = model_hash(model)?;
        let mut attached = attach(model, cfg, kind, classes, device)?;
        init_from_data(model, &mut attached, cfg, train, device)?;
        if kind == DataKind::Preference && matches!(cfg.preference, PreferenceObjective::Dpo(_)) && attached.method.saves_model() {
            // Full fine-tuning changes the base weights: the adapters-off model is not the reference.
            if let Some(d) = std::iter::once(train).chain(eval).find(|d| d.examples().iter().any(|e| e.reference.is_none())) {
                return Err(Error::InvalidArgument {
                    op: "dpo",
                    msg: format!(
                        "{}: method '{}' trains the base weights, so DPO needs the reference log-probabilities computed \
                         before training (--precompute-ref-log-probs; train::preference::compute_reference_log_probs)",
                        d.path(),
                        cfg.method.name()
                    ),
                });
            }
        }
        let groups = param_groups(&attached.params, cfg.weight_decay, attached.method.as_ref());
        let mut opt: Box<dyn Optimizer> = match cfg.optimizer {
            OptimizerKind::AdamW => Box::new(AdamW::new(groups)?),
            OptimizerKind::Sgd => Box::new(Sgd::new(groups, SgdConfig { momentum: 0.9, dampening: 0.0, nesterov: false })?),
        };
        let batches_per_epoch = train.len().div_ceil(cfg.batch_size) as u64;
        let total = total_steps(cfg, train.len(), batches_per_epoch)?;
        let schedule = Schedule::new(cfg.schedule, cfg.warmup_steps, total)?;
        let fingerprint = cfg.fingerprint(train, total, &model_id);
        let lock = OutLock::acquire(&cfg.out)?;
        let st = match (cfg.resume, cfg.resume_weights_only) {
            (true, _) => {
                load_checkpoint(&cfg.out, &attached.params, opt.as_mut(), &fingerprint, (total, cfg.grad_accum as u64), Take::All)?
            }
            (_, true) => {
                load_checkpoint(&cfg.out, &attached.params, opt.as_mut(), &fingerprint, (total, cfg.grad_accum as u64), Take::Weights)?
            }
            _ => State::new(),
        };
        Ok(Trainer {
            model,
            cfg,
            train,
            device: device.clone(),
            attached,
            opt,
            schedule,
            fingerprint,
            st,
            total,
            batches_per_epoch,
            orders: HashMap::new(),
            started: Instant::now(),
            _lock: lock,
        })
    }

    /// Optimizer steps taken (or skipped) so far.
    pub fn step_count(&self) -> u64 {
        self.st.step
    }

    /// The schedule's length.
    pub fn total_steps(&self) -> u64 {
        self.total
    }

    /// Trainable parameters (method and head).
    pub fn trainable_parameters(&self) -> usize {
        self.attached.params.iter().map(|(_, t)| t.numel()).sum()
    }

    /// The model, with the method attached.
    pub fn model(&mut self) -> &mut dyn CausalLm {
        &mut *self.model
    }

    /// One optimizer step: `grad_accum` micro-batches of the seeded epoch order, the loss
    /// weighted by the objective's units over the whole step, clipping, the scheduled
    /// update. A step whose loss or gradient norm is not finite is skipped (`skipped`).
    pub fn step(&mut self) -> Result<StepRecord> {
        let cfg = self.cfg;
        self.attached.method.set_training(self.attached.objective.dropout());
        let mut batches = Vec::with_capacity(cfg.grad_accum);
        for _ in 0..cfg.grad_accum {
            let (epoch, k) = (self.st.micro / self.batches_per_epoch, (self.st.micro % self.batches_per_epoch) as usize);
            let train = self.train;
            let order =
                self.orders.entry(epoch).or_insert_with(|| train.training_order(epoch, cfg.seed, cfg.batch_size, cfg.length_buckets));
            let idx = &order[k * cfg.batch_size..((k + 1) * cfg.batch_size).min(order.len())];
            batches.push((self.st.micro, self.train.batch(idx, &self.device)?));
            self.st.micro += 1;
        }
        let bpe = self.batches_per_epoch;
        let micro = self.st.micro;
        self.orders.retain(|&e, _| e + 1 >= micro / bpe);
        let objective = self.attached.objective.as_ref();
        let denom: usize = batches.iter().map(|(_, b)| objective.units(self.model, b)).sum();
        let mut tokens: usize = batches.iter().map(|(_, b)| b.n_tokens).sum();
        let t0 = Instant::now();
        let updates = objective.updates_per_step().max(1);
        let lr = self.schedule.lr_at(cfg.lr, self.st.step);
        let (mut loss, mut norm, mut metrics, mut skipped) = (0.0, 0.0, Vec::new(), false);
        let tensors: Vec<Tensor> = self.attached.params.iter().map(|(_, t)| t.clone()).collect();
        // Each update: the step's micro-batches, clipping, the optimizer; the reported loss,
        // norm and metrics are the updates' means.
        for u in 0..updates {
            let mut update_loss = 0.0;
            for (micro, b) in &batches {
                self.attached.method.set_step(*micro);
                objective.set_step(*micro);
                objective.set_update(Some(u));
                let out = objective.batch_loss(self.model, b, false);
                let out = match out {
                    Ok(o) => o,
                    Err(e) => {
                        objective.set_update(None);
                        return Err(e);
                    }
                };
                add_metrics(&mut metrics, &out.metrics, 1.0 / (denom.max(1) * updates) as f64);
                if u == 0 {
                    tokens += out.sampled_tokens;
                }
                let part = out.sum.mul_scalar(1.0 / denom.max(1) as f64)?;
                update_loss += part.to_scalar()?;
                part.backward()?;
            }
            // A method's own term (FineGates' sparsity objective), once per update.
            if let Some(r) = self.attached.method.regularizer()? {
                add_metrics(&mut metrics, &r.metrics, 1.0 / updates as f64);
                update_loss += r.loss.to_scalar()?;
                r.loss.backward()?;
            }
            let n = crate::profile::in_phase("optimizer", || match cfg.clip {
                Some(c) if update_loss.is_finite() => clip_grad_norm(&tensors, c),
                _ => grad_norm(&tensors),
            })?;
            if !update_loss.is_finite() || !n.is_finite() {
                skipped = true;
            } else {
                crate::profile::in_phase("optimizer", || self.opt.step(lr))?;
            }
            self.opt.zero_grad();
            loss += update_loss / updates as f64;
            norm += n / updates as f64;
        }
        objective.set_update(None);
        if skipped {
            self.st.skipped += 1;
            self.st.bad_streak += 1;
        } else {
            self.st.bad_streak = 0;
        }
        self.st.step += 1;
        if !skipped {
            self.st.history.push((self.st.step as f64, loss));
        }
        let dt = t0.elapsed().as_secs_f64();
        Ok(StepRecord {
            step: self.st.step,
            total_steps: self.total,
            epoch: self.st.micro as f64 / self.batches_per_epoch as f64,
            loss,
            lr,
            grad_norm: norm,
            tokens,
            tokens_per_s: tokens as f64 / dt.max(1e-9),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            skipped,
            metrics,
        })
    }

    /// A divergence (`why`): an error naming the step and the last checkpoint, or with
    /// `stop_on_divergence` off a warning, once.
    fn diverged(&mut self, why: &str, saved_step: Option<u64>, observer: &mut dyn Observer) -> Result<()> {
        let advice = "lower the learning rate (or raise --warmup, or clip harder)";
        if self.cfg.stop_on_divergence {
            return Err(Error::InvalidArgument {
                op: "finetune",
                msg: format!(
                    "stopped at step {}: {why}; {advice}; {} (--on-divergence warn goes on)",
                    self.st.step,
                    last_checkpoint(self.cfg, saved_step)
                ),
            });
        }
        if !self.st.diverged {
            self.st.diverged = true;
            observer.on_message(&format!("warning: step {}: {why}; {advice}. Going on (--on-divergence warn).", self.st.step));
        }
        Ok(())
    }

    /// The mean loss (and accuracy) on `data` now, in inference mode (no dropout, no graph).
    pub fn evaluate(&mut self, data: &Dataset) -> Result<EvalRecord> {
        self.evaluate_observed(data, &mut |_, _| {})
    }

    /// [`Trainer::evaluate`], calling `progress(examples_done, examples)` after each batch.
    pub fn evaluate_observed(&mut self, data: &Dataset, progress: &mut dyn FnMut(usize, usize)) -> Result<EvalRecord> {
        self.attached.method.set_training(false);
        let (objective, batch) = (self.attached.objective.as_ref(), self.cfg.batch_size);
        evaluate_observed(self.model, objective, data, batch, &self.device, self.st.step, progress)
    }

    /// Write a checkpoint of this step to `cfg.out/checkpoint` (atomically; see the module docs).
    pub fn save_checkpoint(&self) -> Result<()> {
        save_checkpoint(&self.cfg.out, &self.st, &self.attached.params, self.opt.as_ref(), &self.fingerprint)
    }

    /// Save the result: the adapter in the PEFT layout (`cfg.out/adapter`), or for a method
    /// that trains the whole model, the model (`cfg.out/model`, a head beside it as an
    /// adapter). `base` names the base model in the adapter's config. Returns the directory.
    pub fn save(&mut self, base: &str) -> Result<PathBuf> {
        let (out, head) = (&self.cfg.out, self.attached.objective.head());
        if self.attached.method.saves_model() {
            let dir = out.join("model");
            crate::models::save_checkpoint(self.model, &dir)?;
            if let Some(h) = head {
                format::save(&out.join("adapter"), self.model, None, Some(h), base)?;
            }
            Ok(dir)
        } else {
            let dir = out.join("adapter");
            format::save(&dir, self.model, Some(self.attached.method.as_ref()), head, base)?;
            format::record(&dir, "seq_len", json!(self.train.seq_len()))?;
            Ok(dir)
        }
    }
}

/// Fine-tune `model` on `train` as `cfg` says, evaluating on `eval`; write everything under
/// `cfg.out` (see the crate README for the layout). `base` names the base model in the
/// adapter's config. The loop of a [`Trainer`], with the observer told of every step.
pub fn train(
    model: &mut dyn CausalLm,
    train: &Dataset,
    eval: Option<&Dataset>,
    cfg: &TrainConfig,
    base: &str,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<TrainReport> {
    let mut t = Trainer::new(model, train, eval, cfg, device)?;
    let total = t.total;
    let trainable = t.trainable_parameters();
    if cfg.resume {
        observer.on_message(&format!("resuming from step {} of {total}", t.st.step));
    }
    let resumed_from = cfg.resume.then_some(t.st.step);
    let metrics_path = cfg.out.join("metrics.jsonl");
    let mut metrics = open_metrics(&metrics_path, t.st.step, total, cfg.resume)?;
    // The step of the newest checkpoint on disk, for the message of a stopped run.
    let mut saved_step = resumed_from;

    if t.st.before.is_none() && cfg.eval_before {
        if let Some(e) = eval {
            t.st.before = Some(report_eval(&mut t, e, observer, &mut metrics, &metrics_path)?);
        }
    }
    observer.on_start(t.st.step, total);
    t.started = Instant::now();
    while t.st.step < total {
        let rec = t.step()?;
        let (loss, norm) = (rec.loss, rec.grad_norm);
        if rec.skipped {
            observer.on_message(&format!("step {}: loss {loss} / gradient norm {norm} is not finite; step skipped", rec.step));
        }
        observer.on_step(&rec);
        let mut line = json!({ "step": rec.step, "epoch": rec.epoch, "loss": finite_or_null(loss), "lr": rec.lr, "grad_norm": finite_or_null(norm),
                     "tokens": rec.tokens, "tokens_per_s": rec.tokens_per_s, "elapsed_s": rec.elapsed_s, "skipped": rec.skipped });
        for (k, m) in &rec.metrics {
            line[k] = finite_or_null(*m);
        }
        write_metric(&mut metrics, &metrics_path, &line)?;
        if rec.skipped && t.st.bad_streak >= cfg.max_bad_steps {
            // Stop (the step is reported above); the newest checkpoint stays as it is.
            return Err(Error::InvalidArgument {
                op: "finetune",
                msg: format!(
                    "stopped at step {}: {} steps in a row had a non-finite loss or gradient (lower the learning rate, or check the data); {}",
                    t.st.step,
                    t.st.bad_streak,
                    last_checkpoint(cfg, saved_step)
                ),
            });
        }
        if let Some(why) = diverging_loss(&t.st.history, &rec) {
            t.diverged(&why, saved_step, observer)?;
        }
        let last = t.st.step == total;
        if let (Some(e), Some(every)) = (eval, cfg.eval_every) {
            if t.st.step % every == 0 && !last {
                let r = report_eval(&mut t, e, observer, &mut metrics, &metrics_path)?;
                t.st.evals.push(r.clone());
                if !r.perplexity().is_finite() {
                    t.diverged(&format!("the evaluation's perplexity is infinite (mean loss {})", r.loss), saved_step, observer)?;
                }
            }
        }
        if t.st.step % cfg.save_every == 0 || last {
            t.save_checkpoint()?;
            saved_step = Some(t.st.step);
        }
        if !last && !observer.keep_going() {
            if saved_step != Some(t.st.step) {
                t.save_checkpoint()?;
            }
            t.attached.method.set_training(false);
            observer.on_message(&format!("stopped at step {} of {total}; resume to continue", t.st.step));
            return Ok(TrainReport {
                steps: t.st.step,
                skipped_steps: t.st.skipped,
                before: t.st.before.clone(),
                after: None,
                final_loss: t.st.history.last().map(|p| p.1),
                trainable_parameters: trainable,
                saved: cfg.out.join(CHECKPOINT_DIR),
                resumed_from,
                interrupted: true,
            });
        }
    }
    t.attached.method.set_training(false);
    let after = match eval {
        Some(e) => {
            let r = report_eval(&mut t, e, observer, &mut metrics, &metrics_path)?;
            t.st.evals.push(r.clone());
            if !r.perplexity().is_finite() {
                t.diverged(&format!("the final evaluation's perplexity is infinite (mean loss {})", r.loss), saved_step, observer)?;
            }
            Some(r)
        }
        None => None,
    };
    let saved = t.save(base)?;
    let st = &t.st;
    let train_curve = &st.history;
    // The running mean only where it differs from the raw curve (a window of 2 steps or more).
    let window = train_curve.len() / 20;
    let smooth = if window >= 2 { plot::smooth(train_curve, window) } else { Vec::new() };
    let all_evals: Vec<&EvalRecord> = st.before.iter().chain(st.evals.iter()).collect();
    let classification = all_evals.iter().any(|e| e.accuracy.is_some());
    let eval_loss: Vec<(f64, f64)> = all_evals.iter().map(|e| (e.step as f64, e.loss)).collect();
    let accuracy: Vec<(f64, f64)> = all_evals.iter().filter_map(|e| Some((e.step as f64, 100.0 * e.accuracy?))).collect();
    let data_name = Path::new(train.path()).file_name().map_or(train.path().to_string(), |n| n.to_string_lossy().into_owned());
    let model_name = Path::new(base).file_name().map_or(base.to_string(), |n| n.to_string_lossy().into_owned());
    let mut settings: Vec<String> = match cfg.method.fingerprint() {
        Value::Object(m) => ["r", "alpha", "num_virtual_tokens", "reduction_factor", "adapter_kind"]
            .iter()
            .filter_map(|k| m.get(*k).filter(|v| !v.is_null()).map(|v| format!("{k} {v}")))
            .collect(),
        _ => Vec::new(),
    };
    settings.extend([format!("lr {}", cfg.lr), format!("batch {}×{}", cfg.batch_size, cfg.grad_accum), format!("{} steps", st.step)]);
    let title = format!("{} · {model_name} · {data_name} · {}", cfg.method.name(), settings.join(", "));
    let mut series = vec![plot::Series { name: "train loss (per step)", points: train_curve, color: "#9ecae1", dots: false }];
    if !smooth.is_empty() {
        series.push(plot::Series { name: "train loss (running mean)", points: &smooth, color: "#1f77b4", dots: false });
    }
    series.push(plot::Series {
        name: if classification { "eval loss" } else { "eval NLL" },
        points: &eval_loss,
        color: "#d62728",
        dots: true,
    });
    let acc_series = plot::Series { name: "eval accuracy", points: &accuracy, color: "#2ca02c", dots: true };
    let picture = plot::svg_with_axis(&title, &series, classification.then_some(("eval accuracy (%)", &acc_series)));
    crate::io::write_atomic(&cfg.out.join("loss.svg"), picture.as_bytes())?;
    if let Some(p) = reward_picture(&metrics_path, &title)? {
        crate::io::write_atomic(&cfg.out.join("rewards.svg"), p.as_bytes())?;
    }
    let report = TrainReport {
        steps: st.step,
        skipped_steps: st.skipped,
        before: st.before.clone(),
        after,
        final_loss: st.history.last().map(|p| p.1),
        trainable_parameters: trainable,
        saved,
        resumed_from,
        interrupted: false,
    };
    let summary = json!({
        "steps": report.steps, "skipped_steps": report.skipped_steps, "trainable_parameters": trainable,
        "before": report.before.as_ref().map(eval_json), "after": report.after.as_ref().map(eval_json),
        "final_loss": report.final_loss, "saved": report.saved.display().to_string(),
    });
    crate::io::write_atomic(&cfg.out.join("report.json"), serde_json::to_string_pretty(&summary).unwrap_or_default().as_bytes())?;
    Ok(report)
}

/// A preference objective's metrics over the steps (from `metrics.jsonl`, which a resumed run
/// has cut to its checkpoint): DPO's and a reward model's `rewards/*` on one axis; GRPO's mean
/// reward with its KL from the reference on a second axis. `None` for other objectives.
fn reward_picture(metrics_path: &Path, title: &str) -> Result<Option<String>> {
    let text = std::fs::read_to_string(metrics_path).map_err(|e| io_err(metrics_path, e))?;
    let steps: Vec<Value> =
        text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v.get("step").is_some()).collect();
    let curve = |k: &str| -> Vec<(f64, f64)> { steps.iter().filter_map(|v| Some((v["step"].as_f64()?, v.get(k)?.as_f64()?))).collect() };
    // Per-step values of a few pairs or prompts are noisy: a running mean over a tenth of the run.
    let smooth = |pts: Vec<(f64, f64)>| if pts.len() >= 20 { plot::smooth(&pts, pts.len() / 10) } else { pts };
    let (reward, kl) = (smooth(curve("reward")), smooth(curve("kl")));
    if !reward.is_empty() {
        let r = [plot::Series { name: "mean reward of the samples", points: &reward, color: "#2ca02c", dots: false }];
        let k = plot::Series { name: "KL from the reference (per token)", points: &kl, color: "#d62728", dots: false };
        return Ok(Some(plot::svg_with_axis(&format!("{title} · reward and KL"), &r, Some(("KL per token", &k)))));
    }
    let (chosen, rejected, margins) =
        (smooth(curve("rewards/chosen")), smooth(curve("rewards/rejected")), smooth(curve("rewards/margins")));
    if margins.is_empty() {
        return Ok(None);
    }
    let series = [
        plot::Series { name: "rewards/chosen", points: &chosen, color: "#2ca02c", dots: false },
        plot::Series { name: "rewards/rejected", points: &rejected, color: "#d62728", dots: false },
        plot::Series { name: "rewards/margins", points: &margins, color: "#1f77b4", dots: false },
    ];
    Ok(Some(plot::svg(&format!("{title} · rewards"), &series)))
}

/// One evaluation of a [`train`] run: announced, run, told to the observer, written to the
/// metrics.
fn report_eval(
    t: &mut Trainer,
    e: &Dataset,
    observer: &mut dyn Observer,
    metrics: &mut std::fs::File,
    metrics_path: &Path,
) -> Result<EvalRecord> {
    observer.on_eval_start(t.st.step, e.len());
    let r = t.evaluate_observed(e, &mut |done, total| observer.on_eval_progress(done, total))?;
    observer.on_eval(&r);
    write_metric(metrics, metrics_path, &json!({ "eval": eval_json(&r) }))?;
    Ok(r)
}

/// Where the newest checkpoint is, for the message of a stopped run.
fn last_checkpoint(cfg: &TrainConfig, saved_step: Option<u64>) -> String {
    let dir = cfg.out.join(CHECKPOINT_DIR);
    match saved_step {
        Some(s) => format!("the last checkpoint (step {s}) is in {}", dir.display()),
        None => format!("no checkpoint was written yet (one is written every {} steps to {})", cfg.save_every, dir.display()),
    }
}

/// A training loss this many times the first step's (and above 1) has diverged: two orders
/// of magnitude, far beyond the noise of any healthy run.
const DIVERGENCE_FACTOR: f64 = 100.0;

/// Why the loss of `rec` says the run diverged, if it does (`history`: the finite losses so
/// far, the first of the run included).
fn diverging_loss(history: &[(f64, f64)], rec: &StepRecord) -> Option<String> {
    let &(_, first) = history.first()?;
    let limit = DIVERGENCE_FACTOR * first.max(1.0);
    (!rec.skipped && rec.loss > limit).then(|| {
        format!("the training loss {:.4e} is more than {DIVERGENCE_FACTOR}× the first step's {first:.4}: the run diverged", rec.loss)
    })
}

fn finite_or_null(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// Open `metrics.jsonl` for appending; on resume keep only the lines up to the checkpoint's
/// step (a crash may have written later ones, which the resumed run writes again). The final
/// evaluation (at step `total`, after the last checkpoint) is always written again, so an old
/// one is dropped.
fn open_metrics(path: &Path, step: u64, total: u64, resume: bool) -> Result<std::fs::File> {
    let kept = if resume {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
                match (v.get("step").and_then(Value::as_u64), v.get("eval").and_then(|e| e.get("step")).and_then(Value::as_u64)) {
                    (Some(s), _) => s <= step,
                    (None, Some(s)) => s <= step && s < total,
                    (None, None) => false,
                }
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    } else {
        String::new()
    };
    crate::io::write_atomic(path, kept.as_bytes())?;
    std::fs::OpenOptions::new().append(true).open(path).map_err(|e| io_err(path, e))
}

fn write_metric(f: &mut std::fs::File, path: &Path, v: &Value) -> Result<()> {
    use std::io::Write;
    writeln!(f, "{v}").map_err(|e| io_err(path, e))
}
