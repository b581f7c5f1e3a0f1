//! `tinytune finetune`: flags, or a TOML file with the same keys (`--config run.toml`; a flag
//! given on the command line wins over the file).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tinytune::cli::FinetuneArgs;
use tinytune::io::Tokenizer;
use tinytune::optim::ScheduleKind;
use tinytune::peft;
use tinytune::train::data::{DataKind, DataOptions, Dataset, Holdout};
use tinytune::train::select::{select_layers, LayerPolicy, SelectOptions};
use tinytune::train::{
    self, DpoConfig, EvalRecord, GrpoConfig, Observer, OptimizerKind, PpoConfig, PreferenceObjective, RewardModel, StepRecord, TrainConfig,
};
use tinytune::{Error, Result};

use super::progress;

/// Draws a progress bar (step, loss, tokens/s, ETA) and prints evaluations and messages. When
/// stderr is not a terminal the bar is hidden, so messages are printed plainly (indicatif's
/// `println` drops them then) and a step line is printed every tenth of the run.
struct Progress {
    bar: ProgressBar,
    quiet: bool,
    /// The classification head starts untrained (not from a checkpoint's weights).
    fresh_head: bool,
    /// Hidden bar: print a step line every this many steps.
    every: u64,
    /// The first step of this run (a resumed run starts later), for the time per step.
    start: u64,
    /// Set by Ctrl-C: stop after the current step (with a checkpoint).
    stop: Arc<AtomicBool>,
    /// Evaluations every this many steps (besides before and after), and whether there is
    /// held-out data at all: the ETA counts the evaluations still to come.
    eval_every: Option<u64>,
    evaluates: bool,
    /// Seconds spent in training steps (not evaluating) in this run, and when the current
    /// stretch of steps began.
    train_secs: f64,
    mark: Instant,
    /// The current evaluation (its task knows when it began); the last one's duration.
    eval: Option<progress::Task>,
    last_eval_secs: Option<f64>,
    total: u64,
}

impl Progress {
    fn say(&self, msg: &str) {
        self.bar.suspend(|| note!("{msg}"));
    }

    /// Time left after `step`: the remaining steps at this run's mean time per training step,
    /// plus the evaluations still to come at the last one's duration.
    fn eta(&self, step: u64) -> Option<f64> {
        let done = step.checked_sub(self.start).filter(|&d| d > 0)?;
        let per_step = self.train_secs / done as f64;
        let left = self.total.saturating_sub(step);
        let evals_left = match (self.evaluates, self.eval_every) {
            (false, _) => 0,
            // Periodic ones strictly between here and the end, and the final one.
            (true, Some(e)) => (self.total.saturating_sub(1) / e).saturating_sub(step / e) + 1,
            (true, None) => 1,
        };
        Some(per_step * left as f64 + self.last_eval_secs.unwrap_or(0.0) * evals_left as f64)
    }
}

