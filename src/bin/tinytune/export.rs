//! `tinytune export`: a model (with an adapter merged in) as a GGUF file llama.cpp loads, or an
//! adapter alone as a GGUF LoRA adapter. Re-quantising prints what it cost: the held-out NLL
//! of the merged model in float against the file as written, read back.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use tinytune::io::{GgufFile, Tokenizer};
use tinytune::models::gguf_export::{self, TokenizerSource};
use tinytune::models::{self, CausalLm};
use tinytune::peft::format;
use tinytune::peft::lora::LoraAdapter;
use tinytune::quant::ggml::GgmlType;
use tinytune::quant::BaseDType;
use tinytune::{Device, Error, Result};

#[derive(Args)]
pub struct ExportArgs {
    /// Base model directory, .gguf file or Hugging Face id in the local cache (LLaMA family).
    #[arg(long, value_parser = tinytune::io::model_arg)]
    model: PathBuf,
    /// Adapter directory: merged into the model, or with --adapter-only written alone.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The .gguf file to write (written beside itself and renamed when complete).
    #[arg(long)]
    out: PathBuf,
    /// The matrices' type: f32, f16, bf16, q8_0, q5_0, q4_0, q4_k [default: f16; with
    /// --adapter-only f32]. Norms stay f32.
    #[arg(long = "type")]
    ty: Option<String>,
    /// Write the LoRA adapter alone, as a llama.cpp GGUF LoRA adapter (`llama-cli --lora`).
    #[arg(long, requires = "adapter")]
    adapter_only: bool,
    /// Write the adapter as a plain PEFT LoRA adapter directory at --out (LoRA-XS, LoRA-SB: `lora_A = A`,
    /// `lora_B = s·B R`), for PEFT, vLLM and other LoRA servers.
    #[arg(long, requires = "adapter", conflicts_with_all = ["adapter_only", "eval_data"])]
    peft_lora: bool,
    /// Held-out text (.jsonl of {"text"} lines, or a text file): print the mean NLL of the
    /// merged model in float and of the file as written, to see what quantising cost.
    #[arg(long, conflicts_with = "adapter_only")]
    eval_data: Option<PathBuf>,
    /// With --eval-data: the texts are cut into pieces of this many tokens.
    #[arg(long, default_value_t = 256)]
    eval_len: usize,
    /// `general.name` in the file [default: the output file's stem].
    #[arg(long)]
    name: Option<String>,
    /// Print a JSON summary on standard output.
    #[arg(long)]
    json: bool,
}

