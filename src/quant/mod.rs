//! Quantised weight formats. Today: the GGML/GGUF tensor types tinytune reads
//! ([`ggml`]: F32, F16, BF16, Q8_0, Q4_0, Q4_1), dequantised to f32 at load. Keeping weights
//! quantised in memory (dequant-in-matmul kernels), NF4 and int8 come later.

pub mod ggml;

pub use ggml::GgmlType;
