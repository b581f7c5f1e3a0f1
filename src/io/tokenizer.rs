//! Text ↔ token ids, with the conventions of the Hugging Face stack so that ids (and therefore
//! losses and generations) compare one to one with `transformers`.
//!
//! The tokenization itself is Hugging Face's own `tokenizers` crate; this module builds it from
//! the three places a vocabulary comes from, and adds what a fine-tuning library needs around it:
//!
//! - [`Tokenizer::from_hf_json`]: a `tokenizer.json` (any model the crate reads: byte-level BPE as
//!   GPT-2, LLaMA 3, SmolLM and Qwen use; SentencePiece-style BPE with byte fallback as Llama 2
//!   and TinyLlama use), with the special-token names and chat template of a `tokenizer_config.json`
//!   beside it when there is one.
//! - [`Tokenizer::from_gpt2_files`]: GPT-2's original `encoder.json` + `vocab.bpe`, built as
//!   `transformers`' `GPT2Tokenizer(vocab, merges)` builds it.
//! - [`Tokenizer::from_gguf`]: the vocabulary a GGUF file carries (`tokenizer.ggml.*`), built as
//!   `transformers` builds it for `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
//!
//! Special tokens are added to a text as the Hugging Face tokenizer's default does (its
//! post-processor; for SmolLM2 nothing, for Llama 2 a BOS), and the special tokens of the
//! vocabulary (`<|im_start|>`, `<|endoftext|>`, ...) are recognised whole inside the text.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::io::gguf::{GgufFile, GgufTokenizer};

/// A special token: its id and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub id: u32,
    pub token: String,
}

/// How [`Tokenizer::apply_chat_template`] lays out a conversation: the model's own Jinja
/// template (`tokenizer_config.json`'s `chat_template` or a GGUF file's
/// `tokenizer.chat_template`), rendered as `transformers` renders it, or — for a model that
/// carries none — ChatML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` per message; `<|im_start|>assistant\n` as the
    /// generation prompt.
    ChatMl {
        /// System message put first when the conversation does not start with one.
        default_system: Option<String>,
    },
    /// A Jinja template, rendered with minijinja in the environment `transformers` builds
    /// (`trim_blocks`, `lstrip_blocks`, loop controls, Python's string methods, `tojson` as
    /// `json.dumps`, `raise_exception`, `strftime_now`), with `messages`, `add_generation_prompt`
    /// and the special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`) defined.
    Jinja {
        /// The template text.
        source: String,
        /// Where it came from, for errors (a file and the key).
        origin: String,
        /// `(name, token)` of the special tokens the template may use.
        special: Vec<(String, String)>,
    },
}

