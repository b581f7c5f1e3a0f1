//! The `tinytune` command line. Every subcommand has `--help`, and `--json` for output that
//! programs read. MODEL is a Hugging Face directory (config.json + safetensors) or a .gguf file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Args, Parser, Subcommand};
use serde_json::json;
use tinytune::io::config::RawConfig;
use tinytune::io::{Checkpoint, GgufFile, GgufValue, Tokenizer};
use tinytune::models::{self, CausalLm, GenerateOptions, Sampling};
use tinytune::peft::{format, ClassifierHead};
use tinytune::quant::BaseDType;
use tinytune::train::data::{DataFormat, DataOptions, Dataset};
use tinytune::train::{self};
use tinytune::{DType, Device, Error, Result};

/// Print a line on standard output (see [`emit`]).
macro_rules! outln {
    () => { crate::emit(format_args!("\n"))? };
    ($($t:tt)*) => { crate::emit(format_args!("{}\n", format_args!($($t)*)))? };
}

/// Print a line on standard error. A message that cannot be written (stderr closed or on a
/// full disk) is dropped: there is nowhere left to report it, and it must not stop the work.
macro_rules! note {
    ($($t:tt)*) => {{ let _ = writeln!(std::io::stderr(), $($t)*); }};
}

/// Write to standard output and flush. A closed pipe (`tinytune … | head`) ends the program
/// quietly with the status a shell gives a process killed by SIGPIPE (128 + 13); any other
/// failure, such as a full disk (`> /dev/full`), is an error naming standard output.
fn emit(args: std::fmt::Arguments) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(e) => Err(Error::Io { path: "standard output".into(), msg: e.to_string() }),
    }
}

#[path = "tinytune/finetune.rs"]
mod finetune;
use finetune::finetune;
#[path = "tinytune/bench.rs"]
mod bench;
#[path = "tinytune/chat.rs"]
mod chat;
#[path = "tinytune/classify.rs"]
mod classify;
#[path = "tinytune/export.rs"]
mod export;
#[path = "tinytune/progress.rs"]
mod progress;
#[path = "tinytune/reward.rs"]
mod reward;
#[path = "tinytune/sample.rs"]
mod sample;
#[path = "tinytune/select.rs"]
mod select;
use tinytune::cli::FinetuneArgs;