fn type_named(name: Option<&str>, table: &[(&str, GgmlType)], default: GgmlType, what: &str) -> Result<GgmlType> {
    let Some(name) = name else { return Ok(default) };
    let lower = name.to_ascii_lowercase();
    table.iter().find(|(n, _)| *n == lower).map(|&(_, t)| t).ok_or_else(|| Error::InvalidArgument {
        op: "export --type",
        msg: format!("'{name}' is not a type {what} is written in ({})", table.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")),
    })
}

/// The mean NLL of `model` over `texts`, cut into pieces of `len` tokens.
fn held_out_nll(model: &dyn CausalLm, tok: &Tokenizer, texts: &[String], len: usize, what: &str) -> Result<(f64, usize)> {
    let mut seqs = Vec::new();
    for t in texts {
        seqs.extend(tok.encode(t, true)?.chunks(len.max(2)).filter(|c| c.len() > 1).map(|c| c.to_vec()));
    }
    if seqs.is_empty() {
        return Err(Error::InvalidArgument {
            op: "export --eval-data",
            msg: "the held-out text has no piece of two tokens or more".into(),
        });
    }
    let mut task = super::progress::Task::new(format!("scoring {} sequences ({what})", seqs.len()), seqs.len());
    let r = models::sequence_nll_observed(model, &seqs, 4, &Device::Cpu, &mut |d, n| task.set(d, n))?;
    task.finish();
    Ok((r.mean_nll(), r.tokens))
}

pub fn export(a: ExportArgs) -> Result<()> {
    let mut inputs: Vec<(&str, &Path)> = vec![("--model", &a.model)];
    if let Some(ad) = &a.adapter {
        inputs.push(("--adapter", ad));
    }
    super::refuse_overwrite("export --out", &a.out, &inputs)?;
    if a.peft_lora {
        return export_peft_lora(&a);
    }
    if a.out.is_dir() {
        return Err(Error::InvalidArgument {
            op: "export --out",
            msg: format!("{} is a directory: give the .gguf file to write", a.out.display()),
        });
    }
    let name =
        a.name.clone().unwrap_or_else(|| a.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()));
    let mut m = super::load_model(&a.model, &Device::Cpu, BaseDType::Keep)?;

    if a.adapter_only {
        let adapter = a.adapter.as_ref().expect("clap requires --adapter");
        let ty = type_named(a.ty.as_deref(), gguf_export::ADAPTER_TYPES, GgmlType::F32, "a GGUF LoRA adapter")?;
        let loaded = format::load(adapter, m.as_mut(), &Device::Cpu)?;
        let lora = loaded.method_as::<LoraAdapter>().ok_or_else(|| Error::InvalidArgument {
            op: "export --adapter-only",
            msg: format!(
                "{} is not a LoRA adapter (it is '{}'): llama.cpp's GGUF adapters are LoRA only; export the merged model instead",
                adapter.display(),
                loaded.method.name()
            ),
        })?;
        let n = gguf_export::export_lora(m.as_mut(), lora, &name, ty, &a.out)?;
        let alpha = lora.config.scale() * lora.config.r as f64;
        if a.json {
            outln!("{}", json!({ "out": a.out, "kind": "lora", "matrices": n, "rank": lora.config.r, "alpha": alpha, "type": ty.name() }));
        } else {
            outln!(
                "wrote {}: a GGUF LoRA adapter, {n} adapted matrices, rank {}, adapter.lora.alpha {alpha} ({})",
                a.out.display(),
                lora.config.r,
                ty.name()
            );
            outln!("llama.cpp: llama-cli -m BASE.gguf --lora {}   (BASE: the base model as GGUF, e.g. tinytune export --model M --out BASE.gguf)", a.out.display());
        }
        return Ok(());
    }

    let ty = type_named(a.ty.as_deref(), gguf_export::MODEL_TYPES, GgmlType::F16, "a GGUF model")?;
    if let Some(adapter) = &a.adapter {
        let loaded = format::load(adapter, m.as_mut(), &Device::Cpu)?;
        let method = &loaded.method;
        super::progress::spin(&format!("merging {} adapter layers", method.num_sites()), false, || method.merge(m.as_mut())).map_err(
            |e| match e {
                Error::InvalidArgument { msg, .. } => Error::InvalidArgument { op: "export", msg: format!("{}: {msg}", adapter.display()) },
                e => e,
            },
        )?;
        if loaded.head.is_some() {
            note!("note: the adapter's classification head is not part of the exported language model; keep using --adapter for it");
        }
    }
    let gguf = if a.model.is_file() { Some(GgufFile::open(&a.model)?) } else { None };
    let tok = Tokenizer::for_model(&a.model)?;
    let source = match &gguf {
        Some(f) => TokenizerSource::Gguf(f),
        None => TokenizerSource::Meta(tok.to_gguf_tokenizer(m.vocab_size())?),
    };
    let what = format!("writing {} ({})", a.out.display(), ty.name());
    let report = super::progress::spin(&what, super::weight_bytes(&a.model) > 500_000_000, || {
        gguf_export::export_model(m.as_mut(), source, &name, ty, &a.out)
    })?;
    let mut counts: Vec<(String, usize)> = Vec::new();
    for (_, t) in &report.tensors {
        match counts.iter_mut().find(|(n, _)| n == t.name()) {
            Some(c) => c.1 += 1,
            None => counts.push((t.name().to_string(), 1)),
        }
    }
    let nll = match &a.eval_data {
        Some(path) => {
            let texts = super::read_texts(path)?;
            let (before, tokens) = held_out_nll(m.as_ref(), &tok, &texts, a.eval_len, "merged, in float")?;
            drop(m);
            let back = models::load(&a.out, &Device::Cpu)?;
            let (after, _) = held_out_nll(back.as_ref(), &tok, &texts, a.eval_len, "as written")?;
            Some((before, after, tokens))
        }
        None => None,
    };
    if a.json {
        let mut v = json!({
            "out": a.out, "kind": "model", "type": ty.name(), "bytes": report.bytes,
            "tensors": counts.iter().map(|(n, c)| (n.clone(), json!(c))).collect::<serde_json::Map<_, _>>(),
            "fallbacks": report.fallbacks.iter().map(|(n, t)| json!([n, t.name()])).collect::<Vec<_>>(),
            "kept": report.kept.len(),
        });
        if let Some((before, after, tokens)) = nll {
            v["nll"] = json!({ "float": before, "written": after, "change": after - before, "tokens": tokens });
        }
        outln!("{v}");
        return Ok(());
    }
    let counts = counts.iter().map(|(n, c)| format!("{c} {n}")).collect::<Vec<_>>().join(", ");
    outln!("wrote {} ({:.1} MB): {} tensors: {counts}", a.out.display(), report.bytes as f64 / 1e6, report.tensors.len());
    if !report.kept.is_empty() {
        outln!("  {} matrices kept in the blocks they were loaded in (not rounded twice)", report.kept.len());
    }
    if !report.fallbacks.is_empty() {
        let first = &report.fallbacks[0];
        outln!(
            "  {} matrices in another type: their rows are not a whole number of {} blocks (e.g. {} as {})",
            report.fallbacks.len(),
            ty.name(),
            first.0,
            first.1.name()
        );
    }
    match nll {
        Some((before, after, tokens)) => {
            outln!("held-out NLL ({tokens} tokens): {before:.6} merged in float, {after:.6} as written ({:+.6})", after - before)
        }
        None if ty != GgmlType::F32 => {
            note!("note: pass --eval-data FILE to see the held-out NLL change that writing {} causes", ty.name())
        }
        None => {}
    }
    Ok(())
}

