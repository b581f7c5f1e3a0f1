//! FineGates (Svirsky et al. 2024/2026): stochastic gates over the output rows and input
//! columns of every gated linear layer, trained with a sparsity objective, so that fine-tuning
//! also finds what can be removed:
//!
//! ```text
//! y = ((x ⊙ z_c) W0ᵀ + b) ⊙ z_r                 (W → Diag(z_r) W0 Diag(z_c); the bias gated too)
//! μ = tanh θ,   θ ~ N(1, 0.1²)
//! train: z = clamp(μ + 0.5 + ε, 0, 1),  ε ~ N(0, 0.1²) fresh each step;   eval: z = clamp(μ + 0.5, 0, 1)
//! p = Φ((μ + 0.5) / σ_reg),  σ_reg = 0.5          (the probability that a gate is open)
//! L = L_task + λ · mean_layers ½(|mean p_row − κ| + |mean p_col − κ|),   κ = 1 − target sparsity
//! ```
//!
//! (the clamp's gradient is zero outside [0, 1]). `form: l0` uses the plain relaxed-ℓ0 penalty
//! of Yamada et al. 2020 instead, `λ · mean_layers ½(mean p_row + mean p_col)` (a mean per
//! layer rather than a sum over gates, so that λ does not scale with the model: ours). Trained:
//! the gates, the biases of the gated layers, a task head; with `lora_rank` also a LoRA update,
//! `y = ((x ⊙ z_c)(W0 + s B A)ᵀ + b) ⊙ z_r`.
//!
//! Each gated linear's product is one [`GatedProduct`] at its `replace` site: the gated linear
//! op (`Tensor::gated_linear`; on the GPU `shaders/gated.wgsl`, the column gates in the
//! matmul's tile load and the bias and row gates where it writes), the LoRA variant's update
//! with the gates folded into its small factors. The composition — column gates at the
//! `before` site, row gates at the `after` site, the product between — is the same map and the
//! tested reference ([`FineGates::use_composition`]). Merge folds the
//! eval gates into the weights (`W ← Diag(z_r) W Diag(z_c)`, `b ← z_r ⊙ b`): closed rows and
//! columns become zeros.
//!
//! Saved in a PEFT-style layout of its own: `peft_type: "FINEGATES"`, per site
//! `{site}.finegates_rows.theta [out]`, `{site}.finegates_cols.theta [in]`, a trained bias as
//! `{site}.bias`, and with LoRA its `lora_A`/`lora_B` weights.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::lora::{LoraAdapter, LoraConfig, LoraLayer};
use super::method::{AdapterFiles, Method, MethodConfig, Registration, Regularizer, Settings};
use super::{select_sites, DropoutState};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::nn::{Linear, LinearAdapter, LinearSite};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// θ's initial mean and deviation, the training noise and the open probability's σ (the paper's).
pub const INIT_MEAN: f64 = 1.0;
pub const INIT_STD: f64 = 0.1;
pub const NOISE_STD: f64 = 0.1;
pub const SIGMA_REG: f64 = 0.5;

/// The sparsity objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparsityForm {
    /// `½(|mean p_row − κ| + |mean p_col − κ|)` per layer: open fractions pulled to a target.
    Target,
    /// `½(mean p_row + mean p_col)` per layer: every open gate costs (relaxed ℓ0).
    L0,
}

