//! LoRA-XS (Bałazy et al. 2024): a trainable `r × r` matrix between two frozen projections
//! taken from the base weight's own singular vectors,
//!
//! ```text
//! y = x W0ᵀ + b + s · x Aᵀ Rᵀ Bᵀ,     W0 ≈ P_r Σ_r Q_rᵀ,   B = P_r,   A = Σ_r Q_rᵀ,   R ~ N(0, σ²)
//! ```
//!
//! with `B: [out, r]`, `A: [r, in]` frozen and only `R: [r, r]` trained (`σ = 1e-5`, as the
//! paper): `r²` parameters per adapted matrix where LoRA has `r (in + out)`. The truncated SVD
//! is the randomised one of [`crate::linalg`] (10 power iterations, seeded; the exact one when a
//! side is at most 128), on the weight as
//! stored (a quantised base is dequantised for it, in float64). `s = alpha / r`, 1 by default.
//!
//! The forward is LoRA's fused kernel with `B' = B R` as its `B`: `x.lora_linear(W0, A, B R)`,
//! so the GPU runs the same kernel as LoRA and `R`'s gradient comes back through the small
//! product `B R` (`∂R = Bᵀ ∂B'`). Merge: `W ← W0 + s·B R A`.
//!
//! Saved in a PEFT-style layout of its own: `adapter_config.json` with `peft_type: "LORA_XS"`,
//! `r`, `lora_alpha`, `target_modules`, `layers_to_transform`; the tensors
//! `{site}.lora_xs_A.weight [r, in]`, `{site}.lora_xs_B.weight [out, r]` (frozen, kept so that a
//! load needs no SVD and gets the same projections) and `{site}.lora_xs_R.weight [r, r]`.
//! [`LoraXsAdapter::as_lora`] writes the same update as a plain PEFT LoRA adapter
//! (`lora_A = A`, `lora_B = s·B R`, `lora_alpha = r`) that any LoRA server loads.
//!
//! **LoRA-SB** (Ponkshe et al. 2024) is the same structure with `s = 1` and another start: an
//! approximation of full fine-tuning's first step. The trainer accumulates the gradient `G` of
//! each site's full weight over the first `init_examples` training examples
//! ([`Method::gradient_init`]); the first Adam step from zero moments is `ΔW = −lr_eff·sign(G)`
//! (`lr_eff` the learning rate of the first warm-up step, `lr / warmup`); its truncated SVD
//! `U_r S_r V_rᵀ` gives `B = U_r`, `A = V_rᵀ` (frozen) and `R = diag(S_r)` (trained), so the
//! adapter starts at the best rank-r approximation of that step and `R`'s updates move `W` by
//! `B Bᵀ ∂W Aᵀ A`, full fine-tuning's gradient projected on the chosen subspaces. Saved as
//! `peft_type: "LORA_SB"` with `{site}.lora_sb_{A,B,R}.weight` (same shapes), exported to plain
//! LoRA the same way.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::method::{AdapterFiles, GradientInit, Method, MethodConfig, Registration, Settings};
use super::select_sites;
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::nn::{Linear, LinearAdapter, LinearSite};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The standard deviation of `R`'s initial entries (the paper's).
pub const R_INIT_STD: f64 = 1e-5;
/// Power iterations of the randomised SVD.
pub const POWER_ITERS: usize = 10;
/// Matrices whose smaller side is at most this are decomposed exactly.
pub const EXACT_UP_TO: usize = 128;

#[derive(Debug, Clone, PartialEq)]
pub struct LoraXsConfig {
    pub r: usize,
    /// `s = alpha / r`; `None`: `alpha = r` (`s = 1`).
    pub alpha: Option<f64>,
    /// Module names or patterns (see [`super::select_sites`]).
    pub targets: Vec<String>,
    pub layers: Option<Vec<usize>>,
    pub seed: u64,
}

impl Default for LoraXsConfig {
    fn default() -> Self {
        LoraXsConfig { r: 8, alpha: None, targets: vec!["q_proj".into(), "v_proj".into()], layers: None, seed: 0 }
    }
}

