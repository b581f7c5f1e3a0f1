//! The contract every fine-tuning method keeps, and the registry that names them.
//!
//! A method has two halves:
//! - a [`MethodConfig`]: its settings, ready to attach (what a `TrainConfig` holds; a library
//!   user builds one as a plain struct, e.g. `LoraConfig { r: 4, ..Default::default() }`);
//! - a [`Method`]: what it attached to a model (its trainable tensors, its training mode, how
//!   it is saved, merged and taken off again).
//!
//! The CLI and the adapter loader find methods through [`METHODS`]: one [`Registration`] per
//! method, holding how to build its config from the user's [`Settings`] (flags, config-file
//! keys) and how to recognise and load a saved adapter. Adding a method is its own file in
//! `src/peft/` plus one line in [`METHODS`]; nothing outside that file matches on its name.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::backend::Device;
use crate::error::{Error, Result};
use crate::io::SafetensorsFile;
use crate::models::CausalLm;
use crate::tensor::Tensor;

/// A method's settings, ready to attach.
pub trait MethodConfig: Send + Sync + std::fmt::Debug {
    /// The registry name (`lora`, `ia3`, ...).
    fn name(&self) -> &'static str;
    /// Attach fresh (initialised) to `model`; `seed` drives every random init and draw.
    fn attach(&self, model: &mut dyn CausalLm, seed: u64) -> Result<Box<dyn Method>>;
    /// The settings that change the math (resume refuses a checkpoint made with others).
    fn fingerprint(&self) -> Value;
    /// The learning rate the CLI uses when none is given.
    fn default_lr(&self) -> f64 {
        2e-4
    }
    /// Whether the method trains nothing of the body, so it needs a classification head.
    fn head_only(&self) -> bool {
        false
    }
}

/// A method attached to a model.
pub trait Method: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// The trainable tensors, named by their keys in the adapter file without the
    /// `base_model.model.` prefix (full fine-tuning: checkpoint names).
    fn parameters(&self) -> Vec<(String, Tensor)>;
    /// The tensors of the adapter file, by their exact keys there. Default: the parameters
    /// under `base_model.model.`; prompt-learning methods save `prompt_embeddings` as PEFT
    /// does (unprefixed, and for prefix tuning with a projection, the projection's output).
    fn adapter_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.parameters().into_iter().map(|(n, t)| (format!("{}{n}", super::format::PREFIX), t.detach())).collect())
    }
    /// Training mode (dropout, noise) on or off.
    fn set_training(&self, _on: bool) {}
    /// The micro-batch whose random draws the next forward makes (the trainer counts them).
    fn set_step(&self, _micro: u64) {}
    /// The sites it is attached at (for messages).
    fn num_sites(&self) -> usize;
    /// `adapter_config.json` for this method on `model` (`peft_type` and the method's
    /// fields; the saver adds `task_type`, `base_model_name_or_path` and `modules_to_save`).
    fn adapter_config(&self, model: &mut dyn CausalLm) -> Value;
    /// Whether the result is the whole model rather than an adapter (full fine-tuning).
    fn saves_model(&self) -> bool {
        false
    }
    /// Fold the method into the base weights and take it off the sites, so the model runs at
    /// the base model's cost.
    fn merge(&self, _model: &mut dyn CausalLm) -> Result<()> {
        Err(Error::InvalidArgument {
            op: "merge",
            msg: format!("a {} adapter cannot be merged into the base weights; load it with --adapter instead", self.name()),
        })
    }
    /// Take the method off the model (the base model again).
    fn remove(&self, model: &mut dyn CausalLm) -> Result<()>;
    /// The learning rate's multiplier for the trainable tensor `param` (by its name in
    /// [`Method::parameters`]); 1 by default. FineGates' gates take their own (their θ must
    /// travel O(1) in a run where weights move by O(lr)).
    fn lr_scale(&self, _param: &str) -> f64 {
        1.0
    }
    /// A term the method adds to the training loss once per optimizer update (FineGates'
    /// sparsity objective), with metrics to report; not part of an evaluation's loss.
    fn regularizer(&self) -> Result<Option<Regularizer>> {
        Ok(None)
    }
    /// A method initialised from the task's own gradient (LoRA-SB): the linear sites whose
    /// full weight gradient it needs and over how many training examples. The trainer then
    /// makes those weights trainable, accumulates their gradient over the first examples of
    /// the seeded epoch order (before the optimizer exists), restores them, and hands the
    /// gradients to [`Method::init_from_gradients`]. Default: none.
    fn gradient_init(&self) -> Option<GradientInit> {
        None
    }
    /// Initialise from `grads` (site name → `∂L/∂W` summed over the examples, `[out, in]`);
    /// `lr_eff` is the learning rate of the first warm-up step. Attaches the adapters.
    fn init_from_gradients(&mut self, _model: &mut dyn CausalLm, _grads: &[(String, Tensor)], _lr_eff: f64) -> Result<()> {
        Ok(())
    }
    /// For downcasting to the method's own type.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// What [`Method::regularizer`] adds to a step's loss.