impl SparsityForm {
    fn name(self) -> &'static str {
        match self {
            SparsityForm::Target => "target",
            SparsityForm::L0 => "l0",
        }
    }

    fn parse(s: &str) -> Result<SparsityForm> {
        match s {
            "target" => Ok(SparsityForm::Target),
            "l0" => Ok(SparsityForm::L0),
            o => Err(Error::InvalidArgument { op: "finegates", msg: format!("unknown sparsity form '{o}' (target or l0)") }),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FineGatesConfig {
    /// Module names or patterns (see [`super::select_sites`]); default `all-linear` (LLaMA's
    /// q, k, v, o, gate, up, down; GPT-2's c_attn, c_proj, c_fc, mlp.c_proj).
    pub targets: Vec<String>,
    pub layers: Option<Vec<usize>>,
    /// The fraction of gates meant to close, in [0, 1).
    pub target_sparsity: f64,
    /// λ, the sparsity objective's weight.
    pub lambda: f64,
    pub form: SparsityForm,
    /// The LoRA variant: a rank-r update of each gated weight, trained with the gates.
    pub lora_rank: Option<usize>,
    /// LoRA's alpha (default 2r).
    pub lora_alpha: Option<f64>,
    /// Train the biases of the gated layers.
    pub train_biases: bool,
    /// The gates' learning rate as a multiple of the run's (the head's, LoRA's, the biases').
    pub gate_lr_scale: f64,
    pub seed: u64,
}

impl Default for FineGatesConfig {
    fn default() -> Self {
        FineGatesConfig {
            targets: vec!["all-linear".into()],
            layers: None,
            target_sparsity: 0.3,
            lambda: 50.0,
            form: SparsityForm::Target,
            lora_rank: None,
            lora_alpha: None,
            train_biases: true,
            gate_lr_scale: 10.0,
            seed: 0,
        }
    }
}

impl FineGatesConfig {
    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument { op: "finegates", msg });
        if !(0.0..1.0).contains(&self.target_sparsity) {
            return bad(format!("target sparsity {} is not in [0, 1)", self.target_sparsity));
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return bad(format!("lambda {} must be a non-negative number", self.lambda));
        }
        if !(self.gate_lr_scale.is_finite() && self.gate_lr_scale > 0.0) {
            return bad(format!("gate-lr-scale {} must be positive", self.gate_lr_scale));
        }
        if self.lora_rank == Some(0) {
            return bad("the LoRA variant's rank must be at least 1".into());
        }
        Ok(())
    }

    fn lora(&self, sites: &[String]) -> Option<LoraConfig> {
        self.lora_rank.map(|r| LoraConfig {
            r,
            alpha: self.lora_alpha.unwrap_or(2.0 * r as f64),
            dropout: 0.0,
            targets: sites.to_vec(),
            layers: None,
            seed: super::mix(self.seed, 0x6A7E),
            ..LoraConfig::default()
        })
    }
}

/// The gates of one side (rows or columns) of one linear.
#[derive(Debug)]
pub struct GateLayer {
    pub site: String,
    /// Output rows (`after` site) or input columns (`before` site).
    pub rows: bool,
    /// θ: `[out]` or `[in]`, trainable.
    pub theta: Tensor,
    state: Arc<DropoutState>,
    index: u64,
}

impl GateLayer {
    /// `z`: with noise while training, `clamp(tanh θ + 0.5, 0, 1)` otherwise.
    pub fn gates(&self) -> Result<Tensor> {
        let shifted = self.theta.tanh()?.add_scalar(0.5)?;
        let shifted = if self.state.is_training() {
            let mut rng: Rng = self.state.rng(self.index);
            let eps = Tensor::randn(self.theta.shape(), 0.0, NOISE_STD, self.theta.dtype(), self.theta.device(), &mut rng)?;
            shifted.add(&eps)?
        } else {
            shifted
        };
        shifted.clamp(0.0, 1.0)
    }

    /// The eval gates, without a graph.
    pub fn eval_gates(&self) -> Result<Tensor> {
        crate::autograd::with_no_grad(|| self.theta.detach().tanh()?.add_scalar(0.5)?.clamp(0.0, 1.0))
    }

    /// `p = Φ((tanh θ + 0.5) / σ_reg)`.
    pub fn open_probability(&self) -> Result<Tensor> {
        self.theta.tanh()?.add_scalar(0.5)?.affine(1.0 / (SIGMA_REG * std::f64::consts::SQRT_2), 0.0)?.erf()?.affine(0.5, 0.5)
    }
}

impl LinearAdapter for GateLayer {
    fn site(&self) -> LinearSite {
        if self.rows {
            LinearSite::After
        } else {
            LinearSite::Before
        }
    }

