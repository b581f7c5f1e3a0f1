//! Training: data, the trainer loop, checkpoints and metrics.

pub mod data;
