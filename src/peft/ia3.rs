//! (IA)³ (Liu et al. 2022): learned vectors, init 1, that rescale keys, values and the MLP's
//! inner activation,
//!
//! ```text
//! softmax(Q (l_k ⊙ K)ᵀ/√d) (l_v ⊙ V),      (l_ff ⊙ act(W₁ x)) W₂ᵀ
//! ```
//!
//! At a linear site: an ordinary target scales its output, `y' = (x Wᵀ + b) ⊙ l` with
//! `l: (out, 1)` (the `after` site); a feed-forward target scales its input,
//! `y' = (x ⊙ l) Wᵀ + b` with `l: (1, in)` (the `before` site), which for the MLP's down
//! projection is the inner activation. Shapes and names as PEFT's `IA3` (`{site}.ia3_l`).
//! Defaults as PEFT's: LLaMA `k_proj, v_proj, down_proj` (feed-forward `down_proj`), GPT-2
//! `c_attn, mlp.c_proj` (feed-forward `mlp.c_proj`; `c_attn` scales queries too, as PEFT).
//!
//! Merge: `W ← diag(l) W, b ← l ⊙ b` (output), `W ← W diag(l)` (input); unmerge divides.

use std::sync::Arc;

use serde_json::{json, Value};

use super::method::{AdapterFiles, Method, MethodConfig, Registration, Settings};
use super::select_sites;
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::nn::{Linear, LinearAdapter, LinearSite};
use crate::tensor::Tensor;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ia3Config {
    /// Module names or patterns (see [`super::select_sites`]); empty: the family's default.
    pub targets: Vec<String>,
    /// Targets whose input is scaled instead of their output; with empty `targets`, the
    /// family's default.
    pub feedforward: Vec<String>,
    /// Only these transformer blocks.
    pub layers: Option<Vec<usize>>,
}

/// PEFT's default targets and feed-forward targets of a family.
fn defaults(architecture: &str) -> (Vec<String>, Vec<String>) {
    let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
    match architecture {
        "gpt2" => (v(&["c_attn", "mlp.c_proj"]), v(&["mlp.c_proj"])),
        _ => (v(&["k_proj", "v_proj", "down_proj"]), v(&["down_proj"])),
    }
}

/// The vector of one linear site.
#[derive(Debug)]
pub struct Ia3Layer {
    pub site: String,
    /// `(out, 1)` scaling the output, or `(1, in)` scaling the input (`feedforward`).
    pub l: Tensor,
    pub feedforward: bool,
}

impl LinearAdapter for Ia3Layer {
    fn site(&self) -> LinearSite {
        if self.feedforward {
            LinearSite::Before
        } else {
            LinearSite::After
        }
    }

