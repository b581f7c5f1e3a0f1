//! Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP on
//! a sublayer's output, before the block's residual add,
//!
//! ```text
//! y' = y + W_up f(W_down y + b_down) + b_up,   W_down: [m, d], W_up: [d, m], m = d / reduction_factor
//! ```
//!
//! Houlsby: after the attention and after the MLP sublayer (the `attn.out` and `mlp.out`
//! sites); Pfeiffer: after the MLP only. Init near zero **(ours, as AdapterHub's "bert"
//! init)**: both weights `N(0, 0.02²)`, biases 0, so the model starts close to the base.
//! The paper's Houlsby variant also trains the layer norms; here only the adapters train.
//!
//! PEFT has no format for them; tinytune saves one in PEFT's style: `adapter_config.json`
//! with `"peft_type": "BOTTLENECK"`, `adapter_kind` (`houlsby`|`pfeiffer`),
//! `reduction_factor`, `bottleneck_size`, `non_linearity`, `layers_to_transform`, and
//! `adapter_model.safetensors` with `base_model.model.{sublayer}.bottleneck.{down,up}.{weight,bias}`
//! where `{sublayer}` is the Hugging Face path of the attention or MLP module
//! (`model.layers.0.self_attn`, `transformer.h.0.mlp`).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::method::{AdapterFiles, Method, MethodConfig, Registration, Settings};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::nn::{BlockHook, Linear};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Where the adapters sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// After the attention and after the MLP.
    Houlsby,
    /// After the MLP only.
    Pfeiffer,
}

impl AdapterKind {
    fn name(self) -> &'static str {
        match self {
            AdapterKind::Houlsby => "houlsby",
            AdapterKind::Pfeiffer => "pfeiffer",
        }
    }

    fn parse(s: &str) -> Result<AdapterKind> {
        match s {
            "houlsby" => Ok(AdapterKind::Houlsby),
            "pfeiffer" => Ok(AdapterKind::Pfeiffer),
            _ => Err(Error::InvalidArgument { op: "adapter kind", msg: format!("unknown adapter kind '{s}' (houlsby or pfeiffer)") }),
        }
    }
}

/// The bottleneck's non-linearity `f`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonLinearity {
    Relu,
    Silu,
    GeluTanh,
}

