//! Exports for serving engines: a LLaMA-family model as a GGUF file llama.cpp loads, and a
//! LoRA adapter alone as a GGUF LoRA adapter (llama.cpp's `--lora`), without merging.
//!
//! The model file follows llama.cpp's converter (`convert_hf_to_gguf.py`): the `llama.*`
//! hyper-parameters, the tokenizer as `tokenizer.ggml.*`, tensors under llama.cpp's names, and
//! the q/k projections' rows permuted as that converter permutes them (and as
//! [`crate::io::GgufLlamaWeights`] undoes on load). Norms stay f32; each matrix is written in
//! the type asked for, or, when its rows are not a whole number of that type's blocks, in the
//! next type that fits (Q4_K → Q5_0 → Q8_0 → F16, as llama.cpp's quantiser falls back). A
//! matrix still held in GGUF blocks (a GGUF base that a merge did not touch) keeps its blocks
//! when a block type is asked for: re-quantising it would round it a second time.
//!
//! The adapter file follows llama.cpp's `convert_lora_to_gguf.py`: `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, and per adapted matrix `<name>.lora_a`
//! (`[r, in]`) and `<name>.lora_b` (`[out, r]`, rows permuted for q/k, since `W = B·A`).
//! llama.cpp scales by `alpha / r`, so `adapter.lora.alpha` is written as `s·r` with `s` the
//! adapter's own scale (`α/r`, or `α/√r` with rsLoRA): the same update either way.

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::gguf::{llama_gguf_name, permute_order, reorder_rows, GgufFile, GgufTokenizer, GgufValue};
use crate::io::GgufWriter;
use crate::peft::lora::LoraAdapter;
use crate::quant::ggml::{self, GgmlType};
use crate::quant::QFormat;
use crate::tensor::Tensor;

use super::CausalLm;

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidArgument { op: "export", msg: msg.into() }
}

/// The types a model's matrices are written in (`--type`).
pub const MODEL_TYPES: &[(&str, GgmlType)] = &[
    ("f32", GgmlType::F32),
    ("f16", GgmlType::F16),
    ("bf16", GgmlType::BF16),
    ("q8_0", GgmlType::Q8_0),
    ("q5_0", GgmlType::Q5_0),
    ("q4_0", GgmlType::Q4_0),
    ("q4_k", GgmlType::Q4_K),
];

/// The type named `name` (`f16`, `q4_k`, ...; any case), or an error listing them.
pub fn parse_type(name: &str) -> Result<GgmlType> {
    let lower = name.to_ascii_lowercase();
    MODEL_TYPES
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|&(_, t)| t)
        .ok_or_else(|| bad(format!("--type '{name}' is not one of {}", MODEL_TYPES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))))
}

/// llama.cpp's `general.file_type` for a file whose matrices are mostly `ty`.
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q4_K => 14, // MOSTLY_Q4_K_S: every matrix Q4_K
        GgmlType::BF16 => 32,
        _ => 0,
    }
}

fn is_float(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// `ty`, or the first type after it that a row of `cols` values fills with whole blocks.
fn fitting_type(ty: GgmlType, cols: usize) -> GgmlType {
    let chain: &[GgmlType] = match ty {
        GgmlType::Q4_K => &[GgmlType::Q4_K, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::F16],
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[ty, GgmlType::F16],
        _ => &[ty],
    };
    chain.iter().copied().find(|t| cols % t.block_size() == 0).unwrap_or(GgmlType::F16)
}

/// Where the tokenizer of an exported model comes from.
pub enum TokenizerSource<'a> {
    /// Copy every `tokenizer.*` key of a GGUF base as it is.
    Gguf(&'a GgufFile),
    /// Write this one.
    Meta(GgufTokenizer),
}

/// What [`export_model`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelExport {
    /// Every tensor written: GGUF name and type.
    pub tensors: Vec<(String, GgmlType)>,
    /// Matrices written in another type than asked because their rows do not fill its blocks.
    pub fallbacks: Vec<(String, GgmlType)>,
    /// Matrices copied in the GGUF blocks they were loaded in.
    pub kept: Vec<(String, GgmlType)>,
    /// Bytes of the file.
    pub bytes: u64,
}

/// The heads whose rows llama.cpp's converter permutes, for a GGUF tensor name.
fn permuted_heads(gguf_name: &str, config: &serde_json::Value) -> Option<usize> {
    let n = |k: &str| config[k].as_u64().map(|v| v as usize);
    if gguf_name.contains(".attn_q.") {
        n("num_attention_heads")
    } else if gguf_name.contains(".attn_k.") {
        n("num_key_value_heads").or_else(|| n("num_attention_heads"))
    } else {
        None
    }
}

