//! LoRA (Hu et al. 2021): a frozen linear `W0` plus a trainable low-rank update,
//!
//! ```text
//! y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ,    A ∈ R^{r×in}, B ∈ R^{out×r}
//! s = α / r            (LoRA)
//! s = α / √r           (rsLoRA, Kalajdzievski 2023: keeps the update's scale as r grows)
//! ```
//!
//! Init: `B = 0` (the adapted model starts equal to the base), `A ~ U(−1/√in, 1/√in)` (the
//! Kaiming-uniform bound with a = √5 of the reference code). Merge folds the update into the
//! weight, `W = W0 + s·B A`; unmerge subtracts it again. With `dora` set, the site computes
//! DoRA instead (see [`super::dora`]).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::method::{AdapterFiles, Method, MethodConfig, Registration, Settings};
use super::{dora, select_sites, DropoutState};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::nn::{Linear, LinearAdapter, LinearSite};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The hyper-parameters of a LoRA/DoRA adapter (the fields of PEFT's `LoraConfig` that
/// change the math).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of the update.
    pub r: usize,
    /// `α`: the update is scaled by `α/r` (or `α/√r` with `rslora`).
    pub alpha: f64,
    /// Dropout probability on the input of the low-rank path, in training only.
    pub dropout: f64,
    pub rslora: bool,
    /// Weight-decomposed LoRA: a trainable magnitude per output row.
    pub dora: bool,
    /// Module names, patterns or `all-linear` (see [`super::select_sites`]).
    pub targets: Vec<String>,
    /// Only these transformer blocks (PEFT's `layers_to_transform`).
    pub layers: Option<Vec<usize>>,
    /// Seed of the `A` init and of the dropout masks.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            rslora: false,
            dora: false,
            targets: vec!["q_proj".into(), "v_proj".into()],
            layers: None,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// `s = α/r`, or `α/√r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument { op: "lora config", msg });
        if self.r == 0 {
            return bad("rank r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if !self.alpha.is_finite() {
            return bad(format!("alpha must be finite, got {}", self.alpha));
        }
        Ok(())
    }
}

/// The adapter of one linear site.
#[derive(Debug)]
pub struct LoraLayer {
    /// The module path of the site (`model.layers.0.self_attn.q_proj`).
    pub site: String,
    /// `A: [r, in]`, trainable.
    pub a: Tensor,
    /// `B: [out, r]`, trainable.
    pub b: Tensor,
    /// DoRA's magnitude `m: [out]`, trainable; `None` for plain LoRA.
    pub magnitude: Option<Tensor>,
    pub scale: f64,
    pub dropout: f64,
    state: Arc<DropoutState>,
    index: u64,
}

impl LoraLayer {
    /// `dropout(x)` in training, `x` otherwise.
    pub(crate) fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        if self.dropout > 0.0 && self.state.is_training() {
            x.dropout(self.dropout, true, &mut self.state.rng(self.index))
        } else {
            Ok(x.clone())
        }
    }

    /// `s · B A`, the update in the weight's layout `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.detach().matmul(&self.a.detach())?.mul_scalar(self.scale)
    }
}

impl LinearAdapter for LoraLayer {
    fn site(&self) -> LinearSite {
        LinearSite::Replace
    }

    fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor> {
        let xd = self.dropped(x)?;
        let y = match &self.magnitude {
            // x W0ᵀ + s (xd Aᵀ) Bᵀ, one node: the fused kernel on the GPU; no dW0.
            None => x.lora_linear(&xd, &base.weight, &self.a, &self.b, self.scale)?,
            Some(m) => dora::forward(self, m, &base.weight, x, &xd)?,
        };
        match &base.bias {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A LoRA (or DoRA) adapter attached to a model: its config and one layer per site.
#[derive(Debug)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub layers: Vec<Arc<LoraLayer>>,
    pub state: Arc<DropoutState>,
}

/// The names of a model's linear sites, in order.
pub fn linear_sites(model: &mut dyn CausalLm) -> Vec<String> {
    model.linears_mut().into_iter().map(|l| l.name.clone()).collect()
}

impl LoraAdapter {
    /// Attach fresh adapters (`B = 0`, `A` uniform; DoRA: `m = ‖W0‖_row`) to the sites the
    /// config selects.
    pub fn attach(model: &mut dyn CausalLm, config: LoraConfig) -> Result<LoraAdapter> {
        config.validate()?;
        let sites = select_sites(&linear_sites(model), &config.targets, config.layers.as_deref())?;
        let state = Arc::new(DropoutState::new(config.seed));
        let mut init_rng = Rng::new(super::mix(config.seed, u64::MAX));
        let mut layers = Vec::new();
        for (index, lin) in model.linears_mut().into_iter().filter(|l| sites.contains(&l.name)).enumerate() {
            let dev = lin.weight.device().clone();
            let (out, inp) = (lin.out_features(), lin.in_features());
            if config.r > inp.min(out) {
                // B·A has rank at most min(in, out): a larger r adds parameters, never capacity
                // (and an absurd one would be refused only by the allocator).
                return Err(Error::InvalidArgument {
                    op: "lora",
                    msg: format!(
                        "rank {} is more than the smallest dimension of {} ({out}×{inp}): use a rank of at most {}",
                        config.r,
                        lin.name,
                        inp.min(out)
                    ),
                });
            }
            let bound = 1.0 / (inp as f64).sqrt();
            let dt = super::trainable_dtype(lin.weight.dtype());
            let a = Tensor::rand_uniform(&[config.r, inp], -bound, bound, dt, &dev, &mut init_rng)?;
            let b = Tensor::zeros(&[out, config.r], dt, &dev)?;
            let magnitude = if config.dora { Some(dora::row_norms(&lin.weight)?) } else { None };
            layers.push(Self::install(lin, &config, &state, index as u64, a, b, magnitude)?);
        }
        Ok(LoraAdapter { config, layers, state })
    }

    /// Attach given weights (a loaded adapter): `weights[site] = (A, B, magnitude)`.
    pub fn attach_weights(
        model: &mut dyn CausalLm,
        config: LoraConfig,
        weights: &HashMap<String, (Tensor, Tensor, Option<Tensor>)>,
        device: &Device,
    ) -> Result<LoraAdapter> {
        config.validate()?;
        let state = Arc::new(DropoutState::new(config.seed));
        let mut layers = Vec::new();
        super::method::check_linear_sites(model, &weights.keys().cloned().collect::<Vec<_>>(), "weights")?;
        for (index, lin) in model.linears_mut().into_iter().filter(|l| weights.contains_key(&l.name)).enumerate() {
            let (a, b, m) = &weights[&lin.name];
            let (out, inp) = (lin.out_features(), lin.in_features());
            let want = |t: &Tensor, shape: &[usize], what: &str| -> Result<Tensor> {
                if t.shape() != shape {
                    return Err(Error::Shape {
                        op: "load adapter",
                        msg: format!("{}.{what} has shape {:?}, expected {:?}", lin.name, t.shape(), shape),
                    });
                }
                t.to_dtype(super::trainable_dtype(lin.weight.dtype()))?.to_device(device)?.contiguous()
            };
            let a = want(a, &[config.r, inp], "lora_A.weight")?;
            let b = want(b, &[out, config.r], "lora_B.weight")?;
            let m = m.as_ref().map(|m| want(m, &[out], "lora_magnitude_vector")).transpose()?;
            if config.dora != m.is_some() {
                return Err(Error::InvalidArgument {
                    op: "load adapter",
                    msg: format!(
                        "{}: use_dora is {} but the magnitude vector is {}",
                        lin.name,
                        config.dora,
                        if m.is_some() { "present" } else { "missing" }
                    ),
                });
            }
            layers.push(Self::install(lin, &config, &state, index as u64, a, b, m)?);
        }
        Ok(LoraAdapter { config, layers, state })
    }

    fn install(
        lin: &mut Linear,
        config: &LoraConfig,
        state: &Arc<DropoutState>,
        index: u64,
        a: Tensor,
        b: Tensor,
        magnitude: Option<Tensor>,
    ) -> Result<Arc<LoraLayer>> {
        let layer = Arc::new(LoraLayer {
            site: lin.name.clone(),
            a: a.requires_grad()?,
            b: b.requires_grad()?,
            magnitude: magnitude.map(|m| m.requires_grad()).transpose()?,
            scale: config.scale(),
            dropout: config.dropout,
            state: state.clone(),
            index,
        });
        lin.attach(layer.clone())?;
        Ok(layer)
    }

    /// The trainable tensors, named by their PEFT keys without the `base_model.model.`
    /// prefix: `{site}.lora_A.weight`, `{site}.lora_B.weight`, `{site}.lora_magnitude_vector`.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for l in &self.layers {
            out.push((format!("{}.lora_A.weight", l.site), l.a.clone()));
            out.push((format!("{}.lora_B.weight", l.site), l.b.clone()));
            if let Some(m) = &l.magnitude {
                out.push((format!("{}.lora_magnitude_vector", l.site), m.clone()));
            }
        }
        out
    }

