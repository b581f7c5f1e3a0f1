//! Kernel families written as one unit each: a file here holds the family's CPU kernel (the
//! reference and the fast path), its GPU launcher and the tensor op with its autograd rule;
//! `shaders/<family>.wgsl` holds its WGSL. A family implements [`Family`]; [`run`] is the one
//! place that checks the operands share a device, picks the CPU or GPU code and records the
//! launch in the profile. A new family is two files and a `mod` line below.
//!
//! The older families (matmul, norms, attention, …) still go through
//! [`crate::backend::Storage`]'s methods, with CPU kernels in `backend/cpu` and launchers in
//! `backend/gpu`; they move here as they are touched.
//!
//! Families: [`glu`] (the gated activations `act(g) ⊙ u` of SwiGLU/GeGLU MLPs, forward and
//! backward in one pass each).

pub mod glu;

use crate::backend::{CpuStorage, GpuStorage, Storage};
use crate::error::{Error, Result};
use crate::layout::Layout;

/// One kernel family: what it computes on each device. Inputs arrive as (buffer, layout)
/// pairs, all on one device (checked by [`run`]); outputs are fresh contiguous buffers.
pub(crate) trait Family {
    /// The kernel's name in profiles (`tinytune bench --profile`, `TINYTUNE_PROFILE=1`).
    fn name(&self) -> &'static str;
    /// Floating-point operations of one launch on inputs of these layouts (for the profile's
    /// GFLOP/s); 0 for memory-bound kernels.
    fn flops(&self, _inputs: &[&Layout]) -> f64 {
        0.0
    }
    /// The CPU kernel.
    fn cpu(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<Vec<CpuStorage>>;
    /// The GPU launcher.
    fn gpu(&self, inputs: &[(&GpuStorage, &Layout)]) -> Result<Vec<GpuStorage>>;
}

/// Run `family` on `inputs`: the single dispatch point of the families in this module.
pub(crate) fn run(family: &dyn Family, inputs: &[(&Storage, &Layout)]) -> Result<Vec<Storage>> {
    let name = family.name();
    let Some(&(first, _)) = inputs.first() else {
        return Err(Error::InvalidArgument { op: name, msg: "no inputs".into() });
    };
    let mismatch = |s: &Storage| Error::DeviceMismatch { op: name, lhs: first.device().to_string(), rhs: s.device().to_string() };
    let layouts: Vec<&Layout> = inputs.iter().map(|(_, l)| *l).collect();
    let span = crate::profile::span(name, family.flops(&layouts));
    let out = match first {
        Storage::Cpu(_) => {
            let ins = inputs
                .iter()
                .map(|&(s, l)| match s {
                    Storage::Cpu(c) => Ok((c, l)),
                    other => Err(mismatch(other)),
                })
                .collect::<Result<Vec<_>>>()?;
            family.cpu(&ins).map(|v| v.into_iter().map(Storage::Cpu).collect::<Vec<_>>())
        }
        Storage::Gpu(g0) => {
            let ins = inputs
                .iter()
                .map(|&(s, l)| match s {
                    Storage::Gpu(g) if g.device() == g0.device() => Ok((g, l)),
                    other => Err(mismatch(other)),
                })
                .collect::<Result<Vec<_>>>()?;
            family.gpu(&ins).map(|v| v.into_iter().map(Storage::Gpu).collect::<Vec<_>>())
        }
    };
    span.done(out.as_ref().map_or(0, |v| v.iter().map(|s| s.len() * s.dtype().size_in_bytes()).sum()));
    out
}
