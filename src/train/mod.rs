//! Training: data, the trainer loop, checkpoints and metrics.

pub mod data;
pub mod grpo;
pub mod objective;
pub mod plot;
pub mod ppo;
pub mod preference;
pub mod select;
pub mod trainer;

pub use grpo::{GrpoConfig, RewardModel};
pub use objective::{
    class_probabilities, class_probabilities_observed, label_scores, BatchLoss, Classification, LanguageModelling, Objective,
};
pub use ppo::PpoConfig;
pub use preference::{DpoConfig, DpoLoss, PreferenceObjective};
pub use trainer::{
    attach, evaluate, evaluate_observed, init_from_data, train, Attached, EvalRecord, Observer, OptimizerKind, Quiet, StepRecord,
    TrainConfig, TrainReport, Trainer,
};
