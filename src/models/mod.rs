//! Transformer language models loaded from Hugging Face checkpoints.

pub mod eval;
pub mod gemma3;
pub mod generate;
pub mod gguf_export;
pub mod gpt2;
pub mod llama;

pub use crate::nn::KvCache;
pub use eval::{sequence_nll, sequence_nll_observed, NllReport};
pub use generate::{generate, generate_samples, GenerateOptions, Sampling};

use std::path::Path;

use crate::backend::Device;
use crate::error::{Error, Result};
use crate::io::config::RawConfig;
use crate::io::{Checkpoint, GgufFile, GgufLlamaWeights};
use crate::nn::{Decoder, Hidden, Linear};
use crate::tensor::Tensor;

/// A causal language model: token ids in, next-token logits out.
///
/// A family provides its embeddings ([`CausalLm::embed`]), the shared [`Decoder`] and its
/// output layer; the forward is the same for all. Fine-tuning methods reach the model through
/// its named sites: [`CausalLm::linears_mut`] (every linear layer, by its Hugging Face module
/// path), the blocks' hooks ([`CausalLm::decoder_mut`]) and [`CausalLm::visit_parameters`]
/// (every weight tensor, by its checkpoint name).
pub trait CausalLm: Send + Sync {
    /// `ids: [batch, seq]` (U32) → logits `[batch, seq, vocab]`. `keep: [batch, seq]` marks
    /// real tokens (1) and padding (0), or `None` when every row is full.
    fn forward(&self, ids: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
        self.forward_cached(ids, keep, None)
    }
    /// Like `forward`, continuing from the keys and values in `cache` (positions start at
    /// `cache.len()`) and appending this step's to it. With a cache, `keep` covers the cached
    /// positions and the new ones: `[batch, cache.len() + seq]` (with prompt tuning the cache
    /// holds the virtual tokens too: the first forward adds them).
    fn forward_cached(&self, ids: &Tensor, keep: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.lm_head().forward(&self.hidden_states(ids, keep, cache)?)
    }
    /// The final hidden states `[batch, seq, hidden]` (after the last norm, before the LM
    /// head): what a classification head reads.
    fn hidden_states(&self, ids: &Tensor, keep: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        Ok(self.forward_hidden(ids, keep, cache, false)?.last)
    }
    /// The hidden states, with `all`: every layer's as well, as `transformers` returns them
    /// with `output_hidden_states=True` (the embedded input, the residual stream after each
    /// block but the last, the final normed states).
    fn forward_hidden(&self, ids: &Tensor, keep: Option<&Tensor>, cache: Option<&mut KvCache>, all: bool) -> Result<Hidden> {
        if ids.rank() != 2 {
            return Err(crate::Error::Shape {
                op: "forward",
                msg: format!("{}: ids must be [batch, seq], got {:?}", self.architecture(), ids.shape()),
            });
        }
        // The first position: after the cached ones and any a method puts first (a prefix).
        let cached = cache.as_ref().map_or(0, |c| c.len());
        let start = cached + self.decoder().positions_before();
        let prompt = if cached == 0 { self.decoder().virtual_tokens()? } else { None };
        let Some(prompt) = prompt else {
            return self.decoder().forward(self.embed(ids, start)?, keep, cache, all);
        };
        // Prompt tuning: virtual tokens first (never padding), then only the real tokens' states.
        let (b, t, p) = (ids.shape()[0], ids.shape()[1], prompt.shape()[0]);
        let tokens = self.embed_tokens(ids)?;
        let d = tokens.shape()[2];
        let prompt = prompt.to_dtype(tokens.dtype())?.unsqueeze(0)?.broadcast_to(&[b, p, d])?;
        let h = self.embed_positions(Tensor::concat(&[&prompt, &tokens], 1)?, start)?;
        let keep = match keep {
            Some(k) => Some(Tensor::concat(&[&Tensor::ones(&[b, p], k.dtype(), k.device())?, k], 1)?),
            None => None,
        };
        let mut out = self.decoder().forward(h, keep.as_ref(), cache, all)?;
        out.last_virtual = Some(out.last.narrow(1, p - 1, 1)?);
        out.last = out.last.narrow(1, p, t)?;
        for h in &mut out.all {
            *h = h.narrow(1, p, t)?;
        }
        Ok(out)
    }
    /// The embedded input `h₀: [batch, seq, hidden]` of `ids` whose first position is `start`:
    /// [`CausalLm::embed_tokens`] then [`CausalLm::embed_positions`].
    fn embed(&self, ids: &Tensor, start: usize) -> Result<Tensor> {
        self.embed_positions(self.embed_tokens(ids)?, start)
    }
    /// The token embeddings `[batch, seq, hidden]`.
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor>;
    /// Add what a family adds for positions `start..` (GPT-2's learned positions; LLaMA rotates
    /// inside the blocks instead) to embedded inputs `h: [batch, seq, hidden]`.
    fn embed_positions(&self, h: Tensor, start: usize) -> Result<Tensor>;
    /// The blocks and the final norm.
    fn decoder(&self) -> &Decoder;
    fn decoder_mut(&mut self) -> &mut Decoder;
    /// The output layer (`lm_head`; its weight is the embedding's when they are tied).
    fn lm_head(&self) -> &Linear;
    /// Every linear layer, named by its Hugging Face module path
    /// (`model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn`, `lm_head`).
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
    /// Call `f(name, tensor)` on every weight tensor, named as in a Hugging Face checkpoint
    /// (`model.layers.0.input_layernorm.weight`). `f` may replace the tensor (e.g. by a
    /// trainable leaf); a tied output layer follows its embedding and is not visited itself.
    fn visit_parameters(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()>;
    /// Recompute each transformer block in backward instead of keeping its activations.
    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.decoder_mut().checkpointing = on;
    }
    /// Number of transformer blocks (the size of a [`KvCache`]).
    fn num_layers(&self) -> usize {
        self.decoder().blocks.len()
    }
    fn vocab_size(&self) -> usize;
    /// Width of the hidden states.
    fn hidden_size(&self) -> usize;
    /// The most positions the model accepts, when its config says.
    fn max_positions(&self) -> Option<usize>;
    /// The `model_type` of its config.
    fn architecture(&self) -> &'static str;
    /// A Hugging Face `config.json` describing this model (for writing a merged checkpoint).
    fn config_json(&self) -> serde_json::Value;
    /// Refuse token ids the model has no embedding for, and more than `positions` tokens in
    /// all when that exceeds its context: an error naming `what` (the input), instead of an
    /// index error deep in the embedding or a silent run past the positions it was trained on.
    fn check_tokens(&self, what: &str, ids: &[u32], positions: usize) -> Result<()> {
        let v = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= v) {
            return Err(Error::InvalidArgument {
                op: "tokens",
                msg: format!("{what}: token id {bad} is not in the model's vocabulary (ids 0..{v})"),
            });
        }
        match self.max_positions() {
            Some(ctx) if positions > ctx => Err(Error::InvalidArgument {
                op: "tokens",
                msg: format!("{what}: {positions} positions exceed the model's context of {ctx} tokens"),
            }),
            _ => Ok(()),
        }
    }
}

