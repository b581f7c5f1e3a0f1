//! Adapters in the Hugging Face PEFT layout: fixtures saved by the Python `peft` library
//! (scripts/make_peft_fixtures.py) give PEFT's logits, loss and gradients here; adapters we
//! save have PEFT's key names and shapes and load back to the same outputs.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tinytune::models::{self, CausalLm};
use tinytune::peft::format;
use tinytune::train::data::Batch;
use tinytune::train::{LanguageModelling, Objective};
use tinytune::{CrossEntropyReduction, DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("peft/{name}/reference.json"))).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn base_model(r: &Value) -> Box<dyn CausalLm> {
    let mut m = models::load(fixture(r["base"].as_str().unwrap()), &Device::Cpu).unwrap();
    m.visit_parameters(&mut |_, t| {
        *t = t.to_dtype(DType::F32)?;
        Ok(())
    })
    .unwrap();
    m
}

fn inputs(r: &Value) -> (Tensor, Tensor, usize, usize) {
    let rows: Vec<Vec<u32>> = r["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
        .collect();
    let (b, t) = (rows.len(), rows[0].len());
    let mask: Vec<f32> = r["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect::<Vec<_>>())
        .collect();
    let ids = Tensor::from_vec(rows.concat(), &[b, t], &Device::Cpu).unwrap();
    (ids, Tensor::from_vec(mask, &[b, t], &Device::Cpu).unwrap(), b, t)
}

/// Our logits (`[b, t, vocab]` or `[b, classes]`) and loss on the fixture's inputs.
fn run(model: &dyn CausalLm, adapter: &format::LoadedAdapter, r: &Value) -> (Tensor, Tensor) {
    let (ids, keep, b, t) = inputs(r);
    match &adapter.head {
        Some(head) => {
            let logits = head.forward(&model.hidden_states(&ids, Some(&keep), None).unwrap(), Some(&keep)).unwrap();
            let labels: Vec<i32> = r["labels"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
            let loss =
                logits.cross_entropy(&Tensor::from_vec(labels, &[b], &Device::Cpu).unwrap(), -100, CrossEntropyReduction::Mean).unwrap();
            (logits, loss)
        }
        None => {
            let logits = model.forward(&ids, Some(&keep)).unwrap();
            // labels = ids with padding −100, shifted by one (transformers' causal LM loss),
            // through the trainer's objective (which, with prompt tuning, also scores the
            // first real token from the last virtual one, as PEFT does).
            let (idv, kv) = (ids.to_vec::<u32>().unwrap(), keep.to_vec::<f32>().unwrap());
            let targets: Vec<i32> = (0..b * t).map(|i| if i % t == t - 1 || kv[i + 1] == 0.0 { -100 } else { idv[i + 1] as i32 }).collect();
            let batch = Batch {
                ids: ids.clone(),
                keep: Some(keep.clone()),
                n_target_tokens: targets.iter().filter(|&&x| x != -100).count(),
                targets: Tensor::from_vec(targets, &[b, t], &Device::Cpu).unwrap(),
                labels: None,
                pairs: None,
                reference: None,
                lengths: (0..b).map(|r| kv[r * t..(r + 1) * t].iter().filter(|&&k| k > 0.0).count()).collect(),
                n_tokens: kv.iter().filter(|&&k| k > 0.0).count(),
            };
            let lm = LanguageModelling;
            let loss = lm.batch_loss(model, &batch, false).unwrap().sum.mul_scalar(1.0 / lm.units(model, &batch) as f64).unwrap();
            (logits, loss)
        }
    }
}

/// Largest difference over the real (unpadded) positions.
fn worst(got: &[f64], want: &[f64], keep: &[f32], per_pos: usize) -> f64 {
    got.iter()
        .zip(want)
        .enumerate()
        .filter(|(i, _)| per_pos == 0 || keep[i / per_pos] > 0.0)
        .map(|(_, (a, b))| (a - b).abs())
        .fold(0.0, f64::max)
}

fn check_fixture(name: &str) {
    let r = reference(name);
    let mut model = base_model(&r);
    let dir = fixture(&format!("peft/{name}"));
    let adapter = format::load(&dir, model.as_mut(), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(adapter.warnings.is_empty(), "{name}: {:?}", adapter.warnings);
    let (logits, loss) = run(model.as_ref(), &adapter, &r);
    let want = floats(&r["logits"]);
    assert_eq!(logits.numel(), want.len(), "{name}");
    let (_, keep, _, _) = inputs(&r);
    let keepv = keep.to_vec::<f32>().unwrap();
    let per_pos = if adapter.head.is_some() { 0 } else { logits.shape()[2] };
    let d = worst(&logits.to_vec_f64().unwrap(), &want, &keepv, per_pos);
    assert!(d < 1e-4, "{name}: logits differ from PEFT's by {d}");
    let peft_type = r.get("peft_type").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| {
        let c: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(format::CONFIG_FILE)).unwrap()).unwrap();
        c["peft_type"].as_str().unwrap().to_string()
    });
    let dl = (loss.to_scalar().unwrap() - r["loss"].as_f64().unwrap()).abs();
    assert!(dl < 1e-5, "{name}: loss differs from PEFT's by {dl}");

    // Gradients of every trainable tensor equal PEFT's (eval mode: no dropout).
    loss.backward().unwrap();
    let mut ours: Vec<(String, Tensor)> = Vec::new();
    ours.extend(adapter.method.parameters());
    if let Some(h) = &adapter.head {
        ours.extend(h.parameters());
    }
    let grads = r["grads"].as_object().unwrap();
    assert_eq!(grads.len(), ours.len(), "{name}: trainable tensors");
    for (key, t) in &ours {
        let want = floats(grads.get(&format!("base_model.model.{key}")).unwrap_or_else(|| &grads[key]));
        let got = t.grad().unwrap().to_vec_f64().unwrap();
        let scale = want.iter().fold(1e-3, |m, v| f64::max(m, v.abs()));
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d < 1e-4 * scale, "{name}: gradient of {key} differs from PEFT's by {d} (scale {scale})");
    }

    // Merging reproduces PEFT's merged logits (LoRA, DoRA, IA3).
    if r.get("logits_merged").is_some() {
        adapter.method.merge(model.as_mut()).unwrap();
        let (merged, _) = run(model.as_ref(), &adapter, &r);
        let d = worst(&merged.to_vec_f64().unwrap(), &floats(&r["logits_merged"]), &keepv, per_pos);
        assert!(d < 1e-4, "{name}: merged logits differ from PEFT's by {d}");
    }

    // Saved again here: PEFT's key names, shapes and dtypes; loads back to the same logits.
    let mut model = base_model(&r);
    let adapter = format::load(&dir, model.as_mut(), &Device::Cpu).unwrap();
    let out = tempdir(name);
    format::save(&out, model.as_mut(), Some(adapter.method.as_ref()), adapter.head.as_ref(), "base").unwrap();
    let saved = tinytune::io::SafetensorsFile::open(out.join(format::WEIGHTS_FILE)).unwrap();
    let mut names: Vec<&str> = saved.names();
    names.sort();
    let keys = r["adapter_keys"].as_object().unwrap();
    let mut want_names: Vec<&str> = keys.keys().map(|s| s.as_str()).collect();
    want_names.sort();
    assert_eq!(names, want_names, "{name}: saved keys");
    for n in names {
        let (shape, dtype) = saved.info(n).unwrap();
        let want: Vec<usize> = keys[n]["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!((shape, dtype.as_str()), (want, keys[n]["dtype"].as_str().unwrap()), "{name}: {n}");
    }
    let ours: Value = serde_json::from_str(&std::fs::read_to_string(out.join(format::CONFIG_FILE)).unwrap()).unwrap();
    let theirs: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(format::CONFIG_FILE)).unwrap()).unwrap();
    let fields: &[&str] = match peft_type.as_str() {
        "LORA" => &["r", "use_rslora", "use_dora", "fan_in_fan_out", "target_modules", "layers_to_transform"],
        "IA3" => &["target_modules", "feedforward_modules", "fan_in_fan_out"],
        _ => &["num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"],
    };
    for k in ["peft_type", "task_type"].iter().chain(fields) {
        assert_eq!(ours[k], theirs[k], "{name}: adapter_config.json field {k}");
    }
    assert_eq!(ours["lora_alpha"].as_f64(), theirs["lora_alpha"].as_f64(), "{name}: lora_alpha");
    let mut again = base_model(&r);
    let reloaded = format::load(&out, again.as_mut(), &Device::Cpu).unwrap();
    let (logits2, _) = run(again.as_ref(), &reloaded, &r);
    assert_eq!(logits2.to_vec::<f32>().unwrap(), run(model.as_ref(), &adapter, &r).0.to_vec::<f32>().unwrap(), "{name}: reload");
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tinytune-peft-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn llama_ia3_from_peft() {
    check_fixture("llama-ia3");
}

