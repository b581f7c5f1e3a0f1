//! The `tinytune` command line. Every subcommand has `--help`, and `--json` for output that
//! programs read. MODEL is a Hugging Face directory (config.json + safetensors) or a .gguf file.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tinytune::io::config::RawConfig;
use tinytune::io::{Checkpoint, GgufFile, GgufValue};
use tinytune::models::{self, GenerateOptions, Sampling};
use tinytune::{Device, Error, Result};

#[derive(Parser)]
#[command(name = "tinytune", version, about = "Fine-tune language models on any GPU, without CUDA")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, config, tensor count, dtypes and parameter count of a model.
    Inspect {
        /// Model directory or .gguf file.
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Mean negative log-likelihood and perplexity of token sequences.
    Eval {
        #[command(flatten)]
        common: Common,
        /// Token ids: comma-separated; several sequences separated by ';'.
        #[arg(long)]
        ids: String,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// Continue a prompt of token ids.
    Generate {
        #[command(flatten)]
        common: Common,
        /// Prompt token ids, comma-separated.
        #[arg(long)]
        ids: String,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Always take the most likely token (the default unless --temperature is given).
        #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
        greedy: bool,
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop after any of these token ids (comma-separated).
        #[arg(long)]
        stop: Option<String>,
    },
}

#[derive(Args)]
struct Common {
    /// Model directory or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// auto (a hardware GPU, else the CPU), cpu, gpu, or gpu-software. Default: $TINYTUNE_DEVICE or auto.
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    json: bool,
}

impl Common {
    fn device(&self) -> Result<Device> {
        match &self.device {
            Some(name) => Device::from_name(name),
            None => Device::from_env(),
        }
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

fn inspect(model: &PathBuf, as_json: bool) -> Result<()> {
    let s = if model.is_file() { summarize_gguf(model)? } else { summarize_hf(model)? };
    if as_json {
        println!(
            "{}",
            json!({ "architecture": s.architecture, "tensors": s.tensors, "parameters": s.parameters, "dtypes": s.dtypes, "config": s.config })
        );
    } else {
        println!("architecture: {}", s.architecture);
        println!("tensors:      {}", s.tensors);
        println!("parameters:   {}", s.parameters);
        println!("dtypes:       {}", s.dtypes.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", "));
        println!("config:       {}", serde_json::to_string_pretty(&s.config).unwrap_or_default());
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Eval { common, ids, batch_size } => {
            let device = common.device()?;
            let model = models::load(&common.model, &device)?;
            let seqs: Vec<Vec<u32>> = ids.split(';').map(|s| parse_ids("eval --ids", s)).collect::<Result<_>>()?;
            let r = models::sequence_nll(model.as_ref(), &seqs, batch_size, &device)?;
            if common.json {
                println!("{}", json!({ "mean_nll": r.mean_nll(), "perplexity": r.perplexity(), "tokens": r.tokens }));
            } else {
                println!("mean NLL {:.6}  perplexity {:.4}  tokens {}", r.mean_nll(), r.perplexity(), r.tokens);
            }
            Ok(())
        }
        Command::Generate { common, ids, max_new_tokens, greedy: _, temperature, top_k, top_p, repetition_penalty, seed, stop } => {
            let device = common.device()?;
            let model = models::load(&common.model, &device)?;
            let prompt = parse_ids("generate --ids", &ids)?;
            let sampling = match (temperature, top_k, top_p) {
                (None, None, None) => Sampling::Greedy,
                (t, k, p) => Sampling::Sample { temperature: t.unwrap_or(1.0), top_k: k, top_p: p },
            };
            let stop_tokens = stop.as_deref().map(|s| parse_ids("generate --stop", s)).transpose()?.unwrap_or_default();
            let opts = GenerateOptions { max_new_tokens, sampling, repetition_penalty, seed, stop_tokens };
            let stream = !common.json;
            let mut out = std::io::stdout();
            let new = models::generate(
                model.as_ref(),
                &prompt,
                &opts,
                &mut |t| {
                    if stream {
                        let _ = write!(out, "{t} ");
                        let _ = out.flush();
                    }
                    Ok(())
                },
                &device,
            )?;
            if common.json {
                println!("{}", json!({ "ids": new }));
            } else {
                println!();
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
