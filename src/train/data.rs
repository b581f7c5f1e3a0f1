//! Training data from JSONL files: one JSON object a line, tokenized into examples, split into
//! training and held-out sets, shuffled per epoch with a seed, and batched into tensors.
//!
//! # Formats
//!
//! The format of a file is read from the keys of its first line; every other line must have the
//! same keys. Keys that belong to no format are ignored (`{"text": .., "book": ..}` is plain
//! text); a line that mixes the keys of two formats is an error. Blank lines are skipped.
//!
//! | keys | [`DataFormat`] | tokens | loss on |
//! |---|---|---|---|
//! | `text` | [`Text`](DataFormat::Text) | `encode(text)` + EOS | every token |
//! | `prompt`, `completion` | [`PromptCompletion`](DataFormat::PromptCompletion) | `encode(prompt)` + `encode(completion)` + EOS | the completion's tokens and the EOS |
//! | `messages` | [`Messages`](DataFormat::Messages) | `encode(chat_template(messages))` | the assistant turns' tokens |
//! | `text`, `label` | [`Classification`](DataFormat::Classification) | `encode(text)` | none: the label is the target |
//! | `prompt` | [`Prompt`](DataFormat::Prompt) | `encode(prompt)` | none: an online method samples the completions |
//! | `prompt`, `chosen`, `rejected` | [`Preference`](DataFormat::Preference) | two sequences: prompt + chosen, prompt + rejected | each completion's tokens (and EOS) |
//!
//! `encode(s)` adds what the tokenizer adds by default (a BOS for Llama 2, nothing for GPT-2 and
//! SmolLM2); a completion is encoded on its own without special tokens, so its ids are those it
//! has alone (a BPE merge across the prompt/completion boundary is not made). The EOS is appended
//! when [`DataOptions::add_eos`] is set. `messages` is a list of `{"role", "content"}` objects
//! rendered with [`Tokenizer::apply_chat_template`]; the tokens of assistant turn `i` are found by
//! rendering prefixes: they run from the token count of `messages[..i]` rendered with the
//! generation prompt (`<|im_start|>assistant\n` in ChatML) to the token count of `messages[..=i]`,
//! so they are the turn's content, its end marker (`<|im_end|>`) and the separator after it. A
//! classification label is a non-negative integer, or a bool (`false` = 0, `true` = 1).
//!
//! A preference line (TRL's format) holds strings — the completions encoded after the prompt as
//! a prompt/completion line's — or lists of messages (the prompt's turns, then each completion's
//! assistant turns, through the chat template). Without `prompt`, the two sequences' common
//! start is the prompt. A pair whose two completions are the same tokens is dropped and counted
//! ([`DataStats::identical_pairs`]); a prompt that fills the model's context is an error naming
//! its line. [`Dataset::batch`] puts the chosen sequences first and the rejected ones after them.
//!
//! # Lengths
//!
//! An example longer than [`DataOptions::seq_len`] tokens keeps its first `seq_len` tokens (the
//! count is in [`DataStats::truncated`]); a language-modelling example left with no token to
//! predict (an empty text, or a prompt that fills `seq_len`) is dropped and counted in
//! [`DataStats::no_targets`]. With [`DataOptions::pack`], the documents of a `text` file are
//! concatenated, each followed by EOS, and cut into windows of exactly `seq_len` tokens (the
//! tokens after the last full window are dropped and counted): no padding, loss on every token.
//!
//! # Batches
//!
//! [`Dataset::batch`] right-pads the chosen examples to the longest of them and gives, for a batch
//! of `b` examples padded to `T` tokens, `ids [b, T]` and `targets [b, T]` aligned with the
//! positions of the logits: `targets[i, t] = ids[i, t + 1]` when token `t + 1` of example `i` is a
//! loss token, else `-100` (also at the last position and on padding), so the mean next-token loss
//! is `logits.cross_entropy(&targets, -100, Mean)` on logits `[b, T, vocab]`.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::io::Tokenizer;
use crate::rng::philox4x32_10;
use crate::tensor::Tensor;
use crate::Device;

/// The target value of a position that contributes no loss (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i32 = -100;

/// The layout of a JSONL file, from the keys of its first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// `{"text"}`: language modelling, loss on every token.
    Text,
    /// `{"prompt", "completion"}`: loss on the completion's tokens (and the EOS) only.
    PromptCompletion,
    /// `{"messages": [{"role", "content"}, ..]}`: loss on the assistant turns only.
    Messages,
    /// `{"text", "label"}`: sequence classification.
    Classification,
    /// `{"prompt", "chosen", "rejected"}` (the prompt optional): preference pairs, loss on the
    /// two completions' tokens (DPO, a reward model).
    Preference,
    /// `{"prompt"}` alone: prompts for an online method (GRPO), which samples the completions.
    Prompt,
}