/// Every weight tensor of `model` by checkpoint name (clones of the handles, sharing data).
pub fn parameters(model: &mut dyn CausalLm) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    model.visit_parameters(&mut |name, t| {
        out.push((name.to_string(), t.clone()));
        Ok(())
    })?;
    Ok(out)
}

/// `model.embed_tokens.weight`, the decoder's weights and the LM head, by checkpoint name, for
/// the families laid out that way (LLaMA, Gemma 3). A head tied to the embedding is not visited
/// again and stays tied to whatever `f` put in the embedding's place.
fn visit_embed_decoder_head(
    embed: &mut crate::nn::Embedding,
    decoder: &mut Decoder,
    lm_head: &mut Linear,
    f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
) -> Result<()> {
    let tied = lm_head.weight.id() == embed.weight.id();
    f("model.embed_tokens.weight", &mut embed.weight)?;
    decoder.visit_parameters(f)?;
    if tied {
        lm_head.weight = embed.weight.clone();
        Ok(())
    } else {
        lm_head.visit_parameters(f)
    }
}

/// The longest context a config may declare. Real models reach 10M tokens (Llama 4 Scout); a
/// larger value is a corrupt or hostile config, refused before anything is sized from it.
pub const MAX_CONTEXT: usize = 1 << 26;