impl Observer for Progress {
    fn on_start(&mut self, start: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(start);
        self.every = (total / 10).max(1);
        self.start = start;
        self.total = total;
        self.mark = Instant::now();
    }
    fn on_step(&mut self, r: &StepRecord) {
        self.train_secs += self.mark.elapsed().as_secs_f64();
        self.mark = Instant::now();
        let msg = format!("loss {:.4}  lr {:.2e}  {:.0} tok/s  epoch {:.2}", r.loss, r.lr, r.tokens_per_s, r.epoch);
        let eta = self.eta(r.step).map_or("?".into(), progress::clock);
        if self.bar.is_hidden() && (r.step % self.every == 0 || r.step == r.total_steps) {
            // A log file gets what the bar shows: elapsed time, the mean time per step, the ETA.
            let per_step = self.train_secs / (r.step - self.start).max(1) as f64;
            self.say(&format!(
                "step {}/{}: {msg}  [{} elapsed, {per_step:.2} s/step, ETA {eta}]",
                r.step,
                r.total_steps,
                progress::clock(r.elapsed_s),
            ));
        }
        self.bar.set_prefix(eta);
        self.bar.set_position(r.step);
        self.bar.set_message(msg);
    }
    fn on_eval(&mut self, r: &EvalRecord) {
        if let Some(task) = self.eval.take() {
            self.last_eval_secs = Some(task.elapsed_secs());
            task.finish();
        }
        self.mark = Instant::now();
        if !self.quiet {
            self.say(&describe_eval(r, self.fresh_head));
        }
    }
    fn on_eval_start(&mut self, step: u64, examples: usize) {
        let what = format!("evaluating {examples} held-out examples at step {step}");
        if self.bar.is_hidden() {
            self.say(&format!("{what}..."));
            self.eval = Some(progress::Task::new(what, examples));
        } else {
            self.bar.set_message(format!("{what}: 0/{examples}"));
            self.eval = Some(progress::Task::hidden(what, examples));
        }
    }
    fn on_eval_progress(&mut self, done: usize, examples: usize) {
        if let Some(task) = self.eval.as_mut() {
            task.set(done, examples);
            if !self.bar.is_hidden() {
                self.bar.set_message(format!("{}: {done}/{examples}", task.what()));
            }
        }
    }
    fn on_message(&mut self, msg: &str) {
        self.say(msg);
    }
    fn keep_going(&mut self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}

fn describe_eval(r: &EvalRecord, fresh_head: bool) -> String {
    let metric = |k: &str| r.metric(k);
    if let (Some(acc), Some(margin)) = (metric("rewards/accuracies"), metric("rewards/margins")) {
        // Preference pairs: how often the chosen completion is preferred, and by how much.
        let at_reference = metric("rewards/chosen") == Some(0.0) && metric("rewards/rejected") == Some(0.0);
        return format!(
            "eval @ step {:>4}: loss {:.4}  preferred {:.2}%  reward margin {:.4} (chosen {:.4}, rejected {:.4})  ({} pairs){}",
            r.step,
            r.loss,
            100.0 * acc,
            margin,
            metric("rewards/chosen").unwrap_or(f64::NAN),
            metric("rewards/rejected").unwrap_or(f64::NAN),
            r.examples,
            if at_reference { "; the policy is still its reference: every implicit reward is 0" } else { "" }
        );
    }
    if let (Some(reward), Some(kl), None) = (metric("reward"), metric("kl"), metric("reward_std")) {
        // PPO: the mean reward of the policy's own samples, how far it moved, the value's error.
        return format!(
            "eval @ step {:>4}: mean reward {:.4}  KL {:.4} per completion  value loss {:.4}  completion length {:.1}  ({} prompts)",
            r.step,
            reward,
            kl,
            metric("value_loss").unwrap_or(f64::NAN),
            metric("completion_length").unwrap_or(f64::NAN),
            r.examples
        );
    }
    if let (Some(reward), Some(kl)) = (metric("reward"), metric("kl")) {
        // GRPO: the mean reward of the policy's own samples, and how far it moved.
        return format!(
            "eval @ step {:>4}: mean reward {:.4} (std within groups {:.4})  KL {:.4} per token  completion length {:.1}  ({} prompts)",
            r.step,
            reward,
            metric("reward_std").unwrap_or(f64::NAN),
            kl,
            metric("completion_length").unwrap_or(f64::NAN),
            r.examples
        );
    }
    match r.accuracy {
        // The head is new: before training its accuracy is chance by construction.
        Some(a) if r.step == 0 && fresh_head => format!(
            "eval @ step {:>4}: accuracy {:.2}%  mean loss {:.4}  ({} examples; a new, untrained head: chance level)",
            r.step,
            100.0 * a,
            r.loss,
            r.examples
        ),
        Some(a) => format!("eval @ step {:>4}: accuracy {:.2}%  mean loss {:.4}  ({} examples)", r.step, 100.0 * a, r.loss, r.examples),
        None => format!("eval @ step {:>4}: mean NLL {:.4}  perplexity {:.3}  ({} examples)", r.step, r.loss, r.perplexity(), r.examples),
    }
}

/// What a directory holds of an earlier run (a checkpoint, a result, metrics), if anything.
fn previous_run(out: &std::path::Path) -> Option<String> {
    let state = out.join("checkpoint/state.json");
    if let Ok(text) = std::fs::read_to_string(&state) {
        let step = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["step"].as_u64());
        return Some(step.map_or("a checkpoint".into(), |s| format!("a run's checkpoint (step {s})")));
    }
    ["adapter", "model", "metrics.jsonl"].iter().find(|n| out.join(n).exists()).map(|n| format!("the {n} of an earlier run"))
}

