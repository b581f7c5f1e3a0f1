//! Reading checkpoints: safetensors files (memory-mapped), sharded Hugging Face directories,
//! and `config.json`.

pub mod config;
pub mod safetensors;

pub use self::safetensors::{Checkpoint, SafetensorsFile};