impl NonLinearity {
    fn name(self) -> &'static str {
        match self {
            NonLinearity::Relu => "relu",
            NonLinearity::Silu => "silu",
            NonLinearity::GeluTanh => "gelu_tanh",
        }
    }

    fn parse(s: &str) -> Result<NonLinearity> {
        match s {
            "relu" => Ok(NonLinearity::Relu),
            "silu" | "swish" => Ok(NonLinearity::Silu),
            "gelu_tanh" | "gelu_new" => Ok(NonLinearity::GeluTanh),
            _ => Err(Error::InvalidArgument { op: "non-linearity", msg: format!("unknown non-linearity '{s}' (relu, silu or gelu_tanh)") }),
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            NonLinearity::Relu => x.relu(),
            NonLinearity::Silu => x.silu(),
            NonLinearity::GeluTanh => x.gelu_tanh(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BottleneckConfig {
    pub kind: AdapterKind,
    /// `m = hidden / reduction_factor` (at least 1).
    pub reduction_factor: usize,
    pub non_linearity: NonLinearity,
    /// Only these transformer blocks.
    pub layers: Option<Vec<usize>>,
}

impl Default for BottleneckConfig {
    fn default() -> Self {
        BottleneckConfig { kind: AdapterKind::Houlsby, reduction_factor: 16, non_linearity: NonLinearity::Relu, layers: None }
    }
}

/// One bottleneck: `y + up(f(down(y)))`.
#[derive(Debug)]
pub struct Bottleneck {
    /// The sublayer's module path (`model.layers.0.mlp`).
    pub sublayer: String,
    pub down: Linear,
    pub up: Linear,
    pub f: NonLinearity,
}

impl Bottleneck {
    fn forward(&self, y: &Tensor) -> Result<Tensor> {
        y.add(&self.up.forward(&self.f.apply(&self.down.forward(y)?)?)?)
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        let p = format!("{}.bottleneck", self.sublayer);
        vec![
            (format!("{p}.down.weight"), self.down.weight.clone()),
            (format!("{p}.down.bias"), self.down.bias.clone().expect("bottlenecks have biases")),
            (format!("{p}.up.weight"), self.up.weight.clone()),
            (format!("{p}.up.bias"), self.up.bias.clone().expect("bottlenecks have biases")),
        ]
    }
}

/// The adapters of one block, at its `attn.out` and `mlp.out` sites.
#[derive(Debug)]
pub struct BlockAdapters {
    pub attn: Option<Bottleneck>,
    pub mlp: Bottleneck,
}

impl BlockHook for BlockAdapters {
    fn attn_out(&self, _layer: usize, y: Tensor) -> Result<Tensor> {
        match &self.attn {
            Some(a) => a.forward(&y),
            None => Ok(y),
        }
    }

    fn mlp_out(&self, _layer: usize, y: Tensor) -> Result<Tensor> {
        self.mlp.forward(&y)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Bottleneck adapters attached to a model.
#[derive(Debug)]
pub struct BottleneckAdapter {
    pub config: BottleneckConfig,
    /// `m`.
    pub size: usize,
    /// One per adapted block, by block index.
    pub blocks: Vec<(usize, Arc<BlockAdapters>)>,
}

/// The weights of one bottleneck: `(down.weight, down.bias, up.weight, up.bias)`.
type Weights4 = (Tensor, Tensor, Tensor, Tensor);

impl BottleneckAdapter {
    /// Attach fresh adapters (near-zero init, seeded).
    pub fn attach(model: &mut dyn CausalLm, config: BottleneckConfig, seed: u64) -> Result<BottleneckAdapter> {
        if config.reduction_factor == 0 {
            return Err(Error::InvalidArgument { op: "bottleneck", msg: "reduction factor must be at least 1".into() });
        }
        let d = model.hidden_size();
        let m = (d / config.reduction_factor).max(1);
        let n = model.num_layers();
        if let Some(bad) = config.layers.as_ref().and_then(|l| l.iter().find(|&&i| i >= n)) {
            return Err(Error::InvalidArgument { op: "layers", msg: format!("layer {bad} does not exist: the model has layers 0..{n}") });
        }
        let mut rng = Rng::new(super::mix(seed, 0xADA9_7E25));
        let dev = model.lm_head().weight.device().clone();
        let dt = super::trainable_dtype(model.lm_head().weight.dtype());
        let mut weights = HashMap::new();
        for blk in &model.decoder_mut().blocks {
            if !config.layers.as_ref().is_none_or(|l| l.contains(&blk.index)) {
                continue;
            }
            let mut names = vec![blk.mlp.name.clone()];
            if config.kind == AdapterKind::Houlsby {
                names.push(blk.attn.name.clone());
            }
            for name in names {
                let w = (
                    Tensor::randn(&[m, d], 0.0, 0.02, dt, &dev, &mut rng)?,
                    Tensor::zeros(&[m], dt, &dev)?,
                    Tensor::randn(&[d, m], 0.0, 0.02, dt, &dev, &mut rng)?,
                    Tensor::zeros(&[d], dt, &dev)?,
                );
                weights.insert(name, w);
            }
        }
        Self::install(model, config, m, weights)
    }

    /// Attach given weights, by sublayer path.
    fn install(
        model: &mut dyn CausalLm,
        config: BottleneckConfig,
        m: usize,
        mut weights: HashMap<String, Weights4>,
    ) -> Result<BottleneckAdapter> {
        let d = model.hidden_size();
        let mut blocks = Vec::new();
        let known: Vec<String> = model.decoder_mut().blocks.iter().flat_map(|b| [b.attn.name.clone(), b.mlp.name.clone()]).collect();
        let mut given: Vec<&String> = weights.keys().collect();
        given.sort();
        if let Some(bad) = given.into_iter().find(|k| !known.contains(k)) {
            return Err(Error::InvalidArgument {
                op: "bottleneck",
                msg: format!("the adapter has a bottleneck for '{bad}', which is not an attention or MLP module of this model"),
            });
        }
        let f = config.non_linearity;
        for blk in model.decoder_mut().blocks.iter_mut() {
            let mut take = |name: &str| -> Result<Option<Bottleneck>> {
                let Some((dw, db, uw, ub)) = weights.remove(name) else { return Ok(None) };
                let p = format!("{name}.bottleneck");
                for (t, shape, what) in [
                    (&dw, vec![m, d], "down.weight"),
                    (&db, vec![m], "down.bias"),
                    (&uw, vec![d, m], "up.weight"),
                    (&ub, vec![d], "up.bias"),
                ] {
                    if t.shape() != shape {
                        return Err(Error::Shape {
                            op: "bottleneck",
                            msg: format!("{p}.{what} has shape {:?}, expected {shape:?} (hidden {d}, bottleneck {m})", t.shape()),
                        });
                    }
                }
                let leaf = |t: Tensor| t.contiguous()?.requires_grad();
                Ok(Some(Bottleneck {
                    sublayer: name.to_string(),
                    down: Linear::new(format!("{p}.down"), leaf(dw)?, Some(leaf(db)?)),
                    up: Linear::new(format!("{p}.up"), leaf(uw)?, Some(leaf(ub)?)),
                    f,
                }))
            };
            let attn = take(&blk.attn.name.clone())?;
            let Some(mlp) = take(&blk.mlp.name.clone())? else {
                if attn.is_some() {
                    return Err(Error::InvalidArgument {
                        op: "bottleneck",
                        msg: format!("{}: an attention adapter without its MLP adapter", blk.name),
                    });
                }
                continue;
            };
            if config.kind == AdapterKind::Houlsby && attn.is_none() {
                return Err(Error::InvalidArgument {
                    op: "bottleneck",
                    msg: format!("{}: a Houlsby adapter needs one after the attention too", blk.name),
                });
            }
            if config.kind == AdapterKind::Pfeiffer && attn.is_some() {
                return Err(Error::InvalidArgument {
                    op: "bottleneck",
                    msg: format!("{}: a Pfeiffer adapter has none after the attention", blk.name),
                });
            }
            let hook = Arc::new(BlockAdapters { attn, mlp });
            blk.hooks.push(hook.clone());
            blocks.push((blk.index, hook));
        }
        if blocks.is_empty() {
            return Err(Error::InvalidArgument { op: "bottleneck", msg: "no block to adapt".into() });
        }
        Ok(BottleneckAdapter { config, size: m, blocks })
    }
}

impl MethodConfig for BottleneckConfig {
    fn name(&self) -> &'static str {
        "adapter"
    }

    fn attach(&self, model: &mut dyn CausalLm, seed: u64) -> Result<Box<dyn Method>> {
        Ok(Box::new(BottleneckAdapter::attach(model, self.clone(), seed)?))
    }

    fn fingerprint(&self) -> Value {
        json!({ "kind": self.kind.name(), "reduction_factor": self.reduction_factor, "non_linearity": self.non_linearity.name(), "layers": self.layers })
    }

    fn default_lr(&self) -> f64 {
        1e-3
    }
}

impl Method for BottleneckAdapter {
    fn name(&self) -> &'static str {
        "adapter"
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.blocks.iter().flat_map(|(_, b)| b.attn.iter().chain([&b.mlp]).flat_map(|a| a.parameters())).collect()
    }

    fn num_sites(&self) -> usize {
        self.blocks.iter().map(|(_, b)| 1 + b.attn.is_some() as usize).sum()
    }

    fn adapter_config(&self, _model: &mut dyn CausalLm) -> Value {
        json!({
            "peft_type": "BOTTLENECK",
            "adapter_kind": self.config.kind.name(),
            "reduction_factor": self.config.reduction_factor,
            "bottleneck_size": self.size,
            "non_linearity": self.config.non_linearity.name(),
            "layers_to_transform": self.config.layers,
        })
    }

    fn remove(&self, model: &mut dyn CausalLm) -> Result<()> {
        for blk in model.decoder_mut().blocks.iter_mut() {
            blk.hooks.retain(|h| !self.blocks.iter().any(|(_, b)| super::is_same(h, b)));
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub const BOTTLENECK: Registration = Registration {
    name: "adapter",
    about: "bottleneck adapters y + W_up f(W_down y) after the attention and/or MLP (Houlsby, Pfeiffer)",
    peft_type: "BOTTLENECK",
    settings: &["adapter-kind", "reduction-factor", "non-linearity", "layers"],
    configure: |s: &Settings| {
        let d = BottleneckConfig::default();
        let config = BottleneckConfig {
            kind: s.str("adapter-kind")?.map(|k| AdapterKind::parse(&k)).transpose()?.unwrap_or(d.kind),
            reduction_factor: s.usize("reduction-factor")?.unwrap_or(d.reduction_factor),
            non_linearity: s.str("non-linearity")?.map(|k| NonLinearity::parse(&k)).transpose()?.unwrap_or(d.non_linearity),
            layers: s.usizes("layers")?,
        };
        if config.reduction_factor == 0 {
            return Err(Error::InvalidArgument { op: "--reduction-factor", msg: "must be at least 1".into() });
        }
        Ok(Arc::new(config))
    },
    recognises: |c| c.get("peft_type").and_then(Value::as_str) == Some("BOTTLENECK"),
    load,
};

fn load(model: &mut dyn CausalLm, files: &mut AdapterFiles, device: &Device) -> Result<Box<dyn Method>> {
    files.check_keys(&["adapter_kind", "reduction_factor", "bottleneck_size", "non_linearity", "layers_to_transform"], &[]);
    let str_field =
        |k: &str| files.config.get(k).and_then(Value::as_str).ok_or_else(|| files.config_error(format!("missing string field '{k}'")));
    let kind = AdapterKind::parse(str_field("adapter_kind")?).map_err(|e| files.config_error(e.to_string()))?;
    let non_linearity = NonLinearity::parse(str_field("non_linearity")?).map_err(|e| files.config_error(e.to_string()))?;
    let reduction_factor = files.usize("reduction_factor")?.ok_or_else(|| files.config_error("missing field 'reduction_factor'"))?;
    let m = files.usize("bottleneck_size")?.ok_or_else(|| files.config_error("missing field 'bottleneck_size'"))?;
    let layers = match files.config.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| files.config_error(format!("layers_to_transform = {v} is not a layer list")))?,
        ),
    };
    let mut weights: HashMap<String, Weights4> = HashMap::new();
    for key in &files.keys {
        let Some(sub) = key.strip_suffix(".bottleneck.down.weight") else {
            let known = [".bottleneck.down.bias", ".bottleneck.up.weight", ".bottleneck.up.bias"].iter().any(|s| key.ends_with(s));
            if !known {
                return Err(files.weights_error(format!("tensor '{}{key}' is not a bottleneck adapter weight", super::format::PREFIX)));
            }
            continue;
        };
        let get = |w: &str| files.tensor(&format!("{sub}.bottleneck.{w}"), device);
        weights.insert(sub.to_string(), (get("down.weight")?, get("down.bias")?, get("up.weight")?, get("up.bias")?));
    }
    let config = BottleneckConfig { kind, reduction_factor, non_linearity, layers };
    let adapter = BottleneckAdapter::install(model, config, m, weights).map_err(|e| files.weights_error(e.to_string()))?;
    Ok(Box::new(adapter))
}