impl DataFormat {
    /// The keys a line of this format must have.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            DataFormat::Text => &["text"],
            DataFormat::PromptCompletion => &["prompt", "completion"],
            DataFormat::Messages => &["messages"],
            DataFormat::Classification => &["text", "label"],
            DataFormat::Preference => &["chosen", "rejected"],
            DataFormat::Prompt => &["prompt"],
        }
    }

    /// The keys a line of this format may have: its own, and optional ones.
    fn allowed(self) -> &'static [&'static str] {
        match self {
            DataFormat::Preference => &["prompt", "chosen", "rejected"],
            f => f.keys(),
        }
    }

    /// The kind of training the format is for.
    pub fn kind(self) -> DataKind {
        match self {
            DataFormat::Classification => DataKind::Classification,
            DataFormat::Preference => DataKind::Preference,
            DataFormat::Prompt => DataKind::Prompts,
            _ => DataKind::Lm,
        }
    }

    fn name(self) -> &'static str {
        match self {
            DataFormat::Text => "{\"text\"}",
            DataFormat::PromptCompletion => "{\"prompt\", \"completion\"}",
            DataFormat::Messages => "{\"messages\"}",
            DataFormat::Classification => "{\"text\", \"label\"}",
            DataFormat::Preference => "{\"prompt\", \"chosen\", \"rejected\"}",
            DataFormat::Prompt => "{\"prompt\"}",
        }
    }

    /// The format of a JSONL file, from its first non-blank line alone (`None` when that line
    /// is not a JSON object with a format's keys); [`Dataset::load`] checks every line.
    pub fn of_file(path: impl AsRef<Path>) -> Result<Option<DataFormat>> {
        use std::io::BufRead;
        let path = path.as_ref();
        let io = |e: std::io::Error| Error::Io { path: path.display().to_string(), msg: e.to_string() };
        let file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
        for line in file.lines() {
            let line = line.map_err(io)?;
            let line = line.trim().trim_start_matches('\u{feff}');
            if !line.is_empty() {
                return Ok(serde_json::from_str::<Value>(line).ok().and_then(|v| v.as_object().and_then(DataFormat::of)));
            }
        }
        Ok(None)
    }

    /// The format a line's keys select: `chosen`/`rejected`, else `messages`, else
    /// `prompt`/`completion`, else `text` with `label`, else `text`.
    fn of(obj: &Map<String, Value>) -> Option<DataFormat> {
        if obj.contains_key("chosen") || obj.contains_key("rejected") {
            Some(DataFormat::Preference)
        } else if obj.contains_key("messages") {
            Some(DataFormat::Messages)
        } else if obj.contains_key("completion") {
            Some(DataFormat::PromptCompletion)
        } else if obj.contains_key("prompt") {
            Some(DataFormat::Prompt)
        } else if obj.contains_key("text") {
            Some(if obj.contains_key("label") { DataFormat::Classification } else { DataFormat::Text })
        } else {
            None
        }
    }
}

/// Every key some format uses; a line may not carry the keys of another format than its file's.
const KNOWN_KEYS: [&str; 7] = ["text", "label", "prompt", "completion", "messages", "chosen", "rejected"];

/// What a data set trains: next-token prediction, or one label per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    Lm,
    Classification,
    /// Pairs of a chosen and a rejected completion of one prompt.
    Preference,
    /// Prompts alone (online methods sample their completions).
    Prompts,
}

/// How a file is turned into examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOptions {
    /// Most tokens per example; longer examples keep their first `seq_len` tokens. With `pack`,
    /// the exact length of every window.
    pub seq_len: usize,
    /// The model's maximum number of positions, when known: an example longer than this (which
    /// can only happen when `seq_len` is larger) is an error naming its line.
    pub context: Option<usize>,
    /// `text` files only: concatenate the documents, each followed by EOS, into windows of
    /// exactly `seq_len` tokens instead of one padded example per document.
    pub pack: bool,
    /// Append the tokenizer's EOS to each `text` document and each completion (unpacked; packing
    /// always separates documents with EOS). Not used for `messages` (the chat template ends
    /// every turn) or classification.
    pub add_eos: bool,
    /// Encode `text`, `prompt` and labelled text with the tokenizer's special tokens (a BOS
    /// for Llama 2, SmolLM2's nothing): `add_special_tokens` of `transformers`.
    pub add_special_tokens: bool,
}

impl Default for DataOptions {
    /// `seq_len` 512, no context limit, no packing, EOS appended.
    fn default() -> Self {
        DataOptions { seq_len: 512, context: None, pack: false, add_eos: true, add_special_tokens: true }
    }
}

/// Counts from loading a file (shared, as loaded, by the two halves of a split).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Non-blank lines read.
    pub lines: usize,
    /// Examples longer than `seq_len` that were cut to `seq_len` tokens.
    pub truncated: usize,
    /// Language-modelling examples dropped because no token was left to predict.
    pub no_targets: usize,
    /// Packing: tokens after the last full window, dropped.
    pub packed_remainder: usize,
    /// Preference pairs whose chosen and rejected completions have the same tokens: they
    /// carry no preference, so they are dropped (and counted; the first one's line is kept).
    pub identical_pairs: usize,
    pub first_identical_line: Option<usize>,
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids, at most `seq_len` of them.
    pub ids: Vec<u32>,
    /// `is_target[j]`: token `j` is predicted with loss (from position `j − 1`). Always false at
    /// `j = 0` (nothing precedes it) and everywhere for classification.
    pub is_target: Vec<bool>,
    /// The class, for classification.
    pub label: Option<u32>,
    /// The 1-based line of the file the example comes from (with packing: where the window's
    /// first token comes from).
    pub line: usize,
    /// A preference pair: `ids`/`is_target` are the prompt and the chosen completion, this is
    /// the prompt and the rejected one.
    pub rejected: Option<Sequence>,
    /// A preference pair's reference log-probabilities `(chosen, rejected)`, when computed
    /// beforehand ([`Dataset::set_reference_log_probs`]).
    pub reference: Option<(f64, f64)>,
}

/// Token ids and which of them are predicted with loss (see [`Example`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub is_target: Vec<bool>,
}

impl Example {
    /// Number of tokens predicted with loss.
    pub fn n_targets(&self) -> usize {
        self.is_target.iter().filter(|&&t| t).count()
    }
}