    /// Training mode: dropout on. Inference: off.
    pub fn set_training(&self, on: bool) {
        self.state.set_training(on);
    }

    /// Fold every update into its base weight (`W = W0 + s·B A`, DoRA: `m ⊙ (W0 + s·B A)/‖·‖_row`)
    /// and take the adapters off the sites: the model then runs at the base model's cost.
    /// Returns what [`LoraAdapter::unmerge`] needs to undo it.
    pub fn merge(&self, model: &mut dyn CausalLm) -> Result<Merged> {
        let mut norms = Vec::new();
        crate::autograd::with_no_grad(|| -> Result<()> {
            for (lin, layer) in self.sites(model)? {
                // A base kept as stored (16-bit or quantised) is dequantised and merged in
                // float: the merged weight is dense f32 (save it as f16/bf16 if wanted).
                let w0 = lin.weight.to_dtype(super::trainable_dtype(lin.weight.dtype()))?;
                let w = w0.add(&layer.delta_weight()?.to_dtype(w0.dtype())?)?;
                let (w, norm) = match &layer.magnitude {
                    None => (w, None),
                    Some(m) => {
                        let norm = dora::row_norms(&w)?;
                        (w.mul(&m.detach().div(&norm)?.unsqueeze(1)?)?, Some(norm))
                    }
                };
                lin.weight = w.contiguous()?;
                detach(lin, &layer);
                norms.push(norm);
            }
            Ok(())
        })?;
        Ok(Merged { norms })
    }

    /// Undo [`LoraAdapter::merge`]: subtract the update again and re-attach the adapters.
    pub fn unmerge(&self, model: &mut dyn CausalLm, merged: Merged) -> Result<()> {
        crate::autograd::with_no_grad(|| -> Result<()> {
            for ((lin, layer), norm) in self.sites(model)?.into_iter().zip(merged.norms) {
                let w = match (&layer.magnitude, norm) {
                    (Some(m), Some(norm)) => lin.weight.div(&m.detach().div(&norm)?.unsqueeze(1)?)?,
                    _ => lin.weight.clone(),
                };
                lin.weight = w.sub(&layer.delta_weight()?.to_dtype(lin.weight.dtype())?)?.contiguous()?;
                lin.attach(layer.clone())?;
            }
            Ok(())
        })
    }

    /// Take the adapters off the model (the base model again, unmerged).
    pub fn remove(&self, model: &mut dyn CausalLm) -> Result<()> {
        for (lin, layer) in self.sites(model)? {
            detach(lin, &layer);
        }
        Ok(())
    }

    fn sites<'m>(&self, model: &'m mut dyn CausalLm) -> Result<Vec<(&'m mut Linear, Arc<LoraLayer>)>> {
        let mut out = Vec::new();
        let mut lins = model.linears_mut();
        for layer in &self.layers {
            let pos = lins.iter().position(|l| l.name == layer.site).ok_or_else(|| Error::InvalidArgument {
                op: "lora",
                msg: format!("the model has no linear layer '{}' (was the adapter made for another model?)", layer.site),
            })?;
            out.push((lins.swap_remove(pos), layer.clone()));
        }
        Ok(out)
    }
}

