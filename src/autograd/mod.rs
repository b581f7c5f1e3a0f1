//! Reverse-mode automatic differentiation.
//!
//! Every op that takes an input requiring a gradient records a [`Node`]: its inputs and a
//! closure that maps the output's gradient to the inputs' gradients. The closures are written
//! with tensor ops, so backward runs on whatever device the tensors live on. `backward()` sorts
//! the graph topologically, walks it from the output to the leaves, and adds each leaf's
//! gradient into its `grad` (so gradients accumulate across calls until `zero_grad`).
//! Backward itself runs under `no_grad`: no graph is built for the gradients (no double
//! backward), which keeps memory at one graph.

use std::cell::Cell;
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

mod checkpoint;
pub use checkpoint::{checkpoint, CheckpointFn};

/// Maps the output gradient to one optional gradient per input.
pub type BackwardFn = Box<dyn Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// How a tensor was computed.
pub struct Node {
    pub op: &'static str,
    pub inputs: Vec<Tensor>,
    pub backward: BackwardFn,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({}, {} inputs)", self.op, self.inputs.len())
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops record the graph on this thread.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Disables graph recording until dropped (restores the previous state).
pub struct NoGradGuard {
    prev: bool,
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.prev));
    }
}

/// Start a scope in which no graph is built: `let _g = no_grad();`.
pub fn no_grad() -> NoGradGuard {
    NoGradGuard { prev: GRAD_ENABLED.with(|g| g.replace(false)) }
}

/// Turn graph recording back on until dropped (restores the previous state); used where a
/// backward rule must build a graph, e.g. the recomputation of [`checkpoint`].
pub fn enable_grad() -> NoGradGuard {
    NoGradGuard { prev: GRAD_ENABLED.with(|g| g.replace(true)) }
}

/// Run `f` with graph recording off.
pub fn with_no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _g = no_grad();
    f()
}

/// Post-order of the graph under `root` (inputs before the tensors computed from them),
/// following only tensors that require a gradient. Iterative, so deep graphs do not overflow
/// the stack.
fn topo_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut visited = std::collections::HashSet::new();
    let mut stack: Vec<(Tensor, bool)> = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !visited.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(node) = t.node() {
            for i in node.inputs.iter().filter(|i| i.requires_grad_flag()) {
                if !visited.contains(&i.id()) {
                    stack.push((i.clone(), false));
                }
            }
        }
    }
    order
}

/// Back-propagate from the scalar `root`, accumulating into the leaves' gradients.
pub fn backward(root: &Tensor) -> Result<()> {
    if root.numel() != 1 {
        return Err(Error::Backward(format!("can only start from a scalar, got shape {:?}", root.shape())));
    }
    backward_with_grad(root, &root.ones_like()?)
}

/// Back-propagate from `root` given the gradient of some scalar with respect to it
/// (`grad`, the shape of `root`), accumulating into the leaves' gradients.
pub fn backward_with_grad(root: &Tensor, grad: &Tensor) -> Result<()> {
    if !root.requires_grad_flag() {
        return Err(Error::Backward("the tensor does not require a gradient (no input of its graph has requires_grad)".into()));
    }
    if grad.shape() != root.shape() {
        return Err(Error::Backward(format!("seed gradient {:?} does not match the tensor {:?}", grad.shape(), root.shape())));
    }
    let _g = no_grad();
    let order = topo_order(root);
    let mut grads: HashMap<u64, Tensor> = HashMap::new();
    grads.insert(root.id(), grad.detach());
    for t in order.iter().rev() {
        let Some(g) = grads.remove(&t.id()) else { continue };
        match t.node() {
            None => crate::profile::in_phase("backward:leaf", || t.accumulate_grad(&g))?,
            Some(node) => {
                let input_grads = crate::profile::in_phase(crate::profile::backward_phase(node.op), || (node.backward)(&g))?;
                for (input, ig) in node.inputs.iter().zip(input_grads) {
                    let Some(ig) = ig else { continue };
                    if !input.requires_grad_flag() {
                        continue;
                    }
                    if ig.shape() != input.shape() {
                        return Err(Error::Backward(format!(
                            "internal: {} produced a gradient of shape {:?} for an input of shape {:?}",
                            node.op,
                            ig.shape(),
                            input.shape()
                        )));
                    }
                    let acc = match grads.remove(&input.id()) {
                        Some(prev) => crate::profile::in_phase("backward:fan-in", || prev.add(&ig))?,
                        None => ig,
                    };
                    grads.insert(input.id(), acc);
                }
            }
        }
    }
    Ok(())
}
