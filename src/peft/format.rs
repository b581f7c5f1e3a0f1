//! The Hugging Face PEFT adapter layout, so adapters move between tinytune and the Python
//! ecosystem. (It lives here, not in `io`, because it needs the methods' types; `io` sits
//! below `peft`.)
//!
//! A directory with
//! - `adapter_config.json`: `peft_type` "LORA", `r`, `lora_alpha`, `lora_dropout`,
//!   `target_modules` (a list of module names, or a regex string matched against the whole
//!   module path), `layers_to_transform`, `use_rslora`, `use_dora`, `fan_in_fan_out` (true for
//!   GPT-2, whose checkpoint stores linears as `in×out` Conv1D), `bias`, `task_type`,
//!   `modules_to_save`, `base_model_name_or_path`, ...;
//! - `adapter_model.safetensors`: `base_model.model.{site}.lora_A.weight` (`r×in`),
//!   `….lora_B.weight` (`out×r`), DoRA's `….lora_magnitude_vector` (`out`), and a
//!   classification head saved whole as `base_model.model.score.weight`;
//! - `tinytune.json` (ours; PEFT ignores it): the head's pooling and the method.
//!
//! Config keys this reader does not know are ignored with a warning (newer PEFT versions add
//! keys); keys it knows but does not implement, where they would change the math
//! (`rank_pattern`, `alpha_pattern`, `bias` other than "none", ...), are errors naming the key.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use super::{select_sites, ClassifierHead, LoraAdapter, LoraConfig, Pooling};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::io::SafetensorsFile;
use crate::models::CausalLm;
use crate::tensor::Tensor;

const PREFIX: &str = "base_model.model.";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const EXTRA_FILE: &str = "tinytune.json";

/// Config keys PEFT writes that do not change the math of an adapter we can load.
const IGNORED: &[&str] = &[
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "layers_pattern",
    "loftq_config",
    "megatron_config",
    "megatron_core",
    "exclude_modules",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "ensure_weight_tying",
    "peft_version",
];

/// Keys of LoRA variants tinytune does not implement: fine while unset (null, false, empty),
/// an error naming the key when set.
const VARIANTS: &[&str] = &[
    "use_qalora",
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "use_bdlora",
];

fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// A loaded adapter directory: what it attached to the model.
#[derive(Debug)]
pub struct LoadedAdapter {
    pub lora: Option<LoraAdapter>,
    pub head: Option<ClassifierHead>,
    /// Config keys that were not understood (ignored).
    pub warnings: Vec<String>,
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format { path: path.display().to_string(), msg: msg.into() }
}

/// Save `lora` (and a classification `head`) to `dir` in the PEFT layout.
pub fn save(dir: &Path, model: &mut dyn CausalLm, lora: Option<&LoraAdapter>, head: Option<&ClassifierHead>, base: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.display().to_string(), msg: e.to_string() })?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    if let Some(l) = lora {
        tensors.extend(l.parameters().into_iter().map(|(n, t)| (format!("{PREFIX}{n}"), t.detach())));
    }
    if let Some(h) = head {
        tensors.extend(h.parameters().into_iter().map(|(n, t)| (format!("{PREFIX}{n}"), t.detach())));
    }
    let config = match lora {
        Some(l) => config_json(model, l, head, base),
        None => json!({ "peft_type": "NONE", "task_type": "SEQ_CLS", "base_model_name_or_path": base, "modules_to_save": ["score"] }),
    };
    let extra = json!({
        "format": "tinytune adapter 1",
        "method": match (lora, head) { (Some(l), _) if l.config.dora => "dora", (Some(_), _) => "lora", (None, _) => "head" },
        "pooling": head.map(|h| match h.pooling { Pooling::Last => "last", Pooling::Mean => "mean" }),
        "num_labels": head.map(|h| h.num_classes()),
        "target_modules": lora.map(|l| l.config.targets.clone()),
    });
    crate::io::safetensors::save(dir.join(WEIGHTS_FILE), &tensors, Some(HashMap::from([("format".to_string(), "pt".to_string())])))?;
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON values serialize");
    crate::io::write_atomic(&dir.join(CONFIG_FILE), &pretty(&config))?;
    crate::io::write_atomic(&dir.join(EXTRA_FILE), &pretty(&extra))
}

