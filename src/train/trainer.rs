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
use super::objective::{Classification, LanguageModelling, Objective};
use super::plot;
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
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (default: `epochs` passes over the data).
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
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
    /// Where checkpoints, the adapter, metrics and the loss picture go.
    pub out: PathBuf,
    /// Continue from the last checkpoint in `out`.
    pub resume: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Arc::new(LoraConfig::default()),
            pooling: Pooling::Last,
            num_classes: None,
            optimizer: OptimizerKind::AdamW,
            lr: 2e-4,
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            warmup_steps: 0,
            schedule: ScheduleKind::Linear,
            weight_decay: 0.0,
            clip: Some(1.0),
            seed: 0,
            gradient_checkpointing: false,
            eval_every: None,
            save_every: 100,
            max_bad_steps: 5,
            out: PathBuf::from("tinytune-out"),
            resume: false,
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
        if self.clip.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return bad("clip must be positive".into());
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
        // The method's own settings sit beside the trainer's, by their names (`r`, `alpha`, ...).
        if let Value::Object(m) = self.method.fingerprint() {
            v.as_object_mut().expect("an object").extend(m);
        }
        v
    }
}

/// FNV-1a over bytes.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// A hash of every example's token ids, loss mask and label.
fn data_hash(d: &Dataset) -> u64 {
    d.examples().iter().fold(FNV_START, |h, e| {
        let h = e.ids.iter().fold(h, |h, id| fnv(h, &id.to_le_bytes()));
        let h = e.is_target.iter().fold(h, |h, &t| fnv(h, &[t as u8]));
        fnv(h, &e.label.map_or(u32::MAX, |l| l).to_le_bytes())
    })
}

