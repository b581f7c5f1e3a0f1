//! The options of `tinytune finetune`: its flags and the `--config` TOML file with the same
//! keys (a flag given on the command line wins over the file). In the library, behind the
//! `cli` feature, so that the file's parser is fuzzed and tested as the rest is.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::peft::Settings;

/// Every option is optional so that a `--config` file can supply it; defaults are applied
/// after merging (see `resolve`).
#[derive(Args, Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FinetuneArgs {
    /// A TOML file with any of these options (keys as the flag names: `lr = 1e-4`,
    /// `target-modules = ["q_proj", "v_proj"]`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model directory, .gguf file, or Hugging Face id in the local cache (org/name[@revision]).
    #[arg(long, value_parser = crate::io::model_arg)]
    pub model: Option<PathBuf>,
    /// The frozen weights' type: auto (keep, but f32 matrices in f16 on a GPU with shader-f16),
    /// keep (as stored: GGUF blocks stay quantised, f16/bf16 stay 16-bit), f32, f16, bf16, nf4
    /// (QLoRA: the block linears in NF4) or int8 [default: auto].
    #[arg(long)]
    pub base_dtype: Option<crate::quant::BaseDType>,
    /// Training data, JSONL: {"text"}, {"prompt","completion"}, {"messages"}, {"text","label"}
    /// or {"prompt","chosen","rejected"}.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data (same format). Without it, --eval-split of the training data is held out.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Fraction of the training data held out for evaluation when there is no --eval-data [default: 0.1].
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// lora, dora, lora-xs, lora-sb, finegates, full, head (a classifier head alone), ia3, prefix, prompt or adapter (bottleneck) [default: lora].
    #[arg(long)]
    pub method: Option<String>,
    /// LoRA rank [default: 8].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha/rank [default: 16].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA input [default: 0.05].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// rsLoRA scaling alpha/√rank.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub rslora: Option<bool>,
    /// Module names (comma-separated), patterns with *, or all-linear [default: q_proj,v_proj].
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Only these transformer blocks: comma-separated indices or ranges (0-3,8); `auto`: from
    /// the block of greatest gain to the last, `auto:K`: the K blocks of greatest gain, by
    /// semantic layer selection on the training data (`tinytune select-layers`).
    #[arg(long)]
    pub layers: Option<String>,
    /// IA³: targets whose input is scaled instead of their output (a subset of
    /// --target-modules) [default with default targets: down_proj / mlp.c_proj].
    #[arg(long, value_delimiter = ',')]
    pub feedforward_modules: Option<Vec<String>>,
    /// Prefix and prompt tuning: the number of virtual tokens [default: 20].
    #[arg(long)]
    pub num_virtual_tokens: Option<usize>,
    /// Prompt tuning: random, text (the embeddings of --prompt-init-text) or vocab (of random
    /// vocabulary tokens) [default: random, or text when a text is given].
    #[arg(long)]
    pub prompt_init: Option<String>,
    /// Prompt tuning: the text whose token embeddings start the virtual tokens (repeated to fill them).
    #[arg(long)]
    pub prompt_init_text: Option<String>,
    /// Prefix tuning: train the prefix through an MLP (hidden --encoder-hidden-size); the saved
    /// adapter holds its output.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub prefix_projection: Option<bool>,
    /// Prefix tuning: the projection MLP's hidden width [default: 512].
    #[arg(long)]
    pub encoder_hidden_size: Option<usize>,
    /// Bottleneck adapters: houlsby (after attention and MLP) or pfeiffer (after the MLP) [default: houlsby].
    #[arg(long)]
    pub adapter_kind: Option<String>,
    /// Bottleneck adapters: bottleneck width = hidden size / this [default: 16].
    #[arg(long)]
    pub reduction_factor: Option<usize>,
    /// Bottleneck adapters: relu, silu or gelu_tanh [default: relu].
    #[arg(long)]
    pub non_linearity: Option<String>,
    /// LoRA-SB: training examples whose summed full-fine-tuning gradient gives the adapter's
    /// start [default: 64].
    #[arg(long)]
    pub init_examples: Option<usize>,
    /// FineGates: the fraction of gates meant to close, in [0, 1) [default: 0.3].
    #[arg(long)]
    pub target_sparsity: Option<f64>,
    /// FineGates: λ, the sparsity objective's weight [default: 50].
    #[arg(long)]
    pub lambda: Option<f64>,
    /// FineGates: target (open fractions pulled to 1 − target sparsity) or l0 (relaxed ℓ0)
    /// [default: target].
    #[arg(long)]
    pub sparsity_form: Option<String>,
    /// FineGates: train the gated layers' biases [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub train_biases: Option<bool>,
    /// FineGates: the gates' learning rate as a multiple of --lr [default: 10].
    #[arg(long)]
    pub gate_lr_scale: Option<f64>,
    /// Any method setting by name, for settings without a flag of their own (a method added
    /// to the registry needs no CLI edit): `--set num-virtual-tokens=8`; the value is read as
    /// JSON when it parses (numbers, true/false, lists), else as a string. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Option<Vec<String>>,
    /// Peak learning rate [default: 2e-4; full fine-tuning 2e-5, others as the method says].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Passes over the training data [default: 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Examples per micro-batch [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Batch examples of similar length: each run of N batches of the seeded epoch order is
    /// sorted by length, cut into batches, and the batches shuffled (seeded), so a batch is not
    /// mostly padding. 0 (the default): off.
    #[arg(long)]
    pub length_buckets: Option<usize>,
    /// Most tokens per example (longer ones are truncated) [default: 256, or the model's context if shorter].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Encode the data without the tokenizer's special tokens (BOS and the like), as
    /// `add_special_tokens=False` in transformers.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub no_special_tokens: Option<bool>,
    /// The base model's name written into the adapter (`base_model_name_or_path`), e.g. its
    /// Hugging Face id [default: GGUF's general.source.huggingface.repository, else --model].
    #[arg(long)]
    pub base_model_name: Option<String>,
    /// Pack {"text"} documents into full windows of --seq-len tokens instead of padding.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub pack: Option<bool>,
    /// Use a seeded random N of the training examples (after the held-out split).
    #[arg(long)]
    pub max_train_examples: Option<usize>,
    /// Use a seeded random N of the held-out examples.
    #[arg(long)]
    pub max_eval_examples: Option<usize>,
    /// Warm-up steps [default: 0].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// constant, linear or cosine [default: linear].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Decoupled weight decay of the matrices [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm; 0 turns clipping off [default: 1].
    #[arg(long)]
    pub clip: Option<f64>,
    /// adamw or sgd [default: adamw].
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Seed of the data order, the initialisation and dropout [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Recompute each transformer block in backward (less memory, ~30% more compute).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// Classification: pool the last real token (last) or the mean (mean) [default: last].
    #[arg(long)]
    pub pooling: Option<String>,
    /// Classification: classes of the new head [default: largest label + 1].
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Preference pairs ({"prompt","chosen","rejected"}): dpo (the policy against its
    /// adapters-off self) or reward (a reward model: a one-output head, Bradley–Terry loss)
    /// [default: dpo]. Prompts alone ({"prompt"}): grpo or ppo, with --reward-model [default: grpo].
    #[arg(long)]
    pub objective: Option<String>,
    /// DPO: β, the strength of the pull towards the reference [default: 0.1]; GRPO: the KL
    /// penalty's weight [default: 0.04]; PPO: the per-token KL penalty's weight, TRL's
    /// kl_coef [default: 0.05].
    #[arg(long)]
    pub beta: Option<f64>,
    /// GRPO, PPO: the reward, an adapter directory with a head over the same --model (a reward
    /// model's score, or a classifier's probability of --reward-label).
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// GRPO, PPO with a classifier as the reward: the class whose probability is the reward [default: 1].
    #[arg(long)]
    pub reward_label: Option<usize>,
    /// GRPO: completions sampled per prompt [default: 8].
    #[arg(long)]
    pub num_generations: Option<usize>,
    /// GRPO, PPO: the longest completion sampled, in tokens [default: 32].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// GRPO, PPO: the sampling temperature [default: 1].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// PPO: optimizer updates on each rollout [default: 4].
    #[arg(long)]
    pub ppo_epochs: Option<usize>,
    /// PPO: the clip range of the policy ratio and of the value [default: 0.2].
    #[arg(long)]
    pub cliprange: Option<f64>,
    /// PPO: the value loss's weight [default: 0.1].
    #[arg(long)]
    pub vf_coef: Option<f64>,
    /// DPO: sigmoid or ipo [default: sigmoid].
    #[arg(long)]
    pub dpo_loss: Option<String>,
    /// DPO (sigmoid): the probability that a pair's preference is wrong, in [0, 0.5) [default: 0].
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// DPO: compute the reference's log-probabilities in one pass before training, so a step
    /// runs the model once (needed with --method full).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub precompute_ref_log_probs: Option<bool>,
    /// Evaluate every N steps (always before and after).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Skip the evaluation before the first step (the report then has no "before").
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub skip_eval_before: Option<bool>,
    /// Write a checkpoint every N steps (always at the end) [default: 50].
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Output directory [default: tinytune-out].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the last checkpoint in --out (checked: its checksum, optimizer state and
    /// settings must match this run).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub resume: Option<bool>,
    /// Replace the run already in --out (its checkpoint, adapter and metrics) instead of refusing.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite: Option<bool>,
    /// Start a new run (step 0, new optimizer, these settings) from the trained weights of the
    /// checkpoint in --out alone.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", conflicts_with = "resume")]
    pub resume_weights_only: Option<bool>,
    /// When the loss grows a hundredfold or the perplexity becomes infinite: stop (naming the
    /// last checkpoint) or warn and go on [default: stop].
    #[arg(long)]
    pub on_divergence: Option<String>,
    /// auto, cpu, gpu or gpu-software [default: $TINYTUNE_DEVICE or auto].
    #[arg(long)]
    pub device: Option<String>,
    /// Print the final report as JSON.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub json: Option<bool>,
}

macro_rules! merge_fields {
    ($cli:ident, $file:ident, $($f:ident),*) => { $( if $cli.$f.is_none() { $cli.$f = $file.$f.take(); } )* };
}

impl FinetuneArgs {
    /// The options of a `--config` file's text (`path` names it in errors): keys as the flag
    /// names, snake_case accepted; an unknown key or a value of the wrong type is an error.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<FinetuneArgs> {
        let ferr = |msg: String| Error::Format { path: path.display().to_string(), msg };
        let value: toml::Table = toml::from_str(text).map_err(|e| ferr(e.to_string()))?;
        // Accept snake_case keys too: normalise to the flags' kebab-case.
        let value: toml::Table = value.into_iter().map(|(k, v)| (k.replace('_', "-"), v)).collect();
        value.try_into().map_err(|e: toml::de::Error| ferr(e.message().to_string()))
    }

    /// The method's settings, by flag name (the method says which it reads); `tokenize` turns
    /// `--prompt-init-text` into the ids prompt tuning starts from.
    pub fn method_settings(&self, tokenize: &dyn Fn(&str) -> Result<Vec<u32>>) -> Result<Settings> {
        let mut settings = Settings::new();
        settings
            .set("rank", self.rank)
            .set("alpha", self.alpha)
            .set("dropout", self.dropout)
            .set("rslora", self.rslora)
            .set("target-modules", self.target_modules.clone())
            // `auto` / `auto:K` are chosen by the finetune command from the data (train::select).
            .set(
                "layers",
                self.layers
                    .as_deref()
                    .filter(|l| crate::train::select::LayerPolicy::parse(l).ok().flatten().is_none())
                    .map(parse_layers)
                    .transpose()?,
            )
            .set("feedforward-modules", self.feedforward_modules.clone())
            .set("num-virtual-tokens", self.num_virtual_tokens)
            .set("prompt-init", self.prompt_init.clone())
            .set("prompt-init-ids", self.prompt_init_text.as_deref().map(tokenize).transpose()?)
            .set("prompt-init-text", self.prompt_init_text.clone())
            .set("prefix-projection", self.prefix_projection)
            .set("encoder-hidden-size", self.encoder_hidden_size)
            .set("adapter-kind", self.adapter_kind.clone())
            .set("reduction-factor", self.reduction_factor)
            .set("non-linearity", self.non_linearity.clone())
            .set("init-examples", self.init_examples)
            .set("target-sparsity", self.target_sparsity)
            .set("lambda", self.lambda)
            .set("sparsity-form", self.sparsity_form.clone())
            .set("train-biases", self.train_biases)
            .set("gate-lr-scale", self.gate_lr_scale);
        for kv in self.set.iter().flatten() {
            let (k, v) =
                kv.split_once('=').ok_or_else(|| Error::InvalidArgument { op: "--set", msg: format!("'{kv}' is not KEY=VALUE") })?;
            let value: serde_json::Value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
            settings.set(k.trim(), Some(value));
        }
        Ok(settings)
    }

    /// Fill the options not given on the command line from the `--config` file.
    pub fn with_file(mut self) -> Result<FinetuneArgs> {
        let Some(path) = self.config.clone() else { return Ok(self) };
        let text = crate::io::read_regular_string(&path)?;
        let mut file = FinetuneArgs::from_toml_str(&text, &path)?;
        merge_fields!(
            self,
            file,
            model,
            base_dtype,
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
            init_examples,
            target_sparsity,
            lambda,
            sparsity_form,
            train_biases,
            gate_lr_scale,
            set,
            lr,
            epochs,
            max_steps,
            batch_size,
            grad_accum,
            length_buckets,
            seq_len,
            pack,
            no_special_tokens,
            base_model_name,
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
            objective,
            beta,
            reward_model,
            reward_label,
            num_generations,
            max_new_tokens,
            temperature,
            ppo_epochs,
            cliprange,
            vf_coef,
            dpo_loss,
            label_smoothing,
            precompute_ref_log_probs,
            eval_every,
            skip_eval_before,
            save_every,
            out,
            resume,
            resume_weights_only,
            overwrite,
            on_divergence,
            device,
            json
        );
        Ok(self)
    }
}

/// `0-3,8` → [0, 1, 2, 3, 8].
pub fn parse_layers(s: &str) -> Result<Vec<usize>> {
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