#[test]
fn gpt2_ia3_from_peft() {
    check_fixture("gpt2-ia3");
}

/// Grouped-query attention: PEFT sizes the prefix by the key/value heads.
#[test]
fn llama_prefix_from_peft() {
    check_fixture("llama-prefix");
}

#[test]
fn gpt2_prefix_from_peft() {
    check_fixture("gpt2-prefix");
}

#[test]
fn llama_prompt_from_peft() {
    check_fixture("llama-prompt");
}

#[test]
fn llama_lora_from_peft() {
    check_fixture("llama-lora");
}

#[test]
fn llama_rslora_one_layer_all_linears_from_peft() {
    check_fixture("llama-rslora-all");
}

#[test]
fn llama_dora_from_peft() {
    check_fixture("llama-dora");
}

#[test]
fn gpt2_lora_fan_in_fan_out_from_peft() {
    check_fixture("gpt2-lora");
}

#[test]
fn llama_sequence_classification_from_peft() {
    check_fixture("llama-seqcls");
}

/// A copy of a fixture adapter with its config edited by `edit`.
fn edited(name: &str, tag: &str, edit: impl Fn(&mut serde_json::Map<String, Value>)) -> PathBuf {
    let src = fixture(&format!("peft/{name}"));
    let dir = tempdir(tag);
    std::fs::copy(src.join(format::WEIGHTS_FILE), dir.join(format::WEIGHTS_FILE)).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join(format::CONFIG_FILE)).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(dir.join(format::CONFIG_FILE), serde_json::to_vec(&cfg).unwrap()).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    let r = reference("llama-lora");
    let mut model = base_model(&r);
    format::load(dir, model.as_mut(), &Device::Cpu).unwrap_err().to_string()
}