/// How much of a data set [`Dataset::split_holdout`] holds out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Holdout {
    /// This fraction of the examples, rounded to the nearest count (at least 1), `0 < f < 1`.
    Fraction(f64),
    /// This many examples, `1 ≤ n < len`.
    Count(usize),
}

/// A batch of examples as tensors, right-padded to the longest example in it (`T` tokens).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids `[b, T]` U32; padding is the data set's pad id.
    pub ids: Tensor,
    /// `[b, T]` F32, 1 on real tokens and 0 on padding; `None` when no example is padded.
    pub keep: Option<Tensor>,
    /// Next-token targets `[b, T]` I32 aligned with the logits' positions:
    /// `targets[i, t] = ids[i, t + 1]` where token `t + 1` is a loss token, else
    /// [`IGNORE_INDEX`] (the last position, padding, prompts, non-assistant turns, and every
    /// position of a classification batch). Loss: `logits.cross_entropy(&targets, -100, Mean)`.
    pub targets: Tensor,
    /// Class labels `[b]` I32, for classification.
    pub labels: Option<Tensor>,
    /// Preference pairs: rows `0..pairs` are the chosen sequences and rows `pairs..2·pairs`
    /// the rejected ones, in the same order (all per-row fields cover the `2·pairs` rows).
    pub pairs: Option<usize>,
    /// The pairs' reference log-probabilities `(chosen, rejected)`, when every pair has them.
    pub reference: Option<Vec<(f64, f64)>>,
    /// Each example's number of real tokens (its last real token is at `lengths[i] − 1`).
    pub lengths: Vec<usize>,
    /// Number of targets that are not [`IGNORE_INDEX`].
    pub n_target_tokens: usize,
    /// Number of real (not padding) tokens.
    pub n_tokens: usize,
}

impl Batch {
    /// Rows of token ids with their loss flags (`is_target[j]`: token `j` is predicted) as one
    /// right-padded batch: the layout of [`Dataset::batch`], without labels or pairs.
    pub fn from_rows(rows: &[(&[u32], &[bool])], pad_id: u32, device: &Device) -> Result<Batch> {
        let lengths: Vec<usize> = rows.iter().map(|s| s.0.len()).collect();
        let (b, t) = (rows.len(), lengths.iter().copied().max().unwrap_or(0));
        let mut ids = vec![pad_id; b * t];
        let mut keep = vec![0f32; b * t];
        let mut targets = vec![IGNORE_INDEX; b * t];
        for (row, (r_ids, r_target)) in rows.iter().enumerate() {
            let at = row * t;
            ids[at..at + r_ids.len()].copy_from_slice(r_ids);
            keep[at..at + r_ids.len()].fill(1.0);
            for p in 0..r_ids.len().saturating_sub(1) {
                if r_target[p + 1] {
                    targets[at + p] = r_ids[p + 1] as i32;
                }
            }
        }
        let padded = lengths.iter().any(|&l| l < t);
        Ok(Batch {
            ids: Tensor::from_vec(ids, &[b, t], device)?,
            keep: if padded { Some(Tensor::from_vec(keep, &[b, t], device)?) } else { None },
            n_target_tokens: targets.iter().filter(|&&x| x != IGNORE_INDEX).count(),
            targets: Tensor::from_vec(targets, &[b, t], device)?,
            labels: None,
            pairs: None,
            reference: None,
            n_tokens: lengths.iter().sum(),
            lengths,
        })
    }
}

/// A tokenized JSONL file.
#[derive(Debug, Clone)]
pub struct Dataset {
    path: String,
    format: DataFormat,
    examples: Vec<Example>,
    pad_id: u32,
    seq_len: usize,
    stats: DataStats,
}

fn format_err(path: &str, msg: impl Into<String>) -> Error {
    Error::Format { path: path.to_string(), msg: msg.into() }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument { op: "Dataset::load", msg: msg.into() }
}

/// "a string", "a number", ... for error messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One line's fields, checked against the file's format.
enum Record<'a> {
    Text(&'a str),
    PromptCompletion(&'a str, &'a str),
    Messages(Vec<(&'a str, &'a str)>),
    Classification(&'a str, u32),
    Prompt(&'a str),
    /// `(prompt, chosen, rejected)`.
    Preference(Option<Side<'a>>, Side<'a>, Side<'a>),
}

/// One field of a preference line: plain text, or a list of messages for the chat template.
enum Side<'a> {
    Text(&'a str),
    Messages(Vec<(&'a str, &'a str)>),
}

fn side<'a>(obj: &'a Map<String, Value>, key: &str, path: &str, line: usize) -> Result<Side<'a>> {
    match &obj[key] {
        Value::String(s) => Ok(Side::Text(s)),
        v @ Value::Array(_) => Ok(Side::Messages(parse_messages(v, key, path, line)?)),
        v => Err(format_err(
            path,
            format!("line {line}: '{key}' must be a string or a list of {{\"role\", \"content\"}} messages, got {}", json_kind(v)),
        )),
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str, path: &str, line: usize) -> Result<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(format_err(path, format!("line {line}: '{key}' must be a string, got {}", json_kind(v)))),
        None => Err(format_err(path, format!("line {line}: missing key '{key}'"))),
    }
}

fn parse_label(v: &Value, path: &str, line: usize) -> Result<u32> {
    let bad = |what: String| format_err(path, format!("line {line}: 'label' must be a non-negative integer or a bool, got {what}"));
    match v {
        Value::Bool(b) => Ok(*b as u32),
        Value::Number(n) => match n.as_u64() {
            Some(x) => i32::try_from(x).map(|l| l as u32).map_err(|_| bad(format!("{x}, which is too large (at most {})", i32::MAX))),
            None => Err(bad(n.to_string())),
        },
        other => Err(bad(json_kind(other).to_string())),
    }
}

