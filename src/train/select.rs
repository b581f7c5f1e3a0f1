//! Where to fine-tune: semantic layer selection, after Gu et al. 2024 (SALF).
//!
//! The paper compares a "virtual" and the "factual" transition of the latent representation
//! between layers, estimates each layer's gain from the deviation, freezes the layers before the
//! one with the greatest gain and fine-tunes the rest. Its exact formulas were not available;
//! **this is our reading**, a logit-lens one:
//!
//! - the frozen model reads a small sample of the task's data and keeps every hidden state
//!   `h_0` (the embedded input) … `h_L` (the final normed states);
//! - the **deviation** `D_k` of latent `k` is the task's loss when `h_k` is read out directly:
//!   language modelling through the final norm and the LM head (the mean NLL per target token);
//!   classification through a linear probe (a softmax regression on the pooled, final-normed
//!   `h_k`, fitted on the sample, its held-out cross-entropy by 4-fold cross-validation: a new
//!   head is random, so reading through it would measure nothing);
//! - the **gain** of block `i` (0-based, `h_i → h_{i+1}`) is `G_i = D_i − D_{i+1}`, how far that
//!   block moves the representation towards the target;
//! - the policy: `auto` trains the blocks from the one of greatest gain to the last (the
//!   blocks before it are frozen), `auto:K` the `K` blocks of greatest gain.
//!
//! The method then attaches at the chosen blocks only (`layers`), and the frozen blocks below the
//! lowest chosen one build no backward graph: nothing below it requires a gradient, so the
//! engine records no backward there and runs none of its kernels.

use std::fmt::Write;

use serde_json::{json, Value};

use super::data::{DataKind, Dataset};
use crate::autograd::with_no_grad;
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::peft::{ClassifierHead, Pooling};
use crate::rng::Rng;

/// Which blocks to train from their gains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPolicy {
    /// From the block of greatest gain to the last.
    Auto,
    /// The `K` blocks of greatest gain.
    Budget(usize),
}

impl LayerPolicy {
    /// `auto` or `auto:K`; `None` for anything else (a list of layers).
    pub fn parse(s: &str) -> Result<Option<LayerPolicy>> {
        let s = s.trim();
        if s == "auto" {
            return Ok(Some(LayerPolicy::Auto));
        }
        let Some(k) = s.strip_prefix("auto:") else { return Ok(None) };
        match k.trim().parse::<usize>() {
            Ok(k) if k >= 1 => Ok(Some(LayerPolicy::Budget(k))),
            _ => Err(Error::InvalidArgument {
                op: "--layers",
                msg: format!("'{s}': the layer budget K of auto:K must be an integer of at least 1"),
            }),
        }
    }
}

/// How the sample is read.
#[derive(Debug, Clone)]
pub struct SelectOptions {
    /// Examples of the data read (a seeded subset when there are more).
    pub examples: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Classification: how the probe pools a sequence.
    pub pooling: Pooling,
}

impl Default for SelectOptions {
    fn default() -> Self {
        SelectOptions { examples: 256, batch_size: 16, seed: 0, pooling: Pooling::Last }
    }
}

/// What the selection measured and chose.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSelection {
    /// `lm-head` (language modelling) or `probe` (classification).
    pub reading: &'static str,
    pub examples: usize,
    /// `D_0 … D_L`: the loss read from each latent.
    pub deviations: Vec<f64>,
    /// `G_i = D_i − D_{i+1}` of each block.
    pub gains: Vec<f64>,
    /// The blocks to train, ascending.
    pub chosen: Vec<usize>,
}

impl LayerSelection {
    /// The chosen blocks as `--layers` takes them (`12-29`, `3,7,9-11`).
    pub fn layers_arg(&self) -> String {
        let mut parts = Vec::new();
        let mut i = 0;
        while i < self.chosen.len() {
            let mut j = i;
            while j + 1 < self.chosen.len() && self.chosen[j + 1] == self.chosen[j] + 1 {
                j += 1;
            }
            parts.push(if i == j { self.chosen[i].to_string() } else { format!("{}-{}", self.chosen[i], self.chosen[j]) });
            i = j + 1;
        }
        parts.join(",")
    }