impl LoraXsConfig {
    pub fn scale(&self) -> f64 {
        self.alpha.unwrap_or(self.r as f64) / self.r as f64
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::InvalidArgument { op: "lora-xs", msg: "rank must be at least 1".into() });
        }
        if let Some(a) = self.alpha.filter(|a| !(a.is_finite() && *a > 0.0)) {
            return Err(Error::InvalidArgument { op: "lora-xs", msg: format!("alpha must be positive, got {a}") });
        }
        Ok(())
    }
}

/// Which start the `r × r` core has: the weight's SVD (LoRA-XS) or full fine-tuning's
/// approximated first step (LoRA-SB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Xs,
    Sb,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Xs => "lora-xs",
            Variant::Sb => "lora-sb",
        }
    }

    pub fn peft_type(self) -> &'static str {
        match self {
            Variant::Xs => "LORA_XS",
            Variant::Sb => "LORA_SB",
        }
    }

    /// The tensors' infix: `{site}.{infix}_R.weight`.
    fn infix(self) -> &'static str {
        match self {
            Variant::Xs => "lora_xs",
            Variant::Sb => "lora_sb",
        }
    }
}

/// The adapter of one linear site.
#[derive(Debug)]
pub struct LoraXsLayer {
    pub site: String,
    /// `A: [r, in]`, frozen.
    pub a: Tensor,
    /// `B: [out, r]`, frozen.
    pub b: Tensor,
    /// `R: [r, r]`, trainable.
    pub r: Tensor,
    pub scale: f64,
}

impl LoraXsLayer {
    /// `s · B R A`, the update in the weight's layout `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.matmul(&self.r.detach())?.matmul(&self.a)?.mul_scalar(self.scale)
    }
}

impl LinearAdapter for LoraXsLayer {
    fn site(&self) -> LinearSite {
        LinearSite::Replace
    }

    fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor> {
        let br = self.b.matmul(&self.r)?;
        let y = x.lora_linear(x, &base.weight, &self.a, &br, self.scale)?;
        match &base.bias {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A LoRA-XS (or LoRA-SB) adapter attached to a model.
#[derive(Debug)]
pub struct LoraXsAdapter {
    pub config: LoraXsConfig,
    pub variant: Variant,
    pub layers: Vec<Arc<LoraXsLayer>>,
    /// LoRA-SB before its initialisation: the sites and examples it asks the trainer for.
    pending: Option<GradientInit>,
}

/// The rank-`r` truncated SVD of `w [out, in]` (host, float64): exact when a side is at most
/// [`EXACT_UP_TO`] (Jacobi is cubic), else the randomised one with [`POWER_ITERS`].
fn truncated_svd(w: &[f64], out: usize, inp: usize, r: usize, seed: u64) -> Result<crate::linalg::Svd> {
    if out.min(inp) <= EXACT_UP_TO {
        Ok(crate::linalg::svd(w, out, inp)?.truncate(r))
    } else {
        crate::linalg::randomized_svd(w, out, inp, r, 10, POWER_ITERS, seed)
    }
}

/// `(A, B)` of `W0 [out, in]` at rank `r`: `B = P_r`, `A = Σ_r Q_rᵀ` from its truncated SVD.
pub fn svd_projections(w0: &Tensor, r: usize, seed: u64) -> Result<(Vec<f64>, Vec<f64>)> {
    let (out, inp) = (w0.shape()[0], w0.shape()[1]);
    // On the host: the SVD is float64, which GPUs lack.
    let w = w0.to_dtype(super::trainable_dtype(w0.dtype()))?.to_device(&Device::Cpu)?.to_vec_f64()?;
    let d = truncated_svd(&w, out, inp, r, seed)?;
    let a: Vec<f64> = (0..r * inp).map(|i| d.s[i / inp] * d.vt[i]).collect();
    Ok((a, d.u))
}

/// LoRA-SB's start from the summed gradient `g [out, in]` of a weight: the truncated SVD of
/// the approximated first Adam step `ΔW = −lr_eff·sign(g)`, as `(A = V_rᵀ, B = U_r, R = diag(S_r))`
/// (host, float64; a zero gradient entry has sign 0).
pub fn sb_init(g: &[f64], out: usize, inp: usize, r: usize, lr_eff: f64, seed: u64) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let step: Vec<f64> = g
        .iter()
        .map(|&v| {
            if v > 0.0 {
                -lr_eff
            } else if v < 0.0 {
                lr_eff
            } else {
                0.0
            }
        })
        .collect();
    let d = truncated_svd(&step, out, inp, r, seed)?;
    let mut core = vec![0.0; r * r];
    for i in 0..r {
        core[i * r + i] = d.s[i];
    }
    Ok((d.vt, d.u, core))
}

/// The sites of `model` that `targets` and `layers` pick, each checked to have a side of at
/// least `r`.
fn chosen_sites(model: &mut dyn CausalLm, r: usize, targets: &[String], layers: Option<&[usize]>, op: &'static str) -> Result<Vec<String>> {
    let sites = select_sites(&super::lora::linear_sites(model), targets, layers)?;
    for lin in model.linears_mut().into_iter().filter(|l| sites.contains(&l.name)) {
        let (out, inp) = (lin.out_features(), lin.in_features());
        if r > inp.min(out) {
            return Err(Error::InvalidArgument {
                op,
                msg: format!(
                    "rank {r} is more than the smallest dimension of {} ({out}×{inp}): use a rank of at most {}",
                    lin.name,
                    inp.min(out)
                ),
            });
        }
    }
    Ok(sites)
}

impl LoraXsAdapter {
    /// Attach fresh adapters: `A`, `B` from each site's truncated SVD, `R` near 0.
    pub fn attach(model: &mut dyn CausalLm, config: LoraXsConfig) -> Result<LoraXsAdapter> {
        config.validate()?;
        let sites = chosen_sites(model, config.r, &config.targets, config.layers.as_deref(), "lora-xs")?;
        let mut rng = Rng::new(super::mix(config.seed, 0x5A5));
        let mut weights = HashMap::new();
        for (index, lin) in model.linears_mut().into_iter().filter(|l| sites.contains(&l.name)).enumerate() {
            let (out, inp) = (lin.out_features(), lin.in_features());
            let (dev, dt) = (lin.weight.device().clone(), super::trainable_dtype(lin.weight.dtype()));
            let (a, b) = crate::autograd::with_no_grad(|| svd_projections(&lin.weight, config.r, super::mix(config.seed, index as u64)))?;
            // Made on the host in float64, then the site's dtype and device.
            let a = Tensor::from_vec(a, &[config.r, inp], &Device::Cpu)?.to_dtype(dt)?.to_device(&dev)?;
            let b = Tensor::from_vec(b, &[out, config.r], &Device::Cpu)?.to_dtype(dt)?.to_device(&dev)?;
            let r = Tensor::randn(&[config.r, config.r], 0.0, R_INIT_STD, dt, &dev, &mut rng)?;
            weights.insert(lin.name.clone(), (a, b, r));
        }
        Self::install(model, config, Variant::Xs, &weights)
    }

    /// Attach given `(A, B, R)` per site (a loaded adapter), checking their shapes.
    pub fn install(
        model: &mut dyn CausalLm,
        config: LoraXsConfig,
        variant: Variant,
        weights: &HashMap<String, (Tensor, Tensor, Tensor)>,
    ) -> Result<LoraXsAdapter> {
        config.validate()?;
        let mut layers = Vec::new();
        let infix = variant.infix();
        for lin in model.linears_mut().into_iter().filter(|l| weights.contains_key(&l.name)) {
            let (a, b, r) = &weights[&lin.name];
            let (out, inp, rank) = (lin.out_features(), lin.in_features(), config.r);
            let (dev, dt) = (lin.weight.device().clone(), super::trainable_dtype(lin.weight.dtype()));
            let want = |t: &Tensor, shape: [usize; 2], what: &str| -> Result<Tensor> {
                if t.shape() != shape {
                    return Err(Error::Shape {
                        op: variant.name(),
                        msg: format!("{}.{infix}_{what}.weight has shape {:?}, expected {shape:?} (rank {rank})", lin.name, t.shape()),
                    });
                }
                t.to_dtype(dt)?.to_device(&dev)?.contiguous()
            };
            let layer = Arc::new(LoraXsLayer {
                site: lin.name.clone(),
                a: want(a, [rank, inp], "A")?.detach(),
                b: want(b, [out, rank], "B")?.detach(),
                r: want(r, [rank, rank], "R")?.requires_grad()?,
                scale: config.scale(),
            });
            lin.attach(layer.clone())?;
            layers.push(layer);
        }
        Ok(LoraXsAdapter { config, variant, layers, pending: None })
    }

    fn sites<'m>(&self, model: &'m mut dyn CausalLm) -> Vec<(&'m mut Linear, Arc<LoraXsLayer>)> {
        super::linear_sites_of(model, &self.layers, |l| &l.site)
    }

    /// Write the same update to `dir` as a plain PEFT LoRA adapter (with `head`, if any).
    pub fn save_as_lora(
        &self,
        dir: &std::path::Path,
        model: &mut dyn CausalLm,
        head: Option<&super::ClassifierHead>,
        base: &str,
    ) -> Result<()> {
        let (config, tensors) = self.as_lora(model)?;
        super::format::write_adapter(dir, config, &tensors, "lora", head, base)
    }

    /// The same update as a plain PEFT LoRA adapter: `(adapter_config.json, tensors)` with
    /// `lora_A = A`, `lora_B = s·B R` and `lora_alpha = r` (LoRA's scale 1), which PEFT, vLLM
    /// and llama.cpp's converter load.
    pub fn as_lora(&self, model: &mut dyn CausalLm) -> Result<(Value, Vec<(String, Tensor)>)> {
        let mut tensors = Vec::new();
        crate::autograd::with_no_grad(|| -> Result<()> {
            for l in &self.layers {
                tensors.push((format!("{}{}.lora_A.weight", super::format::PREFIX, l.site), l.a.clone()));
                tensors
                    .push((format!("{}{}.lora_B.weight", super::format::PREFIX, l.site), l.b.matmul(&l.r.detach())?.mul_scalar(l.scale)?));
            }
            Ok(())
        })?;
        let sites: Vec<String> = self.layers.iter().map(|l| l.site.clone()).collect();
        let (targets, layers) = super::format::target_modules(model, &sites, self.config.layers.as_deref());
        let config = json!({
            "peft_type": "LORA",
            "r": self.config.r,
            "lora_alpha": self.config.r,
            "lora_dropout": 0.0,
            "target_modules": targets,
            "layers_to_transform": layers,
            "use_rslora": false,
            "use_dora": false,
            "fan_in_fan_out": model.architecture() == "gpt2",
            "bias": "none",
            "init_lora_weights": true,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        Ok((config, tensors))
    }
}

impl MethodConfig for LoraXsConfig {
    fn name(&self) -> &'static str {
        "lora-xs"
    }

    fn attach(&self, model: &mut dyn CausalLm, seed: u64) -> Result<Box<dyn Method>> {
        Ok(Box::new(LoraXsAdapter::attach(model, LoraXsConfig { seed, ..self.clone() })?))
    }

    fn fingerprint(&self) -> Value {
        json!({ "r": self.r, "alpha": self.alpha, "targets": self.targets, "layers": self.layers })
    }

    /// `R` starts near 0 and holds few parameters: a larger step than LoRA's (the paper's
    /// GLUE runs use 1e-3 to 1e-2).
    fn default_lr(&self) -> f64 {
        2e-3
    }
}

impl Method for LoraXsAdapter {
    fn name(&self) -> &'static str {
        self.variant.name()
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        let infix = self.variant.infix();
        self.layers.iter().map(|l| (format!("{}.{infix}_R.weight", l.site), l.r.clone())).collect()
    }

    /// `R` and the frozen `A`, `B` (a load then needs no SVD).
    fn adapter_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let (p, infix) = (super::format::PREFIX, self.variant.infix());
        let mut out = Vec::new();
        for l in &self.layers {
            out.push((format!("{p}{}.{infix}_A.weight", l.site), l.a.clone()));
            out.push((format!("{p}{}.{infix}_B.weight", l.site), l.b.clone()));
            out.push((format!("{p}{}.{infix}_R.weight", l.site), l.r.detach()));
        }
        Ok(out)
    }

