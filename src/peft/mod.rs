//! Fine-tuning methods that attach to a model's sites.