/// `--peft-lora`: a LoRA-XS or LoRA-SB adapter rewritten as the plain PEFT LoRA adapter of the same update.
fn export_peft_lora(a: &ExportArgs) -> Result<()> {
    let adapter = a.adapter.as_ref().expect("clap requires --adapter");
    let mut m = super::load_model(&a.model, &Device::Cpu, BaseDType::Keep)?;
    let loaded = format::load(adapter, m.as_mut(), &Device::Cpu)?;
    let xs = loaded.method_as::<tinytune::peft::LoraXsAdapter>().ok_or_else(|| Error::InvalidArgument {
        op: "export --peft-lora",
        msg: format!(
            "{} is a '{}' adapter: --peft-lora rewrites LoRA-XS and LoRA-SB adapters (a LoRA adapter already is one)",
            adapter.display(),
            loaded.method.name()
        ),
    })?;
    let base = std::fs::read_to_string(adapter.join(format::CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["base_model_name_or_path"].as_str().map(str::to_string))
        .unwrap_or_else(|| a.model.display().to_string());
    xs.save_as_lora(&a.out, m.as_mut(), loaded.head.as_ref(), &base)?;
    if let Some(n) = loaded.seq_len {
        format::record(&a.out, "seq_len", json!(n))?;
    }
    if a.json {
        outln!("{}", json!({ "out": a.out, "kind": "peft-lora", "sites": xs.layers.len(), "rank": xs.config.r }));
    } else {
        outln!(
            "wrote {}: a PEFT LoRA adapter of {} sites, rank {} (lora_B = s·B R of the {} adapter)",
            a.out.display(),
            xs.layers.len(),
            xs.config.r,
            xs.variant.name()
        );
    }
    Ok(())
}