impl ChatTemplate {
    /// The conversation as text, exactly as the template writes it.
    pub fn render(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> crate::error::Result<String> {
        match self {
            ChatTemplate::ChatMl { default_system } => {
                let mut out = String::new();
                for (i, (role, content)) in messages.iter().enumerate() {
                    if i == 0 && *role != "system" {
                        if let Some(system) = default_system {
                            out.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
                        }
                    }
                    out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
                Ok(out)
            }
            ChatTemplate::Jinja { source, origin, special } => render_jinja(source, origin, special, messages, add_generation_prompt),
        }
    }
}

/// `json.dumps(x, ensure_ascii=False, indent=indent)` of a template value: Python's separators
/// (`", "`, `": "`, or `","` and `": "` with an indent), mappings in insertion order, non-ASCII
/// kept, as `transformers`' `tojson` filter writes it.
fn python_json(v: &minijinja::Value, indent: Option<usize>, depth: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    let string = |s: &str| serde_json::to_string(s).unwrap_or_default();
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match (v.as_i64(), f64::try_from(v.clone())) {
            (Some(i), _) => out.push_str(&i.to_string()),
            // Python writes floats with a fractional part (1.0, not 1).
            (None, Ok(f)) if f.is_finite() && f == f.trunc() && f.abs() < 1e16 => out.push_str(&format!("{f:.1}")),
            (None, Ok(f)) => out.push_str(&serde_json::to_string(&f).unwrap_or_else(|_| "NaN".into())),
            (None, Err(e)) => return Err(e),
        },
        ValueKind::String => out.push_str(&string(v.as_str().unwrap_or_default())),
        ValueKind::Map => {
            let keys: Vec<minijinja::Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&string(&k.to_string()));
                out.push_str(": ");
                python_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            let items: Vec<minijinja::Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                python_json(x, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
    }
    Ok(())
}

fn render_jinja(
    source: &str,
    origin: &str,
    special: &[(String, String)],
    messages: &[(&str, &str)],
    add_generation_prompt: bool,
) -> crate::error::Result<String> {
    use minijinja::{Environment, Error as JError, ErrorKind, Value};
    let bad = |e: &JError| {
        let mut msg = format!("{origin}: {}", e.kind());
        if let Some(d) = e.detail() {
            msg.push_str(&format!(": {d}"));
        }
        if let Some(line) = e.line() {
            let text = source.lines().nth(line.saturating_sub(1)).unwrap_or("").trim();
            msg.push_str(&format!(" (template line {line}: `{}`)", text.chars().take(120).collect::<String>()));
        }
        crate::error::Error::InvalidArgument { op: "chat template", msg }
    };
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(|e| bad(&e))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, JError> {
        Err(JError::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| -> String {
        // No clock formatting library here: the date parts templates ask for (e.g. Llama 3's
        // "%d %b %Y") from the system time, in UTC.
        strftime_utc(&format)
    });
    env.add_filter("tojson", |v: Value, kwargs: minijinja::value::Kwargs| -> std::result::Result<String, JError> {
        let indent: Option<usize> = kwargs.get("indent")?;
        let mut out = String::new();
        python_json(&v, indent, 0, &mut out)?;
        kwargs.assert_all_used()?;
        Ok(out)
    });
    env.add_template("chat", source).map_err(|e| bad(&e))?;
    let tmpl = env.get_template("chat").map_err(|e| bad(&e))?;
    // Each message a mapping with `role` before `content` (insertion order, as a Python dict).
    let msgs: Vec<Value> = messages.iter().map(|&(role, content)| Value::from_pairs([("role", role), ("content", content)])).collect();
    let mut ctx: Vec<(String, Value)> =
        vec![("messages".into(), Value::from(msgs)), ("add_generation_prompt".into(), Value::from(add_generation_prompt))];
    ctx.extend(special.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))));
    tmpl.render(Value::from_pairs(ctx)).map_err(|e| bad(&e))
}

/// `datetime.now().strftime(format)` for the directives chat templates use (`%d %b %B %Y %m %H
/// %M %S %y %j %%`), in UTC; any other directive is kept as written.
fn strftime_utc(format: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + (leap && month > 2) as i64;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A tokenizer: text to ids and back, special tokens, chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it was read from, for error messages.
    source: String,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    unk: Option<SpecialToken>,
    chat: ChatTemplate,
    chat_source: Option<String>,
    /// `inner.get_vocab_size(true)`, which builds the whole vocabulary map on every call
    /// (and streaming decode asks once per token).
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("unk", &self.unk)
            .field("chat", &self.chat)
            .finish()
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format { path: path.display().to_string(), msg: msg.into() }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    super::read_regular(path)
}

/// GPT-2's byte ↔ character table: each byte is spelled by one printable character, so byte-level
/// vocabularies are plain strings. Printable Latin-1 bytes stand for themselves; the other 68
/// (controls, space, DEL, NBSP, soft hyphen) map to U+0100 onwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\u{fffd}');
    }
    table
}

/// The pre-tokenizer split of a GGUF `tokenizer.ggml.pre` family, where it is not GPT-2's; the
/// same table `transformers` uses when it builds a tokenizer from a GGUF file. Families not listed
/// use GPT-2's byte-level regex.
fn gguf_pre_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str =
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "dbrx" | "smaug-bpe" => {
            Some(LLAMA3)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2),
        "gpt-4o" | "llama4" | "minimax-m2" => Some(GPT4O),
        _ => None,
    }
}

