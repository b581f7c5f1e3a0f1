//! The language-modelling loss through a frozen output layer, in chunks of rows, so that the
//! `[tokens, vocab]` logits (49,152 columns for SmolLM2) never exist whole.
//!
//! For a head `W: [V, d]` (and bias `b`), hidden rows `x: [n, d]` and targets `t`:
//!
//! ```text
//! L = Σ_i  −log softmax(x_i Wᵀ + b)[t_i]            (rows with t_i = ignore: nothing)
//! ∂L/∂x_i = (softmax(x_i Wᵀ + b) − onehot(t_i)) W
//! ```
//!
//! The rows are cut into chunks of [`CHUNK_ELEMENTS`] logits (at least [`MIN_CHUNK_ROWS`]
//! rows). While the graph is being recorded, each chunk's `∂L/∂x` is computed in the forward pass, right after its logits, and
//! the logits are freed before the next chunk: what is kept for backward is `∂L/∂x` itself
//! (`[n, d]`, 1/85 of the logits for SmolLM2), and backward only scales it by the incoming
//! gradient (a scalar, since `L` is one). The work is that of the plain composition (one
//! product for the logits, one for `∂L/∂x`), moved from backward to forward, on the rows with a
//! target only: prompt and padding rows are dropped before the head.
//!
//! This holds because the head is frozen: nothing but `x` takes a gradient. A trainable head,
//! or one with a method attached, takes the plain composition
//! `head.forward(x).cross_entropy(t, Sum)` (its own tested path).

use super::{adapters_enabled, Linear};
use crate::autograd::{enable_grad, is_grad_enabled, with_no_grad};
use crate::error::{Error, Result};
use crate::tensor::{CrossEntropyReduction, Tensor};

/// The logits one chunk holds (16 MiB in f32): SmolLM2's 49,152-way head takes 85 rows at a
/// time. With a checkpointed LoRA step (4 × 128) over an NF4 base this is the difference
/// between 358 MB and 217 MB of peak memory (64 MiB chunks against 16), at the same step time.
pub const CHUNK_ELEMENTS: usize = 1 << 22;

/// The fewest rows a chunk takes, whatever the vocabulary: each chunk reads the whole head
/// (decoding it, when quantised) twice, so a 256k-way head still multiplies 64 rows at a time.
pub const MIN_CHUNK_ROWS: usize = 64;

/// `Σ_i −log softmax(head(x_i))[t_i]` over the rows of `x: [.., d]` whose target `t: [..]` is
/// not `ignore_index`: the same value as `head.forward(x)?.cross_entropy(t, ignore_index,
/// Sum)` (up to the order of the sum), in chunks of rows (see the module documentation).
pub fn linear_cross_entropy_sum(head: &Linear, x: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let rows = (CHUNK_ELEMENTS / head.out_features().max(1)).max(MIN_CHUNK_ROWS);
    linear_cross_entropy_sum_chunked(head, x, targets, ignore_index, rows)
}

/// [`linear_cross_entropy_sum`] in chunks of `chunk_rows` rows (tests use small chunks to
/// cover the seams).
pub fn linear_cross_entropy_sum_chunked(
    head: &Linear,
    x: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    chunk_rows: usize,
) -> Result<Tensor> {
    let d = head.in_features();
    if x.rank() == 0 || x.shape()[x.rank() - 1] != d || x.shape()[..x.rank() - 1] != *targets.shape() {
        return Err(Error::Shape {
            op: "linear_cross_entropy",
            msg: format!(
                "{}: hidden states {:?} need targets {:?} and width {d}",
                head.name,
                x.shape(),
                &x.shape()[..x.rank().saturating_sub(1)]
            ),
        });
    }
    let frozen = is_frozen(head);
    let t_host = targets.to_vec_f64()?;
    let wanted: Vec<u32> = (0..t_host.len() as u32).filter(|&i| t_host[i as usize] as i64 != ignore_index).collect();
    if !frozen || wanted.is_empty() {
        // A trainable head, or nothing to score: the plain composition (which also gives a
        // zero with its graph when every target is ignored).
        return head.forward(x)?.cross_entropy(targets, ignore_index, CrossEntropyReduction::Sum);
    }
    let n = targets.numel();
    let x2 = x.reshape(&[n as isize, d as isize])?;
    let ts: Vec<i32> = wanted.iter().map(|&i| t_host[i as usize] as i32).collect();
    let ts = Tensor::from_vec(ts, &[wanted.len()], x.device())?;
    let xs = if wanted.len() == n {
        x2
    } else {
        // The gather is recorded, so `∂L/∂x` reaches `x` as zeros on the dropped rows.
        x2.index_select(0, &Tensor::from_vec(wanted.clone(), &[wanted.len()], x.device())?)?
    };
    let m = wanted.len();
    let rows = chunk_rows.max(1);
    let record = is_grad_enabled() && xs.requires_grad_flag();
    let mut total: Option<Tensor> = None;
    let mut grads = Vec::new();
    for start in (0..m).step_by(rows) {
        let len = rows.min(m - start);
        let (xc, tc) = (xs.narrow(0, start, len)?.detach(), ts.narrow(0, start, len)?.detach());
        let loss = if record {
            let _on = enable_grad();
            let leaf = xc.requires_grad()?;
            let loss = head.forward_base(&leaf)?.cross_entropy(&tc, ignore_index, CrossEntropyReduction::Sum)?;
            loss.backward()?;
            grads.push(leaf.grad().ok_or_else(|| Error::Backward(format!("{}: no gradient reached the hidden states", head.name)))?);
            loss.detach()
        } else {
            with_no_grad(|| head.forward_base(&xc)?.cross_entropy(&tc, ignore_index, CrossEntropyReduction::Sum))?
        };
        total = Some(match total {
            None => loss,
            Some(t) => with_no_grad(|| t.add(&loss))?,
        });
    }
    let total = total.expect("at least one row is scored");
    if !record {
        return Ok(total);
    }
    let dx = if grads.len() == 1 { grads.pop().expect("one chunk") } else { Tensor::concat(&grads.iter().collect::<Vec<_>>(), 0)? };
    Ok(Tensor::from_op_shared(total.storage_arc(), &[], "linear_cross_entropy", &[&xs], move |g| {
        Ok(vec![Some(dx.mul(&g.reshape(&[1, 1])?)?)])
    }))
}

