//! Text generation: a key/value cache (prefill the prompt once, then one token per step) and
//! the usual sampling controls, with the semantics of Hugging Face `generate`:
//! repetition penalty, then temperature, top-k, top-p, then a draw from the softmax.

use super::{CausalLm, KvCache};
use crate::autograd::no_grad;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::rng;
use crate::tensor::Tensor;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first, on ties).
    Greedy,
    /// A draw from `softmax(logits / temperature)`, restricted to the `top_k` most likely
    /// tokens and then to the smallest set holding `top_p` of the probability.
    Sample { temperature: f64, top_k: Option<usize>, top_p: Option<f64> },
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// `> 1` discourages tokens already in the sequence (1 = off): a positive logit is divided
    /// by it, a negative one multiplied.
    pub repetition_penalty: f64,
    /// Seed of the Philox stream the draws come from (step `s` uses stream offset `s`).
    pub seed: u64,
    /// Generation stops after emitting any of these.
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 32, sampling: Sampling::Greedy, repetition_penalty: 1.0, seed: 0, stop_tokens: vec![] }
    }
}

fn validate(o: &GenerateOptions) -> Result<()> {
    let bad = |msg: String| Err(Error::InvalidArgument { op: "generate", msg });
    if o.repetition_penalty.is_nan() || o.repetition_penalty <= 0.0 {
        return bad(format!("repetition_penalty must be > 0, got {}", o.repetition_penalty));
    }
    if let Sampling::Sample { temperature, top_k, top_p } = &o.sampling {
        if temperature.is_nan() || *temperature <= 0.0 {
            return bad(format!("temperature must be > 0 (use greedy for 0), got {temperature}"));
        }
        if *top_k == Some(0) {
            return bad("top_k must be ≥ 1".into());
        }
        if let Some(p) = top_p {
            if !(*p > 0.0 && *p <= 1.0) {
                return bad(format!("top_p must be in (0, 1], got {p}"));
            }
        }
    }
    Ok(())
}

/// Choose the next token from one row of logits. `history` is the sequence so far (for the
/// repetition penalty); `u` is a uniform draw in [0, 1).
pub fn pick_token(logits: &[f32], history: &[u32], opts: &GenerateOptions, u: f32) -> Result<u32> {
    validate(opts)?;
    if logits.is_empty() {
        return Err(Error::InvalidArgument { op: "generate", msg: "empty logits".into() });
    }
    let mut l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    if opts.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        let n = l.len();
        for &t in seen.iter().filter(|&&t| (t as usize) < n) {
            let x = &mut l[t as usize];
            *x = if *x < 0.0 { *x * opts.repetition_penalty } else { *x / opts.repetition_penalty };
        }
    }
    let argmax = |l: &[f64]| l.iter().enumerate().fold(0, |b, (i, &x)| if x > l[b] { i } else { b }) as u32;
    let (temperature, top_k, top_p) = match &opts.sampling {
        Sampling::Greedy => return Ok(argmax(&l)),
        Sampling::Sample { temperature, top_k, top_p } => (*temperature, *top_k, *top_p),
    };
    l.iter_mut().for_each(|x| *x /= temperature);
    if let Some(k) = top_k {
        // Keep every token at least as likely as the k-th most likely one.
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[k.min(sorted.len()) - 1];
        l.iter_mut().for_each(|x| {
            if *x < kth {
                *x = f64::NEG_INFINITY
            }
        });
    }
    let softmax = |l: &[f64]| {
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect::<Vec<f64>>()
    };
    if let Some(p) = top_p {
        // Remove the least likely tokens whose total probability is at most 1 − p; the most
        // likely token always stays.
        let probs = softmax(&l);
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
        let mut cum = 0.0;
        for (rank, &i) in order.iter().enumerate() {
            cum += probs[i];
            if cum <= 1.0 - p && rank + 1 < order.len() {
                l[i] = f64::NEG_INFINITY;
            }
        }
    }
    let probs = softmax(&l);
    let mut acc = 0.0;
    let target = u as f64;
    for (i, &q) in probs.iter().enumerate() {
        acc += q;
        if target < acc {
            return Ok(i as u32);
        }
    }
    Ok(argmax(&l))
}