#[derive(Parser)]
#[command(name = "tinytune", version, about = "Fine-tune language models on any GPU, without CUDA")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, config, tensor count, dtypes and parameter count of a model.
    #[command(group(ArgGroup::new("which").required(true).args(["model", "model_flag"])))]
    #[command(
        after_help = "Examples:\n  tinytune inspect --model ~/.cache/tinytune/smollm2-135m-instruct/SmolLM2-135M-Instruct-Q8_0.gguf\n  tinytune inspect --model path/to/hf-dir --json"
    )]
    Inspect {
        /// Model directory, .gguf file, or Hugging Face id in the local cache (org/name).
        #[arg(value_parser = tinytune::io::model_arg)]
        model: Option<PathBuf>,
        /// The same, as every other command takes it.
        #[arg(long = "model", value_name = "MODEL", value_parser = tinytune::io::model_arg)]
        model_flag: Option<PathBuf>,
        /// Load the model on the CPU with this frozen-weight type (keep, f32, f16, bf16, nf4,
        /// int8) and report the bytes its weights take in memory.
        #[arg(long)]
        base_dtype: Option<BaseDType>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The token ids of a text, with special tokens added as the model's tokenizer does.
    #[command(after_help = "Example:\n  tinytune tokenize --model M --text \"Hello, world\" --json")]
    Tokenize {
        /// Model directory, .gguf file or Hugging Face id in the local cache (its tokenizer is used).
        #[arg(long, value_parser = tinytune::io::model_arg)]
        model: PathBuf,
        /// The text to tokenize.
        #[arg(long)]
        text: String,
        /// Do not add the tokenizer's special tokens (BOS and the like).
        #[arg(long)]
        no_special_tokens: bool,
        /// Print {"ids": [...]} instead of the ids separated by spaces.
        #[arg(long)]
        json: bool,
    },
    /// Mean negative log-likelihood and perplexity of a text, a file, or token ids; with
    /// --adapter of a classifier on labelled --data ({"text", "label"} lines), its accuracy.
    #[command(group(ArgGroup::new("input").required(true).args(["ids", "text", "data"])))]
    #[command(after_help = "Examples:\n  tinytune eval --model M --text \"It was a truth universally acknowledged\"\n  \
tinytune eval --model M --data held-out.jsonl --seq-len 128       # finetune's held-out NLL of a run with --seq-len 128\n  \
tinytune eval --model M --adapter run/adapter --data test.jsonl   # {\"text\",\"label\"} lines: accuracy of a classifier")]
    Eval {
        #[command(flatten)]
        common: Common,
        /// Token ids: comma-separated; several sequences separated by ';'.
        #[arg(long)]
        ids: Option<String>,
        /// A text to score (tokenized with the model's tokenizer, special tokens added).
        #[arg(long)]
        text: Option<String>,
        /// A text file, or a .jsonl file whose lines have a "text" field (one sequence each).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Longer sequences are scored in consecutive windows of this many tokens; with labelled
        /// data, examples are cut to this many [default: 1024, or the model's context if shorter;
        /// labelled data with --adapter: the length the adapter was trained with].
        #[arg(long)]
        max_len: Option<usize>,
        /// Score a .jsonl --data file as `finetune --seq-len N` scores its held-out data: each
        /// {"text"} document followed by EOS and cut to its first N tokens, prompts and chat
        /// turns masked as in training; the NLL is then the one the run reported.
        #[arg(long, conflicts_with = "max_len", requires = "data")]
        seq_len: Option<usize>,
        /// Encode without the tokenizer's special tokens (BOS and the like), as
        /// `add_special_tokens=False` in transformers [default: as the adapter was trained].
        #[arg(long)]
        no_special_tokens: bool,
        /// Sequences scored at once.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// Fine-tune a model on a JSONL file (LoRA, DoRA, full, a classification head, ...; on
    /// preference pairs DPO or a reward model, on prompts GRPO).
    #[command(
        after_help = "Examples:\n  tinytune finetune --model M --data train.jsonl --out run                # LoRA r=8 on q_proj,v_proj\n  \
tinytune finetune --model M --data reviews.jsonl --target-modules all-linear --max-steps 100 --out run\n  \
tinytune finetune --model M --data austen.jsonl --pack --seq-len 256 --lr 1e-3 --out run\n  \
tinytune finetune --config run.toml --resume                             # continue an interrupted run"
    )]
    Finetune(Box<FinetuneArgs>),
    /// The label and class probabilities of texts: by a fine-tuned head (--adapter), or
    /// zero-shot by the label words' likelihood (--labels negative,positive).
    #[command(
        after_help = "Examples:\n  tinytune classify --model M --adapter run/adapter --labels negative,positive --text \"A wonderful film.\"\n  \
tinytune classify --model M --adapter run/adapter --data test.jsonl --json\n  \
tinytune classify --model M --labels negative,positive --chat --text \"Dull and far too long.\"   # zero-shot"
    )]
    Classify(Box<classify::ClassifyArgs>),
    /// Time the training and inference steps of the project's jobs on this machine; with
    /// --python, the same steps in PyTorch + PEFT in the same run, and the ratios; with
    /// --profile, where the time of one step goes, kernel by kernel.
    #[command(after_help = "Examples:\n  tinytune bench --device cpu\n  \
tinytune bench --cases cls-step --profile\n  \
tinytune bench --python /tmp/pyref/bin/python --steps 5     # against PyTorch + PEFT, same run")]
    Bench(Box<bench::BenchArgs>),
    /// Fold an adapter into its base model and write a merged checkpoint (safetensors +
    /// config.json + tokenizer).
    #[command(after_help = "Example:\n  tinytune merge --model M --adapter run/adapter --out merged --dtype bf16")]
    Merge {
        /// Base model directory, .gguf file or Hugging Face id in the local cache.
        #[arg(long, value_parser = tinytune::io::model_arg)]
        model: PathBuf,
        /// Adapter directory (PEFT layout: adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// f32, f16 or bf16 [default: the base model's: the dtype of most of its weights; f16
        /// for a quantised GGUF].
        #[arg(long)]
        dtype: Option<String>,
        /// FineGates: also remove what the closed gates make dead (LLaMA MLP units whose gate
        /// or up row or down column is closed), printing per layer what went; the result is a
        /// smaller checkpoint with per-block MLP widths.
        #[arg(long)]
        compress: bool,
    },
    /// Write a model (with an adapter merged in) as a GGUF file llama.cpp loads (f16, q8_0,
    /// q4_0, q4_k, ...), or with --adapter-only the LoRA adapter alone as a GGUF LoRA adapter.
    #[command(
        after_help = "Examples:\n  tinytune export --model M --adapter run/adapter --out merged.q4_k.gguf --type q4_k --eval-data held-out.jsonl\n  \
tinytune export --model M --adapter run/adapter --adapter-only --out adapter.gguf    # llama-cli -m M.gguf --lora adapter.gguf"
    )]
    Export(Box<export::ExportArgs>),
    /// Sample completions of a file of prompts (several per prompt, decoded as one batch) as
    /// JSONL; with --log-probs the policy's and the reference's log-probabilities, with
    /// --reward-model the reward of each.
    Sample(Box<sample::SampleArgs>),
    /// Which blocks to fine-tune: each block's deviation and gain on a sample of the task's
    /// data (semantic layer selection), the chosen blocks as a --layers argument, an SVG chart.
    SelectLayers(Box<select::SelectArgs>),
    /// Continue a prompt (text, or token ids), streaming the new text.
    #[command(group(ArgGroup::new("input").required(true).args(["ids", "prompt"])))]
    #[command(after_help = "Examples:\n  tinytune generate --model M --prompt \"Once upon a time\" --max-new-tokens 40\n  \
