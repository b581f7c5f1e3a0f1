//! Fine-tuning methods. Each attaches to a model's named sites (its linear layers, its
//! weight tensors, its hidden states) and says which tensors are trainable; the model code
//! never forks per method.
//!
//! - [`full`]: every weight trainable (the baseline);
//! - [`head`]: a new classification head on the hidden states, alone or with the body;
//! - [`lora`]: low-rank updates `s·B A` beside frozen linear weights (rsLoRA scaling too);
//! - [`dora`]: LoRA's direction plus a trainable magnitude per output row;
//! - [`ia3`]: learned vectors scaling keys, values and the MLP's inner activation;
//! - [`prefix`]: trainable key/value prefixes in every attention layer;
//! - [`prompt`]: trainable virtual-token embeddings before the input;
//! - [`bottleneck`]: small residual MLPs after the attention and/or MLP sublayers.
//!
//! Every method keeps the contract of [`method`] ([`MethodConfig`] to attach, [`Method`] once
//! attached) and is named in its registry [`METHODS`]; the trainer, the adapter format and the
//! CLI go through that and nothing else.
//!
//! Only the tensors a method returns require a gradient: every other weight stays a frozen
//! leaf, so backward builds no gradient for it and the optimizer holds no state for it.

pub mod bottleneck;
pub mod dora;
pub mod finegates;
pub mod format;
pub mod full;
pub mod head;
pub mod ia3;
pub mod lora;
pub mod loraxs;
pub mod method;
pub mod prefix;
pub mod prompt;

pub use bottleneck::{AdapterKind, BottleneckAdapter, BottleneckConfig};
pub use finegates::{FineGates, FineGatesConfig, GatedProduct, SparsityForm};
pub use full::Full;
pub use head::{ClassifierHead, HeadOnly, Pooling};
pub use ia3::{Ia3Adapter, Ia3Config};
pub use lora::{LoraAdapter, LoraConfig, LoraLayer};
pub use loraxs::{LoraSbConfig, LoraXsAdapter, LoraXsConfig};
pub use method::{configure, registration, GradientInit, Method, MethodConfig, Regularizer, Settings, METHODS};
pub use prefix::{PrefixAdapter, PrefixConfig};
pub use prompt::{PromptAdapter, PromptConfig, PromptInit};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Whether adapters are in training mode (dropout on) and the random stream their dropout
/// draws from. One per attached adapter set, shared by its layers.
///
/// The mask of site `i` at micro-step `k` is the Philox stream `(mix(seed, i), k)`: a pure
/// function of the seed, the site and the step, so a recomputation (gradient checkpointing)
/// draws the same mask and a resumed run continues with the same masks as an unbroken one.
#[derive(Debug)]
pub struct DropoutState {
    training: AtomicBool,
    seed: u64,
    step: AtomicU64,
}

impl DropoutState {
    pub fn new(seed: u64) -> DropoutState {
        DropoutState { training: AtomicBool::new(false), seed, step: AtomicU64::new(0) }
    }

    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Set the micro-step whose masks the next forward draws (the trainer counts them).
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// The random stream of site `site` at the current micro-step.
    pub fn rng(&self, site: u64) -> Rng {
        Rng { seed: mix(self.seed, site), offset: self.step.load(Ordering::Relaxed) }
    }
}

/// The dtype a method trains its tensors in beside a frozen weight of dtype `w`: the weight's
/// own when it is a compute dtype (f64 in gradient checks), else f32 (f16/bf16 frozen weights).
pub(crate) fn trainable_dtype(w: crate::DType) -> crate::DType {
    if w.is_compute() {
        w
    } else {
        crate::nn::COMPUTE
    }
}

/// Each of `layers` with the model's linear layer at its site (`site(layer)`), for the
/// layers whose site the model has.
pub(crate) fn linear_sites_of<'m, L>(
    model: &'m mut dyn crate::models::CausalLm,
    layers: &[std::sync::Arc<L>],
    site: impl Fn(&L) -> &str,
) -> Vec<(&'m mut crate::nn::Linear, std::sync::Arc<L>)> {
    let mut lins = model.linears_mut();
    let mut out = Vec::new();
    for layer in layers {
        if let Some(pos) = lins.iter().position(|l| l.name == site(layer)) {
            out.push((lins.swap_remove(pos), layer.clone()));
        }
    }
    out
}

/// Takes `layer` off `lin`.
pub(crate) fn detach_from<L: ?Sized>(lin: &mut crate::nn::Linear, layer: &std::sync::Arc<L>) {
    lin.adapters.retain(|a| !is_same(a, layer));
}

/// Whether `attached` (an entry at a site) is `mine` (the same allocation): how a method finds
/// its own entries among other methods' when it takes them off.
pub(crate) fn is_same<T: ?Sized, U: ?Sized>(attached: &std::sync::Arc<T>, mine: &std::sync::Arc<U>) -> bool {
    std::ptr::addr_eq(std::sync::Arc::as_ptr(attached), std::sync::Arc::as_ptr(mine))
}

