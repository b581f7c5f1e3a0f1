//! `tinytune sample`: completions of many prompts, several per prompt (decoded together as
//! one batch), as JSONL, with what preference tuning asks of them: the policy's and the
//! reference's log-probabilities (their difference estimates the KL from the reference) and
//! the reward a reward model or a classifier gives the prompt + completion.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{json, Value};
use tinytune::io::Tokenizer;
use tinytune::models::{self, GenerateOptions, Sampling};
use tinytune::rng::philox4x32_10;
use tinytune::train::preference::completion_log_probs;
use tinytune::train::RewardModel;
use tinytune::{Error, Result};

use super::progress;

#[derive(Args)]
#[command(after_help = "Examples:\n  tinytune sample --model M --prompts prompts.jsonl --num-samples 2 --out samples.jsonl\n  \
tinytune sample --model M --adapter dpo/adapter --prompts held-out.jsonl --log-probs --reward-model cls/adapter --out after.jsonl\n  \
tinytune sample --model M --prompts reviews.jsonl --prompt-tokens 2-8 --out s.jsonl   # the first 2..8 tokens of each text")]
pub struct SampleArgs {
    #[command(flatten)]
    pub common: super::Common,
    /// A .jsonl file of {"prompt"} lines ({"text"} lines too: the text is the prompt).
    #[arg(long)]
    prompts: PathBuf,
    /// Use only the first N prompts.
    #[arg(long)]
    max_prompts: Option<usize>,
    /// Cut each prompt to its first n tokens, n drawn (seeded, per line) from MIN..=MAX: the
    /// prefixes of real sentences as prompts, as in the DPO paper's sentiment task.
    #[arg(long, value_name = "MIN-MAX")]
    prompt_tokens: Option<String>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// Sampling temperature [default: 1, the model's own distribution].
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Add "logp" (the policy's log-probability of the completion) and "ref_logp" (the same
    /// with the adapter off): "logp" − "ref_logp" averaged over samples estimates KL(π ‖ π_ref)
    /// when sampling at temperature 1 without top-k/top-p.
    #[arg(long)]
    log_probs: bool,
    /// Add "reward": an adapter directory with a head over the same --model. A one-output head
    /// (a reward model) gives its score; a classifier the probability of --reward-label.
    #[arg(long)]
    reward_model: Option<PathBuf>,
    /// The class of a classifier that counts as reward [default: 1].
    #[arg(long, default_value_t = 1)]
    reward_label: usize,
    /// Write the JSONL here (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
    /// With --reward-model and --num-samples ≥ 2: write preference pairs here, one
    /// {"prompt", "chosen", "rejected"} line per prompt, the sample with the highest reward
    /// chosen and the one with the lowest rejected (prompts whose samples tie are skipped):
    /// the DPO paper's protocol, ready for `finetune --objective dpo`.
    #[arg(long)]
    pairs_out: Option<PathBuf>,
    /// Write the prompts as used (after --prompt-tokens and --max-prompts) here as {"prompt"}
    /// lines: the prompt file of `finetune --objective grpo`.
    #[arg(long)]
    prompts_out: Option<PathBuf>,
}

/// The prompts of a file: each line's "prompt" (or "text") with its line number.
fn read_prompts(path: &Path) -> Result<Vec<(usize, String)>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: name.clone(), msg: e.to_string() })?;
    let bad = |line: usize, msg: String| Error::Format { path: name.clone(), msg: format!("line {line}: {msg}") };
    let mut out = Vec::new();
    for (i, l) in text.strip_prefix('\u{feff}').unwrap_or(&text).lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l).map_err(|e| bad(i + 1, format!("not valid JSON: {e}")))?;
        let p = v.get("prompt").or_else(|| v.get("text")).and_then(Value::as_str);
        let p = p.ok_or_else(|| bad(i + 1, "needs a string \"prompt\" (or \"text\")".into()))?;
        if p.is_empty() {
            return Err(bad(i + 1, "the prompt is empty".into()));
        }
        out.push((i + 1, p.to_string()));
    }
    if out.is_empty() {
        return Err(Error::Format { path: name, msg: "no prompts: the file is empty (or only blank lines)".into() });
    }
    Ok(out)
}