fn f32_data(t: &Tensor) -> Result<Vec<f32>> {
    t.detach().to_dtype(DType::F32)?.contiguous()?.to_vec::<f32>()
}

/// Write `model` (LLaMA family; merge any adapter first) to `path` as a GGUF file with its
/// matrices in `ty` (see the module docs for norms, fallbacks and blocks kept as loaded).
pub fn export_model(
    model: &mut dyn CausalLm,
    tokenizer: TokenizerSource<'_>,
    name: &str,
    ty: GgmlType,
    path: &Path,
) -> Result<ModelExport> {
    if model.architecture() != "llama" {
        return Err(bad(format!(
            "GGUF export writes LLaMA-family models (llama.cpp's 'llama' architecture); this model is '{}'",
            model.architecture()
        )));
    }
    if !MODEL_TYPES.iter().any(|&(_, t)| t == ty) {
        return Err(bad(format!("tinytune writes GGUF models as {}, not {}", ggml::WRITES, ty.name())));
    }
    if let Some(site) = model.linears_mut().iter().find(|l| !l.adapters.is_empty()) {
        return Err(bad(format!("{} still has an adapter attached: merge it before exporting the model", site.name)));
    }
    if !model.decoder().inputs.is_empty() || model.decoder_mut().blocks.iter().any(|b| !b.hooks.is_empty()) {
        return Err(bad("the model has a method attached that a merge cannot fold in (prefix or prompt tuning, adapters between layers)"));
    }
    let config = model.config_json();
    if config.get("intermediate_sizes").is_some() {
        return Err(bad("the model's blocks have different MLP widths (a compressed model): GGUF export writes one feed_forward_length"));
    }
    if config.get("attention_heads").is_some() {
        return Err(bad("the model's blocks have different attention heads (a compressed model): GGUF export writes one head_count"));
    }
    let c = |k: &str| config[k].as_u64().map(|v| v as usize).ok_or_else(|| bad(format!("the model's config has no '{k}'")));
    let (hidden, heads) = (c("hidden_size")?, c("num_attention_heads")?);
    let head_dim = config["head_dim"].as_u64().map_or(hidden / heads.max(1), |v| v as usize);
    let tied = config["tie_word_embeddings"].as_bool() == Some(true);

    let mut w = GgufWriter::new();
    w.set_str("general.architecture", "llama");
    w.set_str("general.type", "model");
    w.set_str("general.name", name);
    w.set("general.file_type", GgufValue::U32(file_type(ty)));
    if !is_float(ty) {
        w.set("general.quantization_version", GgufValue::U32(2));
    }
    w.set_u32("llama.block_count", c("num_hidden_layers")?)?;
    w.set_u32("llama.context_length", config["max_position_embeddings"].as_u64().map_or(2048, |v| v as usize))?;
    w.set_u32("llama.embedding_length", hidden)?;
    w.set_u32("llama.feed_forward_length", c("intermediate_size")?)?;
    w.set_u32("llama.attention.head_count", heads)?;
    w.set_u32("llama.attention.head_count_kv", c("num_key_value_heads")?)?;
    w.set("llama.rope.freq_base", GgufValue::F32(config["rope_theta"].as_f64().unwrap_or(10000.0) as f32));
    w.set("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(config["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32));
    w.set_u32("llama.rope.dimension_count", head_dim)?;
    w.set_u32("llama.attention.key_length", head_dim)?;
    w.set_u32("llama.attention.value_length", head_dim)?;
    w.set_u32("llama.vocab_size", c("vocab_size")?)?;
    match tokenizer {
        TokenizerSource::Gguf(f) => {
            for (k, v) in f.metadata().filter(|(k, _)| k.starts_with("tokenizer.")) {
                w.set(k, v.clone());
            }
        }
        TokenizerSource::Meta(t) => w.set_tokenizer(&t)?,
    }

    let mut params = Vec::new();
    model.visit_parameters(&mut |n, t| {
        params.push((n.to_string(), t.clone()));
        Ok(())
    })?;
    let mut report = ModelExport { tensors: Vec::new(), fallbacks: Vec::new(), kept: Vec::new(), bytes: 0 };
    for (hf, t) in params {
        if tied && hf == "lm_head.weight" {
            continue;
        }
        let g = llama_gguf_name(&hf).ok_or_else(|| bad(format!("'{hf}' has no llama.cpp tensor name")))?;
        let shape = t.shape().to_vec();
        let order = match permuted_heads(&g, &config) {
            Some(n) => {
                Some(permute_order(shape[0], n).ok_or_else(|| bad(format!("'{hf}': {} rows do not split into {n} heads", shape[0])))?)
            }
            None => None,
        };
        let stored = t.qmatrix().filter(|q| !is_float(ty) && matches!(q.format(), QFormat::Ggml(_)));
        if let (Some(q), 2) = (stored, shape.len()) {
            let QFormat::Ggml(qt) = q.format() else { unreachable!("filtered above") };
            report.kept.push((g.clone(), qt));
            report.tensors.push((g.clone(), qt));
            let name = g.clone();
            w.add_tensor(g, &shape, qt, move || {
                let q = match &order {
                    Some(o) => std::sync::Arc::new(q.permute_rows(o).map_err(|m| bad(format!("{name}: {m}")))?),
                    None => q,
                };
                Ok(q.data().to_vec())
            })?;
            continue;
        }
        let tty = if shape.len() == 2 { fitting_type(ty, shape[1]) } else { GgmlType::F32 };
        if shape.len() == 2 && tty != ty {
            report.fallbacks.push((g.clone(), tty));
        }
        report.tensors.push((g.clone(), tty));
        let cols = shape.last().copied().unwrap_or(1);
        let name = g.clone();
        w.add_tensor(g, &shape, tty, move || {
            let mut x = f32_data(&t)?;
            if let Some(o) = &order {
                x = reorder_rows(&x, cols, o);
            }
            ggml::quantize(tty, &x).map_err(|m| bad(format!("{name}: {m}")))
        })?;
    }
    report.bytes = w.write(path)?;
    Ok(report)
}