    fn gradient_init(&self) -> Option<GradientInit> {
        self.pending.clone()
    }

    /// LoRA-SB: `(A, B, R)` of each site from its gradient ([`sb_init`]), then attached.
    fn init_from_gradients(&mut self, model: &mut dyn CausalLm, grads: &[(String, Tensor)], lr_eff: f64) -> Result<()> {
        let Some(pending) = self.pending.take() else { return Ok(()) };
        let mut weights = HashMap::new();
        let r = self.config.r;
        for (index, lin) in model.linears_mut().into_iter().filter(|l| pending.sites.contains(&l.name)).enumerate() {
            let g = grads.iter().find(|(n, _)| *n == lin.name).map(|(_, g)| g).ok_or_else(|| Error::InvalidArgument {
                op: "lora-sb",
                msg: format!("no gradient reached {} over the {} initialisation examples", lin.name, pending.examples),
            })?;
            let (out, inp) = (lin.out_features(), lin.in_features());
            let (dev, dt) = (lin.weight.device().clone(), super::trainable_dtype(lin.weight.dtype()));
            let host = g.to_device(&Device::Cpu)?.to_vec_f64()?;
            let (a, b, core) = sb_init(&host, out, inp, r, lr_eff, super::mix(self.config.seed, index as u64))?;
            let t = |v: Vec<f64>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dt)?.to_device(&dev);
            weights.insert(lin.name.clone(), (t(a, &[r, inp])?, t(b, &[out, r])?, t(core, &[r, r])?));
        }
        let installed = Self::install(model, self.config.clone(), self.variant, &weights)?;
        self.layers = installed.layers;
        Ok(())
    }

    fn num_sites(&self) -> usize {
        self.layers.len()
    }

    fn adapter_config(&self, model: &mut dyn CausalLm) -> Value {
        let sites: Vec<String> = self.layers.iter().map(|l| l.site.clone()).collect();
        let (targets, layers) = super::format::target_modules(model, &sites, self.config.layers.as_deref());
        json!({
            "peft_type": self.variant.peft_type(),
            "r": self.config.r,
            "lora_alpha": self.config.alpha.unwrap_or(self.config.r as f64),
            "target_modules": targets,
            "layers_to_transform": layers,
            "init": match self.variant { Variant::Xs => "svd", Variant::Sb => "gradient" },
        })
    }

    fn merge(&self, model: &mut dyn CausalLm) -> Result<()> {
        crate::autograd::with_no_grad(|| {
            for (lin, layer) in self.sites(model) {
                let w0 = lin.weight.to_dtype(super::trainable_dtype(lin.weight.dtype()))?;
                lin.weight = w0.add(&layer.delta_weight()?.to_dtype(w0.dtype())?)?.contiguous()?;
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

pub const LORA_XS: Registration = Registration {
    name: "lora-xs",
    about: "a trainable r×r matrix between frozen projections from the weight's SVD (r² parameters a site)",
    peft_type: "LORA_XS",
    settings: &["rank", "alpha", "target-modules", "layers"],
    configure: |s: &Settings| {
        let config = LoraXsConfig {
            r: s.usize("rank")?.unwrap_or(8),
            alpha: s.f64("alpha")?,
            targets: s.strings("target-modules")?.unwrap_or_else(|| vec!["q_proj".into(), "v_proj".into()]),
            layers: s.usizes("layers")?,
            seed: 0,
        };
        config.validate()?;
        Ok(Arc::new(config))
    },
    recognises: |c| c.get("peft_type").and_then(Value::as_str) == Some("LORA_XS"),
    load: |m, f, d| load(Variant::Xs, m, f, d),
};

/// LoRA-SB's settings: LoRA-XS's structure at `s = 1`, started from the gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSbConfig {
    pub r: usize,
    pub targets: Vec<String>,
    pub layers: Option<Vec<usize>>,
    /// Training examples whose summed gradient gives the start (the paper: about 0.1% of the
    /// data, 50–170 examples for LLMs).
    pub init_examples: usize,
    pub seed: u64,
}

impl Default for LoraSbConfig {
    fn default() -> Self {
        LoraSbConfig { r: 8, targets: vec!["q_proj".into(), "v_proj".into()], layers: None, init_examples: 64, seed: 0 }
    }
}

impl LoraSbConfig {
    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument { op: "lora-sb", msg });
        if self.r == 0 {
            return bad("rank must be at least 1".into());
        }
        if self.init_examples == 0 {
            return bad("init-examples must be at least 1 (the gradient's examples)".into());
        }
        Ok(())
    }

    fn as_xs(&self) -> LoraXsConfig {
        LoraXsConfig { r: self.r, alpha: None, targets: self.targets.clone(), layers: self.layers.clone(), seed: self.seed }
    }
}

impl MethodConfig for LoraSbConfig {
    fn name(&self) -> &'static str {
        "lora-sb"
    }

    /// Attaches nothing yet: the trainer computes the gradient it starts from
    /// ([`Method::gradient_init`]).
    fn attach(&self, model: &mut dyn CausalLm, seed: u64) -> Result<Box<dyn Method>> {
        self.validate()?;
        let sites = chosen_sites(model, self.r, &self.targets, self.layers.as_deref(), "lora-sb")?;
        Ok(Box::new(LoraXsAdapter {
            config: LoraSbConfig { seed, ..self.clone() }.as_xs(),
            variant: Variant::Sb,
            layers: Vec::new(),
            pending: Some(GradientInit { sites, examples: self.init_examples }),
        }))
    }

    fn fingerprint(&self) -> Value {
        json!({ "r": self.r, "targets": self.targets, "layers": self.layers, "init_examples": self.init_examples })
    }

    /// `R` starts at the singular values of the first step (about `lr_eff` × √(in·out)/r):
    /// the paper trains it at LoRA-XS's rates.
    fn default_lr(&self) -> f64 {
        2e-3
    }
}