    fn forward(&self, _base: &Linear, t: &Tensor) -> Result<Tensor> {
        let n = self.theta.numel() as isize;
        t.mul(&self.gates()?.reshape(&[1, n])?)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The gated product of one linear, the adapter FineGates attaches at the linear's `replace`
/// site: `y = ((x ⊙ z_c) W0ᵀ + b) ⊙ z_r` as one op (`Tensor::gated_linear`: on the GPU one
/// kernel with the gates in its prologue and epilogue); with the LoRA variant, plus
/// `s · (xd A'ᵀ) B'ᵀ` with the gates folded into the small factors, `A' = A Diag(z_c)`,
/// `B' = Diag(z_r) B` (`xd` = LoRA's dropout of `x`, which commutes with `⊙ z_c`), so that
/// no gate is a pass over a full-size activation. The composition — [`GateLayer`]s at the
/// `before` and `after` sites around the plain product or LoRA's — is the same map
/// ([`FineGates::use_composition`]), kept as the reference it is tested against.
#[derive(Debug)]
pub struct GatedProduct {
    pub rows: Arc<GateLayer>,
    pub cols: Arc<GateLayer>,
    pub lora: Option<Arc<LoraLayer>>,
}

impl LinearAdapter for GatedProduct {
    fn site(&self) -> LinearSite {
        LinearSite::Replace
    }

    fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor> {
        let (zr, zc) = (self.rows.gates()?, self.cols.gates()?);
        let y = x.gated_linear(&base.weight, base.bias.as_ref(), Some(&zc), Some(&zr))?;
        let Some(l) = &self.lora else { return Ok(y) };
        let (a, b) = (l.a.mul(&zc.unsqueeze(0)?)?, l.b.mul(&zr.unsqueeze(1)?)?);
        let low = l.dropped(x)?.matmul(&a.t()?)?.matmul(&b.t()?)?.mul_scalar(l.scale)?;
        y.add(&low)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Whether `a` is one of FineGates' adapters (gated product or gate layer).
fn is_gate_adapter(a: &Arc<dyn LinearAdapter>) -> bool {
    a.as_any().is::<GateLayer>() || a.as_any().is::<GatedProduct>()
}

/// FineGates attached to a model.
#[derive(Debug)]
pub struct FineGates {
    pub config: FineGatesConfig,
    /// Per gated site: its row gates and column gates.
    pub gates: Vec<(Arc<GateLayer>, Arc<GateLayer>)>,
    /// Trained biases by site, with the frozen ones they replaced (restored by `remove`).
    biases: Vec<(String, Tensor, Tensor)>,
    pub lora: Option<LoraAdapter>,
    state: Arc<DropoutState>,
}

/// The saved tensors of one site: `(θ_rows, θ_cols, trained bias)`.
type SiteTensors = (Tensor, Tensor, Option<Tensor>);

impl FineGates {
    /// Attach fresh gates (θ ~ N(1, 0.1²): every gate starts open at `clamp(tanh 1 + 0.5) = 1`).
    pub fn attach(model: &mut dyn CausalLm, config: FineGatesConfig) -> Result<FineGates> {
        config.validate()?;
        let sites = select_sites(&super::lora::linear_sites(model), &config.targets, config.layers.as_deref())?;
        let mut rng = Rng::new(super::mix(config.seed, 0xF1E6));
        let mut init = HashMap::new();
        for lin in model.linears_mut().into_iter().filter(|l| sites.contains(&l.name)) {
            let (dev, dt) = (lin.weight.device().clone(), super::trainable_dtype(lin.weight.dtype()));
            let rows = Tensor::randn(&[lin.out_features()], INIT_MEAN, INIT_STD, dt, &dev, &mut rng)?;
            let cols = Tensor::randn(&[lin.in_features()], INIT_MEAN, INIT_STD, dt, &dev, &mut rng)?;
            init.insert(lin.name.clone(), (rows, cols, None));
        }
        let lora = match config.lora(&sites) {
            Some(lc) => Some(LoraAdapter::attach(model, lc)?),
            None => None,
        };
        Self::install(model, config, &init, lora)
    }

    /// Attach given gates (and biases) per site, checking their shapes.
    fn install(
        model: &mut dyn CausalLm,
        config: FineGatesConfig,
        tensors: &HashMap<String, SiteTensors>,
        lora: Option<LoraAdapter>,
    ) -> Result<FineGates> {
        let state = Arc::new(DropoutState::new(super::mix(config.seed, 0x9A7E)));
        let (mut gates, mut biases) = (Vec::new(), Vec::new());
        for (index, lin) in model.linears_mut().into_iter().filter(|l| tensors.contains_key(&l.name)).enumerate() {
            let (rows, cols, bias) = &tensors[&lin.name];
            let (dev, dt) = (lin.weight.device().clone(), super::trainable_dtype(lin.weight.dtype()));
            let want = |t: &Tensor, n: usize, what: &str| -> Result<Tensor> {
                if t.shape() != [n] {
                    return Err(Error::Shape {
                        op: "finegates",
                        msg: format!("{}.{what} has shape {:?}, expected [{n}]", lin.name, t.shape()),
                    });
                }
                t.to_dtype(dt)?.to_device(&dev)?.contiguous()?.requires_grad()
            };
            let row = Arc::new(GateLayer {
                site: lin.name.clone(),
                rows: true,
                theta: want(rows, lin.out_features(), "finegates_rows.theta")?,
                state: state.clone(),
                index: 2 * index as u64,
            });
            let col = Arc::new(GateLayer {
                site: lin.name.clone(),
                rows: false,
                theta: want(cols, lin.in_features(), "finegates_cols.theta")?,
                state: state.clone(),
                index: 2 * index as u64 + 1,
            });
            if config.train_biases {
                if let Some(frozen) = lin.bias.clone() {
                    let start = bias.as_ref().unwrap_or(&frozen);
                    let b = want(start, lin.out_features(), "bias")?;
                    lin.bias = Some(b.clone());
                    biases.push((lin.name.clone(), b, frozen));
                }
            }
            // The LoRA variant's layer moves into the gated product (plain LoRA only).
            let low = lora.as_ref().and_then(|l| l.layers.iter().find(|x| x.site == lin.name && x.magnitude.is_none()).cloned());
            if let Some(l) = &low {
                super::lora::detach(lin, l);
            }
            lin.attach(Arc::new(GatedProduct { rows: row.clone(), cols: col.clone(), lora: low }))?;
            gates.push((row, col));
        }
        Ok(FineGates { config, gates, biases, lora, state })
    }

    /// Replace each site's gated product by the composition it fuses: the column gates at the
    /// linear's `before` site, the row gates at its `after` site, and the plain product or
    /// LoRA's fused linear between them (elementwise passes beside the matmul: the reference
    /// the fused path is tested against).
    pub fn use_composition(&self, model: &mut dyn CausalLm) -> Result<()> {
        for lin in self.sites(model) {
            let Some(pos) = lin.adapters.iter().position(|a| a.as_any().is::<GatedProduct>()) else { continue };
            let fused = lin.adapters.remove(pos);
            let g = fused.as_any().downcast_ref::<GatedProduct>().expect("found by type");
            lin.attach(g.cols.clone())?;
            if let Some(l) = &g.lora {
                lin.attach(l.clone())?;
            }
            lin.attach(g.rows.clone())?;
        }
        Ok(())
    }

    fn sites<'m>(&self, model: &'m mut dyn CausalLm) -> Vec<&'m mut Linear> {
        let names: Vec<&str> = self.gates.iter().map(|(r, _)| r.site.as_str()).collect();
        model.linears_mut().into_iter().filter(|l| names.contains(&l.name.as_str())).collect()
    }

    /// Per gated site: `(site, rows closed, rows, columns closed, columns)` at the eval gates.
    pub fn closed(&self) -> Result<Vec<(String, usize, usize, usize, usize)>> {
        let mut out = Vec::new();
        for (r, c) in &self.gates {
            let zr = r.eval_gates()?.to_vec_f64()?;
            let zc = c.eval_gates()?.to_vec_f64()?;
            out.push((
                r.site.clone(),
                zr.iter().filter(|&&z| z == 0.0).count(),
                zr.len(),
                zc.iter().filter(|&&z| z == 0.0).count(),
                zc.len(),
            ));
        }
        Ok(out)
    }

    /// The sparsity objective (with its graph) and the fraction of gates closed.
    pub fn sparsity_loss(&self) -> Result<(Tensor, f64)> {
        let kappa = 1.0 - self.config.target_sparsity;
        let mut total: Option<Tensor> = None;
        for (r, c) in &self.gates {
            let (pr, pc) = (r.open_probability()?.mean_all()?, c.open_probability()?.mean_all()?);
            let l = match self.config.form {
                SparsityForm::Target => pr.add_scalar(-kappa)?.abs()?.add(&pc.add_scalar(-kappa)?.abs()?)?.mul_scalar(0.5)?,
                SparsityForm::L0 => pr.add(&pc)?.mul_scalar(0.5)?,
            };
            total = Some(match total {
                Some(t) => t.add(&l)?,
                None => l,
            });
        }
        let loss = match total {
            Some(t) => t.mul_scalar(self.config.lambda / self.gates.len() as f64)?,
            None => return Err(Error::InvalidArgument { op: "finegates", msg: "no gated layers".into() }),
        };
        let closed = self.closed()?;
        let (shut, all) = closed.iter().fold((0, 0), |(s, a), c| (s + c.1 + c.3, a + c.2 + c.4));
        Ok((loss, shut as f64 / all.max(1) as f64))
    }
}

/// What [`FineGates::compress`] removed.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressReport {
    /// Per gated site: `(site, rows closed, rows, columns closed, columns)`.
    pub sites: Vec<(String, usize, usize, usize, usize)>,
    /// Per block whose MLP shrank: `(block, units removed, width before)`.
    pub mlp: Vec<(usize, usize, usize)>,
    /// Per block whose attention shrank: `(block, (heads, kv heads) before, after)`.
    pub heads: Vec<(usize, (usize, usize), (usize, usize))>,
    /// Weights of the linear layers before and after.
    pub params_before: usize,
    pub params_after: usize,
}

impl CompressReport {
    /// A table: each gated site's closed rows and columns, then each block's MLP units removed.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "{:<44} {:>15} {:>15}", "site", "rows closed", "columns closed");
        for (site, rc, r, cc, c) in &self.sites {
            let _ = writeln!(s, "{site:<44} {:>15} {:>15}", format!("{rc}/{r}"), format!("{cc}/{c}"));
        }
        for (b, removed, width) in &self.mlp {
            let _ = writeln!(s, "block {b}: {removed} of {width} MLP units removed ({} left)", width - removed);
        }
        for (b, (h, kv), (h2, kv2)) in &self.heads {
            let _ = writeln!(s, "block {b}: attention heads {h} -> {h2}, key/value heads {kv} -> {kv2}");
        }
        let _ = writeln!(
            s,
            "linear weights: {} -> {} ({:.1}% removed)",
            self.params_before,
            self.params_after,
            100.0 * (1.0 - self.params_after as f64 / self.params_before.max(1) as f64)
        );
        s
    }
}

