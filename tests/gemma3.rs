//! Gemma 3 against transformers: tiny random checkpoints (a Hugging Face directory and a GGUF
//! written as llama.cpp writes one; scripts/make_gemma3_fixtures.py) give transformers' logits,
//! losses and greedy continuation on the CPU and the GPU; the real Gemma 3 270M Q4_K_M file
//! (fetched by scripts/fetch-assets.sh) gives transformers' token ids for awkward strings, its
//! mean NLL of a text to 1e-3 and its greedy answer to a chat prompt.

mod common;

use std::path::{Path, PathBuf};

use tinytune::io::{SafetensorsFile, Tokenizer};
use tinytune::models::{self, GenerateOptions};
use tinytune::{DType, Device};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// The model at `model` on `dev` against `reference.safetensors` in `reference_dir`.
fn check(model: &Path, reference_dir: &Path, dev: &Device) {
    let name = model.display();
    let m = models::load(model, dev).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(m.architecture(), "gemma3");
    let r = SafetensorsFile::open(reference_dir.join("reference.safetensors")).unwrap();
    let ids = r.load("ids", dev).unwrap().to_dtype(DType::U32).unwrap();
    let keep = r.load("keep", dev).unwrap();
    let v = m.vocab_size();

    let want = r.load("logits", dev).unwrap().to_vec::<f32>().unwrap();
    let got = m.forward(&ids, None).unwrap();
    assert_eq!(got.shape(), &[2, 7, v]);
    let w = worst(&got.to_vec::<f32>().unwrap(), &want);
    assert!(w < 1e-4, "{name}: logits differ from transformers by up to {w}");

    // Right padding: the real positions only.
    let want = r.load("logits_masked", dev).unwrap().to_vec::<f32>().unwrap();
    let got = m.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
    let keepv = keep.to_vec::<i32>().unwrap();
    let real: Vec<usize> = keepv.iter().enumerate().filter(|(_, &k)| k == 1).map(|(p, _)| p).collect();
    let pick = |x: &[f32]| real.iter().flat_map(|&p| x[p * v..(p + 1) * v].to_vec()).collect::<Vec<f32>>();
    let w = worst(&pick(&got), &pick(&want));
    assert!(w < 1e-4, "{name}: masked logits differ from transformers by up to {w}");

    // The loss as transformers reports it (labels = ids, shifted inside).
    let rows: Vec<Vec<u32>> = ids.to_vec::<u32>().unwrap().chunks(7).map(|c| c.to_vec()).collect();
    let nll = models::sequence_nll(m.as_ref(), &rows, 2, dev).unwrap();
    let want_loss = r.load("loss", dev).unwrap().to_vec::<f32>().unwrap()[0] as f64;
    assert!((nll.mean_nll() - want_loss).abs() < 1e-4, "{name}: loss {} vs transformers {want_loss}", nll.mean_nll());

    // Greedy continuation of the first 5 ids through the KV cache (both layer kinds cached).
    let want: Vec<u32> = r.load("greedy", dev).unwrap().to_vec::<i32>().unwrap().iter().map(|&x| x as u32).collect();
    let opts = GenerateOptions { max_new_tokens: want.len(), stop_tokens: vec![], ..Default::default() };
    let got = models::generate(m.as_ref(), &rows[0][..5], &opts, &mut |_| Ok(()), dev).unwrap();
    assert_eq!(got, want, "{name}: greedy continuation");
}

#[test]
fn tiny_gemma3_from_a_hugging_face_directory_matches_transformers() {
    check(&fixture("tiny-gemma3"), &fixture("tiny-gemma3"), &Device::Cpu);
}

#[test]
fn tiny_gemma3_from_gguf_matches_transformers() {
    let dir = fixture("tiny-gemma3-gguf");
    check(&dir.join("tiny-gemma3.f32.gguf"), &dir, &Device::Cpu);
}

#[test]
fn tiny_gemma3_matches_transformers_on_the_gpu() {
    let Some(gpu) = common::gpu_device() else { return };
    check(&fixture("tiny-gemma3"), &fixture("tiny-gemma3"), &gpu);
    let dir = fixture("tiny-gemma3-gguf");
    check(&dir.join("tiny-gemma3.f32.gguf"), &dir, &gpu);
}