/// The number of blocks a checkpoint's tensor names hold: one more than the largest index
/// after a `layers` / `h` / `blk` segment (`model.layers.29.mlp…`, `h.11.attn…`, `blk.5.…`).
fn layers_in(names: impl Iterator<Item = impl AsRef<str>>) -> Option<usize> {
    names
        .filter_map(|n| {
            let parts: Vec<&str> = n.as_ref().split('.').collect();
            parts.windows(2).find(|w| matches!(w[0], "layers" | "h" | "blk")).and_then(|w| w[1].parse::<usize>().ok())
        })
        .max()
        .map(|m| m + 1)
}

/// A config that declares fewer blocks than its checkpoint holds would silently drop the rest:
/// an error naming the key (more blocks than the checkpoint is the missing-tensor error).
fn check_layer_count(path: &Path, key: &str, declared: usize, stored: Option<usize>) -> Result<()> {
    match stored {
        Some(n) if n > declared => Err(crate::Error::Format {
            path: path.display().to_string(),
            msg: format!("{key} = {declared}, but the checkpoint holds {n} blocks: the config does not describe these weights"),
        }),
        _ => Ok(()),
    }
}

/// Load a model with its frozen weights as stored (`BaseDType::Keep`): a Hugging Face
/// directory (`config.json` + safetensors weights), or a GGUF file (a path ending in `.gguf`,
/// or any file starting with the GGUF magic).
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Box<dyn CausalLm>> {
    load_with(path, device, crate::quant::BaseDType::Keep)
}

/// [`load`] with a frozen-weight policy (`--base-dtype`): see [`apply_base_dtype`].
pub fn load_with(path: impl AsRef<Path>, device: &Device, base: crate::quant::BaseDType) -> Result<Box<dyn CausalLm>> {
    let mut model = load_stored(path.as_ref(), device)?;
    apply_base_dtype(model.as_mut(), base)?;
    Ok(model)
}

/// Put a model's frozen matrices in the type `base` asks for:
/// * `Auto` (the default of the CLI): `Keep` on the CPU; on a GPU whose adapter has
///   `SHADER_F16`, every f32 matrix becomes f16 (halving the bytes each product reads) and the
///   rest stays as stored;
/// * `Keep`: as loaded (GGUF blocks quantised, 16-bit checkpoints 16-bit);
/// * `F32`, `F16`, `BF16`: every matrix (linears, embeddings, the output layer) in that type,
///   quantised ones dequantised;
/// * `Nf4`, `Int8`: the linears of the blocks quantised (QLoRA); the embeddings and the output
///   layer stay as stored, as bitsandbytes leaves them.
///
/// Norms and biases are always f32. Quantising runs on the host; the result stays on the
/// model's device (the GPU's product kernels decode every format, `shaders/weights.wgsl`).
pub fn apply_base_dtype(model: &mut dyn CausalLm, base: crate::quant::BaseDType) -> Result<()> {
    use crate::quant::{BaseDType, QFormat};
    let target = match base {
        BaseDType::Auto => return auto_f16_on_gpu(model),
        BaseDType::Keep => return Ok(()),
        BaseDType::F32 => crate::DType::F32,
        BaseDType::F16 => crate::DType::F16,
        BaseDType::BF16 => crate::DType::BF16,
        BaseDType::Nf4 => crate::DType::Quant(QFormat::Nf4),
        BaseDType::Int8 => crate::DType::Quant(QFormat::Int8),
    };
    let blocks: std::collections::HashSet<String> =
        model.decoder_mut().linears_mut().iter().map(|l| format!("{}.weight", l.name)).collect();
    model.visit_parameters(&mut |name, t| {
        if t.rank() != 2 || t.dtype() == target {
            return Ok(());
        }
        *t = match target {
            crate::DType::Quant(f) if blocks.contains(name) => {
                t.quantize(f).map_err(|e| Error::InvalidArgument { op: "--base-dtype", msg: format!("{name}: {e}") })?
            }
            crate::DType::Quant(_) => return Ok(()),
            d => t.to_dtype(d)?,
        };
        Ok(())
    })
}