/// Remove the attention heads of one (merged) LLaMA block that the eval gates made dead, and
/// return `((heads, kv heads) before, after)` when any went. Query head `h` (of key/value
/// group `g = h / (heads / kv_heads)`) is dead when its `head_dim` columns of `o_proj` are
/// closed, or its group's rows of `v_proj` (its values are then 0). A group whose heads are all
/// dead goes whole (its key and value rows too); from the groups that stay, the same number of
/// dead heads goes from each, so every group keeps one size (grouped-query attention's layout).
/// Heads that are dead but not removable stay as zeros; closed query or key rows alone do not
/// make a head dead (a zero score still averages the values).
fn remove_dead_heads(
    attn: &mut crate::nn::SelfAttention,
    c: &crate::nn::BlockConfig,
    open: &HashMap<String, (Vec<f64>, Vec<f64>)>,
) -> Result<Option<((usize, usize), (usize, usize))>> {
    let (h, kv) = attn.heads(c);
    let hd = c.head_dim;
    let crate::nn::Qkv::Separate { q, k, v } = &mut attn.qkv else { return Ok(None) };
    let size = h / kv.max(1);
    let shut = |z: Option<&Vec<f64>>, i: usize| z.is_some_and(|z| z[i * hd..(i + 1) * hd].iter().all(|&g| g == 0.0));
    let (o_cols, v_rows) = (open.get(&attn.o.name).map(|z| &z.1), open.get(&v.name).map(|z| &z.0));
    let dead: Vec<bool> = (0..h).map(|i| shut(o_cols, i) || shut(v_rows, i / size)).collect();
    let dead_in = |g: usize| (g * size..(g + 1) * size).filter(|&i| dead[i]).count();
    let mut groups: Vec<usize> = (0..kv).filter(|&g| dead_in(g) < size).collect();
    if groups.is_empty() {
        groups.push(0); // every head is dead: keep one (its output is 0), a block needs a head
    }
    let cut = groups.iter().map(|&g| dead_in(g)).min().unwrap_or(0).min(size - 1);
    if groups.len() == kv && cut == 0 {
        return Ok(None);
    }
    let mut heads_kept = Vec::new();
    for &g in &groups {
        let mut dropped = 0;
        for i in g * size..(g + 1) * size {
            if dead[i] && dropped < cut {
                dropped += 1;
            } else {
                heads_kept.push(i);
            }
        }
    }
    let span = |units: &[usize]| -> Vec<usize> { units.iter().flat_map(|&u| u * hd..(u + 1) * hd).collect() };
    let (q_keep, kv_keep) = (span(&heads_kept), span(&groups));
    crate::autograd::with_no_grad(|| -> Result<()> {
        for (lin, keep) in [(&mut *q, &q_keep), (&mut *k, &kv_keep), (&mut *v, &kv_keep)] {
            keep_output_rows(lin, keep)?;
        }
        attn.o.weight = keep_cols(&attn.o.weight, &q_keep)?;
        Ok(())
    })?;
    Ok(Some(((h, kv), (heads_kept.len(), groups.len()))))
}