fn parse_messages<'a>(v: &'a Value, key: &str, path: &str, line: usize) -> Result<Vec<(&'a str, &'a str)>> {
    let Value::Array(list) = v else {
        return Err(format_err(path, format!("line {line}: '{key}' must be an array of {{\"role\", \"content\"}}, got {}", json_kind(v))));
    };
    if list.is_empty() {
        return Err(format_err(path, format!("line {line}: '{key}' is empty")));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(m) = m else {
                return Err(format_err(
                    path,
                    format!("line {line}: {key}[{i}] must be an object {{\"role\", \"content\"}}, got {}", json_kind(m)),
                ));
            };
            let field = |f: &str| match m.get(f) {
                Some(Value::String(s)) => Ok(s.as_str()),
                Some(v) => Err(format_err(path, format!("line {line}: {key}[{i}].{f} must be a string, got {}", json_kind(v)))),
                None => Err(format_err(path, format!("line {line}: {key}[{i}] has no '{f}'"))),
            };
            Ok((field("role")?, field("content")?))
        })
        .collect()
}

/// Checks one line's object against `format` (detected on line `first`) and takes its fields.
fn record<'a>(obj: &'a Map<String, Value>, format: DataFormat, first: usize, path: &str, line: usize) -> Result<Record<'a>> {
    for key in format.keys() {
        if !obj.contains_key(*key) {
            return Err(format_err(path, format!("line {line}: missing key '{key}' (the file is {}, from line {first})", format.name())));
        }
    }
    let foreign: Vec<&str> = KNOWN_KEYS.iter().copied().filter(|k| obj.contains_key(*k) && !format.allowed().contains(k)).collect();
    if !foreign.is_empty() {
        return Err(format_err(
            path,
            format!("line {line}: key(s) {foreign:?} of another format in a {} file (format from line {first})", format.name()),
        ));
    }
    Ok(match format {
        DataFormat::Text => Record::Text(get_str(obj, "text", path, line)?),
        DataFormat::PromptCompletion => {
            Record::PromptCompletion(get_str(obj, "prompt", path, line)?, get_str(obj, "completion", path, line)?)
        }
        DataFormat::Messages => Record::Messages(parse_messages(&obj["messages"], "messages", path, line)?),
        DataFormat::Classification => Record::Classification(get_str(obj, "text", path, line)?, parse_label(&obj["label"], path, line)?),
        DataFormat::Prompt => Record::Prompt(get_str(obj, "prompt", path, line)?),
        DataFormat::Preference => Record::Preference(
            obj.contains_key("prompt").then(|| side(obj, "prompt", path, line)).transpose()?,
            side(obj, "chosen", path, line)?,
            side(obj, "rejected", path, line)?,
        ),
    })
}

/// Philox draws for shuffles: key = the seed, counter = `[k_lo, k_hi ⊕ domain, s_lo, s_hi]` for
/// block `k` of stream `s`; each block gives two 64-bit words `(w₀ | w₁ << 32)`, `(w₂ | w₃ << 32)`.
const DOMAIN_EPOCH: u32 = 0x4550_4f43; // "EPOC"
const DOMAIN_SPLIT: u32 = 0x5350_4c54; // "SPLT"
const DOMAIN_SUBSET: u32 = 0x5355_4253; // "SUBS"
const DOMAIN_BUCKETS: u32 = 0x4255_434b; // "BUCK"