/// [`BaseDType::Auto`](crate::quant::BaseDType::Auto): the f32 matrices of a model on a GPU
/// with `SHADER_F16` become f16; anything else is left as loaded.
fn auto_f16_on_gpu(model: &mut dyn CausalLm) -> Result<()> {
    model.visit_parameters(&mut |_, t| {
        let f16 = matches!(t.device(), Device::Gpu(g) if g.features().contains(wgpu::Features::SHADER_F16));
        if f16 && t.rank() == 2 && t.dtype() == crate::DType::F32 {
            *t = t.to_dtype(crate::DType::F16)?;
        }
        Ok(())
    })
}

/// Bytes the model's weights take in memory (each buffer counted once), and how many of
/// them by dtype name.
pub fn weight_bytes(model: &mut dyn CausalLm) -> Result<(usize, Vec<(String, usize)>)> {
    let mut seen = std::collections::HashSet::new();
    let mut by: std::collections::BTreeMap<String, usize> = Default::default();
    let mut total = 0;
    model.visit_parameters(&mut |_, t| {
        if seen.insert(std::sync::Arc::as_ptr(&t.storage_arc()) as *const () as usize) {
            let b = t.storage_bytes();
            total += b;
            let name = match t.dtype() {
                crate::DType::Quant(f) => f.name().to_string(),
                d => format!("{d:?}").to_lowercase(),
            };
            *by.entry(name).or_default() += b;
        }
        Ok(())
    })?;
    Ok((total, by.into_iter().collect()))
}

fn load_stored(path: &Path, device: &Device) -> Result<Box<dyn CausalLm>> {
    if is_gguf(path) {
        return load_gguf(path, device);
    }
    let dir = path;
    let config_path = dir.join("config.json");
    let raw = RawConfig::read(&config_path)?;
    let weights = Checkpoint::open(dir)?;
    match raw.model_type()?.as_str() {
        "llama" | "LlamaForCausalLM" | "qwen2" | "Qwen2ForCausalLM" | "mistral" | "MistralForCausalLM" => {
            let cfg = llama::LlamaConfig::from_raw(&raw)?;
            check_layer_count(&config_path, "num_hidden_layers", cfg.num_hidden_layers, layers_in(weights.names().iter()))?;
            Ok(Box::new(llama::Llama::load(cfg, &weights, device)?))
        }
        "gpt2" | "GPT2LMHeadModel" => {
            let cfg = gpt2::Gpt2Config::from_raw(&raw)?;
            check_layer_count(&config_path, "n_layer", cfg.n_layer, layers_in(weights.names().iter()))?;
            Ok(Box::new(gpt2::Gpt2::load(cfg, &weights, device)?))
        }
        "gemma3_text" | "Gemma3ForCausalLM" => {
            let cfg = gemma3::Gemma3Config::from_raw(&raw)?;
            check_layer_count(&config_path, "num_hidden_layers", cfg.num_hidden_layers, layers_in(weights.names().iter()))?;
            Ok(Box::new(gemma3::Gemma3::load(cfg, &weights, device)?))
        }
        "gemma3" | "Gemma3ForConditionalGeneration" => Err(raw.error(
            "model_type 'gemma3' is the multimodal Gemma 3 (vision tower and language model): not supported; \
             the text-only checkpoints (model_type 'gemma3_text': 270M, 1B) are",
        )),
        other => Err(raw.error(format!(
            "unknown architecture '{other}' (tinytune runs llama-family (llama, mistral, qwen2), gemma3_text and gpt2 models)"
        ))),
    }
}

/// Whether `path` names a GGUF file: a `.gguf` extension, or a file that starts with "GGUF".
fn is_gguf(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return true;
    }
    let mut magic = [0u8; 4];
    path.is_file() && std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok() && &magic == b"GGUF"
}