fn parse_range(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::InvalidArgument { op: "--prompt-tokens", msg: format!("'{s}' is not MIN-MAX with 1 ≤ MIN ≤ MAX (e.g. 2-8)") };
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

pub fn sample(args: SampleArgs) -> Result<()> {
    if args.num_samples == 0 {
        return Err(Error::InvalidArgument { op: "--num-samples", msg: "must be at least 1".into() });
    }
    let device = args.common.device()?;
    let (model, _) = args.common.load(&device)?;
    let tok = Tokenizer::for_model(&args.common.model)?;
    // The reward reads the sampled ids (not the text re-encoded), as GRPO and PPO do.
    let scorer = args
        .reward_model
        .as_ref()
        .map(|d| RewardModel::load(&args.common.model, d, args.reward_label, &device, args.common.base_dtype))
        .transpose()?;
    if args.pairs_out.is_some() && (scorer.is_none() || args.num_samples < 2) {
        return Err(Error::InvalidArgument {
            op: "--pairs-out",
            msg: "ranks samples: it needs --reward-model and --num-samples 2 or more".into(),
        });
    }
    let create = |p: &Path| -> Result<std::io::BufWriter<std::fs::File>> {
        Ok(std::io::BufWriter::new(std::fs::File::create(p).map_err(|e| Error::Io { path: p.display().to_string(), msg: e.to_string() })?))
    };
    let mut pairs_out = args.pairs_out.as_deref().map(create).transpose()?;
    let mut prompts_out = args.prompts_out.as_deref().map(create).transpose()?;
    let (mut n_pairs, mut ties) = (0usize, 0usize);
    let mut prompts = read_prompts(&args.prompts)?;
    if let Some(n) = args.max_prompts {
        prompts.truncate(n);
    }
    let range = args.prompt_tokens.as_deref().map(parse_range).transpose()?;
    let sampling = Sampling::Sample { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p };
    let stop_tokens: Vec<u32> = if args.chat { tok.stop_ids() } else { tok.eos_id().into_iter().collect() };
    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(create(p)?),
        None => Box::new(std::io::stdout().lock()),
    };
    let io =
        |e: std::io::Error| Error::Io { path: args.out.as_ref().map_or("stdout".into(), |p| p.display().to_string()), msg: e.to_string() };
    let mut task = progress::Task::new(format!("sampling {} × {} completions", prompts.len(), args.num_samples), prompts.len());
    let (mut rewards, mut kls) = (Vec::new(), Vec::new());
    for (k, (line, text)) in prompts.iter().enumerate() {
        let mut ids = if args.chat { tok.encode_chat(&[("user", text.as_str())], true)? } else { tok.encode(text, true)? };
        if let Some((lo, hi)) = range {
            // A draw per line from the seed: the same prompts whatever else the file holds.
            let w = philox4x32_10([*line as u32, 0x5052_4d54, 0, 0], [args.seed as u32, (args.seed >> 32) as u32]);
            let n = lo + (w[0] as usize) % (hi - lo + 1);
            ids.truncate(n);
        }
        let prompt_text = tok.decode_lossy(&ids, false)?;
        if let Some(w) = prompts_out.as_mut() {
            writeln!(w, "{}", json!({ "prompt": prompt_text }))
                .map_err(|e| Error::Io { path: "--prompts-out".into(), msg: e.to_string() })?;
        }
        let opts = GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            sampling: sampling.clone(),
            repetition_penalty: 1.0,
            seed: tinytune::peft::mix(args.seed, *line as u64),
            stop_tokens: stop_tokens.clone(),
        };
        let completions = models::generate_samples(model.as_ref(), &ids, args.num_samples, &opts, &device)?;
        let logps = if args.log_probs {
            let policy = completion_log_probs(model.as_ref(), &ids, &completions, &device)?;
            let reference = tinytune::nn::with_adapters_off(|| completion_log_probs(model.as_ref(), &ids, &completions, &device))?;
            Some((policy, reference))
        } else {
            None
        };
        let texts: Vec<String> = completions.iter().map(|c| tok.decode_lossy(c, true)).collect::<Result<_>>()?;
        let scores = match &scorer {
            Some(s) => {
                let rows: Vec<Vec<u32>> = completions.iter().map(|c| ids.iter().chain(c).copied().collect()).collect();
                Some(s.score(&rows, &device)?)
            }
            None => None,
        };
        for (j, c) in texts.iter().enumerate() {
            let mut v = json!({ "line": line, "sample": j, "prompt": prompt_text, "completion": c, "tokens": completions[j].len() });
            if let Some((p, r)) = &logps {
                v["logp"] = json!(p[j]);
                v["ref_logp"] = json!(r[j]);
                kls.push(p[j] - r[j]);
            }
            if let Some(s) = &scores {
                v["reward"] = json!(s[j]);
                rewards.push(s[j]);
            }
            writeln!(out, "{v}").map_err(io)?;
        }
        if let (Some(w), Some(s)) = (pairs_out.as_mut(), &scores) {
            let best = (0..s.len()).max_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap_or(0);
            let worst = (0..s.len()).min_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap_or(0);
            if s[best] > s[worst] && texts[best] != texts[worst] {
                let pair = json!({ "prompt": prompt_text, "chosen": texts[best], "rejected": texts[worst],
                                   "chosen_reward": s[best], "rejected_reward": s[worst] });
                writeln!(w, "{pair}").map_err(|e| Error::Io { path: "--pairs-out".into(), msg: e.to_string() })?;
                n_pairs += 1;
            } else {
                ties += 1;
            }
        }
        task.set(k + 1, prompts.len());
    }
    out.flush().map_err(io)?;
    if let Some(w) = prompts_out.as_mut() {
        w.flush().map_err(|e| Error::Io { path: "--prompts-out".into(), msg: e.to_string() })?;
    }
    if let Some(w) = pairs_out.as_mut() {
        w.flush().map_err(|e| Error::Io { path: "--pairs-out".into(), msg: e.to_string() })?;
    }
    task.finish();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut summary = format!("{} completions of {} prompts", prompts.len() * args.num_samples, prompts.len());
    if !rewards.is_empty() {
        summary += &format!("; mean reward {:.4}", mean(&rewards));
    }
    if !kls.is_empty() {
        summary += &format!("; KL from the reference {:.4} nats (mean of logp − ref_logp)", mean(&kls));
    }
    if let Some(p) = &args.pairs_out {
        summary += &format!("; {n_pairs} pairs written to {} ({ties} prompts skipped: their samples tie)", p.display());
    }
    note!("{summary}");
    if args.common.json && args.out.is_some() {
        let opt = |v: &[f64]| (!v.is_empty()).then(|| mean(v));
        outln!(
            "{}",
            json!({ "prompts": prompts.len(), "completions": prompts.len() * args.num_samples, "mean_reward": opt(&rewards),
                    "kl": opt(&kls), "pairs": args.pairs_out.as_ref().map(|_| n_pairs) })
        );
    }
    Ok(())
}
