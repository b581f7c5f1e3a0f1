//! `tinytune classify`: the label and class probabilities of texts, by a fine-tuned
//! classification head (`--adapter`) or zero-shot by the language model (`--labels`: the
//! label words' likelihood after a prompt). On labelled data, also accuracy and the confusion
//! matrix.

use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args};
use serde_json::json;
use tinytune::io::Tokenizer;
use tinytune::train::data::{DataOptions, Dataset};
use tinytune::train::{class_probabilities_observed, label_scores};
use tinytune::{Error, Result};

#[derive(Args)]
#[command(group(ArgGroup::new("input").required(true).args(["text", "data"])))]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub common: super::Common,
    /// A text to classify (repeatable).
    #[arg(long)]
    text: Vec<String>,
    /// A .jsonl file of {"text"} lines, or {"text", "label"} lines (then accuracy and the
    /// confusion matrix are printed too).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The class names, comma-separated, in class order. Without --adapter: zero-shot, the
    /// words whose likelihood after the prompt decides (e.g. negative,positive).
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Zero-shot: the prompt, with {text} where the text goes; the label word follows it.
    #[arg(long, default_value = "Review: {text}\nSentiment:")]
    prompt_template: String,
    /// Zero-shot: wrap the prompt as a user message in the model's chat template (the label
    /// follows the assistant's turn start).
    #[arg(long)]
    chat: bool,
    /// With --adapter: examples are cut to this many tokens [default: the length the adapter
    /// was trained with when it says, else 256, or the model's context if shorter].
    #[arg(long)]
    max_len: Option<usize>,
    /// Examples scored at once (with --adapter).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

/// The texts, and their labels when every line has one.
fn read(args: &ClassifyArgs) -> Result<(Vec<String>, Option<Vec<usize>>)> {
    let Some(path) = &args.data else { return Ok((args.text.clone(), None)) };
    let bad = |line: usize, msg: String| Error::Format { path: path.display().to_string(), msg: format!("line {line}: {msg}") };
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), msg: e.to_string() })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let (mut texts, mut labels) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(i + 1, format!("invalid JSON: {e}")))?;
        texts.push(v.get("text").and_then(|t| t.as_str()).ok_or_else(|| bad(i + 1, "no string field \"text\"".into()))?.to_string());
        labels.push(match v.get("label") {
            None => None,
            Some(serde_json::Value::Bool(b)) => Some(*b as usize),
            Some(l) => Some(l.as_u64().ok_or_else(|| bad(i + 1, format!("'label' must be a non-negative integer, got {l}")))? as usize),
        });
    }
    if texts.is_empty() {
        return Err(Error::Format { path: path.display().to_string(), msg: "no lines with text".into() });
    }
    let labels = labels.iter().all(Option::is_some).then(|| labels.into_iter().flatten().collect());
    Ok((texts, labels))
}

