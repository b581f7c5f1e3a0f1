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
}

impl DataFormat {
    /// The keys a line of this format must have.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            DataFormat::Text => &["text"],
            DataFormat::PromptCompletion => &["prompt", "completion"],
            DataFormat::Messages => &["messages"],
            DataFormat::Classification => &["text", "label"],
        }
    }

    /// The kind of training the format is for.
    pub fn kind(self) -> DataKind {
        match self {
            DataFormat::Classification => DataKind::Classification,
            _ => DataKind::Lm,
        }
    }

    fn name(self) -> &'static str {
        match self {
            DataFormat::Text => "{\"text\"}",
            DataFormat::PromptCompletion => "{\"prompt\", \"completion\"}",
            DataFormat::Messages => "{\"messages\"}",
            DataFormat::Classification => "{\"text\", \"label\"}",
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

    /// The format a line's keys select: `messages`, else `prompt`/`completion`, else `text` with
    /// `label`, else `text`.
    fn of(obj: &Map<String, Value>) -> Option<DataFormat> {
        if obj.contains_key("messages") {
            Some(DataFormat::Messages)
        } else if obj.contains_key("prompt") || obj.contains_key("completion") {
            Some(DataFormat::PromptCompletion)
        } else if obj.contains_key("text") {
            Some(if obj.contains_key("label") { DataFormat::Classification } else { DataFormat::Text })
        } else {
            None
        }
    }
}

/// Every key some format uses; a line may not carry the keys of another format than its file's.
const KNOWN_KEYS: [&str; 5] = ["text", "label", "prompt", "completion", "messages"];

/// What a data set trains: next-token prediction, or one label per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    Lm,
    Classification,
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
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Each example's number of real tokens (its last real token is at `lengths[i] − 1`).
    pub lengths: Vec<usize>,
    /// Number of targets that are not [`IGNORE_INDEX`].
    pub n_target_tokens: usize,
    /// Number of real (not padding) tokens.
    pub n_tokens: usize,
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

fn parse_messages<'a>(v: &'a Value, path: &str, line: usize) -> Result<Vec<(&'a str, &'a str)>> {
    let Value::Array(list) = v else {
        return Err(format_err(
            path,
            format!("line {line}: 'messages' must be an array of {{\"role\", \"content\"}}, got {}", json_kind(v)),
        ));
    };
    if list.is_empty() {
        return Err(format_err(path, format!("line {line}: 'messages' is empty")));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(m) = m else {
                return Err(format_err(
                    path,
                    format!("line {line}: messages[{i}] must be an object {{\"role\", \"content\"}}, got {}", json_kind(m)),
                ));
            };
            let field = |key: &str| match m.get(key) {
                Some(Value::String(s)) => Ok(s.as_str()),
                Some(v) => Err(format_err(path, format!("line {line}: messages[{i}].{key} must be a string, got {}", json_kind(v)))),
                None => Err(format_err(path, format!("line {line}: messages[{i}] has no '{key}'"))),
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
    let foreign: Vec<&str> = KNOWN_KEYS.iter().copied().filter(|k| obj.contains_key(*k) && !format.keys().contains(k)).collect();
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
        DataFormat::Messages => Record::Messages(parse_messages(&obj["messages"], path, line)?),
        DataFormat::Classification => Record::Classification(get_str(obj, "text", path, line)?, parse_label(&obj["label"], path, line)?),
    })
}