/// A uniformly random permutation of `0..n`: Fisher–Yates from the top, `i = n−1 .. 1`, swapping
/// `i` with `j = ⌊u · (i + 1) / 2⁶⁴⌋` for the next 64-bit draw `u` (bias below `n / 2⁶⁴`).
fn permutation(n: usize, seed: u64, domain: u32, stream: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let key = [seed as u32, (seed >> 32) as u32];
    let mut words = [0u32; 4];
    for (draw, i) in (1..n).rev().enumerate() {
        let k = (draw / 2) as u64;
        if draw % 2 == 0 {
            words = philox4x32_10([k as u32, (k >> 32) as u32 ^ domain, stream as u32, (stream >> 32) as u32], key);
        }
        let (lo, hi) = if draw % 2 == 0 { (words[0], words[1]) } else { (words[2], words[3]) };
        let u = lo as u64 | (hi as u64) << 32;
        let j = ((u as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

impl Dataset {
    /// Reads and tokenizes a JSONL file (see the module documentation for the formats). Errors:
    /// [`Error::Io`] when the file cannot be read; [`Error::Format`] naming the 1-based line for a
    /// line that is not a JSON object, lacks a key of the file's format, has a value of the wrong
    /// type, mixes the keys of two formats, has a bad label, or is longer than
    /// [`DataOptions::context`]; [`Error::Format`] for a file with no examples;
    /// [`Error::InvalidArgument`] for options that cannot apply (`seq_len` 0, packing a non-`text`
    /// file or with `seq_len` above the context, EOS needed but the tokenizer has none).
    pub fn load(path: impl AsRef<Path>, tokenizer: &Tokenizer, opts: &DataOptions) -> Result<Dataset> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: name.clone(), msg: e.to_string() })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            format_err(&name, format!("line {line}: not valid UTF-8 (byte {at} of the file)"))
        })?;
        Dataset::from_jsonl_str(&text, &name, tokenizer, opts)
    }

    /// The same from JSONL text in memory; `name` is the path errors name.
    pub fn from_jsonl_str(text: &str, name: &str, tokenizer: &Tokenizer, opts: &DataOptions) -> Result<Dataset> {
        if opts.seq_len == 0 {
            return Err(invalid(format!("{name}: seq_len must be at least 1")));
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut stats = DataStats::default();
        let mut examples = Vec::new();
        let mut format: Option<(DataFormat, usize)> = None;
        // Packing: the token stream so far, and the line each window starts on.
        let mut stream: Vec<u32> = Vec::new();
        let mut window_line = 0;

        for (i, raw) in text.split('\n').enumerate() {
            let line = i + 1;
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            if raw.trim().is_empty() {
                continue;
            }
            stats.lines += 1;
            let value: Value = serde_json::from_str(raw).map_err(|e| format_err(name, format!("line {line}: not valid JSON: {e}")))?;
            let Value::Object(obj) = &value else {
                return Err(format_err(name, format!("line {line}: expected a JSON object, got {}", json_kind(&value))));
            };
            let (fmt, first) = match format {
                Some(f) => f,
                None => {
                    let Some(f) = DataFormat::of(obj) else {
                        let keys: Vec<&String> = obj.keys().collect();
                        return Err(format_err(
                            name,
                            format!(
                                "line {line}: keys {keys:?} match no format; expected {{\"text\"}}, {{\"prompt\", \"completion\"}}, \
                                 {{\"messages\"}} or {{\"text\", \"label\"}}"
                            ),
                        ));
                    };
                    check_options(f, tokenizer, opts, name)?;
                    format = Some((f, line));
                    (f, line)
                }
            };
            let rec = record(obj, fmt, first, name, line)?;
            let encode = |s: &str, special: bool| {
                tokenizer.encode(s, special).map_err(|e| format_err(name, format!("line {line}: tokenizing failed: {e}")))
            };
            let eos = tokenizer.eos_id();
            let (ids, is_target, label) = match rec {
                Record::Text(t) if opts.pack => {
                    if stream.is_empty() {
                        window_line = line;
                    }
                    stream.extend(encode(t, opts.add_special_tokens)?);
                    stream.extend(eos);
                    while stream.len() >= opts.seq_len {
                        let rest = stream.split_off(opts.seq_len);
                        let ids = std::mem::replace(&mut stream, rest);
                        let mut is_target = vec![true; ids.len()];
                        is_target[0] = false;
                        examples.push(Example { ids, is_target, label: None, line: window_line, rejected: None, reference: None });
                        window_line = line;
                    }
                    continue;
                }
                Record::Text(t) => {
                    let mut ids = encode(t, opts.add_special_tokens)?;
                    ids.extend(eos.filter(|_| opts.add_eos));
                    let n = ids.len();
                    (ids, vec![true; n], None)
                }
                Record::PromptCompletion(p, c) => {
                    let mut ids = encode(p, opts.add_special_tokens)?;
                    let n_prompt = ids.len();
                    ids.extend(encode(c, false)?);
                    ids.extend(eos.filter(|_| opts.add_eos));
                    let is_target = (0..ids.len()).map(|j| j >= n_prompt).collect();
                    (ids, is_target, None)
                }
                Record::Messages(msgs) => {
                    let (ids, is_target) = chat_example(&msgs, 0, tokenizer, name, line)?;
                    (ids, is_target, None)
                }
                Record::Preference(prompt, chosen, rejected) => {
                    let (c, r) = preference_pair(prompt, chosen, rejected, tokenizer, opts, name, line)?;
                    let mut cut = false;
                    let c = fit(c, opts, &mut cut, name, line)?;
                    let r = fit(r, opts, &mut cut, name, line)?;
                    stats.truncated += cut as usize;
                    if !c.is_target.contains(&true) || !r.is_target.contains(&true) {
                        stats.no_targets += 1;
                    } else if c == r {
                        stats.identical_pairs += 1;
                        stats.first_identical_line.get_or_insert(line);
                    } else {
                        examples.push(Example {
                            ids: c.ids,
                            is_target: c.is_target,
                            label: None,
                            line,
                            rejected: Some(r),
                            reference: None,
                        });
                    }
                    continue;
                }
                Record::Prompt(p) => {
                    let ids = encode(p, opts.add_special_tokens)?;
                    if ids.is_empty() {
                        return Err(format_err(name, format!("line {line}: the prompt has no tokens")));
                    }
                    let n = ids.len();
                    (ids, vec![false; n], None)
                }
                Record::Classification(t, label) => {
                    let ids = encode(t, opts.add_special_tokens)?;
                    if ids.is_empty() {
                        return Err(format_err(name, format!("line {line}: the text has no tokens to classify")));
                    }
                    let n = ids.len();
                    (ids, vec![false; n], Some(label))
                }
            };
            let mut cut = false;
            let Sequence { ids, is_target } = fit(Sequence { ids, is_target }, opts, &mut cut, name, line)?;
            stats.truncated += cut as usize;
            if label.is_none() && fmt != DataFormat::Prompt && !is_target.contains(&true) {
                stats.no_targets += 1;
                continue;
            }
            examples.push(Example { ids, is_target, label, line, rejected: None, reference: None });
        }

        let Some((format, _)) = format else {
            return Err(format_err(name, "no examples: the file is empty (or only blank lines)"));
        };
        stats.packed_remainder = stream.len();
        if examples.is_empty() {
            let why = if opts.pack {
                format!("its {} tokens do not fill one window of seq_len {}", stream.len(), opts.seq_len)
            } else if stats.identical_pairs > 0 {
                format!(
                    "{} of its {} pairs have the same chosen and rejected completion (the first on line {}), the rest no completion token within seq_len {}",
                    stats.identical_pairs,
                    stats.lines,
                    stats.first_identical_line.unwrap_or(0),
                    opts.seq_len
                )
            } else {
                format!("none of its {} examples has a token to predict within seq_len {}", stats.lines, opts.seq_len)
            };
            return Err(format_err(name, format!("no examples: {why}")));
        }
        let pad_id = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
        Ok(Dataset { path: name.to_string(), format, examples, pad_id, seq_len: opts.seq_len, stats })
    }

    /// The path (or name) the data came from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Number of examples (windows, when packed).
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Always false for a loaded data set (an empty file is an error); here for completeness.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    pub fn format(&self) -> DataFormat {
        self.format
    }

    pub fn kind(&self) -> DataKind {
        self.format.kind()
    }

    /// The id padding uses: the tokenizer's pad token, else its EOS, else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The `seq_len` the data was loaded with.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn stats(&self) -> &DataStats {
        &self.stats
    }

    /// The example indices from the shortest to the longest (ties in file order). Evaluation
    /// batches in this order, so a batch is not mostly padding; a sum over the data does not
    /// depend on the order.
    pub fn by_length(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        order.sort_by_key(|&i| self.examples[i].ids.len());
        order
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Example `i`; panics when `i >= len()`, as slice indexing does.
    pub fn example(&self, i: usize) -> &Example {
        &self.examples[i]
    }

    /// Total tokens over all examples.
    pub fn n_tokens(&self) -> usize {
        self.examples.iter().map(|e| e.ids.len()).sum()
    }

    /// Total loss tokens over all examples.
    pub fn n_target_tokens(&self) -> usize {
        self.examples.iter().map(Example::n_targets).sum()
    }

    /// Classification: the largest label + 1. `None` for language modelling.
    pub fn num_classes(&self) -> Option<usize> {
        if self.kind() != DataKind::Classification {
            return None;
        }
        self.examples.iter().filter_map(|e| e.label).max().map(|m| m as usize + 1)
    }

    /// Checks every label is below `n_classes` (a classifier's output count); the error names the
    /// line of the first one that is not. An error for a language-modelling data set.
    pub fn check_labels(&self, n_classes: usize) -> Result<()> {
        if self.kind() != DataKind::Classification {
            return Err(Error::InvalidArgument {
                op: "Dataset::check_labels",
                msg: format!("{} is {}, not a classification data set", self.path, self.format.name()),
            });
        }
        match self.examples.iter().find(|e| e.label.is_some_and(|l| l as usize >= n_classes)) {
            Some(e) => Err(format_err(
                &self.path,
                format!("line {}: label {} is out of range for {n_classes} classes (0..{n_classes})", e.line, e.label.unwrap_or(0)),
            )),
            None => Ok(()),
        }
    }

    /// The order of the examples in epoch `epoch`: a permutation of `0..len()` that depends only
    /// on `(epoch, seed)` (Fisher–Yates on Philox 4x32-10 draws, the same on every machine). A
    /// trainer resuming at batch `k` of an epoch takes `epoch_order(epoch, seed)[k * b..]`.
    pub fn epoch_order(&self, epoch: u64, seed: u64) -> Vec<usize> {
        permutation(self.len(), seed, DOMAIN_EPOCH, epoch)
    }

    /// The training order of epoch `epoch` in batches of `batch_size`, the batch `k` being
    /// `[k·batch_size, (k+1)·batch_size)` of it. With `buckets ≥ 2`, batches of similar length
    /// (length-bucketed batching): the [`epoch_order`](Self::epoch_order) is cut into runs of
    /// `buckets · batch_size` examples, each run is sorted by length (longest first; equal
    /// lengths keep their shuffled order) and cut into batches, and the batches are put in a
    /// seeded random order (all but a short last batch, which stays last). Every example is seen
    /// once per epoch; the order depends only on `(epoch, seed, batch_size, buckets)`, so a
    /// resumed run continues it exactly. Otherwise the plain epoch order.
    pub fn training_order(&self, epoch: u64, seed: u64, batch_size: usize, buckets: usize) -> Vec<usize> {
        let order = self.epoch_order(epoch, seed);
        if buckets < 2 || batch_size < 2 {
            return order;
        }
        let len = |i: usize| {
            let e = &self.examples[i];
            e.ids.len().max(e.rejected.as_ref().map_or(0, |r| r.ids.len()))
        };
        let mut batches: Vec<Vec<usize>> = Vec::with_capacity(order.len().div_ceil(batch_size));
        for run in order.chunks(buckets.saturating_mul(batch_size)) {
            let mut run = run.to_vec();
            run.sort_by_key(|&i| std::cmp::Reverse(len(i)));
            batches.extend(run.chunks(batch_size).map(<[usize]>::to_vec));
        }
        let full = if order.len() % batch_size == 0 { batches.len() } else { batches.len() - 1 };
        let mut out = Vec::with_capacity(order.len());
        for b in permutation(full, seed, DOMAIN_BUCKETS, epoch) {
            out.extend_from_slice(&batches[b]);
        }
        for b in &batches[full..] {
            out.extend_from_slice(b);
        }
        out
    }

    /// Splits off a held-out set: `(train, held_out)`. Which examples are held out depends only
    /// on `(len(), seed)` (a seeded permutation's first `n`, independent of
    /// [`epoch_order`](Self::epoch_order)); both halves keep the file's order and together hold
    /// every example exactly once. With packing, two windows of one document may land on both
    /// sides.
    pub fn split_holdout(&self, holdout: Holdout, seed: u64) -> Result<(Dataset, Dataset)> {
        let len = self.len();
        let n = match holdout {
            Holdout::Fraction(f) if f > 0.0 && f < 1.0 => ((f * len as f64).round() as usize).max(1),
            Holdout::Fraction(f) => {
                return Err(Error::InvalidArgument { op: "Dataset::split_holdout", msg: format!("fraction {f} is not in (0, 1)") })
            }
            Holdout::Count(n) => n,
        };
        if n == 0 || n >= len {
            return Err(Error::InvalidArgument {
                op: "Dataset::split_holdout",
                msg: format!("holding out {n} of {len} examples of {} leaves an empty side", self.path),
            });
        }
        let mut held = vec![false; len];
        for &i in &permutation(len, seed, DOMAIN_SPLIT, 0)[..n] {
            held[i] = true;
        }
        let part = |keep: bool| Dataset {
            examples: self.examples.iter().zip(&held).filter(|(_, &h)| h == keep).map(|(e, _)| e.clone()).collect(),
            ..self.clone_meta()
        };
        Ok((part(false), part(true)))
    }

    /// A seeded random subset of `n` examples (all of them when `n ≥ len`), kept in file
    /// order: a small, unbiased slice of a large file for a quick run.
    pub fn subset(&self, n: usize, seed: u64) -> Result<Dataset> {
        if n == 0 {
            return Err(Error::InvalidArgument { op: "Dataset::subset", msg: format!("a subset of 0 examples of {} is empty", self.path) });
        }
        if n >= self.len() {
            return Ok(self.clone());
        }
        let mut pick = permutation(self.len(), seed, DOMAIN_SUBSET, 0)[..n].to_vec();
        pick.sort_unstable();
        Ok(Dataset { examples: pick.into_iter().map(|i| self.examples[i].clone()).collect(), ..self.clone_meta() })
    }

    fn clone_meta(&self) -> Dataset {
        Dataset {
            path: self.path.clone(),
            format: self.format,
            examples: Vec::new(),
            pad_id: self.pad_id,
            seq_len: self.seq_len,
            stats: self.stats.clone(),
        }
    }

    /// Records each preference pair's reference log-probabilities `(chosen, rejected)`
    /// (`values[i]` for example `i`); batches then carry them ([`Batch::reference`]).
    pub fn set_reference_log_probs(&mut self, values: &[(f64, f64)]) -> Result<()> {
        if self.kind() != DataKind::Preference || values.len() != self.len() {
            return Err(invalid(format!(
                "{}: {} reference log-probabilities for {} examples of a {} file",
                self.path,
                values.len(),
                self.len(),
                self.format.name()
            )));
        }
        for (e, &v) in self.examples.iter_mut().zip(values) {
            e.reference = Some(v);
        }
        Ok(())
    }

    /// The examples `indices` (in that order) as one right-padded batch on `device`; see
    /// [`Batch`] for the layout.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<Batch> {
        if indices.is_empty() {
            return Err(Error::InvalidArgument { op: "Dataset::batch", msg: "no examples given".into() });
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::IndexOutOfRange { op: "Dataset::batch", index: bad as i64, size: self.len() });
        }
        let chosen: Vec<&Example> = indices.iter().map(|&i| &self.examples[i]).collect();
        // The rows: each example's sequence, then (preference pairs) each rejected one.
        let mut seqs: Vec<(&[u32], &[bool])> = chosen.iter().map(|e| (&e.ids[..], &e.is_target[..])).collect();
        let pairs = (self.kind() == DataKind::Preference).then_some(chosen.len());
        if pairs.is_some() {
            for e in &chosen {
                let r = e.rejected.as_ref().ok_or_else(|| {
                    invalid(format!("{}: line {}: a preference example without its rejected sequence", self.path, e.line))
                })?;
                seqs.push((&r.ids, &r.is_target));
            }
        }
        let mut batch = Batch::from_rows(&seqs, self.pad_id, device)?;
        batch.pairs = pairs;
        batch.reference = pairs.and_then(|_| chosen.iter().map(|e| e.reference).collect::<Option<Vec<_>>>());
        if self.kind() == DataKind::Classification {
            let labels: Vec<i32> = chosen.iter().map(|e| e.label.unwrap_or(0) as i32).collect();
            batch.labels = Some(Tensor::from_vec(labels, &[chosen.len()], device)?);
        }
        Ok(batch)
    }
}