    /// A table: each block's deviation before and after it, its gain, and whether it trains.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "block  deviation in  deviation out      gain  trained");
        for (i, g) in self.gains.iter().enumerate() {
            let mark = if self.chosen.contains(&i) { "*" } else { "" };
            let _ = writeln!(s, "{i:>5}  {:>12.4}  {:>13.4}  {g:>8.4}  {mark}", self.deviations[i], self.deviations[i + 1]);
        }
        s
    }

    pub fn to_json(&self) -> Value {
        json!({
            "reading": self.reading,
            "examples": self.examples,
            "deviations": self.deviations,
            "gains": self.gains,
            "chosen": self.chosen,
            "layers": self.layers_arg(),
        })
    }

    /// A bar chart of the gains, the chosen blocks in colour.
    pub fn svg(&self, title: &str) -> String {
        let labels: Vec<String> = (0..self.gains.len()).map(|i| i.to_string()).collect();
        let on: Vec<bool> = (0..self.gains.len()).map(|i| self.chosen.contains(&i)).collect();
        super::plot::bars(title, "block", "gain (deviation in − out)", &labels, &self.gains, &on)
    }
}

/// The blocks `policy` picks from `gains`.
pub fn choose(gains: &[f64], policy: LayerPolicy) -> Result<Vec<usize>> {
    let n = gains.len();
    if n == 0 {
        return Err(Error::InvalidArgument { op: "select layers", msg: "the model has no blocks".into() });
    }
    let by_gain = |a: &usize, b: &usize| gains[*b].total_cmp(&gains[*a]).then(a.cmp(b));
    match policy {
        LayerPolicy::Auto => {
            let best = (0..n).min_by(by_gain).expect("n > 0");
            Ok((best..n).collect())
        }
        LayerPolicy::Budget(k) => {
            if k == 0 || k > n {
                return Err(Error::InvalidArgument {
                    op: "select layers",
                    msg: format!("a layer budget of {k} is not between 1 and the model's {n} layers"),
                });
            }
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(by_gain);
            let mut chosen = order[..k].to_vec();
            chosen.sort_unstable();
            Ok(chosen)
        }
    }
}

/// Measure every latent's deviation on (a seeded subset of) `data` and choose by `policy`.
pub fn select_layers(
    model: &dyn CausalLm,
    data: &Dataset,
    opts: &SelectOptions,
    policy: LayerPolicy,
    device: &Device,
) -> Result<LayerSelection> {
    if data.is_empty() {
        return Err(Error::InvalidArgument { op: "select layers", msg: format!("{}: no examples", data.path()) });
    }
    let sample = if data.len() > opts.examples { data.subset(opts.examples, opts.seed)? } else { data.clone() };
    let (deviations, reading) = deviations(model, &sample, opts, device)?;
    let gains: Vec<f64> = deviations.windows(2).map(|w| w[0] - w[1]).collect();
    let chosen = choose(&gains, policy)?;
    Ok(LayerSelection { reading, examples: sample.len(), deviations, gains, chosen })
}