/// Load a GGUF file (LLaMA or Gemma 3 architecture), its matrices as stored.
fn load_gguf(path: &Path, device: &Device) -> Result<Box<dyn CausalLm>> {
    let file = GgufFile::open(path)?;
    match file.architecture()? {
        "llama" => {
            let cfg = llama::LlamaConfig::from_gguf(&file)?;
            check_layer_count(path, "llama.block_count", cfg.num_hidden_layers, layers_in(file.tensors().iter().map(|t| t.name.as_str())))?;
            let weights = GgufLlamaWeights::new(&file, cfg.num_attention_heads, cfg.num_key_value_heads);
            Ok(Box::new(llama::Llama::load(cfg, &weights, device)?))
        }
        "gemma3" => {
            let cfg = gemma3::Gemma3Config::from_gguf(&file)?;
            check_layer_count(
                path,
                "gemma3.block_count",
                cfg.num_hidden_layers,
                layers_in(file.tensors().iter().map(|t| t.name.as_str())),
            )?;
            Ok(Box::new(gemma3::Gemma3::load(cfg, &GgufLlamaWeights::gemma3(&file), device)?))
        }
        other => Err(file.error(format!(
            "GGUF architecture '{other}' (general.architecture) is not supported (tinytune reads 'llama' and 'gemma3' GGUF files)"
        ))),
    }
}

/// Write `model` as a Hugging Face checkpoint directory: `model.safetensors` (f32, the
/// checkpoint's own names and layouts: GPT-2's Conv1D weights transposed back to `in×out`)
/// and `config.json`. Each file is written atomically. Adapters still attached are not
/// included: merge them first.
pub fn save_checkpoint(model: &mut dyn CausalLm, dir: &Path) -> Result<()> {
    save_checkpoint_as(model, dir, crate::DType::F32)
}

/// [`save_checkpoint`] with the weights stored as `dtype` (F32, F16 or BF16; `config.json`'s
/// `torch_dtype` says which).
pub fn save_checkpoint_as(model: &mut dyn CausalLm, dir: &Path, dtype: crate::DType) -> Result<()> {
    let torch_dtype = match dtype {
        crate::DType::F32 => "float32",
        crate::DType::F16 => "float16",
        crate::DType::BF16 => "bfloat16",
        other => {
            return Err(Error::InvalidArgument {
                op: "save checkpoint",
                msg: format!("weights are stored as f32, f16 or bf16, not {other:?}"),
            })
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::Io { path: dir.display().to_string(), msg: e.to_string() })?;
    if let Some(site) = model.linears_mut().iter().find(|l| !l.adapters.is_empty()) {
        return Err(crate::Error::InvalidArgument {
            op: "save checkpoint",
            msg: format!("{} still has an adapter attached: merge it (or remove it) before saving the model", site.name),
        });
    }
    if !model.decoder().inputs.is_empty() {
        return Err(crate::Error::InvalidArgument {
            op: "save checkpoint",
            msg: "the model has virtual tokens attached at its input (prompt tuning): remove them before saving the model".into(),
        });
    }
    if let Some(b) = model.decoder_mut().blocks.iter().find(|b| !b.hooks.is_empty()) {
        return Err(crate::Error::InvalidArgument {
            op: "save checkpoint",
            msg: format!("{} still has a method attached at its sites: merge it (or remove it) before saving the model", b.name),
        });
    }
    let gpt2 = model.architecture() == "gpt2";
    let mut tensors = Vec::new();
    model.visit_parameters(&mut |name, t| {
        let conv1d = gpt2 && t.rank() == 2 && [".c_attn.weight", ".c_proj.weight", ".c_fc.weight"].iter().any(|s| name.ends_with(s));
        let t = if conv1d { t.t()?.contiguous()? } else { t.clone() };
        tensors.push((name.to_string(), t.detach().to_dtype(dtype)?));
        Ok(())
    })?;
    crate::io::safetensors::save(dir.join("model.safetensors"), &tensors, Some([("format".to_string(), "pt".to_string())].into()))?;
    let mut config = model.config_json();
    if let Some(c) = config.as_object_mut() {
        c.insert("torch_dtype".into(), torch_dtype.into());
    }
    let config = serde_json::to_string_pretty(&config).unwrap_or_default();
    crate::io::write_atomic(&dir.join("config.json"), config.as_bytes())
}