/// The base model's identity: its config and a sample of every weight (the first and last
/// 16 values), hashed, before any method is attached.
fn model_hash(model: &mut dyn CausalLm) -> Result<String> {
    let mut h = fnv(FNV_START, model.config_json().to_string().as_bytes());
    let mut sample = Vec::new();
    model.visit_parameters(&mut |_, t| {
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
}

impl EvalRecord {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Receives progress (the CLI draws a progress bar from it) and may stop a run early.
pub trait Observer {
    fn on_start(&mut self, _start_step: u64, _total_steps: u64) {}
    fn on_step(&mut self, _r: &StepRecord) {}
    fn on_eval(&mut self, _r: &EvalRecord) {}
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
    if kind == DataKind::Lm && cfg.method.head_only() {
        return Err(Error::InvalidArgument {
            op: "finetune",
            msg: format!("method '{}' trains a classifier: the data needs {{\"text\", \"label\"}} lines", cfg.method.name()),
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
    };
    let mut params = method.parameters();
    params.extend(objective.parameters());
    model.set_gradient_checkpointing(cfg.gradient_checkpointing);
    Ok(Attached { method, objective, params })
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
    with_no_grad(|| {
        let (mut total, mut count, mut correct) = (0.0, 0usize, None::<usize>);
        let order: Vec<usize> = (0..data.len()).collect();
        for chunk in order.chunks(batch_size.max(1)) {
            let b = data.batch(chunk, device)?;
            let loss = objective.batch_loss(model, &b, true)?;
            total += loss.sum.to_scalar()?;
            count += objective.units(model, &b);
            if let Some(c) = loss.correct {
                correct = Some(correct.unwrap_or(0) + c);
            }
        }
        if count == 0 {
            return Err(Error::InvalidArgument { op: "evaluate", msg: format!("{}: no targets to evaluate", data.path()) });
        }
        Ok(EvalRecord { step, loss: total / count as f64, accuracy: correct.map(|c| c as f64 / data.len() as f64), examples: data.len() })
    })
}

/// Weight decay applies to matrices; vectors (norm weights, biases, DoRA magnitudes, IA³'s
/// `(out, 1)` scales: at most one axis longer than 1) get none.
fn param_groups(params: &[(String, Tensor)], weight_decay: f64) -> Vec<ParamGroup> {
    let (matrices, vectors): (Vec<_>, Vec<_>) =
        params.iter().cloned().partition(|(_, t)| t.shape().iter().filter(|&&d| d > 1).count() >= 2);
    let mut groups = vec![ParamGroup::new("decay", matrices, 1.0, weight_decay)];
    if !vectors.is_empty() {
        groups.push(ParamGroup::new("no_decay", vectors, 1.0, 0.0));
    }
    groups
}

const CHECKPOINT_DIR: &str = "checkpoint";
const STATE_FILE: &str = "state.json";

/// Saved training state (`checkpoint/state.json` beside `checkpoint/step-N.safetensors`).
struct State {
    step: u64,
    micro: u64,
    skipped: u64,
    bad_streak: usize,
    history: Vec<(f64, f64)>,
    evals: Vec<EvalRecord>,
    before: Option<EvalRecord>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io { path: path.display().to_string(), msg: e.to_string() }
}

fn eval_json(e: &EvalRecord) -> Value {
    json!({ "step": e.step, "loss": e.loss, "accuracy": e.accuracy, "examples": e.examples })
}

fn eval_from(v: &Value) -> Option<EvalRecord> {
    Some(EvalRecord {
        step: v.get("step")?.as_u64()?,
        loss: v.get("loss")?.as_f64()?,
        accuracy: v.get("accuracy").and_then(Value::as_f64),
        examples: v.get("examples")?.as_u64()? as usize,
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
    crate::io::safetensors::save(dir.join(&file), &tensors, None)?;
    let state = json!({
        "format": "tinytune checkpoint 1",
        "tensors": file,
        "step": st.step,
        "micro_batches": st.micro,
        "skipped": st.skipped,
        "bad_streak": st.bad_streak,
        "history": st.history,
        "evals": st.evals.iter().map(eval_json).collect::<Vec<_>>(),
        "before": st.before.as_ref().map(eval_json),
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

/// Load the checkpoint in `out` into `params` and `opt`; the saved state.
fn load_checkpoint(out: &Path, params: &[(String, Tensor)], opt: &mut dyn Optimizer, fingerprint: &Value) -> Result<State> {
    let dir = out.join(CHECKPOINT_DIR);
    let spath = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&spath).map_err(|e| io_err(&spath, format!("cannot resume: {e}")))?;
    let ferr = |msg: String| Error::Format { path: spath.display().to_string(), msg };
    let v: Value = serde_json::from_str(&text).map_err(|e| ferr(format!("not valid JSON: {e}")))?;
    if let Some(saved) = v.get("config") {
        for (k, want) in fingerprint.as_object().into_iter().flatten() {
            if saved.get(k) != Some(want) {
                return Err(ferr(format!(
                    "the checkpoint was made with {k} = {}, this run has {k} = {want}: resume with the same settings (or a new --out)",
                    saved.get(k).unwrap_or(&Value::Null)
                )));
            }
        }
    }
    let file = v.get("tensors").and_then(Value::as_str).ok_or_else(|| ferr("no 'tensors' entry".into()))?;
    let st = SafetensorsFile::open(dir.join(file))?;
    let dev = params.first().map(|(_, t)| t.device().clone()).unwrap_or(Device::Cpu);
    for (name, p) in params {
        let t = st.load(&format!("param/{name}"), &dev)?;
        if t.shape() != p.shape() {
            return Err(ferr(format!("param/{name} has shape {:?} in the checkpoint, the model has {:?}", t.shape(), p.shape())));
        }
        p.set_data(&t.to_dtype(p.dtype())?)?;
    }
    let mut optim = HashMap::new();
    for n in st.names() {
        if let Some(k) = n.strip_prefix("optim/") {
            optim.insert(k.to_string(), st.load(n, &dev)?);
        }
    }
    opt.load_state(&optim)?;
    let num = |k: &str| v.get(k).and_then(Value::as_u64).ok_or_else(|| ferr(format!("missing '{k}'")));
    Ok(State {
        step: num("step")?,
        micro: num("micro_batches")?,
        skipped: num("skipped")?,
        bad_streak: num("bad_streak")? as usize,
        history: v
            .get("history")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect())
            .unwrap_or_default(),
        evals: v.get("evals").and_then(Value::as_array).map(|a| a.iter().filter_map(eval_from).collect()).unwrap_or_default(),
        before: v.get("before").and_then(eval_from),
    })
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
            None => train.num_classes().map(|n| n.max(eval.and_then(|e| e.num_classes()).unwrap_or(0)).max(2)),
        };
        if let Some(n) = classes {
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
        let attached = attach(model, cfg, kind, classes, device)?;
        let groups = param_groups(&attached.params, cfg.weight_decay);
        let mut opt: Box<dyn Optimizer> = match cfg.optimizer {
            OptimizerKind::AdamW => Box::new(AdamW::new(groups)?),
            OptimizerKind::Sgd => Box::new(Sgd::new(groups, SgdConfig { momentum: 0.9, dampening: 0.0, nesterov: false })?),
        };
        let batches_per_epoch = train.len().div_ceil(cfg.batch_size) as u64;
        let total = cfg.max_steps.unwrap_or_else(|| (cfg.epochs as u64 * batches_per_epoch).div_ceil(cfg.grad_accum as u64)).max(1);
        let schedule = Schedule::new(cfg.schedule, cfg.warmup_steps, total)?;
        let fingerprint = cfg.fingerprint(train, total, &model_id);
        std::fs::create_dir_all(&cfg.out).map_err(|e| io_err(&cfg.out, e))?;
        let st = if cfg.resume {
            load_checkpoint(&cfg.out, &attached.params, opt.as_mut(), &fingerprint)?
        } else {
            State { step: 0, micro: 0, skipped: 0, bad_streak: 0, history: Vec::new(), evals: Vec::new(), before: None }
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
        self.attached.method.set_training(true);
        let mut batches = Vec::with_capacity(cfg.grad_accum);
        for _ in 0..cfg.grad_accum {
            let (epoch, k) = (self.st.micro / self.batches_per_epoch, (self.st.micro % self.batches_per_epoch) as usize);
            let train = self.train;
            let order = self.orders.entry(epoch).or_insert_with(|| train.epoch_order(epoch, cfg.seed));
            let idx = &order[k * cfg.batch_size..((k + 1) * cfg.batch_size).min(order.len())];
            batches.push((self.st.micro, self.train.batch(idx, &self.device)?));
            self.st.micro += 1;
        }
        let bpe = self.batches_per_epoch;
        let micro = self.st.micro;
        self.orders.retain(|&e, _| e + 1 >= micro / bpe);
        let objective = self.attached.objective.as_ref();
        let denom: usize = batches.iter().map(|(_, b)| objective.units(self.model, b)).sum();
        let tokens: usize = batches.iter().map(|(_, b)| b.n_tokens).sum();
        let t0 = Instant::now();
        let mut loss = 0.0;
        for (micro, b) in &batches {
            self.attached.method.set_step(*micro);
            let part = objective.batch_loss(self.model, b, false)?.sum.mul_scalar(1.0 / denom.max(1) as f64)?;
            loss += part.to_scalar()?;
            part.backward()?;
        }
        let tensors: Vec<Tensor> = self.attached.params.iter().map(|(_, t)| t.clone()).collect();
        let norm = match cfg.clip {
            Some(c) if loss.is_finite() => clip_grad_norm(&tensors, c)?,
            _ => grad_norm(&tensors)?,
        };
        let lr = self.schedule.lr_at(cfg.lr, self.st.step);
        let skipped = !loss.is_finite() || !norm.is_finite();
        if skipped {
            self.st.skipped += 1;
            self.st.bad_streak += 1;
        } else {
            self.st.bad_streak = 0;
            self.opt.step(lr)?;
        }
        self.opt.zero_grad();
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
        })
    }

    /// The mean loss (and accuracy) on `data` now, in inference mode (no dropout, no graph).
    pub fn evaluate(&mut self, data: &Dataset) -> Result<EvalRecord> {
        self.attached.method.set_training(false);
        evaluate(self.model, self.attached.objective.as_ref(), data, self.cfg.batch_size, &self.device, self.st.step)
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

    if t.st.before.is_none() {
        if let Some(e) = eval {
            let r = t.evaluate(e)?;
            observer.on_eval(&r);
            write_metric(&mut metrics, &metrics_path, &json!({ "eval": eval_json(&r) }))?;
            t.st.before = Some(r);
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
        write_metric(
            &mut metrics,
            &metrics_path,
            &json!({ "step": rec.step, "epoch": rec.epoch, "loss": finite_or_null(loss), "lr": rec.lr, "grad_norm": finite_or_null(norm),
                     "tokens": rec.tokens, "tokens_per_s": rec.tokens_per_s, "elapsed_s": rec.elapsed_s, "skipped": rec.skipped }),
        )?;
        if rec.skipped && t.st.bad_streak >= cfg.max_bad_steps {
            // Stop (the step is reported above); the newest checkpoint stays as it is.
            let dir = cfg.out.join(CHECKPOINT_DIR);
            let ckpt = match saved_step {
                Some(s) => format!("the last checkpoint (step {s}) is in {}", dir.display()),
                None => format!("no checkpoint was written yet (one is written every {} steps to {})", cfg.save_every, dir.display()),
            };
            return Err(Error::InvalidArgument {
                op: "finetune",
                msg: format!(
                    "stopped at step {}: {} steps in a row had a non-finite loss or gradient (lower the learning rate, or check the data); {ckpt}",
                    t.st.step, t.st.bad_streak,
                ),
            });
        }
        let last = t.st.step == total;
        if let (Some(e), Some(every)) = (eval, cfg.eval_every) {
            if t.st.step % every == 0 && !last {
                let r = t.evaluate(e)?;
                observer.on_eval(&r);
                write_metric(&mut metrics, &metrics_path, &json!({ "eval": eval_json(&r) }))?;
                t.st.evals.push(r);
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
            let r = t.evaluate(e)?;
            observer.on_eval(&r);
            write_metric(&mut metrics, &metrics_path, &json!({ "eval": eval_json(&r) }))?;
            t.st.evals.push(r.clone());
            Some(r)
        }
        None => None,
    };
    let saved = t.save(base)?;
    let st = &t.st;
    let train_curve = &st.history;
    let smooth = plot::smooth(train_curve, (train_curve.len() / 20).max(1));
    let evals: Vec<(f64, f64)> = st.before.iter().chain(st.evals.iter()).map(|e| (e.step as f64, e.loss)).collect();
    let picture = plot::svg(
        &format!("{} fine-tuning: loss", cfg.method.name()),
        &[
            plot::Series { name: "train (per step)", points: train_curve, color: "#9ecae1", dots: false },
            plot::Series { name: "train (running mean)", points: &smooth, color: "#1f77b4", dots: false },
            plot::Series { name: "eval", points: &evals, color: "#d62728", dots: true },
        ],
    );
    crate::io::write_atomic(&cfg.out.join("loss.svg"), picture.as_bytes())?;
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
