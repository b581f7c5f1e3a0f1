//! `tinytune finetune`: flags, or a TOML file with the same keys (`--config run.toml`; a flag
//! given on the command line wins over the file).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::json;
use tinytune::io::Tokenizer;
use tinytune::models;
use tinytune::optim::ScheduleKind;
use tinytune::peft::{self, Settings};
use tinytune::train::data::{DataKind, DataOptions, Dataset, Holdout};
use tinytune::train::{self, EvalRecord, Observer, OptimizerKind, StepRecord, TrainConfig};
use tinytune::{Error, Result};

/// Every option is optional so that a `--config` file can supply it; defaults are applied
/// after merging (see `resolve`).
#[derive(Args, Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FinetuneArgs {
    /// A TOML file with any of these options (keys as the flag names: `lr = 1e-4`,
    /// `target-modules = ["q_proj", "v_proj"]`).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Model directory or .gguf file.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data, JSONL: {"text"}, {"prompt","completion"}, {"messages"} or {"text","label"}.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out data (same format). Without it, --eval-split of the training data is held out.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Fraction of the training data held out for evaluation when there is no --eval-data [default: 0.1].
    #[arg(long)]
    eval_split: Option<f64>,
    /// lora, dora, full, head (a classifier head alone), ia3, prefix, prompt or adapter (bottleneck) [default: lora].
    #[arg(long)]
    method: Option<String>,
    /// LoRA rank [default: 8].
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha/rank [default: 16].
    #[arg(long)]
    alpha: Option<f64>,
    /// Dropout on the LoRA input [default: 0.05].
    #[arg(long)]
    dropout: Option<f64>,
    /// rsLoRA scaling alpha/√rank.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    rslora: Option<bool>,
    /// Module names (comma-separated), patterns with *, or all-linear [default: q_proj,v_proj].
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    /// Only these transformer blocks: comma-separated indices or ranges (0-3,8).
    #[arg(long)]
    layers: Option<String>,
    /// IA³: targets whose input is scaled instead of their output (a subset of
    /// --target-modules) [default with default targets: down_proj / mlp.c_proj].
    #[arg(long, value_delimiter = ',')]
    feedforward_modules: Option<Vec<String>>,
    /// Prefix and prompt tuning: the number of virtual tokens [default: 20].
    #[arg(long)]
    num_virtual_tokens: Option<usize>,
    /// Prompt tuning: random, text (the embeddings of --prompt-init-text) or vocab (of random
    /// vocabulary tokens) [default: random, or text when a text is given].
    #[arg(long)]
    prompt_init: Option<String>,
    /// Prompt tuning: the text whose token embeddings start the virtual tokens (repeated to fill them).
    #[arg(long)]
    prompt_init_text: Option<String>,
    /// Prefix tuning: train the prefix through an MLP (hidden --encoder-hidden-size); the saved
    /// adapter holds its output.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    prefix_projection: Option<bool>,
    /// Prefix tuning: the projection MLP's hidden width [default: 512].
    #[arg(long)]
    encoder_hidden_size: Option<usize>,
    /// Bottleneck adapters: houlsby (after attention and MLP) or pfeiffer (after the MLP) [default: houlsby].
    #[arg(long)]
    adapter_kind: Option<String>,
    /// Bottleneck adapters: bottleneck width = hidden size / this [default: 16].
    #[arg(long)]
    reduction_factor: Option<usize>,
    /// Bottleneck adapters: relu, silu or gelu_tanh [default: relu].
    #[arg(long)]
    non_linearity: Option<String>,
    /// Any method setting by name, for settings without a flag of their own (a method added
    /// to the registry needs no CLI edit): `--set num-virtual-tokens=8`; the value is read as
    /// JSON when it parses (numbers, true/false, lists), else as a string. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Option<Vec<String>>,
    /// Peak learning rate [default: 2e-4; full fine-tuning 2e-5, others as the method says].
    #[arg(long)]
    lr: Option<f64>,
    /// Passes over the training data [default: 1].
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Examples per micro-batch [default: 8].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Most tokens per example (longer ones are truncated) [default: 256, or the model's context if shorter].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Pack {"text"} documents into full windows of --seq-len tokens instead of padding.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pack: Option<bool>,
    /// Use a seeded random N of the training examples (after the held-out split).
    #[arg(long)]
    max_train_examples: Option<usize>,
    /// Use a seeded random N of the held-out examples.
    #[arg(long)]
    max_eval_examples: Option<usize>,
    /// Warm-up steps [default: 0].
    #[arg(long)]
    warmup: Option<u64>,
    /// constant, linear or cosine [default: linear].
    #[arg(long)]
    schedule: Option<String>,
    /// Decoupled weight decay of the matrices [default: 0].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Clip the global gradient norm; 0 turns clipping off [default: 1].
    #[arg(long)]
    clip: Option<f64>,
    /// adamw or sgd [default: adamw].
    #[arg(long)]
    optimizer: Option<String>,
    /// Seed of the data order, the initialisation and dropout [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Recompute each transformer block in backward (less memory, ~30% more compute).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    gradient_checkpointing: Option<bool>,
    /// Classification: pool the last real token (last) or the mean (mean) [default: last].
    #[arg(long)]
    pooling: Option<String>,
    /// Classification: classes of the new head [default: largest label + 1].
    #[arg(long)]
    num_classes: Option<usize>,
    /// Evaluate every N steps (always before and after).
    #[arg(long)]
    eval_every: Option<u64>,
    /// Write a checkpoint every N steps (always at the end) [default: 50].
    #[arg(long)]
    save_every: Option<u64>,
    /// Output directory [default: tinytune-out].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the last checkpoint in --out (checked: its checksum, optimizer state and
    /// settings must match this run).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    resume: Option<bool>,
    /// Start a new run (step 0, new optimizer, these settings) from the trained weights of the
    /// checkpoint in --out alone.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", conflicts_with = "resume")]
    resume_weights_only: Option<bool>,
    /// When the loss grows a hundredfold or the perplexity becomes infinite: stop (naming the
    /// last checkpoint) or warn and go on [default: stop].
    #[arg(long)]
    on_divergence: Option<String>,
    /// auto, cpu, gpu or gpu-software [default: $TINYTUNE_DEVICE or auto].
    #[arg(long)]
    device: Option<String>,
    /// Print the final report as JSON.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    json: Option<bool>,
}