tinytune generate --model M --adapter run/adapter --chat --prompt \"Write a haiku about rust.\" --temperature 0.7 --seed 1")]
    Generate {
        #[command(flatten)]
        common: Common,
        /// The prompt text (tokenized with the model's tokenizer).
        #[arg(long)]
        prompt: Option<String>,
        /// Prompt token ids, comma-separated.
        #[arg(long)]
        ids: Option<String>,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long, requires = "prompt")]
        chat: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Talk to a model in the terminal: its chat template keeps the history, the answer streams
    /// as it is generated; /reset, /system TEXT, /save FILE, /quit.
    #[command(after_help = "Examples:\n  tinytune chat --model HuggingFaceTB/SmolLM2-135M-Instruct\n  \
tinytune chat --model M --adapter run/adapter --system \"You are terse.\" --temperature 0.7 --top-p 0.9")]
    Chat(Box<chat::ChatArgs>),
}

/// How to pick each new token, shared by `generate` and `chat`.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Most tokens to generate per answer (fewer when a stop token comes, or the context is
    /// full) [default: 32 for generate, 256 for chat].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Always take the most likely token (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,
    /// Sample: divide the logits by this (higher = more varied) [default with --top-k/--top-p: 1].
    #[arg(long)]
    temperature: Option<f64>,
    /// Sample from the k most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probabilities add up to p (nucleus sampling).
    #[arg(long)]
    top_p: Option<f64>,
    /// Scale down the logits of tokens already in the text (> 1 repeats less; 1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after any of these token ids (comma-separated). Default: the tokenizer's EOS, and
    /// for a chat its format's end-of-turn token (`<end_of_turn>`, `<|im_end|>`, `<|eot_id|>`).
    #[arg(long)]
    stop: Option<String>,
}

impl SamplingArgs {
    /// The options of one generation of at most `max_new_tokens` (`--max-new-tokens` or the
    /// command's default), stopping at `--stop`, or at the tokenizer's EOS (and, for a
    /// conversation, `chat`, at its end-of-turn token).
    pub fn options(&self, default_max: usize, tok: Option<&Tokenizer>, chat: bool, op: &'static str) -> Result<GenerateOptions> {
        let sampling = match (self.temperature, self.top_k, self.top_p) {
            (None, None, None) => Sampling::Greedy,
            (t, k, p) => Sampling::Sample { temperature: t.unwrap_or(1.0), top_k: k, top_p: p },
        };
        let stop_tokens = match self.stop.as_deref() {
            Some(s) => parse_ids(op, s)?,
            None if chat => tok.map(Tokenizer::stop_ids).unwrap_or_default(),
            None => tok.and_then(|t| t.eos_id()).into_iter().collect(),
        };
        Ok(GenerateOptions {
            max_new_tokens: self.max_new_tokens.unwrap_or(default_max),
            sampling,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop_tokens,
        })
    }
}

#[derive(Args)]
pub struct Common {
    /// Model directory, .gguf file, or Hugging Face id in the local cache (org/name[@revision]).
    #[arg(long, value_parser = tinytune::io::model_arg)]
    model: PathBuf,
    /// auto (a hardware GPU, else the CPU), cpu, gpu, or gpu-software. Default: $TINYTUNE_DEVICE or auto.
    #[arg(long)]
    device: Option<String>,
    /// A fine-tuned adapter directory (PEFT layout) to apply on top of the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The frozen weights' type: auto (keep, but f32 matrices in f16 on a GPU with shader-f16),
    /// keep (as stored: GGUF blocks stay quantised, f16/bf16 stay 16-bit), f32, f16, bf16, nf4
    /// or int8 [default: auto].
    #[arg(long, default_value = "auto")]
    base_dtype: BaseDType,
    /// Multiply GGUF Q4_0/Q4_1/Q8_0 weights by activations rounded to int8 per block of 32
    /// (llama.cpp's scheme): about twice as fast on CPUs with AVX-512 VNNI, slightly
    /// approximate (see the README's "Integer products"); the same as TINYTUNE_INT8_DOT=1.
    #[arg(long)]
    int8_dot: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// How an adapter's training data was encoded, so evaluating with it encodes the same way.
pub struct Trained {
    pub seq_len: Option<usize>,
    pub add_special_tokens: bool,
}

impl Common {
    pub fn device(&self) -> Result<Device> {
        device_from(self.device.as_deref())
    }