/// Options that cannot apply to a format or tokenizer, found once the format is known.
fn check_options(format: DataFormat, tokenizer: &Tokenizer, opts: &DataOptions, name: &str) -> Result<()> {
    if opts.pack {
        if format != DataFormat::Text {
            return Err(invalid(format!("{name}: packing applies to {{\"text\"}} files; this one is {}", format.name())));
        }
        if let Some(ctx) = opts.context.filter(|&c| opts.seq_len > c) {
            return Err(invalid(format!(
                "{name}: packed windows of seq_len {} exceed the model's context of {ctx} positions",
                opts.seq_len
            )));
        }
        if tokenizer.eos_id().is_none() {
            return Err(invalid(format!("{name}: packing separates documents with EOS, and the tokenizer has none")));
        }
    }
    if opts.add_eos
        && matches!(format, DataFormat::Text | DataFormat::PromptCompletion | DataFormat::Preference)
        && tokenizer.eos_id().is_none()
    {
        return Err(invalid(format!("{name}: add_eos is set but the tokenizer has no EOS token (set add_eos to false)")));
    }
    Ok(())
}

/// A conversation's ids and loss mask: loss on the tokens of each assistant turn, located by
/// rendering prefixes (see the module documentation).
/// Only the assistant turns from message `from` on are targets (a preference pair's prompt
/// turns are not).
fn chat_example(msgs: &[(&str, &str)], from: usize, tokenizer: &Tokenizer, name: &str, line: usize) -> Result<(Vec<u32>, Vec<bool>)> {
    let encode = |m: &[(&str, &str)], generation_prompt: bool| {
        tokenizer.encode_chat(m, generation_prompt).map_err(|e| format_err(name, format!("line {line}: {e}")))
    };
    let ids = encode(msgs, false)?;
    let mut is_target = vec![false; ids.len()];
    for (i, (role, _)) in msgs.iter().enumerate() {
        if *role != "assistant" || i < from {
            continue;
        }
        let start = encode(&msgs[..i], true)?;
        let end = encode(&msgs[..=i], false)?;
        if !ids.starts_with(&start) || !ids.starts_with(&end) || start.len() > end.len() {
            return Err(format_err(
                name,
                format!(
                    "line {line}: cannot locate assistant message {i}: the tokens of the conversation rendered up to it are not \
                     a prefix of the whole conversation's tokens (the chat template or the tokenizer is not prefix-stable here)"
                ),
            ));
        }
        is_target[start.len()..end.len()].fill(true);
    }
    Ok((ids, is_target))
}

