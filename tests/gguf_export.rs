//! GGUF exports: a merged model written in each type tinytune writes and read back, and a LoRA
//! adapter written in llama.cpp's adapter layout, checked in GGUF space: the base as written
//! plus `alpha/r · B·A` from the adapter file must equal the merged model as written, which is
//! what llama.cpp computes with `--lora`.
//!
//! The model is the tiny Llama fixture with PEFT's rsLoRA adapter on every linear of block 0
//! (q and k included, whose rows llama.cpp permutes) and a small byte-level tokenizer made here.

use std::path::{Path, PathBuf};

mod common;

use tinytune::io::gguf::unpermute_rows;
use tinytune::io::{GgufFile, GgufValue, Tokenizer};
use tinytune::models::gguf_export::{self, TokenizerSource};
use tinytune::models::{self, CausalLm};
use tinytune::peft::format;
use tinytune::peft::lora::LoraAdapter;
use tinytune::quant::ggml::GgmlType;
use tinytune::{Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tinytune-gguf-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A byte-level BPE `tokenizer.json` of exactly 96 tokens (the fixture's vocabulary): the
/// printable ASCII characters but `~`, `Ġ` (space), the merge `h e`, and `<|endoftext|>`.
fn tiny_bpe_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, c) in ('!'..='}').enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    vocab.insert("Ġ".into(), 93.into());
    vocab.insert("he".into(), 94.into());
    vocab.insert("<|endoftext|>".into(), 95.into());
    serde_json::json!({
        "version": "1.0",
        "added_tokens": [{"id": 95, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": ["h e"]}
    })
    .to_string()
}

/// The tiny Llama fixture with that tokenizer, as a model directory.
fn model_dir(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), m.join(f)).unwrap();
    }
    std::fs::write(m.join("tokenizer.json"), tiny_bpe_json()).unwrap();
    std::fs::write(m.join("tokenizer_config.json"), r#"{"eos_token": "<|endoftext|>"}"#).unwrap();
    m
}