macro_rules! merge_fields {
    ($cli:ident, $file:ident, $($f:ident),*) => { $( if $cli.$f.is_none() { $cli.$f = $file.$f.take(); } )* };
}

impl FinetuneArgs {
    /// Fill the options not given on the command line from the `--config` file.
    fn with_file(mut self) -> Result<FinetuneArgs> {
        let Some(path) = self.config.clone() else { return Ok(self) };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.display().to_string(), msg: e.to_string() })?;
        let ferr = |msg: String| Error::Format { path: path.display().to_string(), msg };
        let value: toml::Table = toml::from_str(&text).map_err(|e| ferr(e.to_string()))?;
        // Accept snake_case keys too: normalise to the flags' kebab-case.
        let value: toml::Table = value.into_iter().map(|(k, v)| (k.replace('_', "-"), v)).collect();
        let mut file: FinetuneArgs = value.try_into().map_err(|e: toml::de::Error| ferr(e.message().to_string()))?;
        merge_fields!(
            self,
            file,
            model,
            data,
            eval_data,
            eval_split,
            method,
            rank,
            alpha,
            dropout,
            rslora,
            target_modules,
            layers,
            feedforward_modules,
            num_virtual_tokens,
            prompt_init,
            prompt_init_text,
            prefix_projection,
            encoder_hidden_size,
            adapter_kind,
            reduction_factor,
            non_linearity,
            set,
            lr,
            epochs,
            max_steps,
            batch_size,
            grad_accum,
            seq_len,
            pack,
            max_train_examples,
            max_eval_examples,
            warmup,
            schedule,
            weight_decay,
            clip,
            optimizer,
            seed,
            gradient_checkpointing,
            pooling,
            num_classes,
            eval_every,
            save_every,
            out,
            resume,
            resume_weights_only,
            on_divergence,
            device,
            json
        );
        Ok(self)
    }
}

/// `0-3,8` → [0, 1, 2, 3, 8].
fn parse_layers(s: &str) -> Result<Vec<usize>> {
    let bad = |p: &str| Error::InvalidArgument { op: "--layers", msg: format!("'{p}' is not a layer index or range (e.g. 0-3,8)") };
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad(part))?, b.trim().parse().map_err(|_| bad(part))?);
                if a > b {
                    return Err(bad(part));
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad(part))?),
        }
    }
    Ok(out)
}

/// Draws a progress bar (step, loss, tokens/s, ETA) and prints evaluations and messages. When
/// stderr is not a terminal the bar is hidden, so messages are printed plainly (indicatif's
/// `println` drops them then) and a step line is printed every tenth of the run.
struct Progress {
    bar: ProgressBar,
    quiet: bool,
    /// Hidden bar: print a step line every this many steps.
    every: u64,
    /// Set by Ctrl-C: stop after the current step (with a checkpoint).
    stop: Arc<AtomicBool>,
}