    fn forward(&self, _base: &Linear, t: &Tensor) -> Result<Tensor> {
        // Both as a row `[1, n]` broadcast over the rows of `t: [rows, n]`.
        let n = self.l.numel() as isize;
        t.mul(&self.l.reshape(&[1, n])?)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// An (IA)³ adapter attached to a model.
#[derive(Debug)]
pub struct Ia3Adapter {
    pub config: Ia3Config,
    pub layers: Vec<Arc<Ia3Layer>>,
}

impl Ia3Adapter {
    /// Attach fresh vectors (all ones: the model starts as the base model).
    pub fn attach(model: &mut dyn CausalLm, config: Ia3Config) -> Result<Ia3Adapter> {
        let (targets, feedforward) =
            if config.targets.is_empty() { defaults(model.architecture()) } else { (config.targets.clone(), config.feedforward.clone()) };
        let all = super::lora::linear_sites(model);
        let sites = select_sites(&all, &targets, config.layers.as_deref())
            .map_err(|e| Error::InvalidArgument { op: "ia3 target_modules", msg: e.to_string() })?;
        let ff = if feedforward.is_empty() {
            Vec::new()
        } else {
            select_sites(&all, &feedforward, config.layers.as_deref())
                .map_err(|e| Error::InvalidArgument { op: "ia3 feedforward_modules", msg: e.to_string() })?
        };
        if let Some(f) = ff.iter().find(|f| !sites.contains(f)) {
            return Err(Error::InvalidArgument {
                op: "ia3 feedforward_modules",
                msg: format!("{f} is a feed-forward module but not a target: feedforward_modules must be a subset of target_modules"),
            });
        }
        let mut ones = std::collections::HashMap::new();
        for lin in model.linears_mut().into_iter().filter(|l| sites.contains(&l.name)) {
            let is_ff = ff.contains(&lin.name);
            let shape = if is_ff { [1, lin.in_features()] } else { [lin.out_features(), 1] };
            ones.insert(lin.name.clone(), Tensor::ones(&shape, super::trainable_dtype(lin.weight.dtype()), lin.weight.device())?);
        }
        Self::install(model, Ia3Config { targets, feedforward, ..config }, ones, &ff)
    }

    fn install(
        model: &mut dyn CausalLm,
        config: Ia3Config,
        vectors: std::collections::HashMap<String, Tensor>,
        ff: &[String],
    ) -> Result<Ia3Adapter> {
        let mut layers = Vec::new();
        for lin in model.linears_mut().into_iter().filter(|l| vectors.contains_key(&l.name)) {
            let feedforward = ff.contains(&lin.name);
            let want = if feedforward { [1, lin.in_features()] } else { [lin.out_features(), 1] };
            let l = &vectors[&lin.name];
            if l.shape() != want {
                return Err(Error::Shape {
                    op: "ia3",
                    msg: format!(
                        "{}.ia3_l has shape {:?}, expected {want:?} ({})",
                        lin.name,
                        l.shape(),
                        if feedforward { "a feed-forward module scales its input" } else { "scales the output" }
                    ),
                });
            }
            let l =
                l.to_dtype(super::trainable_dtype(lin.weight.dtype()))?.to_device(lin.weight.device())?.contiguous()?.requires_grad()?;
            let layer = Arc::new(Ia3Layer { site: lin.name.clone(), l, feedforward });
            lin.attach(layer.clone())?;
            layers.push(layer);
        }
        Ok(Ia3Adapter { config, layers })
    }

    fn sites<'m>(&self, model: &'m mut dyn CausalLm) -> Vec<(&'m mut Linear, Arc<Ia3Layer>)> {
        super::linear_sites_of(model, &self.layers, |l| &l.site)
    }

    /// Undo [`Method::merge`]: divide the vectors out again and re-attach them.
    pub fn unmerge(&self, model: &mut dyn CausalLm) -> Result<()> {
        crate::autograd::with_no_grad(|| {
            for (lin, layer) in self.sites(model) {
                scale(lin, &layer, true)?;
                lin.attach(layer.clone())?;
            }
            Ok(())
        })
    }
}

/// Fold `layer` into `lin`'s weight (and bias), or divide it out (`inverse`).
fn scale(lin: &mut Linear, layer: &Ia3Layer, inverse: bool) -> Result<()> {
    // A base kept as stored (16-bit or quantised) is scaled in float.
    lin.weight = lin.weight.to_dtype(super::trainable_dtype(lin.weight.dtype()))?;
    let l = layer.l.detach().to_dtype(lin.weight.dtype())?;
    let l = if inverse { l.ones_like()?.div(&l)? } else { l };
    // (out, 1) scales the rows of W: [out, in]; (1, in) its columns: both broadcast as stored.
    lin.weight = lin.weight.mul(&l)?.contiguous()?;
    if !layer.feedforward {
        if let Some(b) = lin.bias.as_mut() {
            *b = b.mul(&l.reshape(&[-1])?)?;
        }
    }
    Ok(())
}

impl MethodConfig for Ia3Config {
    fn name(&self) -> &'static str {
        "ia3"
    }

    fn attach(&self, model: &mut dyn CausalLm, _seed: u64) -> Result<Box<dyn Method>> {
        Ok(Box::new(Ia3Adapter::attach(model, self.clone())?))
    }

    fn fingerprint(&self) -> Value {
        json!({ "targets": self.targets, "feedforward": self.feedforward, "layers": self.layers })
    }

    /// (IA)³ trains few parameters that start at 1: a larger step than LoRA's (PEFT's
    /// examples use 1e-3 to 3e-3).
    fn default_lr(&self) -> f64 {
        3e-3
    }
}