/// A linear keeping the output rows `keep` of its weight and bias.
fn keep_output_rows(lin: &mut Linear, keep: &[usize]) -> Result<()> {
    lin.weight = keep_rows(&lin.weight, keep)?;
    if let Some(b) = &lin.bias {
        lin.bias = Some(keep_rows(b, keep)?);
    }
    Ok(())
}

/// `t [out, in]` (or a bias `[out]`) keeping the rows `keep` (host, then `t`'s dtype and device).
fn keep_rows(t: &Tensor, keep: &[usize]) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    let width: usize = shape[1..].iter().product();
    let v = t.to_device(&Device::Cpu)?.to_vec_f64()?;
    let out: Vec<f64> = keep.iter().flat_map(|&r| v[r * width..(r + 1) * width].iter().copied()).collect();
    let mut new_shape = shape.clone();
    new_shape[0] = keep.len();
    Tensor::from_vec(out, &new_shape, &Device::Cpu)?.to_dtype(t.dtype())?.to_device(t.device())
}

/// `t [out, in]` keeping the columns `keep`.
fn keep_cols(t: &Tensor, keep: &[usize]) -> Result<Tensor> {
    let (rows, cols) = (t.shape()[0], t.shape()[1]);
    let v = t.to_device(&Device::Cpu)?.to_vec_f64()?;
    let out: Vec<f64> = (0..rows).flat_map(|r| keep.iter().map(move |&c| (r, c))).map(|(r, c)| v[r * cols + c]).collect();
    Tensor::from_vec(out, &[rows, keep.len()], &Device::Cpu)?.to_dtype(t.dtype())?.to_device(t.device())
}