impl Progress {
    fn say(&self, msg: &str) {
        self.bar.suspend(|| note!("{msg}"));
    }
}

impl Observer for Progress {
    fn on_start(&mut self, start: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(start);
        self.bar.reset_eta();
        self.every = (total / 10).max(1);
    }
    fn on_step(&mut self, r: &StepRecord) {
        let msg = format!("loss {:.4}  lr {:.2e}  {:.0} tok/s  epoch {:.2}", r.loss, r.lr, r.tokens_per_s, r.epoch);
        if self.bar.is_hidden() && (r.step % self.every == 0 || r.step == r.total_steps) {
            self.say(&format!("step {}/{}: {msg}", r.step, r.total_steps));
        }
        self.bar.set_position(r.step);
        self.bar.set_message(msg);
    }
    fn on_eval(&mut self, r: &EvalRecord) {
        if !self.quiet {
            self.say(&describe_eval(r));
        }
    }
    fn on_message(&mut self, msg: &str) {
        self.say(msg);
    }
    fn keep_going(&mut self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}

fn describe_eval(r: &EvalRecord) -> String {
    match r.accuracy {
        Some(a) => format!("eval @ step {:>4}: accuracy {:.2}%  mean loss {:.4}  ({} examples)", r.step, 100.0 * a, r.loss, r.examples),
        None => format!("eval @ step {:>4}: mean NLL {:.4}  perplexity {:.3}  ({} examples)", r.step, r.loss, r.perplexity(), r.examples),
    }
}

pub fn finetune(args: FinetuneArgs) -> Result<()> {
    let a = args.with_file()?;
    let need =
        |v: Option<PathBuf>, flag: &str| v.ok_or_else(|| Error::InvalidArgument { op: "finetune", msg: format!("--{flag} is required") });
    let model_path = need(a.model, "model")?;
    let data_path = need(a.data, "data")?;
    let clip = match a.clip {
        None => Some(1.0),
        Some(0.0) => None,
        Some(c) if c > 0.0 && c.is_finite() => Some(c),
        Some(c) => return Err(Error::InvalidArgument { op: "--clip", msg: format!("must be positive (or 0 for no clipping), got {c}") }),
    };
    let device = super::device_from(a.device.as_deref())?;
    let mut model = models::load(&model_path, &device)?;
    let tok = Tokenizer::for_model(&model_path)?;
    let method_name = a.method.as_deref().unwrap_or("lora");
    // The method's own settings, by flag name; the method says which it reads.
    let mut settings = Settings::new();
    settings
        .set("rank", a.rank)
        .set("alpha", a.alpha)
        .set("dropout", a.dropout)
        .set("rslora", a.rslora)
        .set("target-modules", a.target_modules)
        .set("layers", a.layers.as_deref().map(parse_layers).transpose()?)
        .set("feedforward-modules", a.feedforward_modules)
        .set("num-virtual-tokens", a.num_virtual_tokens)
        .set("prompt-init", a.prompt_init)
        .set("prompt-init-ids", a.prompt_init_text.as_deref().map(|t| tok.encode(t, false)).transpose()?)
        .set("prompt-init-text", a.prompt_init_text)
        .set("prefix-projection", a.prefix_projection)
        .set("encoder-hidden-size", a.encoder_hidden_size)
        .set("adapter-kind", a.adapter_kind)
        .set("reduction-factor", a.reduction_factor)
        .set("non-linearity", a.non_linearity);
    for kv in a.set.iter().flatten() {
        let (k, v) = kv.split_once('=').ok_or_else(|| Error::InvalidArgument { op: "--set", msg: format!("'{kv}' is not KEY=VALUE") })?;
        let value: serde_json::Value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        settings.set(k.trim(), Some(value));
    }
    let method = peft::configure(method_name, &settings)?;
    let seed = a.seed.unwrap_or(0);
    // Without --seq-len, examples are cut to fit the model (an explicit longer one is an error
    // naming the line).
    let seq_len = a.seq_len.unwrap_or_else(|| model.max_positions().map_or(256, |c| c.min(256)));
    let opts = DataOptions { seq_len, context: model.max_positions(), pack: a.pack.unwrap_or(false), add_eos: true };
    let all = Dataset::load(&data_path, &tok, &opts)?;
    let (mut train_set, mut eval_set) = match &a.eval_data {
        Some(p) => (all, Some(Dataset::load(p, &tok, &DataOptions { pack: false, ..opts.clone() })?)),
        None => {
            let frac = a.eval_split.unwrap_or(0.1);
            if frac <= 0.0 || all.len() < 2 {
                (all, None)
            } else {
                let (t, e) = all.split_holdout(Holdout::Fraction(frac), seed)?;
                (t, Some(e))
            }
        }
    };
    if let Some(n) = a.max_train_examples {
        train_set = train_set.subset(n, seed)?;
    }
    if let (Some(n), Some(e)) = (a.max_eval_examples, eval_set.as_mut()) {
        *e = e.subset(n, seed)?;
    }
    let cfg = TrainConfig {
        method: method.clone(),
        pooling: a.pooling.as_deref().unwrap_or("last").parse()?,
        num_classes: a.num_classes,
        optimizer: match a.optimizer.as_deref().unwrap_or("adamw") {
            "adamw" => OptimizerKind::AdamW,
            "sgd" => OptimizerKind::Sgd,
            o => return Err(Error::InvalidArgument { op: "--optimizer", msg: format!("unknown optimizer '{o}' (adamw or sgd)") }),
        },
        lr: a.lr.unwrap_or(method.default_lr()),
        epochs: a.epochs.unwrap_or(1),
        max_steps: a.max_steps,
        batch_size: a.batch_size.unwrap_or(8),
        grad_accum: a.grad_accum.unwrap_or(1),
        warmup_steps: a.warmup.unwrap_or(0),
        schedule: ScheduleKind::from_name(a.schedule.as_deref().unwrap_or("linear"))?,
        weight_decay: a.weight_decay.unwrap_or(0.0),
        clip,
        seed,
        gradient_checkpointing: a.gradient_checkpointing.unwrap_or(false),
        eval_every: a.eval_every,
        save_every: a.save_every.unwrap_or(50),
        max_bad_steps: 5,
        out: a.out.unwrap_or_else(|| PathBuf::from("tinytune-out")),
        resume: a.resume.unwrap_or(false),
        resume_weights_only: a.resume_weights_only.unwrap_or(false),
        stop_on_divergence: match a.on_divergence.as_deref().unwrap_or("stop") {
            "stop" => true,
            "warn" => false,
            o => return Err(Error::InvalidArgument { op: "--on-divergence", msg: format!("'{o}' is not stop or warn") }),
        },
    };
    let json_out = a.json.unwrap_or(false);
    let kind = match train_set.kind() {
        DataKind::Lm => "language modelling",
        DataKind::Classification => "classification",
    };
    note!(
        "{} on {} ({kind}): {} training examples, {} held out; device {device}",
        method.name(),
        data_path.display(),
        train_set.len(),
        eval_set.as_ref().map_or(0, |e| e.len())
    );
    let bar = ProgressBar::new(1);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}").expect("valid template"));
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // A second Ctrl-C (or a failure to install the handler) falls back to the default: exit now.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        note!("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to quit at once)");
    });
    let mut progress = Progress { bar, quiet: false, every: 1, stop };
    let base = model_path.display().to_string();
    let report = train::train(model.as_mut(), &train_set, eval_set.as_ref(), &cfg, &base, &device, &mut progress)?;
    progress.bar.finish();
    if report.interrupted {
        note!(
            "stopped at step {}; the checkpoint is in {}: continue with the same command and --resume",
            report.steps,
            report.saved.display()
        );
        return Err(Error::InvalidArgument { op: "finetune", msg: "interrupted".into() });
    }
    if report.saved.join("config.json").exists() {
        // A whole model (full fine-tuning): its tokenizer goes beside it.
        tok.save_hf(&report.saved)?;
    }
    if json_out {
        let ev = |e: &Option<EvalRecord>| e.as_ref().map(|e| json!({ "loss": e.loss, "accuracy": e.accuracy, "examples": e.examples }));
        outln!(
            "{}",
            json!({ "steps": report.steps, "skipped_steps": report.skipped_steps, "trainable_parameters": report.trainable_parameters,
                    "before": ev(&report.before), "after": ev(&report.after), "final_loss": report.final_loss,
                    "saved": report.saved, "out": cfg.out })
        );
    } else {
        outln!("trainable parameters: {}", report.trainable_parameters);
        if let Some(b) = &report.before {
            outln!("before: {}", describe_eval(b));
        }
        if let Some(b) = &report.after {
            outln!("after:  {}", describe_eval(b));
        }
        outln!(
            "saved {} ; loss curve {} ; metrics {}",
            report.saved.display(),
            cfg.out.join("loss.svg").display(),
            cfg.out.join("metrics.jsonl").display()
        );
    }
    Ok(())
}
