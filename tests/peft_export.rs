//! Adapters saved by tinytune, in the PEFT layout, for the Python `peft` library to load.
//!
//! Each case attaches a fresh adapter (LoRA, DoRA, IA3, prefix or prompt tuning) to a tiny
//! base model (f32), fills its tensors with seeded random values (so the adapter changes the
//! output), saves it with
//! [`format::save`], loads it back with [`format::load`] onto a fresh base model and checks
//! the logits are bit-identical. LoRA-XS and LoRA-SB (no PEFT type of their own) are written
//! as the plain PEFT LoRA adapter of the same update (`export --peft-lora`), reloaded as LoRA
//! and checked to 1e-5 (`lora_B = s·B R` is a product). That part always runs.
//!
//! With `TINYTUNE_EXPORT_DIR` set, each case is also written to `$TINYTUNE_EXPORT_DIR/<case>/`:
//! the adapter files plus `expect.json` (the base model directory, the inputs and our
//! logits, in the layout of tests/fixtures/peft/*/reference.json), which
//! scripts/check_peft_export.sh feeds to scripts/check_peft_adapter.py.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tinytune::models::{self, CausalLm};
use tinytune::peft::{
    format, ClassifierHead, Ia3Config, LoraConfig, LoraSbConfig, LoraXsAdapter, LoraXsConfig, Method, MethodConfig, Pooling, PrefixConfig,
    PromptConfig,
};
use tinytune::{DType, Device, Rng, Tensor};

/// The padding id (transformers' sequence classifier pools the last token whose id is not it).
const PAD: u32 = 0;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The base model with every weight in f32 (the f16 GPT-2 checkpoint too, as PEFT's side
/// loads it with `dtype=float32`).
fn base_model(base: &str) -> Box<dyn CausalLm> {
    let mut m = models::load(fixture(base), &Device::Cpu).unwrap();
    m.visit_parameters(&mut |_, t| {
        *t = t.to_dtype(DType::F32)?;
        Ok(())
    })
    .unwrap();
    m
}

/// Two rows of 7 ids in `1..vocab` (never the pad id); row 1 right-padded after 5 tokens
/// with [`PAD`]. Returns `(ids, mask)` as nested rows.
fn inputs(vocab: usize) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let mut rng = Rng::new(7);
    let u = Tensor::rand_uniform(&[14], 0.0, 1.0, DType::F64, &Device::Cpu, &mut rng).unwrap().to_vec_f64().unwrap();
    let mut ids: Vec<Vec<u32>> =
        u.chunks(7).map(|r| r.iter().map(|&x| 1 + ((x * (vocab - 1) as f64) as u32).min(vocab as u32 - 2)).collect()).collect();
    let mut mask = vec![vec![1u32; 7]; 2];
    for t in 5..7 {
        ids[1][t] = PAD;
        mask[1][t] = 0;
    }
    (ids, mask)
}