#[test]
fn unknown_config_keys_warn_and_unsupported_ones_fail() {
    let dir = edited("llama-lora", "unknown-key", |c| {
        c.insert("some_future_option".into(), Value::from(3));
    });
    let r = reference("llama-lora");
    let mut model = base_model(&r);
    let a = format::load(&dir, model.as_mut(), &Device::Cpu).unwrap();
    assert_eq!(a.warnings.len(), 1);
    assert!(a.warnings[0].contains("some_future_option"), "{:?}", a.warnings);

    let dir = edited("llama-lora", "rank-pattern", |c| {
        c.insert("rank_pattern".into(), serde_json::json!({"q_proj": 8}));
    });
    let e = load_err(&dir);
    assert!(e.contains("rank_pattern") && e.contains("adapter_config.json"), "{e}");
    let dir = edited("llama-lora", "bias", |c| {
        c.insert("bias".into(), Value::from("all"));
    });
    assert!(load_err(&dir).contains("'bias'"));
    let dir = edited("llama-lora", "rank", |c| {
        c.insert("r".into(), Value::from(8));
    });
    let e = load_err(&dir);
    assert!(e.contains("lora_A.weight has shape [4, 32], expected [8, 32]"), "{e}");
    let dir = edited("llama-lora", "peft-type", |c| {
        c.insert("peft_type".into(), Value::from("IA3"));
    });
    assert!(load_err(&dir).contains("IA3"));
}

#[test]
fn an_adapter_for_another_model_is_refused() {
    // The GPT-2 adapter's sites do not exist in the LLaMA model.
    let r = reference("llama-lora");
    let mut model = base_model(&r);
    let e = format::load(&fixture("peft/gpt2-lora"), model.as_mut(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("transformer.h.0.attn.c_attn") && e.contains("not a linear layer of this model"), "{e}");
}

#[test]
fn a_malformed_adapter_is_a_clear_error() {
    let dir = tempdir("malformed");
    std::fs::write(dir.join(format::CONFIG_FILE), b"{not json").unwrap();
    std::fs::write(dir.join(format::WEIGHTS_FILE), b"junk").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("adapter_config.json") && e.contains("not valid JSON"), "{e}");
    let dir = edited("llama-lora", "truncated", |_| {});
    let bytes = std::fs::read(dir.join(format::WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(format::WEIGHTS_FILE), &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("adapter_model.safetensors"), "{e}");
    let e = load_err(&fixture("peft/does-not-exist"));
    assert!(e.contains("does-not-exist"), "{e}");
}

#[test]
fn an_unknown_peft_type_lists_the_ones_that_load() {
    let dir = tempdir("loha");
    std::fs::copy(fixture("peft/llama-lora/adapter_model.safetensors"), dir.join(format::WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(format::CONFIG_FILE), r#"{"peft_type": "LOHA", "r": 4}"#).unwrap();
    let mut model = base_model(&reference("llama-lora"));
    let e = format::load(&dir, model.as_mut(), &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("'LOHA'") && e.contains("LORA, LORA_XS, LORA_SB, FINEGATES, IA3, PREFIX_TUNING, PROMPT_TUNING, BOTTLENECK, or NONE"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
