//! The Hugging Face PEFT adapter layout, so adapters move between tinytune and the Python
//! ecosystem. (It lives here, not in `io`, because it needs the methods' types; `io` sits
//! below `peft`.)
//!
//! A directory with
//! - `adapter_config.json`: `peft_type` and the method's own fields (each method writes and
//!   reads its own: see `Method::adapter_config` and the method's loader), plus `task_type`,
//!   `modules_to_save`, `base_model_name_or_path`;
//! - `adapter_model.safetensors`: the method's tensors as `base_model.model.{key}` (LoRA:
//!   `base_model.model.{site}.lora_A.weight`, ...), and a classification head saved whole as
//!   `base_model.model.score.weight`;
//! - `tinytune.json` (ours; PEFT ignores it): the head's pooling and the method.
//!
//! Which method loads a directory is decided by the registry ([`super::METHODS`]): the first
//! whose `recognises` accepts the config. Config keys a method does not know are ignored with
//! a warning (newer PEFT versions add keys); keys it knows but does not implement, where they
//! would change the math, are errors naming the key.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use super::method::{AdapterFiles, Method, METHODS};
use super::{select_sites, ClassifierHead, Pooling};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::io::SafetensorsFile;
use crate::models::CausalLm;
use crate::tensor::Tensor;

pub const PREFIX: &str = "base_model.model.";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const EXTRA_FILE: &str = "tinytune.json";

/// A loaded adapter directory: what it attached to the model.
#[derive(Debug)]
pub struct LoadedAdapter {
    /// The method attached to the body (a head-only adapter: the `head` method, which
    /// attaches nothing).
    pub method: Box<dyn Method>,
    pub head: Option<ClassifierHead>,
    /// The longest example (tokens) it was trained on, when its `tinytune.json` says: the
    /// length to cut examples to when evaluating or classifying with it.
    pub seq_len: Option<usize>,
    /// Whether its training data was encoded with the tokenizer's special tokens (the
    /// default; `false` when trained with `--no-special-tokens`).
    pub add_special_tokens: bool,
    /// Config keys that were not understood (ignored).
    pub warnings: Vec<String>,
}

impl LoadedAdapter {
    /// The attached method as its own type (`loaded.method_as::<LoraAdapter>()`).
    pub fn method_as<T: 'static>(&self) -> Option<&T> {
        self.method.as_any().downcast_ref::<T>()
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format { path: path.display().to_string(), msg: msg.into() }
}

/// Save `method` (and a classification `head`) to `dir` in the PEFT layout. `base` names
/// the base model.
pub fn save(dir: &Path, model: &mut dyn CausalLm, method: Option<&dyn Method>, head: Option<&ClassifierHead>, base: &str) -> Result<()> {
    let tensors = match method {
        Some(m) => m.adapter_tensors()?,
        None => Vec::new(),
    };
    let config = match method {
        Some(m) => m.adapter_config(model),
        None => json!({ "peft_type": "NONE" }),
    };
    write_adapter(dir, config, &tensors, method.map_or("head", |m| m.name()), head, base)
}

/// Write an adapter directory from its `adapter_config.json` fields (`peft_type` and the
/// method's), its tensors by their file keys, the method's name and the head: what [`save`]
/// writes for an attached method, and what a conversion (LoRA-XS as a plain LoRA) writes.
pub fn write_adapter(
    dir: &Path,
    mut config: Value,
    tensors: &[(String, Tensor)],
    method: &str,
    head: Option<&ClassifierHead>,
    base: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.display().to_string(), msg: e.to_string() })?;
    let mut tensors = tensors.to_vec();
    if let Some(h) = head {
        tensors.extend(h.parameters().into_iter().map(|(n, t)| (format!("{PREFIX}{n}"), t.detach())));
    }
    config["task_type"] = json!(if head.is_some() { "SEQ_CLS" } else { "CAUSAL_LM" });
    config["base_model_name_or_path"] = json!(base);
    config["modules_to_save"] = if head.is_some() { json!(["score"]) } else { Value::Null };
    config["inference_mode"] = json!(true);
    let extra = json!({
        "format": "tinytune adapter 1",
        "method": method,
        "pooling": head.map(|h| match h.pooling { Pooling::Last => "last", Pooling::Mean => "mean" }),
        "num_labels": head.map(|h| h.num_classes()),
    });
    crate::io::safetensors::save(dir.join(WEIGHTS_FILE), &tensors, Some(HashMap::from([("format".to_string(), "pt".to_string())])))?;
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON values serialize");
    crate::io::write_atomic(&dir.join(CONFIG_FILE), &pretty(&config))?;
    crate::io::write_atomic(&dir.join(EXTRA_FILE), &pretty(&extra))
}

/// Add `key = value` to the `tinytune.json` of the adapter in `dir` (written atomically), for
/// what the trainer knows and the adapter files do not say (`seq_len`).
pub fn record(dir: &Path, key: &str, value: Value) -> Result<()> {
    let path = dir.join(EXTRA_FILE);
    let mut extra: Value = match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| format_err(&path, format!("not valid JSON: {e}")))?,
        Err(_) => json!({}),
    };
    let obj = extra.as_object_mut().ok_or_else(|| format_err(&path, "must be a JSON object"))?;
    obj.insert(key.to_string(), value);
    crate::io::write_atomic(&path, &serde_json::to_vec_pretty(&extra).expect("JSON values serialize"))
}