/// Whether nothing of `head` takes a gradient: its weight and bias are not trainable, and no
/// method attached to it runs. Only then may `∂L/∂x` be formed in the forward pass.
fn is_frozen(head: &Linear) -> bool {
    !head.weight.requires_grad_flag()
        && head.bias.as_ref().is_none_or(|b| !b.requires_grad_flag())
        && (head.adapters.is_empty() || !adapters_enabled())
}

/// Per row of `x: [rows, T, d]`: `Σ_t −log softmax(head(x_{r,t}))[t_{r,t}]` over the positions
/// whose target is not `ignore_index`, as a `[rows]` tensor (0 for a row with no target): the
/// negated log-likelihood of each sequence's completion, what a preference objective (DPO)
/// compares. The same chunks as [`linear_cross_entropy_sum`]; backward scales each scored
/// position's kept `∂L/∂x` by its row's incoming gradient. A trainable head (or one with a
/// method attached) takes the plain composition `head.forward(x).cross_entropy(t, None).sum(1)`.
pub fn linear_cross_entropy_rows(head: &Linear, x: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let rows = (CHUNK_ELEMENTS / head.out_features().max(1)).max(MIN_CHUNK_ROWS);
    linear_cross_entropy_rows_chunked(head, x, targets, ignore_index, rows)
}

/// [`linear_cross_entropy_rows`] in chunks of `chunk_rows` scored positions.
pub fn linear_cross_entropy_rows_chunked(
    head: &Linear,
    x: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    chunk_rows: usize,
) -> Result<Tensor> {
    let d = head.in_features();
    if x.rank() != 3 || x.shape()[2] != d || x.shape()[..2] != *targets.shape() {
        return Err(Error::Shape {
            op: "linear_cross_entropy_rows",
            msg: format!(
                "{}: hidden states {:?} must be [rows, T, {d}] with targets [rows, T], got targets {:?}",
                head.name,
                x.shape(),
                targets.shape()
            ),
        });
    }
    let (b, t) = (x.shape()[0], x.shape()[1]);
    let frozen = is_frozen(head);
    if !frozen {
        return head.forward(x)?.cross_entropy(targets, ignore_index, CrossEntropyReduction::None)?.sum(&[1], false);
    }
    let t_host = targets.to_vec_f64()?;
    let wanted: Vec<u32> = (0..t_host.len() as u32).filter(|&i| t_host[i as usize] as i64 != ignore_index).collect();
    let device = x.device();
    if wanted.is_empty() {
        return Tensor::zeros(&[b], crate::DType::F32, device);
    }
    let m = wanted.len();
    let x2 = x.reshape(&[(b * t) as isize, d as isize])?;
    let ts = Tensor::from_vec(wanted.iter().map(|&i| t_host[i as usize] as i32).collect::<Vec<_>>(), &[m], device)?;
    let xs = x2.index_select(0, &Tensor::from_vec(wanted.clone(), &[m], device)?)?;
    let record = is_grad_enabled() && xs.requires_grad_flag();
    let (mut per_position, mut grads) = (Vec::with_capacity(m), Vec::new());
    for start in (0..m).step_by(chunk_rows.max(1)) {
        let len = chunk_rows.max(1).min(m - start);
        let (xc, tc) = (xs.narrow(0, start, len)?.detach(), ts.narrow(0, start, len)?.detach());
        let losses = if record {
            let _on = enable_grad();
            let leaf = xc.requires_grad()?;
            let losses = head.forward_base(&leaf)?.cross_entropy(&tc, ignore_index, CrossEntropyReduction::None)?;
            // Each position's loss depends on its own row of x only: the gradient of their
            // sum is every position's own ∂L/∂x.
            losses.sum_all()?.backward()?;
            grads.push(leaf.grad().ok_or_else(|| Error::Backward(format!("{}: no gradient reached the hidden states", head.name)))?);
            losses.detach()
        } else {
            with_no_grad(|| head.forward_base(&xc)?.cross_entropy(&tc, ignore_index, CrossEntropyReduction::None))?
        };
        per_position.extend(losses.to_vec_f64()?);
    }
    let mut sums = vec![0f64; b];
    for (&i, l) in wanted.iter().zip(&per_position) {
        sums[i as usize / t] += l;
    }
    let total = Tensor::from_vec(sums.iter().map(|&s| s as f32).collect::<Vec<_>>(), &[b], device)?;
    if !record {
        return Ok(total);
    }
    let dx = if grads.len() == 1 { grads.pop().expect("one chunk") } else { Tensor::concat(&grads.iter().collect::<Vec<_>>(), 0)? };
    // The row of each scored position, to spread the rows' gradients over their positions.
    let row_of = Tensor::from_vec(wanted.iter().map(|&i| i / t as u32).collect::<Vec<_>>(), &[m], device)?;
    Ok(Tensor::from_op_shared(total.storage_arc(), &[b], "linear_cross_entropy_rows", &[&xs], move |g| {
        let per = g.index_select(0, &row_of)?.reshape(&[m as isize, 1])?;
        Ok(vec![Some(dx.mul(&per)?)])
    }))
}
