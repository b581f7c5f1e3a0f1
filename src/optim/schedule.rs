//! Learning-rate schedules with linear warm-up, as Hugging Face `transformers`'
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (`num_cycles = 0.5`).

use std::str::FromStr;

use crate::error::{Error, Result};

/// The shape of the learning rate after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Stays at the base rate.
    Constant,
    /// Falls linearly to 0 at `total_steps`.
    Linear,
    /// Half a cosine from the base rate to 0 at `total_steps`.
    Cosine,
}

impl ScheduleKind {
    /// The names [`ScheduleKind::from_name`] accepts.
    pub const NAMES: [&'static str; 3] = ["constant", "linear", "cosine"];

    /// `"constant"`, `"linear"` or `"cosine"` (case-insensitive); anything else is an error
    /// listing the valid names.
    pub fn from_name(name: &str) -> Result<ScheduleKind> {
        match name.trim().to_ascii_lowercase().as_str() {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(Error::InvalidArgument {
                op: "schedule",
                msg: format!("unknown schedule {name:?}; valid names: {}", ScheduleKind::NAMES.join(", ")),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        }
    }
}

impl FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<ScheduleKind> {
        ScheduleKind::from_name(s)
    }
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A learning-rate schedule: `lr(s) = base_lr · λ(s)` for optimizer step `s`, **counted from 0**
/// (the first call of `Optimizer::step` uses `λ(0)`, the next `λ(1)`, ...). This is the
/// convention of Hugging Face's `LambdaLR` schedules as the `Trainer` drives them (the
/// scheduler is stepped after each optimizer step), so with warm-up the first step has rate 0,
/// exactly as there. With `W = warmup_steps`, `T = total_steps`:
///
/// ```text
/// s < W:     λ(s) = s / max(1, W)                                  (all kinds)
/// s ≥ W:     constant  λ = 1
///            linear    λ = max(0, (T − s) / max(1, T − W))
///            cosine    λ = ½ (1 + cos(π p)),  p = min(1, (s − W) / max(1, T − W))
/// ```
///
/// One deliberate difference from Hugging Face: past `T` the cosine schedule stays at 0 (`p` is
/// clamped to 1), where the formula there would climb back up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// A schedule; the decaying kinds need `total_steps > 0` and `warmup_steps ≤ total_steps`
    /// (otherwise the rate would never reach the base rate or decay).
    pub fn new(kind: ScheduleKind, warmup_steps: u64, total_steps: u64) -> Result<Schedule> {
        if kind != ScheduleKind::Constant && (total_steps == 0 || warmup_steps > total_steps) {
            return Err(Error::InvalidArgument {
                op: "schedule",
                msg: format!(
                    "{kind} schedule needs 0 < total steps and warm-up <= total steps, got warm-up {warmup_steps}, total {total_steps}"
                ),
            });
        }
        Ok(Schedule { kind, warmup_steps, total_steps })
    }

    /// A constant rate with no warm-up.
    pub fn constant() -> Schedule {
        Schedule { kind: ScheduleKind::Constant, warmup_steps: 0, total_steps: 0 }
    }

    /// The multiplier `λ(step)` in `[0, 1]` (formulas on [`Schedule`]).
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = ((s - w) / (t - w).max(1.0)).min(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of optimizer step `step` (from 0): `base_lr · λ(step)`.
    pub fn lr_at(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.factor(step)
    }
}