pub fn classify(args: ClassifyArgs) -> Result<()> {
    let device = args.common.device()?;
    let (texts, truth) = read(&args)?;
    let (model, head, trained) = args.common.load_adapter(&device)?;
    let tok = Tokenizer::for_model(&args.common.model)?;
    let probs: Vec<Vec<f64>> = match (&head, &args.labels) {
        (Some(head), _) => {
            let n = head.num_classes();
            if let Some(l) = args.labels.as_ref().filter(|l| l.len() != n) {
                return Err(Error::InvalidArgument {
                    op: "classify",
                    msg: format!("--labels names {} classes, the adapter's head has {n}", l.len()),
                });
            }
            let default = trained.seq_len.unwrap_or(256);
            let max_len = args.max_len.unwrap_or_else(|| model.max_positions().map_or(default, |c| c.min(default)));
            let lines: String = texts.iter().map(|t| format!("{}\n", json!({ "text": t, "label": 0 }))).collect();
            let opts = DataOptions {
                seq_len: max_len,
                context: model.max_positions(),
                add_special_tokens: trained.add_special_tokens,
                ..DataOptions::default()
            };
            let name = args.data.as_deref().map_or("--text".into(), |p: &Path| p.display().to_string());
            let ds = Dataset::from_jsonl_str(&lines, &name, &tok, &opts)?;
            let mut task = super::progress::Task::new(format!("classifying {} texts", ds.len()), ds.len());
            let p = class_probabilities_observed(model.as_ref(), head, &ds, args.batch_size, &device, &mut |d, n| task.set(d, n))?;
            task.finish();
            p
        }
        (None, Some(labels)) => {
            if labels.len() < 2 {
                return Err(Error::InvalidArgument { op: "classify", msg: "--labels needs at least two class names".into() });
            }
            if !args.prompt_template.contains("{text}") {
                return Err(Error::InvalidArgument { op: "classify", msg: "--prompt-template needs {text} where the text goes".into() });
            }
            // A label word follows the prompt after a space, as it would in running text.
            let label_ids = labels.iter().map(|l| tok.encode(&format!(" {}", l.trim()), false)).collect::<Result<Vec<_>>>()?;
            let mut out = Vec::new();
            let mut task = super::progress::Task::new(format!("scoring {} labels for {} texts", labels.len(), texts.len()), texts.len());
            for t in &texts {
                let prompt = args.prompt_template.replace("{text}", t);
                let ids = if args.chat { tok.encode_chat(&[("user", prompt.as_str())], true)? } else { tok.encode(&prompt, true)? };
                out.push(label_scores(model.as_ref(), &ids, &label_ids, &device)?.1);
                task.set(out.len(), texts.len());
            }
            task.finish();
            out
        }
        (None, None) => {
            return Err(Error::InvalidArgument {
                op: "classify",
                msg: "give --adapter (a fine-tuned classification head) or --labels (zero-shot: class names the model scores)".into(),
            })
        }
    };
    let classes = probs.first().map_or(0, Vec::len);
    let name = |c: usize| args.labels.as_ref().and_then(|l| l.get(c)).cloned().unwrap_or_else(|| c.to_string());
    let predicted: Vec<usize> =
        probs.iter().map(|p| p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)).collect();
    if let Some(t) = &truth {
        if let Some((i, &l)) = t.iter().enumerate().find(|(_, &l)| l >= classes) {
            return Err(Error::InvalidArgument {
                op: "classify",
                msg: format!("example {}: label {l} is not one of the {classes} classes", i + 1),
            });
        }
    }
    let confusion = truth.as_ref().map(|t| {
        let mut m = vec![vec![0usize; classes]; classes];
        for (&want, &got) in t.iter().zip(&predicted) {
            m[want][got] += 1;
        }
        m
    });
    let accuracy = truth.as_ref().map(|t| t.iter().zip(&predicted).filter(|(a, b)| a == b).count() as f64 / t.len() as f64);
    if args.common.json {
        let preds: Vec<_> = texts
            .iter()
            .zip(&probs)
            .zip(&predicted)
            .map(|((t, p), &c)| json!({ "text": t, "label": c, "name": name(c), "probabilities": p }))
            .collect();
        outln!(
            "{}",
            json!({ "predictions": preds, "labels": (0..classes).map(name).collect::<Vec<_>>(), "accuracy": accuracy, "confusion": confusion })
        );
        return Ok(());
    }
    for ((t, p), &c) in texts.iter().zip(&probs).zip(&predicted) {
        let shown: String = if t.chars().count() > 60 { t.chars().take(57).collect::<String>() + "..." } else { t.clone() };
        let ps = p.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(" ");
        outln!("{:<12} {:.3}  [{ps}]  {shown}", name(c), p[c]);
    }
    if let (Some(acc), Some(m)) = (accuracy, &confusion) {
        outln!("accuracy {acc:.4} ({} examples); confusion (rows: true label, columns: predicted):", texts.len());
        let width = (0..classes).map(|c| name(c).len()).max().unwrap_or(1).max(5);
        outln!("{:>width$} {}", "", (0..classes).map(|c| format!("{:>width$}", name(c))).collect::<Vec<_>>().join(" "));
        for (c, row) in m.iter().enumerate() {
            outln!("{:>width$} {}", name(c), row.iter().map(|n| format!("{n:>width$}")).collect::<Vec<_>>().join(" "));
        }
    }
    Ok(())
}