/// The adapter types `export --adapter-only --type` takes.
pub const ADAPTER_TYPES: &[(&str, GgmlType)] = &[("f32", GgmlType::F32), ("f16", GgmlType::F16), ("bf16", GgmlType::BF16)];

/// Write `lora` (attached to `model`, LLaMA family) to `path` as a llama.cpp GGUF LoRA adapter,
/// its matrices in `ty` (F32, F16 or BF16). Returns the number of adapted matrices.
pub fn export_lora(model: &mut dyn CausalLm, lora: &LoraAdapter, name: &str, ty: GgmlType, path: &Path) -> Result<usize> {
    if model.architecture() != "llama" {
        return Err(bad(format!("GGUF adapters are written for LLaMA-family models; this model is '{}'", model.architecture())));
    }
    if !ADAPTER_TYPES.iter().any(|&(_, t)| t == ty) {
        return Err(bad(format!("a GGUF LoRA adapter is written as f32, f16 or bf16, not {}", ty.name())));
    }
    if lora.config.dora || lora.layers.iter().any(|l| l.magnitude.is_some()) {
        return Err(bad(
            "a DoRA adapter has a magnitude per row that llama.cpp's LoRA adapters cannot hold: export the merged model instead (without --adapter-only)",
        ));
    }
    let config = model.config_json();
    let mut w = GgufWriter::new();
    w.set_str("general.architecture", "llama");
    w.set_str("general.type", "adapter");
    w.set_str("general.name", name);
    w.set_str("adapter.type", "lora");
    w.set("adapter.lora.alpha", GgufValue::F32((lora.config.scale() * lora.config.r as f64) as f32));
    for layer in &lora.layers {
        let hf = format!("{}.weight", layer.site);
        let g = llama_gguf_name(&hf).ok_or_else(|| bad(format!("'{}' has no llama.cpp tensor name", layer.site)))?;
        if (layer.scale - lora.layers[0].scale).abs() > 1e-12 * layer.scale.abs().max(1.0) {
            return Err(bad(format!("{}: scales differ between layers; llama.cpp's adapters have one alpha", layer.site)));
        }
        let (a, b) = (layer.a.detach(), layer.b.detach());
        let order = match permuted_heads(&g, &config) {
            Some(n) => Some(permute_order(b.shape()[0], n).ok_or_else(|| bad(format!("'{hf}': its rows do not split into {n} heads")))?),
            None => None,
        };
        let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
        w.add_tensor(format!("{g}.lora_a"), &sa, ty, move || ggml::quantize(ty, &f32_data(&a)?).map_err(bad))?;
        let rank = sb[1];
        w.add_tensor(format!("{g}.lora_b"), &sb, ty, move || {
            let mut x = f32_data(&b)?;
            if let Some(o) = &order {
                x = reorder_rows(&x, rank, o);
            }
            ggml::quantize(ty, &x).map_err(bad)
        })?;
    }
    w.write(path)?;
    Ok(lora.layers.len())
}