/// Reads a `tokenizer_config.json` special-token entry: a string, or `{"content": "..."}`.
fn config_token(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(m) => m.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// Gemma's chat format (`<start_of_turn>user\n…<end_of_turn>\n`, the assistant's role
/// called `model`, a system message put before the first user turn), as the template of
/// Gemma 3's instruction-tuned checkpoints writes it for text messages.
const GEMMA_TURNS: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"#;

impl Tokenizer {
    fn finish(
        inner: tokenizers::Tokenizer,
        source: String,
        names: [Option<String>; 4],
        chat_source: Option<String>,
        path: &Path,
    ) -> Result<Tokenizer> {
        let [bos, eos, pad, unk] = names.map(|n| n.map(|token| (inner.token_to_id(&token), token)));
        let resolve = |field: &str, v: Option<(Option<u32>, String)>| -> Result<Option<SpecialToken>> {
            match v {
                None => Ok(None),
                Some((Some(id), token)) => Ok(Some(SpecialToken { id, token })),
                Some((None, token)) => Err(format_err(path, format!("{field} '{token}' is not in the vocabulary"))),
            }
        };
        let (bos, eos, pad, unk) =
            (resolve("bos_token", bos)?, resolve("eos_token", eos)?, resolve("pad_token", pad)?, resolve("unk_token", unk)?);
        let chat = match &chat_source {
            Some(t) => ChatTemplate::Jinja {
                source: t.clone(),
                origin: format!("{source}: chat template"),
                // The special tokens transformers passes to the template (its special_tokens_map).
                special: [("bos_token", &bos), ("eos_token", &eos), ("pad_token", &pad), ("unk_token", &unk)]
                    .into_iter()
                    .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.token.clone())))
                    .collect(),
            },
            // A vocabulary with Gemma's turn markers and no template of its own (Gemma GGUFs
            // converted without one): Gemma's turn format, not ChatML.
            None if ["<start_of_turn>", "<end_of_turn>"].iter().all(|t| inner.token_to_id(t).is_some()) => ChatTemplate::Jinja {
                source: GEMMA_TURNS.to_string(),
                origin: format!("{source}: Gemma's turn template (built in; the file has no chat template)"),
                special: [("bos_token", &bos), ("eos_token", &eos), ("pad_token", &pad), ("unk_token", &unk)]
                    .into_iter()
                    .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.token.clone())))
                    .collect(),
            },
            None => ChatTemplate::ChatMl { default_system: None },
        };
        Ok(Tokenizer { bos, eos, pad, unk, vocab_size: inner.get_vocab_size(true), inner, source, chat, chat_source })
    }

    /// The tokenizer that goes with a model: the vocabulary inside a GGUF file, or in a model
    /// directory `tokenizer.json` (with `tokenizer_config.json` and `chat_template.jinja` when
    /// present), else GPT-2's `encoder.json` + `vocab.bpe` (or `vocab.json`
    /// + `merges.txt`).
    pub fn for_model(model: impl AsRef<Path>) -> Result<Tokenizer> {
        let model = model.as_ref();
        if model.is_file() {
            return Tokenizer::from_gguf(model);
        }
        if model.join("tokenizer.json").exists() {
            return Tokenizer::from_hf_json(model.join("tokenizer.json"));
        }
        for (vocab, merges) in [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")] {
            if model.join(vocab).exists() && model.join(merges).exists() {
                return Tokenizer::from_gpt2_files(model.join(vocab), model.join(merges));
            }
        }
        Err(format_err(model, "no tokenizer found (tokenizer.json, or encoder.json + vocab.bpe)"))
    }

    /// Write `tokenizer.json` and a `tokenizer_config.json` (special tokens, chat template)
    /// into `dir`, so that this crate and `transformers` read the tokenizer back.
    pub fn save_hf(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let json = self.inner.to_string(false).map_err(|e| format_err(dir, format!("cannot serialize the tokenizer: {e}")))?;
        crate::io::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let name = |t: &Option<SpecialToken>| t.as_ref().map(|t| t.token.clone());
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(&self.bos),
            "eos_token": name(&self.eos),
            "pad_token": name(&self.pad),
            "unk_token": name(&self.unk),
            "chat_template": self.chat_source,
        });
        crate::io::write_atomic(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config).unwrap_or_default().as_bytes())
    }

    /// A Hugging Face `tokenizer.json`. When a `tokenizer_config.json` lies beside it, the names
    /// of the BOS/EOS/PAD/UNK tokens and the chat template are read from it.
    pub fn from_hf_json(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let inner = parse_hf_json(&read(path)?, path)?;
        let mut names = [None, None, None, None];
        let mut chat = None;
        let config_path = path.with_file_name(match path.file_stem().and_then(|s| s.to_str()) {
            // tokenizer.json → tokenizer_config.json; foo.json → foo_config.json.
            Some(stem) => format!("{stem}_config.json"),
            None => "tokenizer_config.json".to_string(),
        });
        if config_path.exists() {
            let config: serde_json::Value =
                serde_json::from_slice(&read(&config_path)?).map_err(|e| format_err(&config_path, format!("not valid JSON: {e}")))?;
            for (slot, key) in names.iter_mut().zip(["bos_token", "eos_token", "pad_token", "unk_token"]) {
                *slot = config.get(key).and_then(config_token);
            }
            chat = match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: the "default" one.
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
        }
        // transformers ≥ 4.43 saves the template as chat_template.jinja beside the config, and
        // reads that file in preference to the config's key.
        let jinja = path.with_file_name("chat_template.jinja");
        if path.file_name().is_some_and(|n| n == "tokenizer.json") && jinja.is_file() {
            let text = read(&jinja)?;
            chat = Some(String::from_utf8(text).map_err(|_| format_err(&jinja, "not UTF-8 text"))?);
        }
        Tokenizer::finish(inner, path.display().to_string(), names, chat, path)
    }

    /// A `tokenizer.json` already in memory (no `tokenizer_config.json` is looked for); `name`
    /// is what errors name.
    pub fn from_hf_json_bytes(bytes: &[u8], name: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = name.as_ref();
        Tokenizer::finish(parse_hf_json(bytes, path)?, path.display().to_string(), [None, None, None, None], None, path)
    }

    /// GPT-2's original files: `encoder.json` (token → id) and `vocab.bpe` (a `#version` line,
    /// then one merge `a b` per line, highest priority first). Byte-level BPE without a prefix
    /// space; `<|endoftext|>` is BOS, EOS and UNK, and no special token is added to a text.
    pub fn from_gpt2_files(encoder_json: impl AsRef<Path>, vocab_bpe: impl AsRef<Path>) -> Result<Tokenizer> {
        let (encoder_json, vocab_bpe) = (encoder_json.as_ref(), vocab_bpe.as_ref());
        let vocab: HashMap<String, u32> = serde_json::from_slice(&read(encoder_json)?)
            .map_err(|e| format_err(encoder_json, format!("expected a JSON object of token → id: {e}")))?;
        let text = String::from_utf8(read(vocab_bpe)?).map_err(|e| format_err(vocab_bpe, format!("not UTF-8: {e}")))?;
        let mut merges = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.is_empty() || (n == 0 && line.starts_with("#version")) {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => merges.push((a.to_string(), b.to_string())),
                _ => return Err(format_err(vocab_bpe, format!("line {}: expected a merge 'a b', got {line:?}", n + 1))),
            }
        }
        let source = format!("{} + {}", encoder_json.display(), vocab_bpe.display());
        let mut inner = byte_level(vocab, merges, None, vocab_bpe)?;
        let eot = "<|endoftext|>";
        if inner.token_to_id(eot).is_none() {
            return Err(format_err(encoder_json, format!("no '{eot}' token in the vocabulary")));
        }
        inner.add_special_tokens(&[AddedToken::from(eot, true)]);
        let names = [Some(eot.to_string()), Some(eot.to_string()), None, Some(eot.to_string())];
        Tokenizer::finish(inner, source, names, None, encoder_json)
    }

    /// The vocabulary stored in a GGUF file (`tokenizer.ggml.*`).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Tokenizer> {
        Tokenizer::from_gguf_file(&GgufFile::open(path)?)
    }

    /// The vocabulary of an open GGUF file: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) or
    /// `"llama"` (SentencePiece BPE with byte fallback), built as `transformers` builds it: tokens
    /// marked control (type 3) are special tokens, user-defined ones (type 4) plain added tokens,
    /// the split regex follows `tokenizer.ggml.pre`, and a BOS/EOS is added only where
    /// `add_bos_token`/`add_eos_token` say (a SentencePiece vocabulary adds BOS unless it says
    /// not to). See [`sentencepiece`] for how SentencePiece merges are recovered.
    pub fn from_gguf_file(file: &GgufFile) -> Result<Tokenizer> {
        let t = file.tokenizer()?;
        Tokenizer::from_gguf_tokenizer(&t, file.path())
    }

    /// The same from already-read GGUF tokenizer metadata; `path` is named in errors.
    pub fn from_gguf_tokenizer(t: &GgufTokenizer, path: &Path) -> Result<Tokenizer> {
        if t.model != "gpt2" && t.model != "llama" {
            return Err(format_err(
                path,
                format!("tokenizer.ggml.model '{}' is not supported ('gpt2': byte-level BPE, 'llama': SentencePiece BPE)", t.model),
            ));
        }
        let n = t.tokens.len();
        for (field, id) in [
            ("tokenizer.ggml.bos_token_id", t.bos_id),
            ("tokenizer.ggml.eos_token_id", t.eos_id),
            ("tokenizer.ggml.padding_token_id", t.pad_id),
            ("tokenizer.ggml.unknown_token_id", t.unk_id),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(format_err(path, format!("{field} = {id} is outside the vocabulary of {n} tokens")));
            }
        }
        let spm = t.model == "llama";
        // Tokens outside the byte alphabet (rare; e.g. spelled with real spaces) are respelled
        // byte by byte, as transformers does.
        let spelling = bytes_to_unicode();
        let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
        let in_alphabet = |s: &str| spm || s.chars().all(|c| alphabet.contains(&c));
        let mut merges = Vec::with_capacity(t.merges.len());
        for (i, m) in t.merges.iter().enumerate() {
            let mut parts = m.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => return Err(format_err(path, format!("tokenizer.ggml.merges[{i}] = {m:?} is not a merge 'a b'"))),
            }
        }
        let mut inner = if spm {
            sentencepiece(t, merges, path)?
        } else {
            let mut vocab = HashMap::with_capacity(n);
            for (id, token) in t.tokens.iter().enumerate() {
                let spelled = if in_alphabet(token) { token.clone() } else { token.bytes().map(|b| spelling[b as usize]).collect() };
                // Later duplicates win, as in a Python dict built in order.
                vocab.insert(spelled, id as u32);
            }
            byte_level(vocab, merges, t.pre.as_deref().and_then(gguf_pre_split), path)?
        };
        if let Some(types) = &t.token_types {
            let control: Vec<AddedToken> = t
                .tokens
                .iter()
                .zip(types)
                .filter(|(tok, &ty)| ty == 3 && in_alphabet(tok))
                .map(|(tok, _)| AddedToken::from(tok.clone(), true))
                .collect();
            inner.add_special_tokens(&control);
            let user: Vec<AddedToken> = t
                .tokens
                .iter()
                .zip(types)
                .filter(|(tok, &ty)| ty == 4 && inner.token_to_id(tok).is_some())
                .map(|(tok, _)| AddedToken::from(tok.clone(), false).normalized(false))
                .collect();
            inner.add_tokens(&user);
        }
        let name = |id: Option<u32>| id.map(|id| t.tokens[id as usize].clone());
        let names = [name(t.bos_id), name(t.eos_id), name(t.pad_id), name(t.unk_id)];
        // The named special tokens are special even when the file's token types do not say so.
        let named: Vec<AddedToken> = names.iter().flatten().map(|tok| AddedToken::from(tok.clone(), true)).collect();
        inner.add_special_tokens(&named);
        // transformers (as llama.cpp) adds BOS to a SentencePiece vocabulary that does not say.
        let add_bos = t.add_bos.unwrap_or(spm).then(|| t.bos_id.map(|id| (t.tokens[id as usize].clone(), id))).flatten();
        let add_eos = t.add_eos.unwrap_or(false).then(|| t.eos_id.map(|id| (t.tokens[id as usize].clone(), id))).flatten();
        if add_bos.is_some() || add_eos.is_some() {
            let mut single = String::new();
            let mut specials = Vec::new();
            if let Some((tok, id)) = &add_bos {
                single.push_str(&format!("{tok} "));
                specials.push((tok.clone(), *id));
            }
            single.push_str("$A");
            if let Some((tok, id)) = &add_eos {
                single.push_str(&format!(" {tok}"));
                if add_bos.as_ref().map(|b| &b.0) != Some(tok) {
                    specials.push((tok.clone(), *id));
                }
            }
            let pp = TemplateProcessing::builder()
                .try_single(single.as_str())
                .map_err(|e| format_err(path, format!("special-token template {single:?}: {e}")))?
                .special_tokens(specials)
                .build()
                .map_err(|e| format_err(path, format!("special-token template {single:?}: {e}")))?;
            inner.with_post_processor(Some(pp));
        }
        Tokenizer::finish(inner, path.display().to_string(), names, t.chat_template.clone(), path)
    }

    /// This tokenizer as GGUF metadata (`tokenizer.ggml.model = "gpt2"`), padded with unused
    /// `[PAD{i}]` tokens to `vocab_size` (the model's embedding rows, which llama.cpp requires
    /// the vocabulary to match). Byte-level BPE only. `tokenizer.ggml.pre` names the split
    /// regex: `llama-bpe`, `qwen2`, `gpt-4o` where the pre-tokenizer's regex is one of theirs,
    /// `smollm` for single digits then GPT-2's split, `gpt-2` for GPT-2's alone, else `default`.
    pub fn to_gguf_tokenizer(&self, vocab_size: usize) -> Result<GgufTokenizer> {
        let path = Path::new(&self.source);
        let bad = |msg: String| format_err(path, msg);
        let json = self.inner.to_string(false).map_err(|e| bad(format!("cannot serialize the tokenizer: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| bad(format!("tokenizer JSON: {e}")))?;
        let model = &v["model"];
        let pre_json = v["pre_tokenizer"].to_string();
        if model["type"] != "BPE" || !pre_json.contains("ByteLevel") {
            return Err(bad("only byte-level BPE tokenizers are written to GGUF (tokenizer.ggml.model = \"gpt2\")".into()));
        }
        let mut tokens: Vec<Option<String>> = Vec::new();
        let mut types: Vec<i32> = Vec::new();
        let mut put = |id: usize, tok: &str, ty: i32| {
            if tokens.len() <= id {
                tokens.resize(id + 1, None);
                types.resize(id + 1, 5);
            }
            tokens[id] = Some(tok.to_string());
            types[id] = ty;
        };
        for (tok, id) in model["vocab"].as_object().into_iter().flatten() {
            let id = id.as_u64().ok_or_else(|| bad(format!("vocabulary entry {tok:?} has no integer id")))?;
            put(id as usize, tok, 1);
        }
        for t in v["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(tok)) = (t["id"].as_u64(), t["content"].as_str()) else { continue };
            put(id as usize, tok, if t["special"].as_bool() == Some(true) { 3 } else { 4 });
        }
        if tokens.len() > vocab_size {
            return Err(bad(format!("the tokenizer has {} tokens, more than the model's {vocab_size} embedding rows", tokens.len())));
        }
        tokens.resize(vocab_size, None);
        types.resize(vocab_size, 5);
        let tokens: Vec<String> = tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
        let merges = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Array(p) if p.len() == 2 => {
                    Ok(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")))
                }
                other => Err(bad(format!("merge {other} is neither \"a b\" nor [\"a\", \"b\"]"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let known = [("llama-bpe", "llama3"), ("qwen2", "qwen2"), ("gpt-4o", "gpt-4o")];
        let pre = known
            .iter()
            .find(|(_, family)| gguf_pre_split(family).is_some_and(|re| pre_json.contains(&serde_json::Value::from(re).to_string()[1..])))
            .map(|(name, _)| name.to_string())
            .unwrap_or_else(|| {
                let digits = pre_json.contains("\"Digits\"") && pre_json.contains("\"individual_digits\":true");
                let plain = !pre_json.contains("\"Split\"");
                match (digits, plain) {
                    (true, true) => "smollm".into(),
                    (false, true) => "gpt-2".into(),
                    _ => "default".into(),
                }
            });
        // Whether encoding with special tokens adds a BOS / an EOS (the post-processor's).
        let (with, without) = (self.encode("a", true)?, self.encode("a", false)?);
        let adds = |id: Option<u32>, pos: fn(&[u32]) -> Option<&u32>| id.map(|id| pos(&with) == Some(&id) && pos(&without) != Some(&id));
        Ok(GgufTokenizer {
            model: "gpt2".into(),
            pre: Some(pre),
            tokens,
            token_types: Some(types),
            scores: None,
            merges,
            bos_id: self.bos_id(),
            eos_id: self.eos_id(),
            pad_id: self.pad_id(),
            unk_id: self.unk().map(|t| t.id),
            add_bos: adds(self.bos_id(), |s| s.first()),
            add_eos: adds(self.eos_id(), |s| s.last()),
            chat_template: self.chat_source.clone(),
            add_space_prefix: None,
            architecture: None,
        })
    }

    /// Text to ids; `add_special_tokens` adds what the tokenizer's post-processor adds (a BOS for
    /// Llama 2, nothing for GPT-2 and SmolLM2), as `transformers` does by default.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| {
                let e = e.to_string();
                // The BPE model's own words for a character no token spells and no unknown token stands for.
                let msg = match e.strip_prefix("Token `").and_then(|r| r.strip_suffix("` out of vocabulary")) {
                    Some(piece) => format!(
                        "cannot encode the text: no token of the vocabulary ({} tokens) spells '{piece}', and it has no unknown token to stand for it",
                        self.vocab_size()
                    ),
                    None => e,
                };
                Error::InvalidArgument { op: "Tokenizer::encode", msg: format!("{}: {msg}", self.source) }
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids to text; `skip_special_tokens` drops special tokens (BOS, `<|im_end|>`, ...). An id
    /// outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n || self.inner.id_to_token(id).is_none()) {
            return Err(Error::InvalidArgument {
                op: "Tokenizer::decode",
                msg: format!("token id {bad} is outside the vocabulary of {n} tokens ({})", self.source),
            });
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::InvalidArgument { op: "Tokenizer::decode", msg: format!("{}: {e}", self.source) })
    }

    /// Like [`Tokenizer::decode`], but ids the vocabulary does not have (models often pad
    /// their embedding table past the tokenizer) are dropped instead of being an error: for
    /// showing what a model generated.
    pub fn decode_lossy(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let known: Vec<u32> = ids.iter().copied().filter(|&id| self.inner.id_to_token(id).is_some()).collect();
        self.decode(&known, skip_special_tokens)
    }

    /// Number of ids, added tokens included (`len(tokenizer)` in `transformers`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token (a vocabulary entry or an added token), spelled as stored.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The stored spelling of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }
    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }
    pub fn pad(&self) -> Option<&SpecialToken> {
        self.pad.as_ref()
    }
    pub fn unk(&self) -> Option<&SpecialToken> {
        self.unk.as_ref()
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|t| t.id)
    }
    /// The tokens that end a generated answer: EOS, and the end-of-turn marker of the chat
    /// format when the vocabulary has one as a special token (Gemma's `<end_of_turn>`,
    /// ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`), as the models' generation configs list.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_id().into_iter().collect();
        let special = self.special_ids();
        for t in ["<end_of_turn>", "<|im_end|>", "<|eot_id|>"] {
            if let Some(id) = self.token_to_id(t).filter(|id| special.contains(id) && !ids.contains(id)) {
                ids.push(id);
            }
        }
        ids
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|t| t.id)
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|t| t.id)
    }

    /// The added tokens (special or not) by id: the ones matched whole inside a text.
    pub fn added_tokens(&self) -> Vec<(u32, String, bool)> {
        let mut v: Vec<(u32, String, bool)> =
            self.inner.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.content.clone(), t.special)).collect();
        v.sort_by_key(|t| t.0);
        v
    }

    /// The special tokens' ids (skipped by `decode(.., true)`), sorted.
    pub fn special_ids(&self) -> Vec<u32> {
        self.added_tokens().into_iter().filter(|t| t.2).map(|t| t.0).collect()
    }

    /// The chat layout in use.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat
    }

    /// The Jinja chat template the file carried, if any (rendered through [`ChatTemplate`]).
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_source.as_deref()
    }

    /// Replace the chat layout (e.g. to drop a default system message).
    pub fn set_chat_template(&mut self, chat: ChatTemplate) {
        self.chat = chat;
    }

    /// A conversation of `(role, content)` messages as the prompt text, as `transformers`'
    /// `apply_chat_template(.., tokenize=False)` renders it with the model's own template
    /// (ChatML for a model that carries none). A template that does not compile, or that
    /// raises (`raise_exception`), is an error naming the template and the line.
    pub fn apply_chat_template(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        self.chat.render(messages, add_generation_prompt)
    }

    /// The ids of a conversation rendered by [`Tokenizer::apply_chat_template`], as
    /// `apply_chat_template(.., tokenize=True)` gives them: a model's own template writes its
    /// special tokens itself (`{{ bos_token }}`), so they are not added again; the ChatML
    /// fallback, which writes none, gets the tokenizer's usual ones.
    pub fn encode_chat(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let own_template = matches!(self.chat, ChatTemplate::Jinja { .. });
        self.encode(&self.apply_chat_template(messages, add_generation_prompt)?, !own_template)
    }

    /// The Hugging Face tokenizer underneath, for what this type does not wrap.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Parse a `tokenizer.json`. The JSON syntax is checked first: `tokenizers` 0.22 panics