/// The tiny model's gradients flow through every Gemma-specific piece (the `1 + w` norms,
/// QK-norm, post-norms, the scaled embedding): a finite-difference check on a norm weight of
/// each kind, in f64.
#[test]
fn gemma3_norm_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let mut m = models::load(fixture("tiny-gemma3"), &dev).unwrap();
    let mut params = Vec::new();
    m.visit_parameters(&mut |name, t| {
        *t = t.to_dtype(DType::F64)?;
        params.push(name.to_string());
        Ok(())
    })
    .unwrap();
    for want in ["self_attn.q_norm.weight", "post_attention_layernorm.weight", "post_feedforward_layernorm.weight", "model.norm.weight"] {
        assert!(params.iter().any(|p| p.ends_with(want)), "no parameter named *{want}: {params:?}");
    }
    let ids = tinytune::Tensor::from_vec(vec![3u32, 17, 5, 88, 41, 9], &[1, 6], &dev).unwrap();
    let loss_of = |m: &dyn models::CausalLm| -> tinytune::Tensor {
        let logits = m.forward(&ids, None).unwrap();
        logits.mul(&logits).unwrap().sum_all().unwrap()
    };
    for name in [
        "model.layers.1.self_attn.k_norm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.2.post_feedforward_layernorm.weight",
    ] {
        let mut w = None;
        m.visit_parameters(&mut |n, t| {
            if n == name {
                *t = t.detach().requires_grad()?;
                w = Some(t.clone());
            }
            Ok(())
        })
        .unwrap();
        let w = w.unwrap();
        loss_of(m.as_ref()).backward().unwrap();
        let g = w.grad().unwrap().to_vec::<f64>().unwrap();
        let base = w.to_vec::<f64>().unwrap();
        let eps = 1e-6;
        for i in [0, base.len() / 2, base.len() - 1] {
            let at = |d: f64, m: &mut Box<dyn models::CausalLm>| -> f64 {
                let mut v = base.clone();
                v[i] += d;
                m.visit_parameters(&mut |n, t| {
                    if n == name {
                        *t = tinytune::Tensor::from_vec(v.clone(), t.shape(), &Device::Cpu)?;
                    }
                    Ok(())
                })
                .unwrap();
                loss_of(m.as_ref()).to_vec::<f64>().unwrap()[0]
            };
            let fd = (at(eps, &mut m) - at(-eps, &mut m)) / (2.0 * eps);
            assert!((fd - g[i]).abs() <= 1e-5 * (1.0 + fd.abs()), "{name}[{i}]: grad {} vs finite differences {fd}", g[i]);
        }
        m.visit_parameters(&mut |n, t| {
            if n == name {
                *t = tinytune::Tensor::from_vec(base.clone(), t.shape(), &Device::Cpu)?;
            }
            Ok(())
        })
        .unwrap();
    }
}

#[test]
fn gemma3_configs_tinytune_cannot_run_are_errors_naming_the_key() {
    let tmp = std::env::temp_dir().join(format!("tinytune-gemma3-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(fixture("tiny-gemma3/model.safetensors"), tmp.join("model.safetensors")).unwrap();
    let good: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-gemma3/config.json")).unwrap()).unwrap();
    for (key, value, needle) in [
        ("final_logit_softcapping", serde_json::json!(30.0), "final_logit_softcapping"),
        ("use_bidirectional_attention", serde_json::json!(true), "use_bidirectional_attention"),
        ("hidden_activation", serde_json::json!("relu"), "hidden_activation"),
        ("layer_types", serde_json::json!(["sliding_attention", "global"]), "layer_types"),
        ("rope_parameters", serde_json::json!({"full_attention": {"rope_type": "yarn", "factor": 4.0}}), "yarn"),
        ("model_type", serde_json::json!("gemma3"), "multimodal"),
    ] {
        let mut cfg = good.clone();
        cfg[key] = value;
        std::fs::write(tmp.join("config.json"), cfg.to_string()).unwrap();
        let e = models::load(&tmp, &Device::Cpu).err().unwrap_or_else(|| panic!("{key}: accepted"));
        let msg = e.to_string();
        assert!(msg.contains("config.json") && msg.contains(needle), "{key}: {msg}");
    }
    std::fs::remove_dir_all(&tmp).ok();
}

struct RealReference {
    text: String,
    text_ids: Vec<u32>,
    mean_nll: f64,
    chat_prompt: String,
    chat_prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    awkward: Vec<(String, Vec<u32>, String)>,
}

fn real_reference() -> RealReference {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("gemma3_reference.json")).unwrap()).unwrap();
    let ids = |x: &serde_json::Value| x.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    RealReference {
        text: v["text"].as_str().unwrap().into(),
        text_ids: ids(&v["text_ids"]),
        mean_nll: v["mean_nll"].as_f64().unwrap(),
        chat_prompt: v["chat_prompt"].as_str().unwrap().into(),
        chat_prompt_ids: ids(&v["chat_prompt_ids"]),
        greedy_ids: ids(&v["greedy_ids"]),
        awkward: v["awkward"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["text"].as_str().unwrap().into(), ids(&a["ids"]), a["decoded"].as_str().unwrap().into()))
            .collect(),
    }
}