/// The `adapter_config.json` of `lora` on `model`.
fn config_json(model: &mut dyn CausalLm, lora: &LoraAdapter, head: Option<&ClassifierHead>, base: &str) -> Value {
    let c = &lora.config;
    let sites: Vec<String> = lora.layers.iter().map(|l| l.site.clone()).collect();
    // target_modules as PEFT's list of names when that (with layers_to_transform) selects
    // exactly our sites; otherwise a regex of the full paths (PEFT full-matches strings).
    let mut names: Vec<String> = sites.iter().map(|s| s.rsplit('.').next().unwrap_or(s).to_string()).collect();
    names.sort();
    names.dedup();
    let all = super::lora::linear_sites(model);
    let same = select_sites(&all, &names, c.layers.as_deref()).is_ok_and(|s| s == sites);
    let targets = if same {
        json!(names)
    } else {
        json!(format!("^({})$", sites.iter().map(|s| s.replace('.', "\\.")).collect::<Vec<_>>().join("|")))
    };
    json!({
        "peft_type": "LORA",
        "task_type": if head.is_some() { "SEQ_CLS" } else { "CAUSAL_LM" },
        "base_model_name_or_path": base,
        "r": c.r,
        // An integer when it is one, as PEFT writes it (stricter readers expect an int).
        "lora_alpha": if c.alpha.fract() == 0.0 && c.alpha.abs() < 1e15 { json!(c.alpha as i64) } else { json!(c.alpha) },
        "lora_dropout": c.dropout,
        "target_modules": targets,
        "layers_to_transform": if same { json!(c.layers) } else { Value::Null },
        "use_rslora": c.rslora,
        "use_dora": c.dora,
        "fan_in_fan_out": model.architecture() == "gpt2",
        "bias": "none",
        "modules_to_save": if head.is_some() { json!(["score"]) } else { Value::Null },
        "inference_mode": true,
        "init_lora_weights": true,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// Load the adapter in `dir` onto `model` (LoRA/DoRA layers attached to their sites, and a
/// classification head if the directory has one).
pub fn load(dir: &Path, model: &mut dyn CausalLm, device: &Device) -> Result<LoadedAdapter> {
    let cpath = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath).map_err(|e| Error::Io { path: cpath.display().to_string(), msg: e.to_string() })?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| format_err(&cpath, format!("not valid JSON: {e}")))?;
    let obj = cfg.as_object().ok_or_else(|| format_err(&cpath, "the config must be a JSON object"))?;
    let wpath = dir.join(WEIGHTS_FILE);
    let file = SafetensorsFile::open(&wpath)?;
    let extra: Value = match std::fs::read_to_string(dir.join(EXTRA_FILE)) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| format_err(&dir.join(EXTRA_FILE), format!("not valid JSON: {e}")))?,
        Err(_) => Value::Null,
    };
    let mut warnings = Vec::new();

    // The head, saved whole (PEFT writes modules_to_save without their wrapper names).
    let head_key = file.names().into_iter().find(|n| n.strip_prefix(PREFIX).is_some_and(|k| k == "score.weight")).map(str::to_string);
    let head = match head_key {
        Some(k) => {
            let pooling = match extra.get("pooling").and_then(Value::as_str) {
                Some(p) => p.parse()?,
                None => Pooling::Last,
            };
            let w = file.load(&k, device)?;
            if w.rank() != 2 || w.shape()[1] != model.hidden_size() {
                return Err(format_err(&wpath, format!("{k} has shape {:?}, expected [classes, {}]", w.shape(), model.hidden_size())));
            }
            Some(ClassifierHead::from_weight(w, pooling)?)
        }
        None => None,
    };

    let peft_type = obj.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type == "NONE" && head.is_some() {
        return Ok(LoadedAdapter { lora: None, head, warnings });
    }
    if peft_type != "LORA" {
        return Err(format_err(&cpath, format!("peft_type '{peft_type}' is not supported (LORA only)")));
    }
    let num = |k: &str| obj.get(k).and_then(Value::as_f64);
    let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
    for (k, v) in obj {
        let unsupported = match k.as_str() {
            "r"
            | "lora_alpha"
            | "lora_dropout"
            | "use_rslora"
            | "use_dora"
            | "fan_in_fan_out"
            | "target_modules"
            | "peft_type"
            | "task_type"
            | "modules_to_save"
            | "layers_to_transform" => None,
            "rank_pattern" | "alpha_pattern" => {
                v.as_object().is_some_and(|o| !o.is_empty()).then_some("per-module ranks/alphas are not implemented")
            }
            "bias" => (v.as_str().unwrap_or("none") != "none").then_some("trained biases are not implemented (bias must be \"none\")"),
            k if VARIANTS.contains(&k) => (!is_unset(v)).then_some("this LoRA variant is not implemented"),
            k if IGNORED.contains(&k) => None,
            other => {
                warnings.push(format!("{}: ignoring unknown config key '{other}'", cpath.display()));
                None
            }
        };
        if let Some(why) = unsupported {
            return Err(format_err(&cpath, format!("field '{k}' = {v}: {why}")));
        }
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let r = num("r").filter(|&r| r >= 1.0 && r.fract() == 0.0).ok_or_else(|| format_err(&cpath, "field 'r' must be a positive integer"))?
        as usize;
    let alpha = num("lora_alpha").unwrap_or(8.0);
    let layers = match obj.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => {
            Some(vec![n.as_u64().ok_or_else(|| format_err(&cpath, "layers_to_transform must be integers"))? as usize])
        }
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_u64().map(|v| v as usize).ok_or_else(|| format_err(&cpath, "layers_to_transform must be integers")))
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(other) => return Err(format_err(&cpath, format!("layers_to_transform = {other} is not a layer list"))),
    };
    let targets = match obj.get("target_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    let config = LoraConfig {
        r,
        alpha,
        dropout: num("lora_dropout").unwrap_or(0.0),
        rslora: flag("use_rslora"),
        dora: flag("use_dora"),
        targets,
        layers,
        seed: 0,
    };

    // The sites come from the weights: `{PREFIX}{site}.lora_A.weight`.
    let mut weights: HashMap<String, (Tensor, Tensor, Option<Tensor>)> = HashMap::new();
    for name in file.names() {
        let Some(key) = name.strip_prefix(PREFIX) else {
            return Err(format_err(&wpath, format!("tensor '{name}' does not start with '{PREFIX}'")));
        };
        let Some(site) = key.strip_suffix(".lora_A.weight") else {
            let known = key.ends_with(".lora_B.weight")
                || key.ends_with(".lora_magnitude_vector")
                || key.ends_with(".lora_magnitude_vector.weight")
                || key == "score.weight";
            if !known {
                return Err(format_err(&wpath, format!("tensor '{name}' is not a LoRA weight tinytune knows")));
            }
            continue;
        };
        let get = |suffix: &str| file.load(&format!("{PREFIX}{site}.{suffix}"), device);
        let b = get("lora_B.weight").map_err(|_| format_err(&wpath, format!("{site} has lora_A but no lora_B.weight")))?;
        let m = if file.contains(&format!("{PREFIX}{site}.lora_magnitude_vector")) {
            Some(get("lora_magnitude_vector")?)
        } else if file.contains(&format!("{PREFIX}{site}.lora_magnitude_vector.weight")) {
            Some(get("lora_magnitude_vector.weight")?)
        } else {
            None
        };
        weights.insert(site.to_string(), (get("lora_A.weight")?, b, m));
    }
    if weights.is_empty() {
        return Err(format_err(&wpath, "no lora_A/lora_B weights in the adapter"));
    }
    let lora = LoraAdapter::attach_weights(model, config, &weights, device).map_err(|e| format_err(dir, e.to_string()))?;
    Ok(LoadedAdapter { lora: Some(lora), head, warnings })
}