impl FineGates {
    /// Merge (the eval gates and any LoRA update folded into the weights), then shrink what
    /// couples cleanly: an MLP unit `j` of a gated LLaMA block goes when its gate-projection
    /// row, its up-projection row or its down-projection column is closed (`silu(0)·u = 0`,
    /// `silu(g)·0 = 0`, a zero column adds nothing), so the block's MLP is narrower and the
    /// logits are the gated model's; dead attention heads go too (see [`remove_dead_heads`]).
    /// Other closed rows and columns stay as zeros (the residual stream's dimensions couple
    /// every layer). The model can then be saved as an ordinary checkpoint with per-block
    /// widths and heads (`intermediate_sizes`, `attention_heads`).
    pub fn compress(&self, model: &mut dyn CausalLm) -> Result<CompressReport> {
        let sites = self.closed()?;
        let open: HashMap<String, (Vec<f64>, Vec<f64>)> = self
            .gates
            .iter()
            .map(|(r, c)| Ok((r.site.clone(), (r.eval_gates()?.to_vec_f64()?, c.eval_gates()?.to_vec_f64()?))))
            .collect::<Result<_>>()?;
        let count = |m: &mut dyn CausalLm| m.linears_mut().iter().filter(|l| l.name != "lm_head").map(|l| l.weight.numel()).sum::<usize>();
        let params_before = count(model);
        Method::merge(self, model)?;
        let (mut mlp, mut heads) = (Vec::new(), Vec::new());
        if model.architecture() == "llama" {
            for block in model.decoder_mut().blocks.iter_mut() {
                let m = &mut block.mlp;
                let Some(gate) = m.gate.as_mut() else { continue };
                let width = m.down.in_features();
                let rows_of = |name: &str| open.get(name).map(|z| z.0.clone());
                let (g, u, d) = (rows_of(&gate.name), rows_of(&m.up.name), open.get(&m.down.name).map(|z| z.1.clone()));
                let alive = |z: &Option<Vec<f64>>, j: usize| z.as_ref().is_none_or(|z| z[j] > 0.0);
                let mut keep: Vec<usize> = (0..width).filter(|&j| alive(&g, j) && alive(&u, j) && alive(&d, j)).collect();
                if keep.is_empty() {
                    // A block of width 0 is no checkpoint: keep one closed unit (it adds 0).
                    keep.push(0);
                }
                if keep.len() == width {
                    continue;
                }
                crate::autograd::with_no_grad(|| -> Result<()> {
                    for lin in [&mut *gate, &mut m.up] {
                        keep_output_rows(lin, &keep)?;
                    }
                    m.down.weight = keep_cols(&m.down.weight, &keep)?;
                    Ok(())
                })?;
                mlp.push((block.index, width - keep.len(), width));
            }
            let config = model.decoder().config.clone();
            for block in model.decoder_mut().blocks.iter_mut() {
                if let Some(change) = remove_dead_heads(&mut block.attn, &config, &open)? {
                    heads.push((block.index, change.0, change.1));
                }
            }
        }
        let params_after = count(model);
        Ok(CompressReport { sites, mlp, heads, params_before, params_after })
    }
}

impl MethodConfig for FineGatesConfig {
    fn name(&self) -> &'static str {
        "finegates"
    }

    fn attach(&self, model: &mut dyn CausalLm, seed: u64) -> Result<Box<dyn Method>> {
        Ok(Box::new(FineGates::attach(model, FineGatesConfig { seed, ..self.clone() })?))
    }

    fn fingerprint(&self) -> Value {
        json!({
            "targets": self.targets, "layers": self.layers, "target_sparsity": self.target_sparsity, "lambda": self.lambda,
            "form": self.form.name(), "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha, "train_biases": self.train_biases,
            "gate_lr_scale": self.gate_lr_scale,
        })
    }

    /// The head's, LoRA's and the biases' rate; the gates train at `gate_lr_scale` × it.
    fn default_lr(&self) -> f64 {
        3e-3
    }
}