/// `D_0 … D_L` of `data` (all of it) and the reading used.
pub fn deviations(model: &dyn CausalLm, data: &Dataset, opts: &SelectOptions, device: &Device) -> Result<(Vec<f64>, &'static str)> {
    let layers = model.num_layers();
    let order: Vec<usize> = (0..data.len()).collect();
    with_no_grad(|| match data.kind() {
        DataKind::Lm => {
            let (mut sums, mut tokens) = (vec![0.0; layers + 1], 0usize);
            for chunk in order.chunks(opts.batch_size.max(1)) {
                let b = data.batch(chunk, device)?;
                let h = model.forward_hidden(&b.ids, b.keep.as_ref(), None, true)?;
                for (k, hk) in h.all.iter().enumerate() {
                    // The last latent is already normed (it is what the LM head reads).
                    let read = if k == layers { hk.clone() } else { model.decoder().norm.forward(hk)? };
                    sums[k] += crate::nn::linear_cross_entropy_sum(model.lm_head(), &read, &b.targets, -100)?.to_scalar()?;
                }
                tokens += b.n_target_tokens;
            }
            if tokens == 0 {
                return Err(Error::InvalidArgument { op: "select layers", msg: format!("{}: no target tokens", data.path()) });
            }
            Ok((sums.into_iter().map(|s| s / tokens as f64).collect(), "lm-head"))
        }
        DataKind::Classification => {
            let d = model.hidden_size();
            let pool = ClassifierHead::new(d, 1, opts.pooling, &mut Rng::new(0), device)?;
            let mut feats: Vec<Vec<f64>> = vec![Vec::new(); layers + 1];
            let mut labels = Vec::new();
            for chunk in order.chunks(opts.batch_size.max(1)) {
                let b = data.batch(chunk, device)?;
                let h = model.forward_hidden(&b.ids, b.keep.as_ref(), None, true)?;
                for (k, hk) in h.all.iter().enumerate() {
                    let read = if k == layers { hk.clone() } else { model.decoder().norm.forward(hk)? };
                    feats[k].extend(pool.pool(&read, b.keep.as_ref())?.to_vec_f64()?);
                }
                let l = b.labels.as_ref().expect("classification batches have labels").to_vec_f64()?;
                labels.extend(l.into_iter().map(|v| v as usize));
            }
            let classes = labels.iter().max().map_or(2, |m| m + 1).max(2);
            let devs = feats.iter().map(|x| probe_loss(x, &labels, d, classes, opts.seed)).collect::<Result<Vec<_>>>()?;
            Ok((devs, "probe"))
        }
        k => Err(Error::InvalidArgument {
            op: "select layers",
            msg: format!("{}: layer selection reads language-modelling or labelled data, not {k:?}", data.path()),
        }),
    })
}

/// Folds of the probe's cross-validation, its optimiser steps and its weight decay.
const FOLDS: usize = 4;
const PROBE_STEPS: usize = 200;
const PROBE_L2: f64 = 1.0;

