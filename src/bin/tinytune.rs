//! The `tinytune` command line. Every subcommand has `--help`, and `--json` for output that
//! programs read. MODEL is a Hugging Face directory (config.json + safetensors).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tinytune::io::config::RawConfig;
use tinytune::io::Checkpoint;
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
        /// Model directory.
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
    /// Model directory.
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

fn inspect(model: &PathBuf, as_json: bool) -> Result<()> {
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
    if as_json {
        println!("{}", json!({ "architecture": arch, "tensors": names.len(), "parameters": params, "dtypes": dtypes, "config": config }));
    } else {
        println!("architecture: {arch}");
        println!("tensors:      {}", names.len());
        println!("parameters:   {params}");
        println!("dtypes:       {}", dtypes.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", "));
        println!("config:       {}", serde_json::to_string_pretty(&config).unwrap_or_default());
    }
    Ok(())
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