impl Method for Ia3Adapter {
    fn name(&self) -> &'static str {
        "ia3"
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.layers.iter().map(|l| (format!("{}.ia3_l", l.site), l.l.clone())).collect()
    }

    fn num_sites(&self) -> usize {
        self.layers.len()
    }

    fn adapter_config(&self, model: &mut dyn CausalLm) -> Value {
        let sites: Vec<String> = self.layers.iter().map(|l| l.site.clone()).collect();
        let ff: Vec<String> = self.layers.iter().filter(|l| l.feedforward).map(|l| l.site.clone()).collect();
        let (targets, layers) = super::format::target_modules(model, &sites, self.config.layers.as_deref());
        let (ff_modules, _) =
            if ff.is_empty() { (json!([]), Value::Null) } else { super::format::target_modules(model, &ff, self.config.layers.as_deref()) };
        json!({
            "peft_type": "IA3",
            "target_modules": targets,
            "feedforward_modules": ff_modules,
            "layers_to_transform": layers,
            "fan_in_fan_out": model.architecture() == "gpt2",
            "init_ia3_weights": true,
        })
    }

    fn merge(&self, model: &mut dyn CausalLm) -> Result<()> {
        crate::autograd::with_no_grad(|| {
            for (lin, layer) in self.sites(model) {
                scale(lin, &layer, false)?;
                super::detach_from(lin, &layer);
            }
            Ok(())
        })
    }

    fn remove(&self, model: &mut dyn CausalLm) -> Result<()> {
        for (lin, layer) in self.sites(model) {
            super::detach_from(lin, &layer);
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub const IA3: Registration = Registration {
    name: "ia3",
    about: "learned vectors (init 1) scaling keys, values and the MLP's inner activation",
    peft_type: "IA3",
    settings: &["target-modules", "feedforward-modules", "layers"],
    configure: |s: &Settings| {
        let targets = s.strings("target-modules")?.unwrap_or_default();
        let feedforward = s.strings("feedforward-modules")?.unwrap_or_default();
        if targets.is_empty() && !feedforward.is_empty() {
            return Err(Error::InvalidArgument {
                op: "ia3",
                msg: "--feedforward-modules needs --target-modules (it must be a subset of them)".into(),
            });
        }
        Ok(Arc::new(Ia3Config { targets, feedforward, layers: s.usizes("layers")? }))
    },
    recognises: |c| c.get("peft_type").and_then(Value::as_str) == Some("IA3"),
    load,
};

/// Attach a saved PEFT IA3 adapter (`{site}.ia3_l`).
fn load(model: &mut dyn CausalLm, files: &mut AdapterFiles, device: &Device) -> Result<Box<dyn Method>> {
    files.check_keys(
        &["target_modules", "feedforward_modules", "layers_to_transform", "fan_in_fan_out", "init_ia3_weights"],
        &["exclude_modules"],
    );
    let mut vectors = std::collections::HashMap::new();
    for key in &files.keys {
        let site = key
            .strip_suffix(".ia3_l")
            .ok_or_else(|| files.weights_error(format!("tensor '{}{key}' is not an IA3 weight ({{site}}.ia3_l)", super::format::PREFIX)))?;
        vectors.insert(site.to_string(), files.tensor(key, device)?);
    }
    if vectors.is_empty() {
        return Err(files.weights_error("no ia3_l weights in the adapter"));
    }
    let sites: Vec<String> = vectors.keys().cloned().collect();
    super::method::check_linear_sites(model, &sites, "an IA3 vector").map_err(|e| files.weights_error(e.to_string()))?;
    // Which sites are feed-forward: the config's feedforward_modules, matched as PEFT does
    // (a name matches a path suffix; a string is a full-match regex, which we accept when it
    // is the alternation of paths tinytune writes).
    let ff_names = files.strings("feedforward_modules")?.unwrap_or_default();
    let ff: Vec<String> = sites.iter().filter(|s| ff_names.iter().any(|n| module_matches(n, s))).cloned().collect();
    let config = Ia3Config { targets: files.strings("target_modules")?.unwrap_or_default(), feedforward: ff_names, layers: None };
    let adapter = Ia3Adapter::install(model, config, vectors, &ff).map_err(|e| files.weights_error(e.to_string()))?;
    Ok(Box::new(adapter))
}

/// PEFT's module matching: a plain name matches the path or a dot-separated suffix of it; a
/// string of the form `^(a\.b|c\.d)$` (what tinytune writes) matches one of its paths.
fn module_matches(pattern: &str, site: &str) -> bool {
    if let Some(alts) = pattern.strip_prefix("^(").and_then(|p| p.strip_suffix(")$")) {
        return alts.split('|').any(|a| a.replace("\\.", ".") == site);
    }
    site == pattern || site.ends_with(&format!(".{pattern}"))
}