impl Method for FineGates {
    fn name(&self) -> &'static str {
        "finegates"
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (r, c) in &self.gates {
            out.push((format!("{}.finegates_rows.theta", r.site), r.theta.clone()));
            out.push((format!("{}.finegates_cols.theta", c.site), c.theta.clone()));
        }
        out.extend(self.biases.iter().map(|(s, b, _)| (format!("{s}.bias"), b.clone())));
        if let Some(l) = &self.lora {
            out.extend(l.parameters());
        }
        out
    }

    fn set_training(&self, on: bool) {
        self.state.set_training(on);
        if let Some(l) = &self.lora {
            l.set_training(on);
        }
    }

    fn set_step(&self, micro: u64) {
        self.state.set_step(micro);
        if let Some(l) = &self.lora {
            Method::set_step(l, micro);
        }
    }

    fn num_sites(&self) -> usize {
        self.gates.len()
    }

    fn lr_scale(&self, param: &str) -> f64 {
        if param.ends_with(".theta") {
            self.config.gate_lr_scale
        } else {
            1.0
        }
    }

    fn regularizer(&self) -> Result<Option<Regularizer>> {
        let (loss, closed) = self.sparsity_loss()?;
        let value = loss.to_scalar()?;
        Ok(Some(Regularizer { loss, metrics: vec![("gates/sparsity_loss", value), ("gates/closed", closed)] }))
    }

    fn adapter_config(&self, model: &mut dyn CausalLm) -> Value {
        let sites: Vec<String> = self.gates.iter().map(|(r, _)| r.site.clone()).collect();
        let (targets, layers) = super::format::target_modules(model, &sites, self.config.layers.as_deref());
        json!({
            "peft_type": "FINEGATES",
            "target_modules": targets,
            "layers_to_transform": layers,
            "target_sparsity": self.config.target_sparsity,
            "lambda": self.config.lambda,
            "sparsity_form": self.config.form.name(),
            "train_biases": self.config.train_biases,
            "r": self.config.lora_rank,
            "lora_alpha": self.lora.as_ref().map(|l| l.config.alpha),
            "fan_in_fan_out": model.architecture() == "gpt2",
        })
    }

    /// Fold the eval gates (and a LoRA update first) into the weights and biases.
    fn merge(&self, model: &mut dyn CausalLm) -> Result<()> {
        if let Some(l) = &self.lora {
            LoraAdapter::merge(l, model)?;
        }
        crate::autograd::with_no_grad(|| {
            let gates: HashMap<String, (Tensor, Tensor)> =
                self.gates.iter().map(|(r, c)| Ok((r.site.clone(), (r.eval_gates()?, c.eval_gates()?)))).collect::<Result<_>>()?;
            for lin in self.sites(model) {
                let (zr, zc) = &gates[&lin.name];
                let w0 = lin.weight.to_dtype(super::trainable_dtype(lin.weight.dtype()))?;
                let (zr, zc) = (zr.to_dtype(w0.dtype())?, zc.to_dtype(w0.dtype())?);
                lin.weight = w0.mul(&zr.unsqueeze(1)?)?.mul(&zc.unsqueeze(0)?)?.contiguous()?;
                if let Some(b) = &lin.bias {
                    lin.bias = Some(b.detach().mul(&zr.to_dtype(b.dtype())?)?.contiguous()?);
                }
                lin.adapters.retain(|a| !is_gate_adapter(a));
            }
            Ok(())
        })
    }

    fn remove(&self, model: &mut dyn CausalLm) -> Result<()> {
        if let Some(l) = &self.lora {
            LoraAdapter::remove(l, model)?;
        }
        let frozen: HashMap<&str, &Tensor> = self.biases.iter().map(|(s, _, f)| (s.as_str(), f)).collect();
        for lin in self.sites(model) {
            lin.adapters.retain(|a| !is_gate_adapter(a));
            if let Some(f) = frozen.get(lin.name.as_str()) {
                lin.bias = Some((*f).clone());
            }
        }
        Ok(())
    }

    fn adapter_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let p = super::format::PREFIX;
        let mut out: Vec<(String, Tensor)> = Vec::new();
        for (r, c) in &self.gates {
            out.push((format!("{p}{}.finegates_rows.theta", r.site), r.theta.detach()));
            out.push((format!("{p}{}.finegates_cols.theta", c.site), c.theta.detach()));
        }
        out.extend(self.biases.iter().map(|(s, b, _)| (format!("{p}{s}.bias"), b.detach())));
        if let Some(l) = &self.lora {
            out.extend(Method::adapter_tensors(l)?);
        }
        Ok(out)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub const FINEGATES: Registration = Registration {
    name: "finegates",
    about: "stochastic gates on the rows and columns of the linears, trained to a target sparsity (fine-tunes and compresses)",
    peft_type: "FINEGATES",
    settings: &["target-modules", "layers", "target-sparsity", "lambda", "sparsity-form", "rank", "alpha", "train-biases", "gate-lr-scale"],
    configure: |s: &Settings| {
        let d = FineGatesConfig::default();
        let config = FineGatesConfig {
            targets: s.strings("target-modules")?.unwrap_or(d.targets),
            layers: s.usizes("layers")?,
            target_sparsity: s.f64("target-sparsity")?.unwrap_or(d.target_sparsity),
            lambda: s.f64("lambda")?.unwrap_or(d.lambda),
            form: s.str("sparsity-form")?.as_deref().map(SparsityForm::parse).transpose()?.unwrap_or(d.form),
            lora_rank: s.usize("rank")?,
            lora_alpha: s.f64("alpha")?,
            train_biases: s.bool("train-biases")?.unwrap_or(d.train_biases),
            gate_lr_scale: s.f64("gate-lr-scale")?.unwrap_or(d.gate_lr_scale),
            seed: 0,
        };
        if config.lora_alpha.is_some() && config.lora_rank.is_none() {
            return Err(Error::InvalidArgument { op: "finegates", msg: "--alpha is the LoRA variant's: give --rank too".into() });
        }
        config.validate()?;
        Ok(Arc::new(config))
    },
    recognises: |c| c.get("peft_type").and_then(Value::as_str) == Some("FINEGATES"),
    load,
};