/// Generate up to `max_new_tokens` after `prompt` (batch of one). `on_token` sees each new
/// token as it is chosen (for streaming). Returns the new tokens, the stop token included.
pub fn generate(
    model: &dyn CausalLm,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
    device: &crate::Device,
) -> Result<Vec<u32>> {
    let mut rows = decode_rows(model, prompt, 1, opts, &mut |_, t| on_token(t), device)?;
    Ok(rows.pop().expect("one row"))
}

/// `k` samples of up to `max_new_tokens` after `prompt`, decoded together: the prompt is
/// prefilled once and its cache repeated for the `k` rows, then each step runs the `k` last
/// tokens as one batch. Sample `j` draws its step-`s` uniform from stream offset `(s, j)`, so
/// with `k = 1` the result is [`generate`]'s. A sample ends at its stop token (kept); the
/// others go on until theirs or `max_new_tokens`.
pub fn generate_samples(
    model: &dyn CausalLm,
    prompt: &[u32],
    k: usize,
    opts: &GenerateOptions,
    device: &crate::Device,
) -> Result<Vec<Vec<u32>>> {
    decode_rows(model, prompt, k, opts, &mut |_, _| Ok(()), device)
}

/// The decoding loop of [`generate`] (`k = 1`) and [`generate_samples`]; `on_token(j, t)` sees
/// row `j`'s new token `t` as it is chosen.
fn decode_rows(
    model: &dyn CausalLm,
    prompt: &[u32],
    k: usize,
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    device: &crate::Device,
) -> Result<Vec<Vec<u32>>> {
    validate(opts)?;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument { op: "generate", msg: "the prompt has no tokens".into() });
    }
    if k == 0 {
        return Err(Error::InvalidArgument { op: "generate", msg: "need at least one sample".into() });
    }
    model.check_tokens(
        &format!("generate: a prompt of {} tokens + max_new_tokens {}", prompt.len(), opts.max_new_tokens),
        prompt,
        prompt.len().saturating_add(opts.max_new_tokens),
    )?;
    let _g = no_grad();
    let v = model.vocab_size();
    let mut cache = KvCache::new(model.num_layers());
    let ids = Tensor::from_vec(prompt.to_vec(), &[1, prompt.len()], device)?;
    let logits = model.forward_cached(&ids, None, Some(&mut cache))?;
    let first = logits.narrow(1, prompt.len() - 1, 1)?.to_dtype(DType::F32)?.to_vec::<f32>()?;
    cache.repeat_batch(k)?;
    let mut rows: Vec<Vec<f32>> = vec![first[..v].to_vec(); k];
    let mut history: Vec<Vec<u32>> = vec![prompt.to_vec(); k];
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); k];
    let mut done = vec![false; k];
    for step in 0..opts.max_new_tokens {
        let mut next = vec![0u32; k];
        for j in 0..k {
            if done[j] {
                // Finished: its row still runs (the batch stays whole), its output is ignored.
                next[j] = *out[j].last().unwrap_or(&prompt[prompt.len() - 1]);
                continue;
            }
            let t = pick_token(&rows[j], &history[j], opts, rng::uniform_at(opts.seed, step as u64, j as u64))?;
            on_token(j, t)?;
            out[j].push(t);
            history[j].push(t);
            done[j] = opts.stop_tokens.contains(&t);
            next[j] = t;
        }
        if done.iter().all(|&d| d) || step + 1 == opts.max_new_tokens {
            break;
        }
        let logits = model.forward_cached(&Tensor::from_vec(next, &[k, 1], device)?, None, Some(&mut cache))?;
        let all = logits.to_dtype(DType::F32)?.to_vec::<f32>()?;
        let width = all.len() / k;
        for (j, row) in rows.iter_mut().enumerate() {
            row.copy_from_slice(&all[j * width..j * width + v]);
        }
    }
    Ok(out)
}