pub struct Regularizer {
    /// A scalar with its graph.
    pub loss: Tensor,
    /// Reported beside the step's loss (means over the step's updates).
    pub metrics: Vec<(&'static str, f64)>,
}

/// What [`Method::gradient_init`] asks of the trainer.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientInit {
    /// Linear site names (as [`crate::nn::Linear::name`]).
    pub sites: Vec<String>,
    /// Training examples the gradient is accumulated over.
    pub examples: usize,
}

/// What a saved adapter directory offers a method's loader.
pub struct AdapterFiles<'a> {
    pub dir: &'a Path,
    /// `adapter_config.json`, parsed.
    pub config: &'a Map<String, Value>,
    /// `adapter_model.safetensors`.
    pub weights: &'a SafetensorsFile,
    /// Keys of the weights without the `base_model.model.` prefix (where they have it), except
    /// the head's.
    pub keys: Vec<String>,
    pub warnings: &'a mut Vec<String>,
}

impl AdapterFiles<'_> {
    fn config_path(&self) -> String {
        self.dir.join(super::format::CONFIG_FILE).display().to_string()
    }

    /// An error about the config file.
    pub fn config_error(&self, msg: impl Into<String>) -> Error {
        Error::Format { path: self.config_path(), msg: msg.into() }
    }

    /// An error about the weights file.
    pub fn weights_error(&self, msg: impl Into<String>) -> Error {
        Error::Format { path: self.dir.join(super::format::WEIGHTS_FILE).display().to_string(), msg: msg.into() }
    }

    /// Check the config's keys: `known` are the method's own, `ignored` do not change its math;
    /// unknown ones are ignored with a warning (newer PEFT versions add keys).
    pub fn check_keys(&mut self, known: &[&str], ignored: &[&str]) {
        const COMMON: &[&str] = &[
            "peft_type",
            "task_type",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "auto_mapping",
            "modules_to_save",
            "peft_version",
        ];
        for k in self.config.keys() {
            if !(known.contains(&k.as_str()) || ignored.contains(&k.as_str()) || COMMON.contains(&k.as_str())) {
                let w = format!("{}: ignoring unknown config key '{k}'", self.config_path());
                crate::say!("warning: {w}");
                self.warnings.push(w);
            }
        }
    }

    /// A non-negative integer field.
    pub fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.config_error(format!("field '{key}' = {v} must be a non-negative integer"))),
        }
    }

    /// A list of strings (or one string) field.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| self.config_error(format!("field '{key}' must list strings"))))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.config_error(format!("field '{key}' = {v} must be a string or a list of strings"))),
        }
    }

    /// Load the tensor saved under `key` (with or without the prefix), or an error naming it.
    pub fn tensor(&self, key: &str, device: &Device) -> Result<Tensor> {
        let full = format!("{}{key}", super::format::PREFIX);
        for k in [&full, key] {
            if self.weights.contains(k) {
                return self.weights.load(k, device);
            }
        }
        Err(self.weights_error(format!("missing tensor '{full}'")))
    }
}

/// One method in the registry.
pub struct Registration {
    /// `--method` name.
    pub name: &'static str,
    /// One line for `--help` and error messages.
    pub about: &'static str,
    /// The `peft_type` its saved adapters carry (for messages; `recognises` decides).
    pub peft_type: &'static str,
    /// The settings it reads (kebab-case, as the CLI flags); any other is an error.
    pub settings: &'static [&'static str],
    /// Build the config from the user's settings.
    pub configure: fn(&Settings) -> Result<Arc<dyn MethodConfig>>,
    /// Whether a saved `adapter_config.json` is this method's.
    pub recognises: fn(&Map<String, Value>) -> bool,
    /// Attach a saved adapter.
    pub load: fn(&mut dyn CausalLm, &mut AdapterFiles, &Device) -> Result<Box<dyn Method>>,
}