/// (`expect("Helper")`) instead of returning an error on some syntax errors inside a component,
/// and a panic it still raises on a well-formed but wrong file is turned into an error too.
fn parse_hf_json(bytes: &[u8], path: &Path) -> Result<tokenizers::Tokenizer> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format_err(path, format!("not a valid tokenizer.json (JSON syntax): {e}")))?;
    let parsed = std::panic::catch_unwind(|| serde_json::from_value::<tokenizers::Tokenizer>(value));
    match parsed {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(format_err(path, format!("not a valid tokenizer.json: {e}"))),
        Err(_) => Err(format_err(path, "not a valid tokenizer.json: the tokenizers crate panicked reading it")),
    }
}

/// The merges a SentencePiece vocabulary implies, best first, as `transformers`' GGUF loader
/// recovers them (`generate_merges`): every split of every token into two tokens of the
/// vocabulary is a merge, ranked by the merged token's priority (then the longer left part,
/// then the longer right part; equal ranks keep the order of the tokens' ids). The priority is
/// the token's score, except for Gemma, whose scores do not follow its merge order: there it
/// is the token's position in the file, earlier first.
fn sentencepiece_merges(tokens: &[String], vocab: &HashMap<String, u32>, priority: &[f32]) -> Vec<(String, String)> {
    // Tokens in first-seen order with their last priority, as a Python dict built in order.
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<(&str, f32)> = Vec::with_capacity(tokens.len());
    for (token, &p) in tokens.iter().zip(priority) {
        match first.get(token.as_str()) {
            Some(&i) => order[i].1 = p,
            None => {
                first.insert(token, order.len());
                order.push((token, p));
            }
        }
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (token, p) in order {
        let start = merges.len();
        for (cut, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(cut);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((l, r, p));
            }
        }
        merges[start..].sort_by_key(|&(l, r, _)| (vocab[l], vocab[r]));
    }
    let chars = |s: &str| s.chars().count();
    // Descending and stable, as Python's sorted(..., reverse=True).
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(chars(b.0).cmp(&chars(a.0))).then(chars(b.1).cmp(&chars(a.1))));
    merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect()
}