    /// The model with `--adapter` attached (if given), and the adapter's classification head.
    pub fn load(&self, device: &Device) -> Result<(Box<dyn CausalLm>, Option<ClassifierHead>)> {
        let (model, head, _) = self.load_adapter(device)?;
        Ok((model, head))
    }

    /// [`Common::load`], with how the adapter's training encoded its data (if it says).
    pub fn load_adapter(&self, device: &Device) -> Result<(Box<dyn CausalLm>, Option<ClassifierHead>, Trained)> {
        if self.int8_dot {
            use tinytune::backend::cpu::qgemm;
            if !qgemm::supported() || device.is_gpu() {
                note!("--int8-dot has no effect here: the integer products run on CPUs with AVX-512 VNNI");
            }
            qgemm::set_enabled(true);
        }
        let mut model = load_model(&self.model, device, self.base_dtype)?;
        let (head, trained) = match &self.adapter {
            Some(dir) => {
                let loaded = format::load(dir, model.as_mut(), device)?;
                (loaded.head, Trained { seq_len: loaded.seq_len, add_special_tokens: loaded.add_special_tokens })
            }
            None => (None, Trained { seq_len: None, add_special_tokens: true }),
        };
        Ok((model, head, trained))
    }
}

/// [`models::load`] under a spinner; a log file is told first when the weights are large.
fn load_model(path: &Path, device: &Device, base: BaseDType) -> Result<Box<dyn CausalLm>> {
    let bytes = weight_bytes(path);
    let what = format!("loading {} ({:.0} MB) onto {device}", path.display(), bytes as f64 / 1e6);
    progress::spin(&what, bytes > 500_000_000, || models::load_with(path, device, base))
}

/// Bytes of a model's weight files: a .gguf file, or the .safetensors files of a directory.
fn weight_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    if path.is_dir() {
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .map(|p| size(&p))
            .sum()
    } else {
        size(path)
    }
}

fn device_from(name: Option<&str>) -> Result<Device> {
    match name {
        Some(name) => Device::from_name(name),
        None => Device::from_env(),
    }
}

fn parse_ids(what: &'static str, text: &str) -> Result<Vec<u32>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().map_err(|e| Error::InvalidArgument { op: what, msg: format!("'{s}' is not a token id: {e}") }))
        .collect()
}

/// A GGUF metadata value as JSON; long arrays (vocabularies) are summarised.
fn gguf_json(v: &GgufValue) -> serde_json::Value {
    match v {
        GgufValue::Array(a) if a.len() > 16 => json!(format!("[{} values]", a.len())),
        GgufValue::Array(a) => serde_json::Value::Array(a.iter().map(gguf_json).collect()),
        GgufValue::String(s) => json!(s),
        GgufValue::Bool(b) => json!(b),
        other => other.as_i64().map(|i| json!(i)).or_else(|| other.as_f64().map(|f| json!(f))).unwrap_or(serde_json::Value::Null),
    }
}

struct Summary {
    architecture: String,
    tensors: usize,
    parameters: u64,
    dtypes: std::collections::BTreeMap<String, usize>,
    config: serde_json::Value,
}

fn summarize_gguf(path: &PathBuf) -> Result<Summary> {
    let f = GgufFile::open(path)?;
    let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
    for t in f.tensors() {
        *dtypes.entry(t.ty.to_string()).or_default() += 1;
    }
    Ok(Summary {
        architecture: f.architecture()?.to_string(),
        tensors: f.tensors().len(),
        parameters: f.tensors().iter().map(|t| t.n_elements()).sum(),
        dtypes,
        config: serde_json::Value::Object(f.metadata().map(|(k, v)| (k.to_string(), gguf_json(v))).collect()),
    })
}

fn inspect(model: &PathBuf, base: Option<BaseDType>, as_json: bool) -> Result<()> {
    let s = if model.is_file() { summarize_gguf(model)? } else { summarize_hf(model)? };
    // With --base-dtype: load on the CPU and count the bytes the weights take there.
    let memory = match base {
        Some(b) => Some(models::weight_bytes(load_model(model, &Device::Cpu, b)?.as_mut())?),
        None => None,
    };
    if as_json {
        let mut j = json!({ "architecture": s.architecture, "tensors": s.tensors, "parameters": s.parameters, "dtypes": s.dtypes, "config": s.config });
        if let (Some((total, by)), Some(b)) = (&memory, base) {
            j["memory"] = json!({ "base_dtype": b.name(), "bytes": total, "by_dtype": by.iter().cloned().collect::<std::collections::BTreeMap<_, _>>() });
        }
        outln!("{j}");
    } else {
        outln!("architecture: {}", s.architecture);
        outln!("tensors:      {}", s.tensors);
        outln!("parameters:   {}", s.parameters);
        outln!("dtypes:       {}", s.dtypes.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", "));
        if let (Some((total, by)), Some(b)) = (&memory, base) {
            let parts: Vec<String> = by.iter().map(|(k, v)| format!("{k} {:.1} MB", *v as f64 / 1e6)).collect();
            outln!("memory:       {:.1} MB of weights with --base-dtype {} ({})", *total as f64 / 1e6, b.name(), parts.join(", "));
        }
        outln!("config:       {}", serde_json::to_string_pretty(&s.config).unwrap_or_default());
    }
    Ok(())
}