/// Every method, in `--help` order. Adding one: a file in `src/peft/` and one line here.
pub const METHODS: &[Registration] = &[
    super::lora::LORA,
    super::lora::DORA,
    super::loraxs::LORA_XS,
    super::loraxs::LORA_SB,
    super::finegates::FINEGATES,
    super::full::FULL,
    super::head::HEAD,
    super::ia3::IA3,
    super::prefix::PREFIX,
    super::prompt::PROMPT,
    super::bottleneck::BOTTLENECK,
];

/// The registration named `name`, or an error listing the methods.
pub fn registration(name: &str) -> Result<&'static Registration> {
    METHODS.iter().find(|r| r.name == name).ok_or_else(|| Error::InvalidArgument {
        op: "method",
        msg: format!("unknown method '{name}' ({})", METHODS.iter().map(|r| r.name).collect::<Vec<_>>().join(", ")),
    })
}

/// The config of method `name` from `settings` (every setting must be one the method reads).
pub fn configure(name: &str, settings: &Settings) -> Result<Arc<dyn MethodConfig>> {
    let r = registration(name)?;
    if let Some(k) = settings.values.keys().find(|k| !r.settings.contains(&k.as_str())) {
        let owners: Vec<&str> = METHODS.iter().filter(|m| m.settings.contains(&k.as_str())).map(|m| m.name).collect();
        let hint = if owners.is_empty() { String::new() } else { format!(" (it is a setting of {})", owners.join(", ")) };
        return Err(Error::InvalidArgument { op: "method settings", msg: format!("--{k} does not apply to method {name}{hint}") });
    }
    (r.configure)(settings)
}

/// A method's settings as the user gave them: flag or config-file names (kebab-case, as
/// `--num-virtual-tokens`) to JSON values. A setting the chosen method does not read is an
/// error naming the setting and the methods it belongs to.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    values: BTreeMap<String, Value>,
}

impl Settings {
    pub fn new() -> Settings {
        Settings::default()
    }

    /// Set `key` (kebab-case) to `value`; `None` leaves it unset.
    pub fn set(&mut self, key: &str, value: Option<impl Into<Value>>) -> &mut Settings {
        if let Some(v) = value {
            self.values.insert(key.to_string(), v.into());
        }
        self
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    fn bad(key: &str, v: &Value, want: &str) -> Error {
        Error::InvalidArgument { op: "method settings", msg: format!("--{key} = {v}: expected {want}") }
    }

    pub fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| Self::bad(key, v, "a non-negative integer"))).transpose()
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| Self::bad(key, v, "a number"))).transpose()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| Self::bad(key, v, "true or false"))).transpose()
    }

    pub fn str(&self, key: &str) -> Result<Option<String>> {
        self.get(key).map(|v| v.as_str().map(str::to_string).ok_or_else(|| Self::bad(key, v, "a string"))).transpose()
    }

    pub fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| Self::bad(key, v, "a list of names"))
            })
            .transpose()
    }

    pub fn usizes(&self, key: &str) -> Result<Option<Vec<usize>>> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(|a| a.iter().map(|s| s.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| Self::bad(key, v, "a list of layer indices"))
            })
            .transpose()
    }
}

/// Find the sites named `sites` among `model`'s linears (in the model's order), or an error
/// naming the first that is not a linear of this model.
pub(crate) fn check_linear_sites(model: &mut dyn CausalLm, sites: &[String], what: &str) -> Result<()> {
    let known = super::lora::linear_sites(model);
    let mut sorted: Vec<&String> = sites.iter().collect();
    sorted.sort();
    if let Some(missing) = sorted.into_iter().find(|k| !known.contains(k)) {
        return Err(Error::InvalidArgument {
            op: "load adapter",
            msg: format!("the adapter has {what} for '{missing}', which is not a linear layer of this model"),
        });
    }
    Ok(())
}