/// A SentencePiece BPE vocabulary from GGUF (`tokenizer.ggml.model = "llama"`), as
/// `transformers` builds it: BPE with byte fallback (`<0x0A>`-style byte tokens) and merges
/// from the file or [`sentencepiece_merges`].
///
/// - Gemma (`general.architecture` gemma, gemma2, gemma3): spaces become `▁` (a normaliser, no
///   prefix space); tokens made only of spaces are stored with real spaces and are respelled
///   `▁…` first; the decoder turns `▁` back into spaces.
/// - Others (LLaMA 2 and kin): a `▁` is put before the text when `add_space_prefix` (default
///   true) and spaces become `▁` (Metaspace); the decoder strips that first space again.
fn sentencepiece(t: &GgufTokenizer, merges: Vec<(String, String)>, path: &Path) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecoderSequence, strip::Strip};
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};

    let gemma = matches!(t.architecture.as_deref(), Some("gemma" | "gemma2" | "gemma3"));
    let tokens: Vec<String> = if gemma {
        t.tokens
            .iter()
            .map(|tok| if tok.contains(' ') && tok.trim().is_empty() { "▁".repeat(tok.chars().count()) } else { tok.clone() })
            .collect()
    } else {
        t.tokens.clone()
    };
    let mut vocab = HashMap::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), id as u32);
    }
    let merges = if !merges.is_empty() {
        merges
    } else if gemma {
        let positions: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        sentencepiece_merges(&tokens, &vocab, &positions)
    } else {
        let scores = t
            .scores
            .as_ref()
            .ok_or_else(|| format_err(path, "tokenizer.ggml.scores is missing: a SentencePiece vocabulary without merges needs them"))?;
        sentencepiece_merges(&tokens, &vocab, scores)
    };
    let vocab: Vocab = vocab.into_iter().collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true);
    if gemma {
        builder = builder.unk_token("<unk>".into());
    }
    let bpe = builder.build().map_err(|e| format_err(path, format!("SentencePiece vocabulary: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let space = |e: tokenizers::Error| format_err(path, format!("SentencePiece normaliser: {e}"));
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new("▁", " ").map_err(space)?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if gemma {
        inner.with_normalizer(Some(Replace::new(" ", "▁").map_err(space)?));
    } else {
        let prefix = t.add_space_prefix.unwrap_or(true);
        let scheme = if prefix { PrependScheme::First } else { PrependScheme::Never };
        inner.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
        if prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// A byte-level BPE tokenizer as `transformers`' `GPT2Tokenizer` builds it: no normaliser, GPT-2's
/// split regex (or `split`, applied before a regex-free byte-level step, as `transformers` does for
/// GGUF pre-tokenizer families), no prefix space, the byte-level decoder, no post-processor.
fn byte_level(
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    split: Option<&str>,
    path: &Path,
) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = vocab.into_iter().collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| {
        let e = e.to_string();
        match e.strip_prefix("Token `").and_then(|r| r.strip_suffix("` out of vocabulary")) {
            Some(t) => format_err(
                path,
                format!("BPE merges: a merge uses the token '{t}', which the vocabulary does not have: the tokenizer is malformed"),
            ),
            None => format_err(path, format!("BPE vocabulary: {e}")),
        }
    })?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre: PreTokenizerWrapper = match split {
        None => ByteLevel::new(false, true, true).into(),
        Some(re) => {
            let split = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| format_err(path, format!("pre-tokenizer regex: {e}")))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
    };
    inner.with_pre_tokenizer(Some(pre));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    Ok(inner)
}