const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

#[test]
fn real_gemma3_tokenizer_matches_transformers() {
    let Some(path) = common::asset(GEMMA) else { return };
    let r = real_reference();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    for (text, ids, decoded) in &r.awkward {
        assert_eq!(&tok.encode(text, true).unwrap(), ids, "ids of {text:?}");
        assert_eq!(&tok.decode(ids, true).unwrap(), decoded, "decoding {text:?}");
    }
    assert_eq!(tok.encode(&r.text, true).unwrap(), r.text_ids, "ids of the text");
    assert_eq!(tok.apply_chat_template(&[("user", "What is the capital of France?")], true).unwrap(), r.chat_prompt);
    assert_eq!(tok.encode_chat(&[("user", "What is the capital of France?")], true).unwrap(), r.chat_prompt_ids);
}

#[test]
fn real_gemma3_matches_transformers_on_the_cpu() {
    let Some(path) = common::asset(GEMMA) else { return };
    let r = real_reference();
    let dev = Device::Cpu;
    let model = models::load(&path, &dev).unwrap();
    let nll = models::sequence_nll(model.as_ref(), std::slice::from_ref(&r.text_ids), 1, &dev).unwrap();
    assert!((nll.mean_nll() - r.mean_nll).abs() < 1e-3, "mean NLL {} vs transformers {}", nll.mean_nll(), r.mean_nll);
    let opts = GenerateOptions { max_new_tokens: r.greedy_ids.len(), stop_tokens: vec![], ..Default::default() };
    let got = models::generate(model.as_ref(), &r.chat_prompt_ids, &opts, &mut |_| Ok(()), &dev).unwrap();
    assert_eq!(got, r.greedy_ids, "greedy answer");
}

/// A Gemma 3 saved as a Hugging Face checkpoint (what full fine-tuning and `merge` write) loads
/// back as the same model: the config's RoPE, layer types and query scale, and the norms in
/// the checkpoint's `w` convention.
#[test]
fn gemma3_saved_as_a_checkpoint_loads_back_the_same() {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("tinytune-gemma3-save-{}", std::process::id()));
    let mut m = models::load(fixture("tiny-gemma3"), &dev).unwrap();
    models::save_checkpoint(m.as_mut(), &dir).unwrap();
    let back = models::load(&dir, &dev).unwrap();
    let ids = tinytune::Tensor::from_vec(vec![3u32, 17, 5, 88, 41, 9, 60], &[1, 7], &dev).unwrap();
    let (a, b) = (m.forward(&ids, None).unwrap().to_vec::<f32>().unwrap(), back.forward(&ids, None).unwrap().to_vec::<f32>().unwrap());
    assert_eq!(a, b, "logits after a save and load");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gemma3_text");
    assert_eq!(cfg["layer_types"][1], "full_attention");
    if let Ok(keep) = std::env::var("TINYTUNE_KEEP_SAVED") {
        std::fs::rename(&dir, keep).unwrap();
    }
    std::fs::remove_dir_all(&dir).ok();
}