/// `target_modules` (and `layers_to_transform`) as PEFT writes them for `sites`: a list of
/// module names when that (with `layers`) selects exactly these sites — each the shortest
/// dotted suffix that picks no other module (`c_attn`, but `mlp.c_proj` beside GPT-2's
/// `attn.c_proj`) — otherwise a regex of the full paths (PEFT full-matches a string).
pub(crate) fn target_modules(model: &mut dyn CausalLm, sites: &[String], layers: Option<&[usize]>) -> (Value, Value) {
    let all = super::lora::linear_sites(model);
    let in_layers = |s: &String| layers.is_none_or(|l| super::layer_of(s).is_some_and(|i| l.contains(&i)));
    let suffix = |s: &str, k: usize| {
        let parts: Vec<&str> = s.split('.').collect();
        parts[parts.len().saturating_sub(k)..].join(".")
    };
    let names: Option<Vec<String>> = sites
        .iter()
        .map(|s| {
            // Module names only (never a suffix starting at a layer number).
            (1..=2)
                .map(|k| suffix(s, k))
                .filter(|n| !n.starts_with(|c: char| c.is_ascii_digit()))
                .find(|n| all.iter().filter(|a| in_layers(a) && (*a == n || a.ends_with(&format!(".{n}")))).all(|a| sites.contains(a)))
        })
        .collect();
    let mut names = names.unwrap_or_default();
    names.sort();
    names.dedup();
    if !names.is_empty() && select_sites(&all, &names, layers).is_ok_and(|s| s == sites) {
        (json!(names), json!(layers))
    } else {
        (json!(format!("^({})$", sites.iter().map(|s| s.replace('.', "\\.")).collect::<Vec<_>>().join("|"))), Value::Null)
    }
}

/// Load the adapter in `dir` onto `model`: the method the registry recognises in its config,
/// and a classification head if the directory has one.
pub fn load(dir: &Path, model: &mut dyn CausalLm, device: &Device) -> Result<LoadedAdapter> {
    let cpath = dir.join(CONFIG_FILE);
    let text = crate::io::read_regular_string(&cpath)?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| format_err(&cpath, format!("not valid JSON: {e}")))?;
    let obj = cfg.as_object().ok_or_else(|| format_err(&cpath, "the config must be a JSON object"))?;
    let wpath = dir.join(WEIGHTS_FILE);
    let file = SafetensorsFile::open(&wpath)?;
    let extra: Value = match std::fs::read_to_string(dir.join(EXTRA_FILE)) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| format_err(&dir.join(EXTRA_FILE), format!("not valid JSON: {e}")))?,
        Err(_) => Value::Null,
    };

    // The head, saved whole (PEFT writes modules_to_save without their wrapper names).
    let head_key = format!("{PREFIX}score.weight");
    let head = if file.contains(&head_key) {
        let pooling = match extra.get("pooling").and_then(Value::as_str) {
            Some(p) => p.parse()?,
            None => Pooling::Last,
        };
        let w = file.load(&head_key, device)?;
        if w.rank() != 2 || w.shape()[1] != model.hidden_size() {
            return Err(format_err(&wpath, format!("{head_key} has shape {:?}, expected [classes, {}]", w.shape(), model.hidden_size())));
        }
        Some(ClassifierHead::from_weight(w, pooling)?)
    } else {
        None
    };

    // PEFT prefixes a module's tensors with `base_model.model.`; prompt-learning methods save
    // `prompt_embeddings` bare. The methods check the keys they are given.
    let keys: Vec<String> =
        file.names().into_iter().filter(|n| *n != head_key).map(|n| n.strip_prefix(PREFIX).unwrap_or(n).to_string()).collect();
    let peft_type = obj.get("peft_type").and_then(Value::as_str).unwrap_or("");
    let Some(reg) = METHODS.iter().find(|r| (r.recognises)(obj)) else {
        return Err(format_err(&cpath, format!("peft_type '{peft_type}' is not one tinytune loads ({})", known_types())));
    };
    let mut warnings = Vec::new();
    let mut files = AdapterFiles { dir, config: obj, weights: &file, keys, warnings: &mut warnings };
    let method = (reg.load)(model, &mut files, device)?;
    if method.as_any().is::<super::head::HeadOnly>() && head.is_none() {
        return Err(format_err(&wpath, format!("peft_type '{peft_type}' with no classification head ({head_key}): nothing to load")));
    }
    let seq_len = extra.get("seq_len").and_then(Value::as_u64).map(|n| n as usize).filter(|&n| n >= 2);
    let add_special_tokens = extra.get("add_special_tokens").and_then(Value::as_bool).unwrap_or(true);
    Ok(LoadedAdapter { method, head, seq_len, add_special_tokens, warnings })
}

/// The `peft_type`s the registry loads, for error messages.
fn known_types() -> String {
    let mut types: Vec<&str> = METHODS.iter().filter(|r| r.peft_type != "NONE").map(|r| r.peft_type).collect();
    types.dedup();
    format!("{}, or NONE with a classification head", types.join(", "))
}