/// Cuts a sequence to `seq_len` tokens (setting `cut`), checks it fits the model's context,
/// and clears the target flag of its first token (nothing predicts it).
fn fit(mut s: Sequence, opts: &DataOptions, cut: &mut bool, name: &str, line: usize) -> Result<Sequence> {
    if s.ids.len() > opts.seq_len {
        s.ids.truncate(opts.seq_len);
        s.is_target.truncate(opts.seq_len);
        *cut = true;
    }
    if let Some(ctx) = opts.context.filter(|&c| s.ids.len() > c) {
        return Err(format_err(
            name,
            format!(
                "line {line}: {} tokens (after truncation to seq_len {}) exceed the model's context of {ctx} positions; \
                 use seq_len <= {ctx}",
                s.ids.len(),
                opts.seq_len
            ),
        ));
    }
    if let Some(first) = s.is_target.first_mut() {
        *first = false;
    }
    Ok(s)
}

/// A preference line's two sequences (prompt + chosen, prompt + rejected), loss on the
/// completions. Text: `encode(prompt)` + `encode(completion)` + EOS, as prompt/completion
/// data; with no prompt, the prompt is the two texts' longest common prefix of tokens (those
/// tokens have the same log-probability in both, so they would cancel in any preference loss).
/// Message lists: the prompt's messages followed by the completion's, rendered with the chat
/// template, loss on the completion's assistant turns; with no prompt, the messages the two
/// lists share at their start are the prompt.
fn preference_pair(
    prompt: Option<Side>,
    chosen: Side,
    rejected: Side,
    tokenizer: &Tokenizer,
    opts: &DataOptions,
    name: &str,
    line: usize,
) -> Result<(Sequence, Sequence)> {
    let encode =
        |s: &str, special: bool| tokenizer.encode(s, special).map_err(|e| format_err(name, format!("line {line}: tokenizing failed: {e}")));
    let eos = tokenizer.eos_id().filter(|_| opts.add_eos);
    let targets_from = |ids: Vec<u32>, n: usize| Sequence { is_target: (0..ids.len()).map(|j| j >= n).collect(), ids };
    let (c, r) = match (prompt, chosen, rejected) {
        (Some(Side::Text(p)), Side::Text(c), Side::Text(r)) => {
            let p = encode(p, opts.add_special_tokens)?;
            let whole = |c: &str| -> Result<Sequence> {
                let ids: Vec<u32> = p.iter().copied().chain(encode(c, false)?).chain(eos).collect();
                Ok(targets_from(ids, p.len()))
            };
            (whole(c)?, whole(r)?)
        }
        (None, Side::Text(c), Side::Text(r)) => {
            let c: Vec<u32> = encode(c, opts.add_special_tokens)?.into_iter().chain(eos).collect();
            let r: Vec<u32> = encode(r, opts.add_special_tokens)?.into_iter().chain(eos).collect();
            let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            (targets_from(c, n), targets_from(r, n))
        }
        (Some(Side::Messages(p)), Side::Messages(c), Side::Messages(r)) => {
            let whole = |c: &[(&str, &str)]| -> Result<Sequence> {
                let conv: Vec<(&str, &str)> = p.iter().chain(c).copied().collect();
                let (ids, is_target) = chat_example(&conv, p.len(), tokenizer, name, line)?;
                Ok(Sequence { ids, is_target })
            };
            (whole(&c)?, whole(&r)?)
        }
        (None, Side::Messages(c), Side::Messages(r)) => {
            let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            let (ci, ct) = chat_example(&c, n, tokenizer, name, line)?;
            let (ri, rt) = chat_example(&r, n, tokenizer, name, line)?;
            (Sequence { ids: ci, is_target: ct }, Sequence { ids: ri, is_target: rt })
        }
        _ => {
            return Err(format_err(
                name,
                format!("line {line}: 'prompt', 'chosen' and 'rejected' must all be strings or all lists of messages"),
            ))
        }
    };
    if let Some(ctx) = opts.context {
        let prompt_len = c.is_target.iter().take_while(|t| !**t).count();
        if prompt_len >= ctx {
            return Err(format_err(
                name,
                format!(
                    "line {line}: the prompt's {prompt_len} tokens fill the model's context of {ctx} positions: no completion token fits"
                ),
            ));
        }
    }
    Ok((c, r))
}