/// Philox draws for shuffles: key = the seed, counter = `[k_lo, k_hi ⊕ domain, s_lo, s_hi]` for
/// block `k` of stream `s`; each block gives two 64-bit words `(w₀ | w₁ << 32)`, `(w₂ | w₃ << 32)`.
const DOMAIN_EPOCH: u32 = 0x4550_4f43; // "EPOC"
const DOMAIN_SPLIT: u32 = 0x5350_4c54; // "SPLT"
const DOMAIN_SUBSET: u32 = 0x5355_4253; // "SUBS"

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
            let (mut ids, mut is_target, label) = match rec {
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
                        examples.push(Example { ids, is_target, label: None, line: window_line });
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
                    let (ids, is_target) = chat_example(&msgs, tokenizer, name, line)?;
                    (ids, is_target, None)
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
            if ids.len() > opts.seq_len {
                ids.truncate(opts.seq_len);
                is_target.truncate(opts.seq_len);
                stats.truncated += 1;
            }
            if let Some(ctx) = opts.context.filter(|&c| ids.len() > c) {
                return Err(format_err(
                    name,
                    format!(
                        "line {line}: {} tokens (after truncation to seq_len {}) exceed the model's context of {ctx} positions; \
                         use seq_len <= {ctx}",
                        ids.len(),
                        opts.seq_len
                    ),
                ));
            }
            if let Some(first) = is_target.first_mut() {
                *first = false;
            }
            if label.is_none() && !is_target.contains(&true) {
                stats.no_targets += 1;
                continue;
            }
            examples.push(Example { ids, is_target, label, line });
        }

        let Some((format, _)) = format else {
            return Err(format_err(name, "no examples: the file is empty (or only blank lines)"));
        };
        stats.packed_remainder = stream.len();
        if examples.is_empty() {
            let why = if opts.pack {
                format!("its {} tokens do not fill one window of seq_len {}", stream.len(), opts.seq_len)
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
        let lengths: Vec<usize> = chosen.iter().map(|e| e.ids.len()).collect();
        let (b, t) = (chosen.len(), lengths.iter().copied().max().unwrap_or(0));
        let mut ids = vec![self.pad_id; b * t];
        let mut keep = vec![0f32; b * t];
        let mut targets = vec![IGNORE_INDEX; b * t];
        for (row, e) in chosen.iter().enumerate() {
            let at = row * t;
            ids[at..at + e.ids.len()].copy_from_slice(&e.ids);
            keep[at..at + e.ids.len()].fill(1.0);
            for p in 0..e.ids.len().saturating_sub(1) {
                if e.is_target[p + 1] {
                    targets[at + p] = e.ids[p + 1] as i32;
                }
            }
        }
        let n_target_tokens = targets.iter().filter(|&&x| x != IGNORE_INDEX).count();
        let n_tokens = lengths.iter().sum();
        let padded = lengths.iter().any(|&l| l < t);
        let labels = match self.kind() {
            DataKind::Classification => {
                let labels: Vec<i32> = chosen.iter().map(|e| e.label.unwrap_or(0) as i32).collect();
                Some(Tensor::from_vec(labels, &[b], device)?)
            }
            DataKind::Lm => None,
        };
        Ok(Batch {
            ids: Tensor::from_vec(ids, &[b, t], device)?,
            keep: if padded { Some(Tensor::from_vec(keep, &[b, t], device)?) } else { None },
            targets: Tensor::from_vec(targets, &[b, t], device)?,
            labels,
            lengths,
            n_target_tokens,
            n_tokens,
        })
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
    if opts.add_eos && matches!(format, DataFormat::Text | DataFormat::PromptCompletion) && tokenizer.eos_id().is_none() {
        return Err(invalid(format!("{name}: add_eos is set but the tokenizer has no EOS token (set add_eos to false)")));
    }
    Ok(())
}

/// A conversation's ids and loss mask: loss on the tokens of each assistant turn, located by
/// rendering prefixes (see the module documentation).
fn chat_example(msgs: &[(&str, &str)], tokenizer: &Tokenizer, name: &str, line: usize) -> Result<(Vec<u32>, Vec<bool>)> {
    let encode = |s: &str| tokenizer.encode(s, true).map_err(|e| format_err(name, format!("line {line}: tokenizing failed: {e}")));
    let ids = encode(&tokenizer.apply_chat_template(msgs, false))?;
    let mut is_target = vec![false; ids.len()];
    for (i, (role, _)) in msgs.iter().enumerate() {
        if *role != "assistant" {
            continue;
        }
        let start = encode(&tokenizer.apply_chat_template(&msgs[..i], true))?;
        let end = encode(&tokenizer.apply_chat_template(&msgs[..=i], false))?;
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