fn summarize_hf(model: &PathBuf) -> Result<Summary> {
    let config_path = model.join("config.json");
    let raw = RawConfig::read(&config_path)?;
    let arch = raw.model_type()?;
    let ck = Checkpoint::open(model)?;
    let names = ck.names();
    let mut params = 0usize;
    let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
    for n in &names {
        if let Some((shape, dtype)) = ck.info(n) {
            params += shape.iter().product::<usize>();
            *dtypes.entry(dtype).or_default() += 1;
        }
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path).map_err(|e| Error::Io { path: config_path.display().to_string(), msg: e.to_string() })?,
    )
    .map_err(|e| Error::Format { path: config_path.display().to_string(), msg: e.to_string() })?;
    Ok(Summary { architecture: arch, tensors: names.len(), parameters: params as u64, dtypes, config })
}

/// The dtype a model's weights are stored in: that of most of its matrices (a quantised GGUF
/// block format counts as f16, which holds its dequantised values closely).
fn stored_dtype(model: &Path) -> Result<DType> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    if model.is_file() {
        for t in GgufFile::open(model)?.tensors().iter().filter(|t| t.ne.len() >= 2) {
            *counts.entry(t.ty.to_string().to_uppercase()).or_default() += 1;
        }
    } else {
        let ck = Checkpoint::open(model)?;
        for n in ck.names() {
            if let Some((shape, dtype)) = ck.info(&n).filter(|(shape, _)| shape.len() >= 2) {
                let _ = shape;
                *counts.entry(dtype.to_uppercase()).or_default() += 1;
            }
        }
    }
    let most = counts.iter().max_by_key(|(_, &n)| n).map(|(k, _)| k.as_str()).unwrap_or("F32");
    Ok(match most {
        "F32" | "FLOAT32" => DType::F32,
        "BF16" | "BFLOAT16" => DType::BF16,
        _ => DType::F16,
    })
}

/// Whether `path` is a .jsonl file of labelled (classification) lines.
/// Prints eval's language-modelling result: mean NLL over `tokens` predicted tokens.
fn report_nll(json: bool, mean_nll: f64, tokens: usize) -> Result<()> {
    let ppl = mean_nll.exp();
    if json {
        outln!("{}", json!({ "mean_nll": mean_nll, "perplexity": ppl, "tokens": tokens }));
    } else {
        outln!("mean NLL {mean_nll:.6}  perplexity {ppl:.4}  tokens {tokens}");
    }
    Ok(())
}

/// Says how many examples of `ds` were cut to `len` tokens, so a score is not read as the whole text's.
fn note_truncated(ds: &Dataset, len: usize) {
    let cut = ds.stats().truncated;
    if cut > 0 {
        note!("note: {cut} of {} examples were longer than {len} tokens and were cut to their first {len}", ds.stats().lines);
    }
}

fn is_labelled(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "jsonl") && DataFormat::of_file(path).ok().flatten() == Some(DataFormat::Classification)
}

/// The sequences a `--data` file holds: one per "text" line of a .jsonl file, else the whole file.
fn read_texts(path: &Path) -> Result<Vec<String>> {
    let io = |e: std::io::Error| Error::Io { path: path.display().to_string(), msg: e.to_string() };
    let content = std::fs::read_to_string(path).map_err(io)?;
    // A byte-order mark (Windows editors write one) is not part of the text, as in `finetune`.
    let content = content.strip_prefix('\u{feff}').map(str::to_string).unwrap_or(content);
    if path.extension().is_some_and(|e| e == "jsonl") {
        let mut texts = Vec::new();
        for (i, line) in content.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = |msg: String| Error::Format { path: path.display().to_string(), msg: format!("line {}: {msg}", i + 1) };
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
            texts.push(v.get("text").and_then(|t| t.as_str()).ok_or_else(|| bad("no string field \"text\"".into()))?.to_string());
        }
        if texts.is_empty() {
            return Err(Error::Format { path: path.display().to_string(), msg: "no lines with text".into() });
        }
        Ok(texts)
    } else {
        Ok(vec![content])
    }
}