/// SplitMix64 finaliser of `seed + site·golden`: well-separated seeds per site.
pub fn mix(seed: u64, site: u64) -> u64 {
    let mut z = seed.wrapping_add(site.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The transformer block a site belongs to: `N` in `….layers.N.…` or `….h.N.…`.
pub fn layer_of(site: &str) -> Option<usize> {
    let parts: Vec<&str> = site.split('.').collect();
    parts.windows(2).find(|w| w[0] == "layers" || w[0] == "h").and_then(|w| w[1].parse().ok())
}

/// `*` matches any run of characters (including dots); everything else literally.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            pi += 1;
            mark = ni;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Pick the sites a method attaches to, from all `sites` of a model.
///
/// Each target is a module name matched as a suffix of the site path (`q_proj` matches
/// `model.layers.3.self_attn.q_proj`, as PEFT's list form does), a pattern with `*`
/// (`model.layers.*.mlp.*`), or `all-linear` (every linear layer but the output layer).
/// `layers` keeps only sites of those transformer blocks. A target that matches nothing is an
/// error that lists the names that would.
pub fn select_sites(sites: &[String], targets: &[String], layers: Option<&[usize]>) -> Result<Vec<String>> {
    if targets.is_empty() {
        return Err(Error::InvalidArgument { op: "target modules", msg: "no target modules given".into() });
    }
    let num_layers = sites.iter().filter_map(|s| layer_of(s)).max().map_or(0, |m| m + 1);
    if let Some(bad) = layers.and_then(|l| l.iter().find(|&&i| i >= num_layers)) {
        return Err(Error::InvalidArgument {
            op: "layers",
            msg: format!("layer {bad} does not exist: the model has layers 0..{num_layers}"),
        });
    }
    let mut chosen = Vec::new();
    for t in targets {
        let hits: Vec<&String> = sites
            .iter()
            .filter(|s| match t.as_str() {
                "all-linear" => s.as_str() != "lm_head",
                t if t.contains('*') => glob(t, s),
                t => s.as_str() == t || s.ends_with(&format!(".{t}")),
            })
            .collect();
        if hits.is_empty() {
            let mut names: Vec<&str> = sites.iter().map(|s| s.rsplit('.').next().unwrap_or(s)).collect();
            names.sort();
            names.dedup();
            return Err(Error::InvalidArgument {
                op: "target modules",
                msg: format!(
                    "'{t}' matches no linear layer of this model; valid names: {}, all-linear, or a pattern with *",
                    names.join(", ")
                ),
            });
        }
        chosen.extend(hits.into_iter().cloned());
    }
    chosen.retain(|s| layers.is_none_or(|l| layer_of(s).is_some_and(|i| l.contains(&i))));
    let mut seen = std::collections::HashSet::new();
    chosen.retain(|s| seen.insert(s.clone()));
    // Keep the model's order (stable names and seeds per site).
    chosen.sort_by_key(|s| sites.iter().position(|x| x == s));
    if chosen.is_empty() {
        return Err(Error::InvalidArgument { op: "layers", msg: "the layer selection leaves no target site".into() });
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_layers() {
        assert!(glob("model.layers.*.mlp.*", "model.layers.12.mlp.up_proj"));
        assert!(!glob("model.layers.*.mlp.*", "model.layers.12.self_attn.q_proj"));
        assert!(glob("*q_proj", "model.layers.0.self_attn.q_proj"));
        assert_eq!(layer_of("model.layers.12.mlp.up_proj"), Some(12));
        assert_eq!(layer_of("transformer.h.3.attn.c_attn"), Some(3));
        assert_eq!(layer_of("lm_head"), None);
    }

    #[test]
    fn selection() {
        let sites: Vec<String> = (0..2)
            .flat_map(|i| ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"].map(|s| format!("model.layers.{i}.{s}")))
            .chain(["lm_head".to_string()])
            .collect();
        let pick = |t: &[&str], l: Option<&[usize]>| select_sites(&sites, &t.iter().map(|s| s.to_string()).collect::<Vec<_>>(), l);
        assert_eq!(pick(&["q_proj"], None).unwrap(), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]);
        assert_eq!(
            pick(&["v_proj", "q_proj"], Some(&[1])).unwrap(),
            ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
        );
        assert_eq!(pick(&["all-linear"], None).unwrap().len(), 6);
        assert_eq!(pick(&["model.layers.*.mlp.*"], None).unwrap().len(), 2);
        let e = pick(&["qproj"], None).unwrap_err().to_string();
        assert!(e.contains("qproj") && e.contains("q_proj, up_proj, v_proj"), "{e}");
        assert!(pick(&["q_proj"], Some(&[5])).unwrap_err().to_string().contains("layer 5"));
    }
}
