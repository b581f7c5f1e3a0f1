//! Training: data, the trainer loop, checkpoints and metrics.

pub mod data;
pub mod objective;
pub mod plot;
pub mod trainer;

pub use objective::{class_probabilities, label_scores, BatchLoss, Classification, LanguageModelling, Objective};
pub use trainer::{
    attach, evaluate, train, Attached, EvalRecord, Observer, OptimizerKind, Quiet, StepRecord, TrainConfig, TrainReport, Trainer,
};