/// The held-out cross-entropy (mean per example, natural log) of a softmax regression on
/// features `x: [n, d]` with `labels`, by [`FOLDS`]-fold cross-validation over a seeded
/// shuffle. Each fold standardises the features with its training part's mean and deviation
/// and fits by Adam (lr 0.05, [`PROBE_STEPS`] full-batch steps, L2 [`PROBE_L2`]).
pub fn probe_loss(x: &[f64], labels: &[usize], d: usize, classes: usize, seed: u64) -> Result<f64> {
    let n = labels.len();
    if n < FOLDS || x.len() != n * d {
        return Err(Error::InvalidArgument {
            op: "select layers",
            msg: format!("the probe needs at least {FOLDS} labelled examples, got {n}"),
        });
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let key = crate::peft::mix(seed, 0x5E1EC7);
    for i in (1..n).rev() {
        let j = ((crate::rng::uniform_at(key, 0, i as u64) as f64 * (i + 1) as f64) as usize).min(i);
        idx.swap(i, j);
    }
    let (mut total, mut count) = (0.0, 0usize);
    for fold in 0..FOLDS {
        let test: Vec<usize> = idx.iter().copied().enumerate().filter(|(p, _)| p % FOLDS == fold).map(|(_, i)| i).collect();
        let train: Vec<usize> = idx.iter().copied().enumerate().filter(|(p, _)| p % FOLDS != fold).map(|(_, i)| i).collect();
        // Standardise with the training part's statistics.
        let mut mean = vec![0.0; d];
        let mut sd = vec![0.0; d];
        for &i in &train {
            for j in 0..d {
                mean[j] += x[i * d + j] / train.len() as f64;
            }
        }
        for &i in &train {
            for j in 0..d {
                sd[j] += (x[i * d + j] - mean[j]).powi(2) / train.len() as f64;
            }
        }
        let sd: Vec<f64> = sd.into_iter().map(|v| v.sqrt().max(1e-6)).collect();
        let z = |i: usize| -> Vec<f64> { (0..d).map(|j| (x[i * d + j] - mean[j]) / sd[j]).collect() };
        let ztrain: Vec<Vec<f64>> = train.iter().map(|&i| z(i)).collect();
        // W: [classes, d], b: [classes]; Adam on the mean cross-entropy + L2.
        let p = classes * (d + 1);
        let (mut w, mut m, mut v) = (vec![0.0; p], vec![0.0; p], vec![0.0; p]);
        let (lr, b1, b2, eps) = (0.05, 0.9, 0.999, 1e-8);
        for step in 1..=PROBE_STEPS {
            let mut g = vec![0.0; p];
            for (zi, &i) in ztrain.iter().zip(&train) {
                let probs = softmax(&logits(&w, zi, d, classes));
                for c in 0..classes {
                    let e = (probs[c] - (labels[i] == c) as u8 as f64) / train.len() as f64;
                    for j in 0..d {
                        g[c * (d + 1) + j] += e * zi[j];
                    }
                    g[c * (d + 1) + d] += e;
                }
            }
            for c in 0..classes {
                for j in 0..d {
                    g[c * (d + 1) + j] += PROBE_L2 * w[c * (d + 1) + j];
                }
            }
            for k in 0..p {
                m[k] = b1 * m[k] + (1.0 - b1) * g[k];
                v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
                let (mh, vh) = (m[k] / (1.0 - b1.powi(step as i32)), v[k] / (1.0 - b2.powi(step as i32)));
                w[k] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        for &i in &test {
            let probs = softmax(&logits(&w, &z(i), d, classes));
            total -= probs[labels[i]].max(1e-300).ln();
            count += 1;
        }
    }
    Ok(total / count as f64)
}

fn logits(w: &[f64], z: &[f64], d: usize, classes: usize) -> Vec<f64> {
    (0..classes).map(|c| w[c * (d + 1) + d] + (0..d).map(|j| w[c * (d + 1) + j] * z[j]).sum::<f64>()).collect()
}

fn softmax(l: &[f64]) -> Vec<f64> {
    let m = l.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f64> = l.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_pick_by_gain() {
        let gains = [0.1, 0.5, -0.2, 0.3, 0.05];
        assert_eq!(choose(&gains, LayerPolicy::Auto).unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(choose(&gains, LayerPolicy::Budget(2)).unwrap(), vec![1, 3]);
        assert_eq!(choose(&gains, LayerPolicy::Budget(5)).unwrap(), vec![0, 1, 2, 3, 4]);
        let e = choose(&gains, LayerPolicy::Budget(6)).unwrap_err().to_string();
        assert!(e.contains("budget of 6") && e.contains("5 layers"), "{e}");
        assert_eq!(LayerPolicy::parse("auto").unwrap(), Some(LayerPolicy::Auto));
        assert_eq!(LayerPolicy::parse("auto:3").unwrap(), Some(LayerPolicy::Budget(3)));
        assert_eq!(LayerPolicy::parse("0-3,8").unwrap(), None);
        let e = LayerPolicy::parse("auto:0").unwrap_err().to_string();
        assert!(e.contains("'auto:0'"), "{e}");
        let sel =
            LayerSelection { reading: "lm-head", examples: 1, deviations: vec![0.0; 8], gains: vec![0.0; 7], chosen: vec![0, 2, 3, 4, 6] };
        assert_eq!(sel.layers_arg(), "0,2-4,6");
    }

    /// The probe separates separable data (held-out loss near 0) and not random labels (near ln 2).
    #[test]
    fn the_probe_reads_what_features_hold() {
        let (n, d) = (64, 5);
        let mut x = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let y = i % 2;
            for j in 0..d {
                let noise = crate::rng::uniform_at(3, 0, (i * d + j) as u64) as f64 - 0.5;
                x.push(if j == 0 { 3.0 * (2.0 * y as f64 - 1.0) + noise } else { noise });
            }
            labels.push(y);
        }
        let sep = probe_loss(&x, &labels, d, 2, 0).unwrap();
        let shuffled: Vec<usize> = (0..n).map(|i| (crate::rng::uniform_at(4, 0, i as u64) < 0.5) as usize).collect();
        let random = probe_loss(&x, &shuffled, d, 2, 0).unwrap();
        // The ridge (λ = 1) keeps the probe modest even on separable data; ln 2 = 0.69 is chance.
        assert!(sep < 0.5, "separable: {sep}");
        assert!(random > 0.65, "random labels: {random}");
    }
}