pub const LORA_SB: Registration = Registration {
    name: "lora-sb",
    about: "LoRA-XS started from full fine-tuning's first step (sign of the gradient over --init-examples, its SVD)",
    peft_type: "LORA_SB",
    settings: &["rank", "target-modules", "layers", "init-examples"],
    configure: |s: &Settings| {
        let d = LoraSbConfig::default();
        let config = LoraSbConfig {
            r: s.usize("rank")?.unwrap_or(d.r),
            targets: s.strings("target-modules")?.unwrap_or(d.targets),
            layers: s.usizes("layers")?,
            init_examples: s.usize("init-examples")?.unwrap_or(d.init_examples),
            seed: 0,
        };
        config.validate()?;
        Ok(Arc::new(config))
    },
    recognises: |c| c.get("peft_type").and_then(Value::as_str) == Some("LORA_SB"),
    load: |m, f, d| load(Variant::Sb, m, f, d),
};

/// Attach a saved LoRA-XS or LoRA-SB adapter.
fn load(variant: Variant, model: &mut dyn CausalLm, files: &mut AdapterFiles, device: &Device) -> Result<Box<dyn Method>> {
    files.check_keys(&["r", "lora_alpha", "target_modules", "layers_to_transform", "init"], &[]);
    let (infix, what) = (
        variant.infix(),
        match variant {
            Variant::Xs => "LoRA-XS",
            Variant::Sb => "LoRA-SB",
        },
    );
    let r = files.usize("r")?.ok_or_else(|| files.config_error("missing field 'r' (the rank)"))?;
    let alpha = match files.config.get("lora_alpha") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_f64().ok_or_else(|| files.config_error(format!("field 'lora_alpha' = {v} must be a number")))?),
    };
    let mut sites: Vec<String> = Vec::new();
    for key in &files.keys {
        let site = key.strip_suffix(&format!(".{infix}_R.weight"));
        let frozen = key.ends_with(&format!(".{infix}_A.weight")) || key.ends_with(&format!(".{infix}_B.weight"));
        match site {
            Some(s) => sites.push(s.to_string()),
            None if frozen => {}
            None => {
                return Err(files.weights_error(format!(
                    "tensor '{}{key}' is not a {what} weight ({{site}}.{infix}_{{A,B,R}}.weight)",
                    super::format::PREFIX
                )))
            }
        }
    }
    if sites.is_empty() {
        return Err(files.weights_error(format!("no {infix}_R weights in the adapter")));
    }
    super::method::check_linear_sites(model, &sites, &format!("a {what} weight")).map_err(|e| files.weights_error(e.to_string()))?;
    let mut weights = HashMap::new();
    for s in &sites {
        let t = |w: &str| files.tensor(&format!("{s}.{infix}_{w}.weight"), device);
        weights.insert(s.clone(), (t("A")?, t("B")?, t("R")?));
    }
    let config = LoraXsConfig { r, alpha, targets: files.strings("target_modules")?.unwrap_or_default(), layers: None, seed: 0 };
    let adapter = LoraXsAdapter::install(model, config, variant, &weights).map_err(|e| files.weights_error(e.to_string()))?;
    Ok(Box::new(adapter))
}