/// `path` made absolute with its links resolved, as far as it exists (an output directory
/// may not exist yet: its nearest existing ancestor is resolved and the rest appended).
fn resolved(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut p = abs.as_path();
    loop {
        if let Ok(c) = p.canonicalize() {
            return rest.iter().rev().fold(c, |acc, r| acc.join(r));
        }
        match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                p = parent;
            }
            _ => return abs,
        }
    }
}

/// No command writes over its own input: refuse an output directory that is one of the
/// inputs (a model directory, an adapter directory, or the file itself).
fn refuse_overwrite(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = resolved(out);
    for (name, input) in inputs {
        if resolved(input) == o {
            return Err(Error::InvalidArgument {
                op: "output",
                msg: format!("{flag} {} is the {name} it reads: choose another output directory", out.display()),
            });
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, model_flag, base_dtype, json } => inspect(
            &model.or(model_flag).ok_or_else(|| Error::InvalidArgument { op: "inspect", msg: "give a model".into() })?,
            base_dtype,
            json,
        ),
        Command::Tokenize { model, text, no_special_tokens, json } => {
            let ids = Tokenizer::for_model(&model)?.encode(&text, !no_special_tokens)?;
            if json {
                outln!("{}", json!({ "ids": ids }));
            } else {
                outln!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
            }
            Ok(())
        }
        Command::Eval { common, ids, text, data, max_len, seq_len, no_special_tokens, batch_size } => {
            let device = common.device()?;
            let (model, head, trained) = common.load_adapter(&device)?;
            let add_special_tokens = trained.add_special_tokens && !no_special_tokens;
            let context = model.max_positions();
            let flag = if seq_len.is_some() { "--seq-len" } else { "--max-len" };
            let max_len_given = max_len.or(seq_len);
            let max_len = match (max_len.or(seq_len), context) {
                (Some(n), _) if n < 2 => return Err(Error::InvalidArgument { op: "eval", msg: format!("{flag} must be ≥ 2, got {n}") }),
                (Some(n), Some(ctx)) if n > ctx => {
                    return Err(Error::InvalidArgument {
                        op: "eval",
                        msg: format!("{flag} {n} is longer than the model's context of {ctx} tokens"),
                    })
                }
                (Some(n), _) => n,
                // Labelled data is cut as the adapter's training cut it, so accuracy matches the run's.
                (None, ctx) => match (trained.seq_len, data.as_ref().is_some_and(|p| is_labelled(p))) {
                    (Some(n), true) => ctx.map_or(n, |c| c.min(n)),
                    _ => ctx.map_or(1024, |c| c.min(1024)),
                },
            };
            if let Some(head) = head.as_ref().filter(|h| h.num_classes() == 1) {
                // A reward model: the reward of each text, or on preference pairs how often
                // the chosen completion scores higher.
                let tok = Tokenizer::for_model(&common.model)?;
                let len = max_len_given.or(trained.seq_len).map_or(max_len, |n| context.map_or(n, |c| c.min(n)));
                let opts = DataOptions { seq_len: len, context, add_special_tokens, ..DataOptions::default() };
                return reward::eval(model.as_ref(), head, text, data.as_deref(), &tok, &opts, batch_size, &device, common.json);
            }
            if let Some(path) = data.as_ref().filter(|p| is_labelled(p)) {
                // Labelled data: accuracy and mean loss of the adapter's classification head.
                let head = head.ok_or_else(|| Error::InvalidArgument {
                    op: "eval",
                    msg: format!("{} is labelled data: give --adapter with a classification head", path.display()),
                })?;
                let tok = Tokenizer::for_model(&common.model)?;
                let opts = DataOptions { seq_len: max_len, context: model.max_positions(), add_special_tokens, ..DataOptions::default() };
                let ds = Dataset::load(path, &tok, &opts)?;
                note_truncated(&ds, max_len);
                ds.check_labels(head.num_classes())?;
                let mut task = progress::Task::new(format!("classifying {} examples", ds.len()), ds.len());
                let objective = train::Classification { head };
                let r = train::evaluate_observed(model.as_ref(), &objective, &ds, batch_size, &device, 0, &mut |d, n| task.set(d, n))?;
                task.finish();
                let acc = r.accuracy.unwrap_or(0.0);
                if common.json {
                    outln!("{}", json!({ "accuracy": acc, "mean_loss": r.loss, "examples": r.examples }));
                } else {
                    outln!("accuracy {:.4}  mean loss {:.6}  examples {}", acc, r.loss, r.examples);
                }
                return Ok(());
            }
            if head.is_some() {
                // The adapter classifies: language-model NLL of its text would be another question.
                return Err(Error::InvalidArgument {
                    op: "eval",
                    msg: format!(
                        "{} has a classification head: eval needs labelled data ({{\"text\", \"label\"}} lines) for its accuracy; \
                         `tinytune classify` labels unlabelled text",
                        common.adapter.as_ref().map_or(String::new(), |a| a.display().to_string())
                    ),
                });
            }
            if let (Some(seq_len), Some(path)) = (seq_len, data.as_ref()) {
                // As finetune's held-out evaluation: the same loader, options and objective.
                let tok = Tokenizer::for_model(&common.model)?;
                let opts = DataOptions { seq_len, context, add_special_tokens, ..DataOptions::default() };
                let ds = Dataset::load(path, &tok, &opts)?;
                note_truncated(&ds, seq_len);
                let mut task = progress::Task::new(format!("scoring {} examples", ds.len()), ds.len());
                let objective = train::LanguageModelling;
                let r = train::evaluate_observed(model.as_ref(), &objective, &ds, batch_size, &device, 0, &mut |d, n| task.set(d, n))?;
                task.finish();
                return report_nll(common.json, r.loss, r.units);
            }
            let seqs: Vec<Vec<u32>> = match (ids, text, data) {
                (Some(ids), _, _) => ids.split(';').map(|s| parse_ids("eval --ids", s)).collect::<Result<_>>()?,
                (_, text, data) => {
                    let tok = Tokenizer::for_model(&common.model)?;
                    let texts = match (text, data) {
                        (Some(t), _) => vec![t],
                        (_, Some(path)) => read_texts(&path)?,
                        _ => unreachable!("clap requires one input"),
                    };
                    let mut seqs = Vec::new();
                    for t in &texts {
                        seqs.extend(tok.encode(t, add_special_tokens)?.chunks(max_len).map(|c| c.to_vec()));
                    }
                    seqs
                }
            };
            let mut task = progress::Task::new(format!("scoring {} sequences", seqs.len()), seqs.len());
            let r = models::sequence_nll_observed(model.as_ref(), &seqs, batch_size, &device, &mut |d, n| task.set(d, n))?;
            task.finish();
            report_nll(common.json, r.mean_nll(), r.tokens)
        }
        Command::Finetune(args) => finetune(*args),
        Command::Classify(args) => classify::classify(*args),
        Command::Bench(args) => bench::bench(*args),
        Command::Export(args) => export::export(*args),
        Command::Sample(args) => sample::sample(*args),
        Command::SelectLayers(args) => select::select(*args),
        Command::Merge { model, adapter, out, dtype, compress } => {
            refuse_overwrite("merge --out", &out, &[("--model", &model), ("--adapter", &adapter)])?;
            let dtype = match dtype.as_deref() {
                Some("f32") => DType::F32,
                Some("f16") => DType::F16,
                Some("bf16") => DType::BF16,
                Some(o) => return Err(Error::InvalidArgument { op: "merge --dtype", msg: format!("'{o}' is not f32, f16 or bf16") }),
                None => stored_dtype(&model)?,
            };
            let mut m = load_model(&model, &Device::Cpu, BaseDType::Keep)?;
            let loaded = format::load(&adapter, m.as_mut(), &Device::Cpu)?;
            // A head alone refuses (HeadOnly::merge), as every method that cannot be merged.
            let method = &loaded.method;
            let report = if compress {
                let gates = loaded.method_as::<tinytune::peft::FineGates>().ok_or_else(|| Error::InvalidArgument {
                    op: "merge --compress",
                    msg: format!(
                        "{} is a '{}' adapter: --compress removes what FineGates' closed gates make dead",
                        adapter.display(),
                        method.name()
                    ),
                })?;
                Some(progress::spin("merging the gates and removing what they closed", false, || gates.compress(m.as_mut()))?)
            } else {
                None
            };
            let merge = |m: &mut dyn CausalLm| if compress { Ok(()) } else { method.merge(m) };
            progress::spin(&format!("merging {} adapter layers", method.num_sites()), false, || merge(m.as_mut())).map_err(
                |e| match e {
                    Error::InvalidArgument { msg, .. } => {
                        Error::InvalidArgument { op: "merge", msg: format!("{}: {msg}", adapter.display()) }
                    }
                    e => e,
                },
            )?;
            let what = format!("writing {} ({dtype:?})", out.join("model.safetensors").display());
            progress::spin(&what, weight_bytes(&model) > 500_000_000, || models::save_checkpoint_as(m.as_mut(), &out, dtype))?;
            Tokenizer::for_model(&model)?.save_hf(&out)?;
            if let Some(head) = &loaded.head {
                // The head stays a head: a head-only adapter over the merged model, so the
                // merged (or compressed) classifier evaluates and classifies at once.
                let dir = out.join("head");
                format::save(&dir, m.as_mut(), None, Some(head), &out.display().to_string())?;
                if let Some(n) = loaded.seq_len {
                    format::record(&dir, "seq_len", json!(n))?;
                }
                if !loaded.add_special_tokens {
                    format::record(&dir, "add_special_tokens", json!(false))?;
                }
                note!(
                    "the classification head is not part of the language model: it is in {} (use it with --model {} --adapter {})",
                    dir.display(),
                    out.display(),
                    dir.display()
                );
            }
            if let Some(r) = &report {
                outln!("{}", r.table().trim_end());
            }
            outln!("merged {} adapter layers into {} ({dtype:?})", method.num_sites(), out.display());
            Ok(())
        }
        Command::Chat(args) => chat::chat(*args),
        Command::Generate { common, prompt, ids, chat, sampling } => {
            let device = common.device()?;
            let (model, head) = common.load(&device)?;
            if head.is_some() {
                note!(
                    "note: this adapter was trained for classification: its weights change the text generated here, and its \
                     classification head is not used (`tinytune classify` applies it)"
                );
            }
            let tok = Tokenizer::for_model(&common.model).ok();
            let prompt_ids = match (&ids, &prompt, &tok) {
                (Some(ids), _, _) => parse_ids("generate --ids", ids)?,
                (_, Some(p), Some(t)) => {
                    if chat {
                        t.encode_chat(&[("user", p.as_str())], true)?
                    } else {
                        t.encode(p, true)?
                    }
                }
                (_, Some(_), None) => {
                    return Err(Tokenizer::for_model(&common.model)
                        .err()
                        .unwrap_or(Error::InvalidArgument { op: "generate", msg: "no tokenizer".into() }))
                }
                _ => unreachable!("clap requires one input"),
            };
            let mut opts = sampling.options(32, tok.as_ref(), chat, "generate --stop")?;
            // The model's context bounds what can be generated: say so rather than run past it.
            let mut max_new_tokens = opts.max_new_tokens;
            if let Some(ctx) = model.max_positions() {
                model.check_tokens("generate: the prompt", &prompt_ids, prompt_ids.len())?;
                if prompt_ids.len() + max_new_tokens > ctx {
                    max_new_tokens = ctx - prompt_ids.len();
                    note!(
                        "note: at most {max_new_tokens} new tokens: the prompt's {} and the model's context of {ctx} tokens leave no room for more",
                        prompt_ids.len()
                    );
                }
            }
            opts.max_new_tokens = max_new_tokens;
            let stream = !common.json;
            // Streaming text: decode everything generated so far and print what is new.
            let (mut generated, mut shown) = (Vec::new(), 0usize);
            let new = models::generate(
                model.as_ref(),
                &prompt_ids,
                &opts,
                &mut |t| {
                    generated.push(t);
                    if stream {
                        match &tok {
                            Some(tok) => stream_new_text(tok, &generated, &mut shown)?,
                            None => {
                                emit(format_args!("{t} "))?;
                            }
                        }
                    }
                    Ok(())
                },
                &device,
            )?;
            if common.json {
                let text = match &tok {
                    Some(t) => Some(t.decode_lossy(&new, true)?),
                    None => None,
                };
                outln!("{}", json!({ "ids": new, "text": text }));
            } else {
                outln!();
            }
            Ok(())
        }
    }
}