/// What [`LoraAdapter::merge`] changed, for [`LoraAdapter::unmerge`]: DoRA's row norms at
/// merge time.
#[derive(Debug)]
pub struct Merged {
    norms: Vec<Option<Tensor>>,
}

/// Take `layer` (this adapter's, not another method's) off `lin`.
pub(crate) fn detach(lin: &mut Linear, layer: &Arc<LoraLayer>) {
    lin.adapters.retain(|a| !super::is_same(a, layer));
}

impl MethodConfig for LoraConfig {
    fn name(&self) -> &'static str {
        if self.dora {
            "dora"
        } else {
            "lora"
        }
    }

    fn attach(&self, model: &mut dyn CausalLm, seed: u64) -> Result<Box<dyn Method>> {
        Ok(Box::new(LoraAdapter::attach(model, LoraConfig { seed, ..self.clone() })?))
    }

    fn fingerprint(&self) -> Value {
        json!({ "r": self.r, "alpha": self.alpha, "dropout": self.dropout, "rslora": self.rslora, "dora": self.dora,
                "targets": self.targets, "layers": self.layers })
    }
}

impl Method for LoraAdapter {
    fn name(&self) -> &'static str {
        self.config.name()
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        LoraAdapter::parameters(self)
    }

    fn set_training(&self, on: bool) {
        self.state.set_training(on);
    }

    fn set_step(&self, micro: u64) {
        self.state.set_step(micro);
    }

    fn num_sites(&self) -> usize {
        self.layers.len()
    }

    fn adapter_config(&self, model: &mut dyn CausalLm) -> Value {
        let c = &self.config;
        let sites: Vec<String> = self.layers.iter().map(|l| l.site.clone()).collect();
        let (targets, layers) = super::format::target_modules(model, &sites, c.layers.as_deref());
        json!({
            "peft_type": "LORA",
            "r": c.r,
            // An integer when it is one, as PEFT writes it (stricter readers expect an int).
            "lora_alpha": if c.alpha.fract() == 0.0 && c.alpha.abs() < 1e15 { json!(c.alpha as i64) } else { json!(c.alpha) },
            "lora_dropout": c.dropout,
            "target_modules": targets,
            "layers_to_transform": layers,
            "use_rslora": c.rslora,
            "use_dora": c.dora,
            "fan_in_fan_out": model.architecture() == "gpt2",
            "bias": "none",
            "init_lora_weights": true,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }

    fn merge(&self, model: &mut dyn CausalLm) -> Result<()> {
        LoraAdapter::merge(self, model).map(|_| ())
    }

    fn remove(&self, model: &mut dyn CausalLm) -> Result<()> {
        LoraAdapter::remove(self, model)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The settings LoRA and DoRA read.
const SETTINGS: &[&str] = &["rank", "alpha", "dropout", "rslora", "target-modules", "layers"];

fn configure(s: &Settings, dora: bool) -> Result<Arc<dyn MethodConfig>> {
    let config = LoraConfig {
        r: s.usize("rank")?.unwrap_or(8),
        alpha: s.f64("alpha")?.unwrap_or(16.0),
        dropout: s.f64("dropout")?.unwrap_or(0.05),
        rslora: s.bool("rslora")?.unwrap_or(false),
        dora,
        targets: s.strings("target-modules")?.unwrap_or_else(|| vec!["q_proj".into(), "v_proj".into()]),
        layers: s.usizes("layers")?,
        seed: 0,
    };
    config.validate()?;
    Ok(Arc::new(config))
}

pub const LORA: Registration = Registration {
    name: "lora",
    about: "low-rank updates s·B A beside frozen linear weights (rsLoRA too)",
    peft_type: "LORA",
    settings: SETTINGS,
    configure: |s| configure(s, false),
    recognises: |c| c.get("peft_type").and_then(Value::as_str) == Some("LORA") && c.get("use_dora").and_then(Value::as_bool) != Some(true),
    load,
};

pub const DORA: Registration = Registration {
    name: "dora",
    about: "LoRA's direction plus a trainable magnitude per output row",
    peft_type: "LORA",
    settings: SETTINGS,
    configure: |s| configure(s, true),
    recognises: |c| c.get("peft_type").and_then(Value::as_str) == Some("LORA") && c.get("use_dora").and_then(Value::as_bool) == Some(true),
    load,
};

/// Config keys PEFT writes that do not change the math of an adapter we can load.
const IGNORED: &[&str] = &[
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

/// Attach a saved PEFT LoRA/DoRA adapter: `{site}.lora_A.weight` (`r×in`), `….lora_B.weight`
/// (`out×r`), DoRA's `….lora_magnitude_vector` (`out`).
fn load(model: &mut dyn CausalLm, files: &mut AdapterFiles, device: &Device) -> Result<Box<dyn Method>> {
    let known = ["r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "fan_in_fan_out", "target_modules", "layers_to_transform"];
    let mut ignored: Vec<&str> = IGNORED.to_vec();
    for (k, v) in files.config {
        let unsupported = match k.as_str() {
            "rank_pattern" | "alpha_pattern" => {
                v.as_object().is_some_and(|o| !o.is_empty()).then_some("per-module ranks/alphas are not implemented")
            }
            "bias" => (v.as_str().unwrap_or("none") != "none").then_some("trained biases are not implemented (bias must be \"none\")"),
            k if VARIANTS.contains(&k) => (!is_unset(v)).then_some("this LoRA variant is not implemented"),
            _ => None,
        };
        if let Some(why) = unsupported {
            return Err(files.config_error(format!("field '{k}' = {v}: {why}")));
        }
    }
    ignored.extend(["rank_pattern", "alpha_pattern", "bias"]);
    ignored.extend(VARIANTS);
    files.check_keys(&known, &ignored);
    let cfg = files.config;
    let num = |k: &str| cfg.get(k).and_then(Value::as_f64);
    let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
    let r = num("r").filter(|&r| r >= 1.0 && r.fract() == 0.0).ok_or_else(|| files.config_error("field 'r' must be a positive integer"))?
        as usize;
    let layers = match cfg.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => {
            Some(vec![n.as_u64().ok_or_else(|| files.config_error("layers_to_transform must be integers"))? as usize])
        }
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_u64().map(|v| v as usize).ok_or_else(|| files.config_error("layers_to_transform must be integers")))
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(other) => return Err(files.config_error(format!("layers_to_transform = {other} is not a layer list"))),
    };
    let config = LoraConfig {
        r,
        alpha: num("lora_alpha").unwrap_or(8.0),
        dropout: num("lora_dropout").unwrap_or(0.0),
        rslora: flag("use_rslora"),
        dora: flag("use_dora"),
        targets: files.strings("target_modules")?.unwrap_or_default(),
        layers,
        seed: 0,
    };

    // The sites come from the weights: `{site}.lora_A.weight`.
    let mut weights: HashMap<String, (Tensor, Tensor, Option<Tensor>)> = HashMap::new();
    for key in &files.keys {
        let Some(site) = key.strip_suffix(".lora_A.weight") else {
            let known = key.ends_with(".lora_B.weight")
                || key.ends_with(".lora_magnitude_vector")
                || key.ends_with(".lora_magnitude_vector.weight");
            if !known {
                return Err(files.weights_error(format!("tensor '{}{key}' is not a LoRA weight tinytune knows", super::format::PREFIX)));
            }
            continue;
        };
        let b = files
            .tensor(&format!("{site}.lora_B.weight"), device)
            .map_err(|_| files.weights_error(format!("{site} has lora_A but no lora_B.weight")))?;
        let m = [".lora_magnitude_vector", ".lora_magnitude_vector.weight"]
            .iter()
            .map(|s| format!("{site}{s}"))
            .find(|k| files.keys.contains(k))
            .map(|k| files.tensor(&k, device))
            .transpose()?;
        weights.insert(site.to_string(), (files.tensor(key, device)?, b, m));
    }
    if weights.is_empty() {
        return Err(files.weights_error("no lora_A/lora_B weights in the adapter"));
    }
    let lora = LoraAdapter::attach_weights(model, config, &weights, device).map_err(|e| files.config_error(e.to_string()))?;
    Ok(Box::new(lora))
}