fn logits(m: &dyn CausalLm) -> Vec<f32> {
    let ids = Tensor::from_vec(vec![3u32, 17, 94, 5, 60, 2, 93, 41, 88, 12], &[2, 5], &Device::Cpu).unwrap();
    m.forward(&ids, None).unwrap().to_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn export(m: &mut dyn CausalLm, dir: &Path, ty: GgmlType, out: &Path) -> gguf_export::ModelExport {
    let tok = Tokenizer::for_model(dir).unwrap().to_gguf_tokenizer(m.vocab_size()).unwrap();
    gguf_export::export_model(m, TokenizerSource::Meta(tok), "tiny", ty, out).unwrap()
}

#[test]
fn merged_models_read_back_in_every_written_type() {
    let dir = temp_dir("model");
    let mdir = model_dir(&dir);
    let mut m = models::load(&mdir, &Device::Cpu).unwrap();
    let loaded = format::load(&fixture("peft/llama-rslora-all"), m.as_mut(), &Device::Cpu).unwrap();
    let before_merge = logits(m.as_ref());
    loaded.method.merge(m.as_mut()).unwrap();
    let want = logits(m.as_ref());
    assert!(max_diff(&before_merge, &want) < 1e-4, "merging keeps the outputs");
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));

    // (type, what the matrices are written in, bound on the logits' change relative to their
    // largest: the fixture's random weights (std 0.25) make a chaotic model, so 4-bit moves
    // its logits a lot; the order of the types is checked below.)
    let cases = [
        (GgmlType::F32, GgmlType::F32, 1e-5),
        (GgmlType::F16, GgmlType::F16, 5e-3),
        (GgmlType::BF16, GgmlType::BF16, 3e-2),
        (GgmlType::Q8_0, GgmlType::Q8_0, 0.1),
        (GgmlType::Q5_0, GgmlType::Q5_0, 0.5),
        (GgmlType::Q4_0, GgmlType::Q4_0, 1.0),
        // Rows of 32 and 64 values are no whole Q4_K super-block of 256: Q5_0, as llama.cpp.
        (GgmlType::Q4_K, GgmlType::Q5_0, 0.5),
    ];
    let mut errs = Vec::new();
    for (ty, matrices, bound) in cases {
        let out = dir.join(format!("tiny.{}.gguf", ty.name()));
        let report = export(m.as_mut(), &mdir, ty, &out);
        assert_eq!(report.bytes, std::fs::metadata(&out).unwrap().len());
        assert_eq!(report.fallbacks.is_empty(), ty == matrices, "{ty}");
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(f.get("general.architecture").and_then(|v| v.as_str()), Some("llama"));
        assert_eq!(f.usize("llama.block_count").unwrap(), 2);
        assert_eq!(f.usize("llama.attention.head_count_kv").unwrap(), 2);
        assert_eq!(f.usize("llama.rope.dimension_count").unwrap(), 8);
        assert!((f.opt_f64("llama.rope.freq_base").unwrap().unwrap() - 50000.0).abs() < 1e-3);
        assert_eq!(f.get("general.quantization_version").is_some(), !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16));
        // 2 blocks × (2 norms + 7 matrices) + embeddings + final norm + output = 21 tensors.
        assert_eq!(f.tensors().len(), 21);
        for t in f.tensors() {
            let want_ty = if t.ne.len() == 1 { GgmlType::F32 } else { matrices };
            assert_eq!(t.ty, want_ty, "{}", t.name);
        }
        assert_eq!(f.tensor_info("blk.1.attn_q.weight").unwrap().ne, vec![32, 32]);
        assert_eq!(f.tensor_info("blk.0.ffn_down.weight").unwrap().ne, vec![64, 32]);

        let back = models::load(&out, &Device::Cpu).unwrap();
        let got = logits(back.as_ref());
        let err = max_diff(&got, &want) / scale;
        errs.push((ty, err));
        assert!(err < bound as f32, "{ty}: logits moved by {err} of their scale (bound {bound})");
    }
    // The finer the type, the closer: f32 < f16 < Q8_0 < Q5_0 < Q4_0.
    let e = |t: GgmlType| errs.iter().find(|(x, _)| *x == t).unwrap().1;
    assert!(e(GgmlType::F32) < e(GgmlType::F16) && e(GgmlType::F16) < e(GgmlType::Q8_0));
    assert!(e(GgmlType::Q8_0) < e(GgmlType::Q5_0) && e(GgmlType::Q5_0) < e(GgmlType::Q4_0), "{errs:?}");

    // The tokenizer reads back the same: ids, special tokens, padding to the vocabulary.
    let f = GgufFile::open(dir.join("tiny.F32.gguf")).unwrap();
    let t = f.tokenizer().unwrap();
    assert_eq!((t.model.as_str(), t.pre.as_deref(), t.tokens.len()), ("gpt2", Some("gpt-2"), 96));
    assert_eq!((t.eos_id, t.token_types.as_ref().unwrap()[95]), (Some(95), 3));
    let (a, b) = (Tokenizer::for_model(&mdir).unwrap(), Tokenizer::from_gguf_file(&f).unwrap());
    let text = "he said: hello there!<|endoftext|>";
    assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
    assert_eq!(a.encode(text, true).unwrap().iter().filter(|&&i| i == 94).count(), 3, "the merge 'h e' is applied");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A GGUF tensor as f32 in its PyTorch shape, with q/k rows as written (llama.cpp's order).
fn gguf_f32(f: &GgufFile, name: &str) -> (Vec<f32>, Vec<usize>) {
    (f.dequantize(name).unwrap(), f.tensor_info(name).unwrap().shape())
}

#[test]
fn lora_adapter_in_llama_cpp_layout_adds_up_to_the_merged_model() {
    let dir = temp_dir("lora");
    let mdir = model_dir(&dir);
    let mut m = models::load(&mdir, &Device::Cpu).unwrap();
    let base = dir.join("base.gguf");
    export(m.as_mut(), &mdir, GgmlType::F32, &base);
    let loaded = format::load(&fixture("peft/llama-rslora-all"), m.as_mut(), &Device::Cpu).unwrap();
    let lora = loaded.method_as::<LoraAdapter>().unwrap();
    let adapter = dir.join("adapter.gguf");
    assert_eq!(gguf_export::export_lora(m.as_mut(), lora, "tiny-lora", GgmlType::F32, &adapter).unwrap(), 7);
    let (r, s) = (lora.config.r, lora.config.scale());
    assert!(lora.config.rslora, "the fixture is rsLoRA: its scale is alpha/sqrt(r)");
    loaded.method.merge(m.as_mut()).unwrap();
    let merged = dir.join("merged.gguf");
    export(m.as_mut(), &mdir, GgmlType::F32, &merged);

    let a = GgufFile::open(&adapter).unwrap();
    let meta = |k: &str| a.get(k).cloned();
    assert_eq!(meta("general.type"), Some(GgufValue::String("adapter".into())));
    assert_eq!(meta("adapter.type"), Some(GgufValue::String("lora".into())));
    assert_eq!(meta("general.architecture"), Some(GgufValue::String("llama".into())));
    let alpha = a.opt_f64("adapter.lora.alpha").unwrap().unwrap();
    assert!((alpha / r as f64 - s).abs() < 1e-6, "llama.cpp's alpha/r is the adapter's scale");
    assert_eq!(a.tensors().len(), 14, "lora_a and lora_b of the 7 linears of block 0");

    let (fb, fm) = (GgufFile::open(&base).unwrap(), GgufFile::open(&merged).unwrap());
    for layer in 0..2 {
        for g in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
            let w = format!("blk.{layer}.{g}.weight");
            let (w0, sw) = gguf_f32(&fb, &w);
            let (wm, _) = gguf_f32(&fm, &w);
            if layer == 1 {
                assert!(!a.contains(&format!("{w}.lora_a")) && w0 == wm, "{w} is not adapted");
                continue;
            }
            let (la, sa) = gguf_f32(&a, &format!("{w}.lora_a"));
            let (lb, sb) = gguf_f32(&a, &format!("{w}.lora_b"));
            // llama.cpp's shape checks: lora_a ne = [in, r], lora_b ne = [r, out].
            assert_eq!((sa[0], sa[1], sb[0], sb[1]), (r, sw[1], sw[0], r), "{w}");
            let (rows, cols) = (sw[0], sw[1]);
            let mut worst = 0f32;
            for i in 0..rows {
                for j in 0..cols {
                    let d: f32 = (0..r).map(|k| lb[i * r + k] * la[k * cols + j]).sum();
                    worst = worst.max((w0[i * cols + j] + (alpha / r as f64) as f32 * d - wm[i * cols + j]).abs());
                }
            }
            assert!(worst < 1e-5, "{w}: base + alpha/r·B·A differs from the merged weight by {worst}");
        }
    }
    // Undoing llama.cpp's permutation of B's rows gives the adapter's own B back.
    let (lb, sb) = gguf_f32(&a, "blk.0.attn_k.weight.lora_b");
    let ours = lora.layers.iter().find(|l| l.site == "model.layers.0.self_attn.k_proj").unwrap().b.to_vec::<f32>().unwrap();
    assert_eq!(unpermute_rows(&lb, sb[0], sb[1], 2).unwrap(), ours);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn what_cannot_be_exported_is_refused_with_the_reason() {
    let dir = temp_dir("refused");
    let mdir = model_dir(&dir);
    let mut m = models::load(&mdir, &Device::Cpu).unwrap();
    let loaded = format::load(&fixture("peft/llama-dora"), m.as_mut(), &Device::Cpu).unwrap();
    let dora = loaded.method_as::<LoraAdapter>().unwrap();
    let e = gguf_export::export_lora(m.as_mut(), dora, "x", GgmlType::F32, &dir.join("a.gguf")).unwrap_err().to_string();
    assert!(e.contains("DoRA") && e.contains("merged model"), "{e}");
    let e = gguf_export::export_lora(m.as_mut(), dora, "x", GgmlType::Q4_0, &dir.join("a.gguf")).unwrap_err().to_string();
    assert!(e.contains("f32, f16 or bf16"), "{e}");
    // An attached adapter must be merged first.
    let tok = Tokenizer::for_model(&mdir).unwrap().to_gguf_tokenizer(96).unwrap();
    let e = gguf_export::export_model(m.as_mut(), TokenizerSource::Meta(tok.clone()), "x", GgmlType::F16, &dir.join("m.gguf")).unwrap_err();
    assert!(e.to_string().contains("merge it"), "{e}");
    assert!(!dir.join("m.gguf").exists() && !dir.join("a.gguf").exists());
    // GPT-2 is not llama.cpp's 'llama' architecture.
    let mut g = models::load(fixture("tiny-gpt2-f16"), &Device::Cpu).unwrap();
    let e = gguf_export::export_model(g.as_mut(), TokenizerSource::Meta(tok.clone()), "x", GgmlType::F16, &dir.join("g.gguf")).unwrap_err();
    assert!(e.to_string().contains("'gpt2'"), "{e}");
    // A tokenizer larger than the embedding, and a word-level one, are refused by name.
    let e = Tokenizer::for_model(&mdir).unwrap().to_gguf_tokenizer(50).unwrap_err().to_string();
    assert!(e.contains("96 tokens") && e.contains("50 embedding rows"), "{e}");
    let words = Tokenizer::from_hf_json(fixture("tokenizer/tiny-words.json")).unwrap();
    assert!(words.to_gguf_tokenizer(96).unwrap_err().to_string().contains("byte-level BPE"));
    assert!(gguf_export::parse_type("q6_k").unwrap_err().to_string().contains("q4_k"));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tinytune(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tinytune")).args(args).output().expect("binary runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_export_command_writes_reads_back_and_reports_what_quantising_cost() {
    let dir = temp_dir("cli");
    let mdir = model_dir(&dir);
    let held = dir.join("held.jsonl");
    std::fs::write(&held, "{\"text\": \"he said: the three of them!\"}\n{\"text\": \"where are they? here, there...\"}\n").unwrap();
    let (m, adapter, held_s) = (mdir.to_str().unwrap(), fixture("peft/llama-rslora-all"), held.to_str().unwrap());
    let a = adapter.to_str().unwrap();
    let out = dir.join("merged.q8_0.gguf");
    let o = out.to_str().unwrap();
    let (ok, stdout, err) =
        tinytune(&["export", "--model", m, "--adapter", a, "--out", o, "--type", "q8_0", "--eval-data", held_s, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["tensors"], serde_json::json!({"F32": 5, "Q8_0": 16}), "{v}");
    let (float, written) = (v["nll"]["float"].as_f64().unwrap(), v["nll"]["written"].as_f64().unwrap());
    assert!(float.is_finite() && written != float && (written - float).abs() < 0.5, "{v}");
    assert!((v["nll"]["change"].as_f64().unwrap() - (written - float)).abs() < 1e-12);
    // The written file is a model tinytune reads like any GGUF.
    let (ok, _, err) = tinytune(&["eval", "--model", o, "--text", "he said", "--json", "--device", "cpu"]);
    assert!(ok, "{err}");

    let (ok, stdout, err) =
        tinytune(&["export", "--model", m, "--adapter", a, "--adapter-only", "--out", dir.join("a.gguf").to_str().unwrap()]);
    assert!(ok && stdout.contains("7 adapted matrices") && stdout.contains("--lora"), "{stdout}{err}");
    let dora = fixture("peft/llama-dora");
    let (ok, _, err) = tinytune(&[
        "export",
        "--model",
        m,
        "--adapter",
        dora.to_str().unwrap(),
        "--adapter-only",
        "--out",
        dir.join("d.gguf").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("DoRA"), "{err}");
    let (ok, _, err) = tinytune(&[
        "export",
        "--model",
        m,
        "--adapter",
        a,
        "--adapter-only",
        "--type",
        "q4_0",
        "--out",
        dir.join("d.gguf").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("f32, f16, bf16"), "{err}");
    let (ok, _, err) = tinytune(&["export", "--model", m, "--out", dir.to_str().unwrap()]);
    assert!(!ok && err.contains("is a directory"), "{err}");
    let (ok, _, err) = tinytune(&["export", "--model", m, "--out", dir.join("x.gguf").to_str().unwrap(), "--type", "q3_k"]);
    assert!(!ok && err.contains("q4_k"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The real SmolLM2-135M-Instruct Q4_1 file written back out: as Q4_K every matrix keeps the
/// blocks it was stored in (the q/k rows permuted back as llama.cpp stored them), so the file
/// reads back to the very same logits, and its tokenizer metadata is copied as it was; as F16
/// the logits move only by f16 rounding of the Q4_1 values.
#[test]
fn a_real_gguf_written_back_out_reads_back() {
    let Some(path) = common::asset("SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let dir = temp_dir("real");
    let src = GgufFile::open(&path).unwrap();
    let mut m = models::load(&path, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(vec![1589u32, 314, 253, 4569, 21902, 14494], &[1, 6], &Device::Cpu).unwrap();
    let want = m.forward(&ids, None).unwrap().to_vec::<f32>().unwrap();
    for (ty, bound) in [(GgmlType::Q4_K, 0.0), (GgmlType::F16, 0.1)] {
        let out = dir.join(format!("smollm2.{}.gguf", ty.name()));
        let report = gguf_export::export_model(m.as_mut(), TokenizerSource::Gguf(&src), "smollm2", ty, &out).unwrap();
        let f = GgufFile::open(&out).unwrap();
        if ty == GgmlType::Q4_K {
            assert_eq!(report.kept.len(), 30 * 7 + 1, "every block linear and the embedding keep their blocks");
            for t in src.tensors() {
                assert_eq!(f.tensor_bytes(&t.name).unwrap(), src.tensor_bytes(&t.name).unwrap(), "{} is copied byte for byte", t.name);
            }
        }
        assert_eq!(f.tokenizer().unwrap(), src.tokenizer().unwrap());
        let back = models::load(&out, &Device::Cpu).unwrap();
        let got = back.forward(&ids, None).unwrap().to_vec::<f32>().unwrap();
        let err = max_diff(&got, &want);
        assert!(err <= bound, "{ty}: logits moved by {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