/// Print the text of `generated` past the `shown` bytes already printed. A character split
/// across tokens decodes as U+FFFD until its last byte arrives: print only up to the last
/// complete one.
fn stream_new_text(tok: &Tokenizer, generated: &[u32], shown: &mut usize) -> Result<()> {
    let text = tok.decode_lossy(generated, true)?;
    let complete = text.trim_end_matches('\u{FFFD}');
    if complete.len() > *shown && complete.is_char_boundary(*shown) {
        emit(format_args!("{}", &complete[*shown..]))?;
        *shown = complete.len();
    }
    Ok(())
}

fn main() -> ExitCode {
    // Mesa's Vulkan loader, probed for a GPU, prints "error: XDG_RUNTIME_DIR is invalid or not
    // set" twice when the variable is missing (containers, ssh, CI), which reads as a tinytune
    // error. Nothing here uses that directory; point it at the temporary one when unset.
    #[cfg(unix)]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let cli = Cli::parse();
    tinytune::mem::tune_allocator();
    // TINYTUNE_PROFILE=1: where the whole command's time went, kernel by kernel (`bench
    // --profile` gives one step of each case instead).
    let profiled = !matches!(cli.command, Command::Bench(_)) && tinytune::profile::enabled();
    // The command runs on a thread of the worker pool: the kernels' parallel loops then start
    // from a worker (the work pushed on its own queue, small loops run inline, idle workers
    // steal) instead of being handed from this thread to the pool and waited for, a round trip
    // per op that showed as a tenth of a decoded token's time.
    let result = match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(|| run(cli)),
        Err(_) => run(cli),
    };
    if profiled {
        note!("{}", tinytune::profile::table());
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            note!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