/// Attach a saved FineGates adapter.
fn load(model: &mut dyn CausalLm, files: &mut AdapterFiles, device: &Device) -> Result<Box<dyn Method>> {
    files.check_keys(
        &["target_modules", "layers_to_transform", "target_sparsity", "lambda", "sparsity_form", "train_biases", "r", "lora_alpha"],
        &["fan_in_fan_out"],
    );
    let f64_field = |k: &str, default: f64| -> Result<f64> {
        match files.config.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| files.config_error(format!("field '{k}' = {v} must be a number"))),
        }
    };
    let d = FineGatesConfig::default();
    let form = match files.config.get("sparsity_form").and_then(Value::as_str) {
        Some(s) => SparsityForm::parse(s).map_err(|e| files.config_error(e.to_string()))?,
        None => d.form,
    };
    let lora_rank = files.usize("r")?;
    let config = FineGatesConfig {
        targets: files.strings("target_modules")?.unwrap_or_default(),
        layers: None,
        target_sparsity: f64_field("target_sparsity", d.target_sparsity)?,
        lambda: f64_field("lambda", d.lambda)?,
        form,
        lora_rank,
        lora_alpha: match lora_rank {
            Some(_) => Some(f64_field("lora_alpha", 2.0 * lora_rank.unwrap_or(1) as f64)?),
            None => None,
        },
        train_biases: files.config.get("train_biases").and_then(Value::as_bool).unwrap_or(true),
        gate_lr_scale: d.gate_lr_scale,
        seed: 0,
    };
    config.validate().map_err(|e| files.config_error(e.to_string()))?;
    let mut sites: Vec<String> = Vec::new();
    for key in &files.keys {
        if let Some(s) = key.strip_suffix(".finegates_rows.theta") {
            sites.push(s.to_string());
        } else if !(key.ends_with(".finegates_cols.theta")
            || key.ends_with(".bias")
            || (lora_rank.is_some() && (key.ends_with(".lora_A.weight") || key.ends_with(".lora_B.weight"))))
        {
            return Err(files.weights_error(format!("tensor '{}{key}' is not a FineGates weight", super::format::PREFIX)));
        }
    }
    if sites.is_empty() {
        return Err(files.weights_error("no finegates_rows.theta weights in the adapter"));
    }
    super::method::check_linear_sites(model, &sites, "gates").map_err(|e| files.weights_error(e.to_string()))?;
    let mut tensors = HashMap::new();
    let mut lora_weights = HashMap::new();
    for s in &sites {
        let bias = format!("{s}.bias");
        let bias = if files.keys.contains(&bias) { Some(files.tensor(&bias, device)?) } else { None };
        tensors.insert(
            s.clone(),
            (
                files.tensor(&format!("{s}.finegates_rows.theta"), device)?,
                files.tensor(&format!("{s}.finegates_cols.theta"), device)?,
                bias,
            ),
        );
        if lora_rank.is_some() {
            let t = |w: &str| files.tensor(&format!("{s}.lora_{w}.weight"), device);
            lora_weights.insert(s.clone(), (t("A")?, t("B")?, None));
        }
    }
    let lora = match config.lora(&sites) {
        Some(lc) => Some(LoraAdapter::attach_weights(model, lc, &lora_weights, device).map_err(|e| files.weights_error(e.to_string()))?),
        None => None,
    };
    let gates = FineGates::install(model, config, &tensors, lora).map_err(|e| files.weights_error(e.to_string()))?;
    Ok(Box::new(gates))
}