/// Logits: `[b, t, vocab]` from the LM head, or `[b, classes]` from `head`.
fn logits(model: &dyn CausalLm, head: Option<&ClassifierHead>, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Tensor {
    let (b, t) = (ids.len(), ids[0].len());
    let idt = Tensor::from_vec(ids.concat(), &[b, t], &Device::Cpu).unwrap();
    let keep: Vec<f32> = mask.concat().into_iter().map(|v| v as f32).collect();
    let keep = Tensor::from_vec(keep, &[b, t], &Device::Cpu).unwrap();
    match head {
        Some(h) => h.forward(&model.hidden_states(&idt, Some(&keep), None).unwrap(), Some(&keep)).unwrap(),
        None => model.forward(&idt, Some(&keep)).unwrap(),
    }
}

/// Fill every trainable tensor with seeded values that make the adapter change the output
/// (PEFT's inits leave it unchanged: `B = 0`, IA3 vectors of 1): LoRA's `A`, `B` `N(0, 0.1²)`,
/// DoRA's magnitudes scaled by `1 + 0.1·N(0, 1)`, IA3 vectors `1 + N(0, 0.3²)`, prefix and
/// prompt embeddings `N(0, 0.5²)`, and the head a fresh `N(0, 0.3²)` weight.
fn randomize(method: &dyn Method, head: Option<&ClassifierHead>, seed: u64) {
    let mut rng = Rng::new(seed);
    for (name, t) in method.parameters() {
        let noise = |mean: f64, std: f64, rng: &mut Rng| Tensor::randn(t.shape(), mean, std, t.dtype(), &Device::Cpu, rng).unwrap();
        let v = if name.ends_with("lora_magnitude_vector") {
            t.detach().mul(&noise(1.0, 0.1, &mut rng)).unwrap().contiguous().unwrap()
        } else if name.ends_with("ia3_l") {
            noise(1.0, 0.3, &mut rng)
        } else if name == "prompt_embeddings" {
            noise(0.0, 0.5, &mut rng)
        } else {
            noise(0.0, 0.1, &mut rng)
        };
        t.set_data(&v).unwrap();
    }
    if let Some(h) = head {
        let w = &h.linear.weight;
        w.set_data(&Tensor::randn(w.shape(), 0.0, 0.3, w.dtype(), &Device::Cpu, &mut rng).unwrap()).unwrap();
    }
}

struct Case {
    name: &'static str,
    base: &'static str,
    config: Box<dyn MethodConfig>,
    /// Classes of a sequence-classification head (`None`: causal LM).
    classes: Option<usize>,
    /// Whether `target_modules` must be written as a regex string (the site set is not a
    /// list of names with `layers_to_transform`); `None` for methods without targets.
    regex: Option<bool>,
}

fn lora(r: usize, alpha: f64, targets: &[&str]) -> LoraConfig {
    LoraConfig { r, alpha, dropout: 0.05, targets: targets.iter().map(|s| s.to_string()).collect(), seed: 11, ..LoraConfig::default() }
}

fn case(name: &'static str, base: &'static str, config: impl MethodConfig + 'static, classes: Option<usize>, regex: Option<bool>) -> Case {
    Case { name, base, config: Box::new(config), classes, regex }
}

fn cases() -> Vec<Case> {
    let prefix = |p| PrefixConfig { num_virtual_tokens: p, ..PrefixConfig::default() };
    vec![
        case("llama-lora", "tiny-llama", lora(4, 8.0, &["q_proj", "v_proj"]), None, Some(false)),
        case(
            "llama-rslora-all-layer0",
            "tiny-llama",
            LoraConfig { rslora: true, layers: Some(vec![0]), ..lora(4, 16.0, &["all-linear"]) },
            None,
            Some(false),
        ),
        case(
            "llama-q0-v1",
            "tiny-llama",
            lora(4, 8.0, &["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
            None,
            Some(true),
        ),
        case("llama-attn-layer1-glob", "tiny-llama", lora(2, 4.0, &["model.layers.1.self_attn.*"]), None, Some(true)),
        case(
            "llama-dora",
            "tiny-llama",
            LoraConfig { dora: true, ..lora(4, 8.0, &["q_proj", "k_proj", "v_proj", "o_proj"]) },
            None,
            Some(false),
        ),
        case("gpt2-lora", "tiny-gpt2-f16", lora(4, 8.0, &["c_attn", "c_proj"]), None, Some(false)),
        case("llama-seqcls", "tiny-llama", lora(4, 8.0, &["q_proj", "v_proj"]), Some(3), Some(false)),
        case("llama-ia3", "tiny-llama", Ia3Config::default(), None, Some(false)),
        case("gpt2-ia3", "tiny-gpt2-f16", Ia3Config::default(), None, Some(false)),
        case("llama-prefix", "tiny-llama", prefix(3), None, None),
        case("gpt2-prefix", "tiny-gpt2-f16", prefix(4), None, None),
        case("llama-prompt", "tiny-llama", PromptConfig { num_virtual_tokens: 3, ..PromptConfig::default() }, None, None),
        case("gpt2-prompt", "tiny-gpt2-f16", PromptConfig { num_virtual_tokens: 2, ..PromptConfig::default() }, None, None),
        case(
            "llama-lora-xs-as-lora",
            "tiny-llama",
            LoraXsConfig {
                r: 4,
                alpha: Some(8.0),
                targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
                ..Default::default()
            },
            None,
            Some(false),
        ),
        case(
            "llama-lora-sb-as-lora",
            "tiny-llama",
            LoraSbConfig { r: 4, targets: vec!["all-linear".into()], ..Default::default() },
            None,
            Some(false),
        ),
        case(
            "gpt2-lora-xs-as-lora",
            "tiny-gpt2-f16",
            LoraXsConfig { r: 3, targets: vec!["c_attn".into()], ..Default::default() },
            Some(2),
            Some(false),
        ),
    ]
}

fn flat(t: &Tensor) -> Value {
    let data: Vec<f64> = t.to_vec::<f32>().unwrap().into_iter().map(f64::from).collect();
    json!({ "shape": t.shape(), "data": data })
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.to_vec::<f32>().unwrap().iter().zip(b.to_vec::<f32>().unwrap()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tinytune-export-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Build one case, save it to `out`, reload it and check it; write `out/expect.json`.
fn run_case(case: &Case, out: &Path) {
    let name = case.name;
    let mut model = base_model(case.base);
    let (ids, mask) = inputs(model.vocab_size());
    let mut rng = Rng::new(5);
    let head = case.classes.map(|c| ClassifierHead::new(model.hidden_size(), c, Pooling::Last, &mut rng, &Device::Cpu).unwrap());
    let before = logits(model.as_ref(), head.as_ref(), &ids, &mask);

    let mut adapter = case.config.attach(model.as_mut(), 11).unwrap_or_else(|e| panic!("{name}: {e}"));
    if let Some(init) = adapter.gradient_init() {
        // LoRA-SB's start from seeded stand-in gradients (the trainer's part is tested in
        // tests/train.rs): the real SVD path, a random-looking sign pattern.
        let mut rng = Rng::new(77);
        let grads: Vec<(String, Tensor)> = model
            .linears_mut()
            .into_iter()
            .filter(|l| init.sites.contains(&l.name))
            .map(|l| (l.name.clone(), Tensor::randn(l.weight.shape(), 0.0, 1.0, DType::F32, &Device::Cpu, &mut rng).unwrap()))
            .collect();
        adapter.init_from_gradients(model.as_mut(), &grads, 0.05).unwrap();
    }
    randomize(adapter.as_ref(), head.as_ref(), 1000 + name.len() as u64);
    let ours = logits(model.as_ref(), head.as_ref(), &ids, &mask);
    let changed = max_diff(&ours, &before);
    assert!(changed > 1e-2, "{name}: the adapter barely changes the output ({changed})");

    let rewritten = adapter.as_any().downcast_ref::<LoraXsAdapter>();
    match rewritten {
        Some(xs) => xs.save_as_lora(out, model.as_mut(), head.as_ref(), &fixture(case.base).display().to_string()).unwrap(),
        None => {
            format::save(out, model.as_mut(), Some(adapter.as_ref()), head.as_ref(), &fixture(case.base).display().to_string()).unwrap()
        }
    }
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join(format::CONFIG_FILE)).unwrap()).unwrap();
    if let Some(regex) = case.regex {
        assert_eq!(cfg["target_modules"].is_string(), regex, "{name}: target_modules form {}", cfg["target_modules"]);
    }
    assert_eq!(cfg["task_type"], if case.classes.is_some() { "SEQ_CLS" } else { "CAUSAL_LM" }, "{name}");

    // Reloaded onto a fresh base model: the same sites, tensors and logits, bit for bit.
    let mut again = base_model(case.base);
    let loaded = format::load(out, again.as_mut(), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(loaded.warnings.is_empty(), "{name}: {:?}", loaded.warnings);
    let l = &loaded.method;
    let want_name = if rewritten.is_some() { "lora" } else { adapter.name() };
    assert_eq!((l.name(), l.num_sites()), (want_name, adapter.num_sites()), "{name}: method and sites");
    assert_eq!(loaded.head.as_ref().map(|h| h.num_classes()), case.classes, "{name}: head");
    let back = logits(again.as_ref(), loaded.head.as_ref(), &ids, &mask);
    assert_eq!(back.shape(), ours.shape(), "{name}");
    if rewritten.is_some() {
        let worst = max_diff(&back, &ours);
        assert!(worst < 1e-5, "{name}: the plain-LoRA rewrite's logits differ by {worst}");
    } else {
        for ((k, a), (k2, b)) in adapter.parameters().iter().zip(l.parameters()) {
            assert_eq!(*k, k2, "{name}");
            assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap(), "{name}: {k}");
        }
        assert_eq!(back.to_vec::<f32>().unwrap(), ours.to_vec::<f32>().unwrap(), "{name}: reloaded logits");
    }

    let mut expect = json!({
        "case": name,
        "base": fixture(case.base).display().to_string(),
        "input_ids": ids,
        "attention_mask": mask,
        "pad_token_id": PAD,
        "logits": flat(&ours),
    });
    if let Some(c) = case.classes {
        expect["num_labels"] = json!(c);
    }
    std::fs::write(out.join("expect.json"), serde_json::to_vec_pretty(&expect).unwrap()).unwrap();
}

#[test]
fn saved_adapters_reload_to_the_same_logits_and_export_for_peft() {
    let export = std::env::var_os("TINYTUNE_EXPORT_DIR").map(PathBuf::from);
    for case in cases() {
        let out = match &export {
            Some(d) => d.join(case.name),
            None => scratch(case.name),
        };
        let _ = std::fs::remove_dir_all(&out);
        run_case(&case, &out);
        if export.is_none() {
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
}