pub fn finetune(args: FinetuneArgs) -> Result<()> {
    let a = args.with_file()?;
    let need =
        |v: Option<PathBuf>, flag: &str| v.ok_or_else(|| Error::InvalidArgument { op: "finetune", msg: format!("--{flag} is required") });
    // A --model from a --config file has not been through the flag's parser: resolve it too.
    let model_path = tinytune::io::resolve_model(&need(a.model.clone(), "model")?.to_string_lossy())?;
    let data_path = need(a.data.clone(), "data")?;
    let clip = match a.clip {
        None => Some(1.0),
        Some(0.0) => None,
        Some(c) if c > 0.0 && c.is_finite() => Some(c),
        Some(c) => return Err(Error::InvalidArgument { op: "--clip", msg: format!("must be positive (or 0 for no clipping), got {c}") }),
    };
    let device = super::device_from(a.device.as_deref())?;
    // Full fine-tuning trains the base weights: `auto` must not round them to f16 first.
    let base_dtype = match a.base_dtype.unwrap_or_default() {
        tinytune::quant::BaseDType::Auto if a.method.as_deref() == Some("full") => tinytune::quant::BaseDType::Keep,
        b => b,
    };
    let mut model = super::load_model(&model_path, &device, base_dtype)?;
    let tok = Tokenizer::for_model(&model_path)?;
    let method_name = a.method.as_deref().unwrap_or("lora");
    // The method's own settings, by flag name; the method says which it reads.
    let layer_policy = a.layers.as_deref().map(LayerPolicy::parse).transpose()?.flatten();
    let mut settings = a.method_settings(&|t| tok.encode(t, false))?;
    let mut method = peft::configure(method_name, &settings)?;
    if layer_policy.is_some() && !peft::registration(method_name)?.settings.contains(&"layers") {
        let with: Vec<&str> = peft::METHODS.iter().filter(|m| m.settings.contains(&"layers")).map(|m| m.name).collect();
        return Err(Error::InvalidArgument {
            op: "--layers",
            msg: format!("method {method_name} does not attach per layer (--layers is a setting of {})", with.join(", ")),
        });
    }
    let seed = a.seed.unwrap_or(0);
    // Without --seq-len, examples are cut to fit the model (an explicit longer one is an error
    // naming the line).
    let seq_len = a.seq_len.unwrap_or_else(|| model.max_positions().map_or(256, |c| c.min(256)));
    let add_special_tokens = !a.no_special_tokens.unwrap_or(false);
    let opts = DataOptions { seq_len, context: model.max_positions(), pack: a.pack.unwrap_or(false), add_eos: true, add_special_tokens };
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
    let prompts_only = train_set.kind() == DataKind::Prompts;
    let preference = match a.objective.as_deref().unwrap_or(if prompts_only { "grpo" } else { "dpo" }) {
        "dpo" => PreferenceObjective::Dpo(DpoConfig {
            beta: a.beta.unwrap_or(0.1),
            loss: a.dpo_loss.as_deref().unwrap_or("sigmoid").parse()?,
            label_smoothing: a.label_smoothing.unwrap_or(0.0),
        }),
        "reward" => PreferenceObjective::Reward,
        "grpo" => PreferenceObjective::Grpo(GrpoConfig {
            group: a.num_generations.unwrap_or(8),
            beta: a.beta.unwrap_or(0.04),
            max_new_tokens: a.max_new_tokens.unwrap_or(32),
            temperature: a.temperature.unwrap_or(1.0),
            eos: tok.eos_id(),
        }),
        "ppo" => {
            let d = PpoConfig::default();
            let clip = a.cliprange.unwrap_or(d.cliprange);
            PreferenceObjective::Ppo(PpoConfig {
                kl_coef: a.beta.unwrap_or(d.kl_coef),
                cliprange: clip,
                cliprange_value: clip,
                vf_coef: a.vf_coef.unwrap_or(d.vf_coef),
                epochs: a.ppo_epochs.unwrap_or(d.epochs),
                max_new_tokens: a.max_new_tokens.unwrap_or(d.max_new_tokens),
                temperature: a.temperature.unwrap_or(d.temperature),
                eos: tok.eos_id(),
                ..d
            })
        }
        o => return Err(Error::InvalidArgument { op: "--objective", msg: format!("unknown objective '{o}' (dpo, reward, grpo or ppo)") }),
    };
    // A setting of another objective would be silently ignored: say so instead.
    let is_ppo = matches!(preference, PreferenceObjective::Ppo(_));
    for (flag, given, of_ppo) in [
        ("--ppo-epochs", a.ppo_epochs.is_some(), true),
        ("--cliprange", a.cliprange.is_some(), true),
        ("--vf-coef", a.vf_coef.is_some(), true),
        ("--num-generations", a.num_generations.is_some(), false),
    ] {
        let wanted = if of_ppo { is_ppo } else { matches!(preference, PreferenceObjective::Grpo(_)) };
        if given && !wanted {
            let of = if of_ppo { "ppo" } else { "grpo" };
            return Err(Error::InvalidArgument { op: "finetune", msg: format!("{flag} is a setting of --objective {of}") });
        }
    }
    let online = matches!(preference, PreferenceObjective::Grpo(_) | PreferenceObjective::Ppo(_));
    if prompts_only != online {
        return Err(Error::InvalidArgument {
            op: "--objective",
            msg: format!(
                "{}: grpo and ppo train on {{\"prompt\"}} lines alone, dpo and reward on {{\"prompt\", \"chosen\", \"rejected\"}} pairs",
                data_path.display()
            ),
        });
    }
    let reward_model = match (&a.reward_model, prompts_only) {
        (Some(dir), true) => {
            Some(Arc::new(RewardModel::load(&model_path, dir, a.reward_label.unwrap_or(1), &device, a.base_dtype.unwrap_or_default())?))
        }
        (None, true) => {
            return Err(Error::InvalidArgument { op: "--reward-model", msg: "GRPO and PPO need a reward: --reward-model DIR".into() })
        }
        (Some(_), false) => {
            return Err(Error::InvalidArgument { op: "--reward-model", msg: "is the reward of GRPO and PPO (prompt-only data)".into() })
        }
        (None, false) => None,
    };
    if !matches!(train_set.kind(), DataKind::Preference | DataKind::Prompts)
        && (a.objective.is_some() || a.beta.is_some() || a.dpo_loss.is_some())
    {
        return Err(Error::InvalidArgument {
            op: "--objective",
            msg: format!(
                "{} is not preference data: dpo and reward train on {{\"prompt\", \"chosen\", \"rejected\"}} lines",
                data_path.display()
            ),
        });
    }
    if train_set.kind() == DataKind::Preference && preference == PreferenceObjective::Reward && a.precompute_ref_log_probs.unwrap_or(false)
    {
        return Err(Error::InvalidArgument { op: "--precompute-ref-log-probs", msg: "is for DPO; a reward model has no reference".into() });
    }
    for set in std::iter::once(&train_set).chain(eval_set.as_ref()) {
        if set.stats().identical_pairs > 0 {
            note!(
                "warning: {}: {} pair(s) whose chosen and rejected completions are the same tokens were dropped (the first on line {})",
                set.path(),
                set.stats().identical_pairs,
                set.stats().first_identical_line.unwrap_or(0)
            );
        }
    }
    if a.precompute_ref_log_probs.unwrap_or(false) && train_set.kind() == DataKind::Preference {
        // The reference is the model as loaded (no method attached yet).
        let bs = a.batch_size.unwrap_or(8);
        for set in std::iter::once(&mut train_set).chain(eval_set.as_mut()) {
            let task = progress::Task::new(format!("reference log-probabilities of {} pairs", set.len()), set.len());
            let mut task = Some(task);
            let values = train::preference::compute_reference_log_probs(model.as_ref(), set, bs, &device, &mut |d, n| {
                if let Some(t) = task.as_mut() {
                    t.set(d, n)
                }
            })?;
            if let Some(t) = task.take() {
                t.finish();
            }
            set.set_reference_log_probs(&values)?;
        }
    }
    // --layers auto / auto:K: the blocks chosen from the frozen model's reading of the data.
    let selection = match layer_policy {
        Some(policy) => {
            let opts = SelectOptions {
                seed,
                batch_size: a.batch_size.unwrap_or(8).max(8),
                pooling: a.pooling.as_deref().unwrap_or("last").parse()?,
                ..SelectOptions::default()
            };
            let sel = progress::spin(
                &format!(
                    "reading {} examples through every layer (--layers {})",
                    opts.examples.min(train_set.len()),
                    a.layers.as_deref().unwrap_or("")
                ),
                false,
                || select_layers(model.as_ref(), &train_set, &opts, policy, &device),
            )?;
            note!("layer selection ({} reading of {} examples):\n{}", sel.reading, sel.examples, sel.table());
            note!("training layers {} ({} of {})", sel.layers_arg(), sel.chosen.len(), sel.gains.len());
            settings.set("layers", Some(json!(sel.chosen)));
            method = peft::configure(method_name, &settings)?;
            Some(sel)
        }
        None => None,
    };
    let cfg = TrainConfig {
        method: method.clone(),
        pooling: a.pooling.as_deref().unwrap_or("last").parse()?,
        num_classes: a.num_classes,
        preference,
        reward_model,
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
        length_buckets: a.length_buckets.unwrap_or(0),
        warmup_steps: a.warmup.unwrap_or(0),
        schedule: ScheduleKind::from_name(a.schedule.as_deref().unwrap_or("linear"))?,
        weight_decay: a.weight_decay.unwrap_or(0.0),
        clip,
        seed,
        gradient_checkpointing: a.gradient_checkpointing.unwrap_or(false),
        eval_every: a.eval_every,
        save_every: a.save_every.unwrap_or(50),
        max_bad_steps: 5,
        eval_before: !a.skip_eval_before.unwrap_or(false),
        out: a.out.unwrap_or_else(|| PathBuf::from("tinytune-out")),
        resume: a.resume.unwrap_or(false),
        resume_weights_only: a.resume_weights_only.unwrap_or(false),
        stop_on_divergence: match a.on_divergence.as_deref().unwrap_or("stop") {
            "stop" => true,
            "warn" => false,
            o => return Err(Error::InvalidArgument { op: "--on-divergence", msg: format!("'{o}' is not stop or warn") }),
        },
    };
    if !(cfg.resume || cfg.resume_weights_only || a.overwrite.unwrap_or(false)) {
        if let Some(what) = previous_run(&cfg.out) {
            return Err(Error::InvalidArgument {
                op: "finetune",
                msg: format!(
                    "{} already holds {what}: --resume continues it, --overwrite replaces it, or give another --out",
                    cfg.out.display()
                ),
            });
        }
    }
    let json_out = a.json.unwrap_or(false);
    let kind = match train_set.kind() {
        DataKind::Lm => "language modelling",
        DataKind::Classification => "classification",
        DataKind::Preference => match cfg.preference {
            PreferenceObjective::Dpo(_) => "preference pairs, DPO",
            PreferenceObjective::Reward => "preference pairs, reward model",
            PreferenceObjective::Grpo(_) | PreferenceObjective::Ppo(_) => "prompts",
        },
        DataKind::Prompts if matches!(cfg.preference, PreferenceObjective::Ppo(_)) => "prompts, PPO",
        DataKind::Prompts => "prompts, GRPO",
    };
    note!(
        "{} on {} ({kind}): {} training examples, {} held out; device {device}",
        method.name(),
        data_path.display(),
        train_set.len(),
        eval_set.as_ref().map_or(0, |e| e.len())
    );
    // Counts are per file (a held-out split shares its file's).
    let separate_eval = eval_set.as_ref().filter(|_| a.eval_data.is_some());
    for set in std::iter::once(&train_set).chain(separate_eval) {
        if set.stats().truncated > 0 {
            note!(
                "note: {} examples of {} were longer than --seq-len {} and were cut to it",
                set.stats().truncated,
                set.path(),
                set.seq_len()
            );
        }
    }
    let bar = ProgressBar::new(1);
    // The ETA (prefix) is the Progress's own: steps and evaluations still to come.
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} < {prefix}] {msg}").expect("valid template"));
    bar.set_prefix("?");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // A second Ctrl-C (or a failure to install the handler) falls back to the default: exit now.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        note!("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to quit at once)");
    });
    let mut progress = Progress {
        bar,
        quiet: false,
        fresh_head: !cfg.resume_weights_only,
        every: 1,
        start: 0,
        stop,
        eval_every: cfg.eval_every,
        evaluates: eval_set.is_some(),
        train_secs: 0.0,
        mark: Instant::now(),
        eval: None,
        last_eval_secs: None,
        total: 0,
    };
    // The adapter names its base: a name given, a GGUF's own record of its source, or the path.
    let base = match &a.base_model_name {
        Some(n) => n.clone(),
        None => tinytune::io::GgufFile::open(&model_path)
            .ok()
            .and_then(|f| f.opt_str("general.source.huggingface.repository").ok().flatten().map(str::to_string))
            .or_else(|| tinytune::io::hf_cache_id(&model_path))
            .unwrap_or_else(|| model_path.display().to_string()),
    };
    let report = train::train(model.as_mut(), &train_set, eval_set.as_ref(), &cfg, &base, &device, &mut progress)?;
    progress.bar.finish();
    if let Some(sel) = &selection {
        tinytune::io::write_atomic(
            &cfg.out.join("layer-selection.json"),
            serde_json::to_string_pretty(&sel.to_json()).unwrap_or_default().as_bytes(),
        )?;
        tinytune::io::write_atomic(&cfg.out.join("layers.svg"), sel.svg("gain of each block (trained: blue)").as_bytes())?;
    }
    if report.interrupted {
        note!(
            "stopped at step {}; the checkpoint is in {}: continue with the same command and --resume",
            report.steps,
            report.saved.display()
        );
        return Err(Error::InvalidArgument { op: "finetune", msg: "interrupted".into() });
    }
    if !add_special_tokens && report.saved.join(tinytune::peft::format::EXTRA_FILE).exists() {
        tinytune::peft::format::record(&report.saved, "add_special_tokens", json!(false))?;
    }
    if report.saved.join("config.json").exists() {
        // A whole model (full fine-tuning): its tokenizer goes beside it.
        tok.save_hf(&report.saved)?;
    }
    if json_out {
        // `tokens`: the target tokens a language-modelling loss is the mean over.
        let ev = |e: &Option<EvalRecord>| {
            e.as_ref().map(|e| {
                let tokens = e.accuracy.is_none().then_some(e.units);
                let mut v = json!({ "loss": e.loss, "accuracy": e.accuracy, "examples": e.examples, "tokens": tokens });
                for (k, m) in &e.metrics {
                    v[k] = json!(m);
                }
                v
            })
        };
        outln!(
            "{}",
            json!({ "steps": report.steps, "skipped_steps": report.skipped_steps, "trainable_parameters": report.trainable_parameters,
                    "before": ev(&report.before), "after": ev(&report.after), "final_loss": report.final_loss,
                    "saved": report.saved, "out": cfg.out })
        );
    } else {
        outln!("trainable parameters: {}", report.trainable_parameters);
        if let Some(b) = &report.before {
            outln!("before: {}", describe_eval(b, progress.fresh_head));
        }
        if let Some(b) = &report.after {
            outln!("after:  {}", describe_eval(b, false));
        }
        let rewards = cfg.out.join("rewards.svg");
        outln!(
            "saved {} ; loss curve {}{} ; metrics {}",
            report.saved.display(),
            cfg.out.join("loss.svg").display(),
            if rewards.exists() { format!(" ; rewards {}", rewards.display()) } else { String::new() },
            cfg.out.join("metrics.jsonl").display()
        );
    }
    Ok(())
}
