//! Transfer learning: a new classification head on a language model's hidden states.
//!
//! ```text
//! h      = hidden states [batch, seq, d] (after the final norm)
//! pooled = h[i, last_i]                    (Last: the last non-padding token, as Hugging
//!                                           Face's *ForSequenceClassification)
//!        = Σ_t keep[i,t] h[i,t] / Σ_t keep[i,t]   (Mean)
//! logits = pooled Wᵀ,  W ∈ R^{classes×d}  (no bias, as HF's `score`)
//! ```
//!
//! Init `W ~ N(0, 0.02²)` (HF's `initializer_range`). Growing the head to more classes keeps
//! the learned rows and initialises only the new ones.

use serde_json::{json, Value};

use super::method::{Method, MethodConfig, Registration};
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::nn::{Linear, COMPUTE};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// How the sequence is reduced to one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The hidden state of the last real (non-padding) token.
    Last,
    /// The mean over the real tokens.
    Mean,
}

impl std::str::FromStr for Pooling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Pooling> {
        match s {
            "last" => Ok(Pooling::Last),
            "mean" => Ok(Pooling::Mean),
            _ => Err(Error::InvalidArgument { op: "pooling", msg: format!("unknown pooling '{s}' (last or mean)") }),
        }
    }
}

/// A linear classifier on pooled hidden states; its weight is trainable.
#[derive(Debug, Clone)]
pub struct ClassifierHead {
    /// `score`: `[classes, d]`, no bias.
    pub linear: Linear,
    pub pooling: Pooling,
}

/// Init standard deviation of new rows.
const INIT_STD: f64 = 0.02;

impl ClassifierHead {
    /// A fresh head for `classes` classes on `d`-wide hidden states (one output: a reward
    /// model's scalar score).
    pub fn new(d: usize, classes: usize, pooling: Pooling, rng: &mut Rng, device: &Device) -> Result<ClassifierHead> {
        if classes < 1 {
            return Err(Error::InvalidArgument { op: "classifier head", msg: "needs at least one output".into() });
        }
        let w = Tensor::randn(&[classes, d], 0.0, INIT_STD, COMPUTE, device, rng)?.requires_grad()?;
        Ok(ClassifierHead { linear: Linear::new("score", w, None), pooling })
    }

    /// A head from a given weight `[classes, d]` (a loaded one).
    pub fn from_weight(weight: Tensor, pooling: Pooling) -> Result<ClassifierHead> {
        if weight.rank() != 2 {
            return Err(Error::Shape {
                op: "classifier head",
                msg: format!("score.weight must be [classes, d], got {:?}", weight.shape()),
            });
        }
        Ok(ClassifierHead { linear: Linear::new("score", weight.to_dtype(COMPUTE)?.requires_grad()?, None), pooling })
    }

    pub fn num_classes(&self) -> usize {
        self.linear.out_features()
    }

    /// The trainable tensors, named as PEFT saves a `modules_to_save` head.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        vec![("score.weight".into(), self.linear.weight.clone())]
    }

    /// Grow to `classes` (≥ the current count): the old rows are kept, new rows drawn fresh.
    pub fn grow(&mut self, classes: usize, rng: &mut Rng) -> Result<()> {
        let (old, d) = (self.num_classes(), self.linear.in_features());
        if classes < old {
            return Err(Error::InvalidArgument {
                op: "classifier head",
                msg: format!("cannot shrink the head from {old} to {classes} classes"),
            });
        }
        if classes == old {
            return Ok(());
        }
        let dev = self.linear.weight.device().clone();
        let fresh = Tensor::randn(&[classes - old, d], 0.0, INIT_STD, COMPUTE, &dev, rng)?;
        let w = Tensor::concat(&[&self.linear.weight.detach(), &fresh], 0)?.requires_grad()?;
        self.linear.weight = w;
        Ok(())
    }

    /// Pool `hidden: [b, t, d]` (padding marked 0 in `keep: [b, t]`, right padding) to `[b, d]`.
    pub fn pool(&self, hidden: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
        if hidden.rank() != 3 {
            return Err(Error::Shape { op: "classifier head", msg: format!("hidden states must be [b, t, d], got {:?}", hidden.shape()) });
        }
        let (b, t, d) = (hidden.shape()[0], hidden.shape()[1], hidden.shape()[2]);
        match self.pooling {
            Pooling::Last => {
                let last: Vec<u32> = match keep {
                    None => vec![(t - 1) as u32; b],
                    Some(k) => {
                        let k = k.to_vec_f64()?;
                        (0..b).map(|i| (k[i * t..(i + 1) * t].iter().filter(|&&v| v > 0.5).count().max(1) - 1) as u32).collect()
                    }
                };
                let idx = Tensor::from_vec(last, &[b, 1, 1], hidden.device())?.broadcast_to(&[b, 1, d])?.contiguous()?;
                hidden.gather(1, &idx)?.reshape(&[b as isize, d as isize])
            }
            Pooling::Mean => match keep {
                None => hidden.mean(&[1], false),
                Some(k) => {
                    let k = k.to_dtype(hidden.dtype())?;
                    let count = k.sum(&[1], true)?.clamp(1.0, f64::INFINITY)?;
                    hidden.mul(&k.unsqueeze(2)?)?.sum(&[1], false)?.div(&count)
                }
            },
        }
    }

    /// Class logits `[b, classes]`.
    pub fn forward(&self, hidden: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
        self.linear.forward(&self.pool(hidden, keep)?)
    }
}

/// Accuracy of `logits: [b, classes]` against `labels: [b]`: the count of rows whose argmax
/// is the label.
pub fn correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let pred = logits.argmax(-1, false)?.to_vec::<u32>()?;
    let labels = labels.to_vec_f64()?;
    Ok(pred.iter().zip(&labels).filter(|(&p, &l)| p as f64 == l).count())
}

/// Transfer learning with the body frozen: the method trains nothing of the body; the
/// trainer's classification head is all that learns.
#[derive(Debug, Clone, Default)]
pub struct HeadOnly;

impl MethodConfig for HeadOnly {
    fn name(&self) -> &'static str {
        "head"
    }

    fn attach(&self, _model: &mut dyn CausalLm, _seed: u64) -> Result<Box<dyn Method>> {
        Ok(Box::new(HeadOnly))
    }

    fn fingerprint(&self) -> Value {
        json!({})
    }

    fn head_only(&self) -> bool {
        true
    }
}

impl Method for HeadOnly {
    fn name(&self) -> &'static str {
        "head"
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn num_sites(&self) -> usize {
        0
    }

    fn adapter_config(&self, _model: &mut dyn CausalLm) -> Value {
        json!({ "peft_type": "NONE" })
    }

    fn merge(&self, _model: &mut dyn CausalLm) -> Result<()> {
        Err(Error::InvalidArgument {
            op: "merge",
            msg: "the adapter holds no LoRA/DoRA weights (nor any other method's) to merge: a classification head alone is not part of the language model".into(),
        })
    }

    fn remove(&self, _model: &mut dyn CausalLm) -> Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub const HEAD: Registration = Registration {
    name: "head",
    about: "a new classification head alone; the body stays frozen",
    peft_type: "NONE",
    settings: &[],
    configure: |_| Ok(std::sync::Arc::new(HeadOnly)),
    recognises: |c| c.get("peft_type").and_then(Value::as_str) == Some("NONE"),
    load: |_, files, _| {
        files.check_keys(&[], &[]);
        Ok(Box::new(HeadOnly))
    },
};
