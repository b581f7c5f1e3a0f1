//! Model parity with the Hugging Face stack: tiny random checkpoints saved by `transformers`
//! (tests/fixtures, made by scripts/make_fixtures.py) must give the logits `transformers`
//! computed, in f32, f16 and bf16 storage, with and without a padding mask.

mod common;

use std::path::PathBuf;

use tinytune::io::{Checkpoint, SafetensorsFile};
use tinytune::models;
use tinytune::{DType, Device, Error};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn check_parity(name: &str, arch: &str) {
    check_parity_on(name, arch, &Device::Cpu);
}

fn check_parity_on(name: &str, arch: &str, dev: &Device) {
    let dev = dev.clone();
    let dir = fixture(name);
    let model = models::load(&dir, &dev).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(model.architecture(), arch);
    let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let ids = reference.load("ids", &dev).unwrap().to_dtype(DType::U32).unwrap();
    let keep = reference.load("keep", &dev).unwrap();
    let want = reference.load("logits", &dev).unwrap().to_vec::<f32>().unwrap();
    let got = model.forward(&ids, None).unwrap();
    assert_eq!(got.shape(), &[2, 7, model.vocab_size()]);
    let got = got.to_vec::<f32>().unwrap();
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "{name}: logits differ from transformers by up to {worst}");

    // With the padding mask: compare the real positions only (padded ones are arbitrary).
    let want = reference.load("logits_masked", &dev).unwrap().to_vec::<f32>().unwrap();
    let got = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
    let keepv = keep.to_vec::<i32>().unwrap();
    let v = model.vocab_size();
    let mut worst = 0f32;
    for (pos, &k) in keepv.iter().enumerate() {
        if k == 1 {
            for j in 0..v {
                worst = worst.max((got[pos * v + j] - want[pos * v + j]).abs());
            }
        }
    }
    assert!(worst < 1e-4, "{name}: masked logits differ from transformers by up to {worst}");
}

#[test]
fn llama_gqa_matches_transformers() {
    check_parity("tiny-llama", "llama");
}

#[test]
fn llama_tied_bf16_matches_transformers() {
    check_parity("tiny-llama-tied-bf16", "llama");
}

#[test]
fn gpt2_f16_matches_transformers() {
    check_parity("tiny-gpt2-f16", "gpt2");
}

#[test]
fn models_match_transformers_on_the_gpu() {
    let Some(gpu) = common::gpu_device() else { return };
    check_parity_on("tiny-llama", "llama", &gpu);
    check_parity_on("tiny-llama-tied-bf16", "llama", &gpu);
    check_parity_on("tiny-gpt2-f16", "gpt2", &gpu);
}

#[test]
fn bad_checkpoints_give_errors_naming_the_file() {
    let tmp = std::env::temp_dir().join(format!("tinytune-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let good = std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap();
    // Truncated file, a header length past the end, garbage.
    for (what, bytes) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("header past end", {
            let mut b = good.clone();
            b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
            b
        }),
        ("garbage", b"not a safetensors file at all".to_vec()),
        ("empty", vec![]),
    ] {
        let p = tmp.join("model.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let e = SafetensorsFile::open(&p).err().unwrap_or_else(|| panic!("{what}: accepted"));
        let msg = e.to_string();
        assert!(matches!(e, Error::Format { .. }) && msg.contains("model.safetensors"), "{what}: {msg}");
    }
    // Hand-made headers: offsets outside the data, an unknown dtype, a shape that does not
    // match its byte range, a header that is not JSON.
    let make = |header: &str, data_len: usize| {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(vec![0u8; data_len]);
        b
    };
    for (what, bytes) in [
        ("offsets outside the data", make(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4)),
        ("unknown dtype", make(r#"{"w":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#, 8)),
        ("shape vs bytes", make(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8)),
        ("header not JSON", make("{not json", 8)),
    ] {
        let p = tmp.join("model.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let e = SafetensorsFile::open(&p).err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("model.safetensors"), "{what}: {e}");
    }
    // A dtype the format knows but tinytune does not read: an error naming file and tensor.
    std::fs::write(tmp.join("model.safetensors"), make(r#"{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#, 8)).unwrap();
    let st = SafetensorsFile::open(tmp.join("model.safetensors")).unwrap();
    let msg = st.load("w", &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("'w'") && msg.contains("I64"), "{msg}");

    // A config that does not match the weights: a shape error naming the tensor.
    std::fs::copy(fixture("tiny-llama/model.safetensors"), tmp.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap();
    std::fs::write(tmp.join("config.json"), cfg.replace("\"intermediate_size\": 64", "\"intermediate_size\": 65")).unwrap();
    let msg = models::load(&tmp, &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("model.layers.0.mlp.gate_proj.weight") && msg.contains("[65, 32]"), "{msg}");
    // Missing field, unknown architecture, unsupported math, malformed JSON, absurd sizes.
    for (cfg_text, expect) in [
        (cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1000000000000"), "num_hidden_layers"),
        (cfg.replace("\"vocab_size\": 96", "\"vocab_size\": 0"), "vocab_size = 0"),
        (cfg.replace("\"vocab_size\": 96", "\"vocab_sz\": 96"), "missing field 'vocab_size'"),
        (cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"mamba\""), "unknown architecture 'mamba'"),
        (cfg.replace("\"hidden_act\": \"silu\"", "\"hidden_act\": \"relu\""), "hidden_act"),
        (cfg.replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\""), "rope_parameters"),
        ("{ not json".to_string(), "invalid JSON"),
    ] {
        std::fs::write(tmp.join("config.json"), cfg_text).unwrap();
        let msg = models::load(&tmp, &Device::Cpu).err().unwrap().to_string();
        assert!(msg.contains("config.json") && msg.contains(expect), "expected '{expect}' in: {msg}");
    }
    // A missing weight file.
    std::fs::remove_file(tmp.join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("config.json"), &cfg).unwrap();
    let msg = models::load(&tmp, &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("no model.safetensors"), "{msg}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// A left-padded row (padding before the text) has queries that see no real key; their
/// attention must stay finite so that the real positions of the row are not poisoned by NaN.
#[test]
fn left_padding_stays_finite() {
    let model = models::load(fixture("tiny-llama"), &Device::Cpu).unwrap();
    let ids = tinytune::Tensor::from_vec(vec![0u32, 0, 5, 9, 2, 7, 1, 3], &[2, 4], &Device::Cpu).unwrap();
    let keep = tinytune::Tensor::from_vec(vec![0f32, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], &[2, 4], &Device::Cpu).unwrap();
    let logits = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
}

/// Mistral-style configs enable sliding-window attention by giving a window; within it the
/// model is exact, beyond it the forward is refused rather than silently wrong.
#[test]
fn sliding_window_is_enforced() {
    let tmp = std::env::temp_dir().join(format!("tinytune-window-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(fixture("tiny-llama/model.safetensors"), tmp.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap();
    std::fs::write(tmp.join("config.json"), cfg.replace("\"mlp_bias\": false", "\"mlp_bias\": false, \"sliding_window\": 4")).unwrap();
    let model = models::load(&tmp, &Device::Cpu).unwrap();
    let ids = |n: usize| tinytune::Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), &[1, n], &Device::Cpu).unwrap();
    assert!(model.forward(&ids(4), None).is_ok());
    let msg = model.forward(&ids(5), None).err().unwrap().to_string();
    assert!(msg.contains("sliding window of 4"), "{msg}");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn checkpoint_lists_and_converts() {
    let ck = Checkpoint::open(fixture("tiny-gpt2-f16")).unwrap();
    assert!(ck.names().iter().any(|n| n == "transformer.wte.weight"));
    let w = ck.get("transformer.wte.weight", &[96, 32], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(w.dtype(), DType::F32);
    let msg = ck.get("transformer.wte.weight", &[32, 96], DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("has shape [96, 32]"), "{msg}");
}

/// A checkpoint split into shards with `model.safetensors.index.json` (as `save_pretrained`
/// does for large models) loads to the same model; an index pointing outside the directory is
/// refused.
#[test]
fn sharded_checkpoints_load() {
    use safetensors::tensor::{SafeTensors, TensorView};
    let src = std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&src).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
    names.sort();
    let tmp = std::env::temp_dir().join(format!("tinytune-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(3)).enumerate() {
        let file = format!("model-{:05}-of-00003.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &tmp.join(&file)).unwrap();
        for n in part {
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(tmp.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(fixture("tiny-llama/config.json"), tmp.join("config.json")).unwrap();
    let ids = tinytune::Tensor::from_vec(vec![1u32, 5, 9, 2], &[1, 4], &Device::Cpu).unwrap();
    let sharded = models::load(&tmp, &Device::Cpu).unwrap().forward(&ids, None).unwrap().to_vec::<f32>().unwrap();
    let single = models::load(fixture("tiny-llama"), &Device::Cpu).unwrap().forward(&ids, None).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(sharded, single);

    let mut evil = map.clone();
    evil.insert(names[0].clone(), serde_json::Value::String("../model.safetensors".into()));
    std::fs::write(tmp.join("model.safetensors.index.json"), serde_json::json!({ "weight_map": evil }).to_string()).unwrap();
    let msg = models::load(&tmp, &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("index.json") && msg.contains("outside the directory"), "{msg}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// `nn::attention` under a mask description against plain float64 loops: grouped-query heads
/// (K/V not repeated by the caller), a prefix every query sees, cached positions before the
/// queries, a sliding window and key padding.
/// `nn::attention` (query heads of a group stacked against their shared K/V head, nothing
/// repeated) against `attention_reference` (K/V repeated per head): the same outputs and the
/// same gradients of q, k and v, on the CPU in float64 and on the GPU against the CPU, with a
/// transposed (non-contiguous) q as the model passes it, padding, a prefix and a window.
#[test]
fn grouped_attention_equals_the_repeated_reference_with_gradients() {
    use tinytune::nn::{attention, attention_reference, Mask};
    let (b, hkv, tq, d) = (2, 2, 4, 6);
    let mut devices = vec![(Device::Cpu, DType::F64)];
    if let Some(g) = common::gpu_device() {
        devices.push((g, DType::F32));
    }
    for rep in [1, 3] {
        for (prefix, offset, window, padded) in [(0, 0, None, true), (2, 1, Some(3), true), (0, 2, None, false)] {
            let (h, tk, real) = (hkv * rep, prefix + offset + tq, offset + tq);
            let mut rng = tinytune::Rng::new(31 + rep as u64);
            let q0 = tinytune::Tensor::randn(&[b, tq, h, d], 0.0, 1.0, DType::F64, &Device::Cpu, &mut rng).unwrap();
            let k0 = tinytune::Tensor::randn(&[b, hkv, tk, d], 0.0, 1.0, DType::F64, &Device::Cpu, &mut rng).unwrap();
            let v0 = tinytune::Tensor::randn(&[b, hkv, tk, d], 0.0, 1.0, DType::F64, &Device::Cpu, &mut rng).unwrap();
            let c0 = tinytune::Tensor::randn(&[b, h, tq, d], 0.0, 1.0, DType::F64, &Device::Cpu, &mut rng).unwrap();
            let keep: Vec<f32> = (0..b * real).map(|i| if padded && i == real { 0.0 } else { 1.0 }).collect();
            // No loss on padding queries (a row that sees no key has no score gradient in the
            // fused CPU kernel; the composed one differentiates through its mask bias there).
            let query_keep: Vec<f64> = (0..b)
                .flat_map(|bi| (0..h).flat_map(move |_| (0..tq).map(move |i| (bi, i))))
                .map(|(bi, i)| keep[bi * real + offset + i] as f64)
                .collect();
            let c0 = c0.mul(&tinytune::Tensor::from_vec(query_keep, &[b, h, tq, 1], &Device::Cpu).unwrap()).unwrap();
            let mut results = Vec::new();
            for (dev, dt) in &devices {
                let up = |t: &tinytune::Tensor| t.to_dtype(*dt).unwrap().to_device(dev).unwrap();
                let keep_t = tinytune::Tensor::from_vec(keep.clone(), &[b, real], dev).unwrap();
                let mask = Mask::causal(offset, padded.then_some(&keep_t)).with_window(window);
                let run = |f: &dyn Fn(&tinytune::Tensor, &tinytune::Tensor, &tinytune::Tensor) -> tinytune::Result<tinytune::Tensor>| {
                    let (q, k, v) = (up(&q0).requires_grad().unwrap(), up(&k0).requires_grad().unwrap(), up(&v0).requires_grad().unwrap());
                    let y = f(&q.transpose(1, 2).unwrap(), &k, &v).unwrap();
                    y.mul(&up(&c0)).unwrap().sum_all().unwrap().backward().unwrap();
                    [y, q.grad().unwrap(), k.grad().unwrap(), v.grad().unwrap()].map(|t| t.to_vec_f64().unwrap())
                };
                let grouped = run(&|q, k, v| attention(q, k, v, &mask));
                let reference = run(&|q, k, v| attention_reference(q, k, v, &mask));
                let tol = if *dt == DType::F64 { 1e-12 } else { 1e-5 };
                for (part, (a, r)) in ["y", "dq", "dk", "dv"].iter().zip(grouped.iter().zip(&reference)) {
                    for (i, (x, y)) in a.iter().zip(r).enumerate() {
                        assert!(
                            (x - y).abs() <= tol * (1.0 + y.abs()),
                            "{dev} rep {rep} prefix {prefix} offset {offset}: {part}[{i}] {x} vs {y}"
                        );
                    }
                }
                results.push(grouped);
            }
            // The GPU's grouped attention against the CPU's.
            if let [cpu, gpu] = &results[..] {
                for (part, (a, r)) in ["y", "dq", "dk", "dv"].iter().zip(gpu.iter().zip(cpu)) {
                    for (i, (x, y)) in a.iter().zip(r).enumerate() {
                        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "gpu vs cpu rep {rep}: {part}[{i}] {x} vs {y}");
                    }
                }
            }
        }
    }
}

#[test]
fn attention_follows_its_mask_description() {
    use tinytune::nn::{attention, Mask};
    let (b, h, hkv, tq, d) = (2, 4, 2, 3, 5);
    let dev = Device::Cpu;
    for (prefix, offset, window, padded) in [(0, 0, None, false), (2, 0, None, true), (1, 2, Some(2), true), (0, 3, Some(3), false)] {
        let tk = prefix + offset + tq;
        let mut rng = tinytune::Rng::new(9 + prefix as u64);
        let q = tinytune::Tensor::randn(&[b, h, tq, d], 0.0, 1.0, DType::F64, &dev, &mut rng).unwrap();
        let k = tinytune::Tensor::randn(&[b, hkv, tk, d], 0.0, 1.0, DType::F64, &dev, &mut rng).unwrap();
        let v = tinytune::Tensor::randn(&[b, hkv, tk, d], 0.0, 1.0, DType::F64, &dev, &mut rng).unwrap();
        // Row 1 pads its first real position (left padding).
        let real = offset + tq;
        let keep: Vec<f64> = (0..b * real).map(|i| if padded && i == real { 0.0 } else { 1.0 }).collect();
        let keep_t = tinytune::Tensor::from_vec(keep.clone(), &[b, real], &dev).unwrap();
        let mask = Mask::causal(offset, padded.then_some(&keep_t)).with_window(window);
        let got = attention(&q, &k, &v, &mask).unwrap().to_vec_f64().unwrap();
        let (qv, kv, vv) = (q.to_vec_f64().unwrap(), k.to_vec_f64().unwrap(), v.to_vec_f64().unwrap());
        for bi in 0..b {
            for hi in 0..h {
                let g = hi / (h / hkv);
                for i in 0..tq {
                    let pos = offset + i;
                    let sees = |j: usize| {
                        j < prefix || {
                            let r = j - prefix;
                            r <= pos && window.is_none_or(|w| r + w > pos) && keep[bi * real + r] > 0.5
                        }
                    };
                    let score = |j: usize| {
                        (0..d).map(|e| qv[((bi * h + hi) * tq + i) * d + e] * kv[((bi * hkv + g) * tk + j) * d + e]).sum::<f64>()
                            / (d as f64).sqrt()
                    };
                    let js: Vec<usize> = (0..tk).filter(|&j| sees(j)).collect();
                    let m = js.iter().map(|&j| score(j)).fold(f64::MIN, f64::max);
                    let z: f64 = js.iter().map(|&j| (score(j) - m).exp()).sum();
                    for e in 0..d {
                        let want: f64 = js.iter().map(|&j| (score(j) - m).exp() / z * vv[((bi * hkv + g) * tk + j) * d + e]).sum();
                        let at = ((bi * h + hi) * tq + i) * d + e;
                        assert!(
                            (got[at] - want).abs() < 1e-12,
                            "prefix {prefix} offset {offset} window {window:?}: [{bi},{hi},{i},{e}] {} vs {want}",
                            got[at]
                        );
                    }
                }
            }
        }
    }
    // Shapes that do not fit are errors naming them.
    let q = tinytune::Tensor::zeros(&[1, 3, 2, 4], DType::F32, &dev).unwrap();
    let k = tinytune::Tensor::zeros(&[1, 2, 2, 4], DType::F32, &dev).unwrap();
    let e = attention(&q, &k, &k, &Mask::causal(0, None)).unwrap_err().to_string();
    assert!(e.contains("multiple of the key/value heads") && e.contains("[1, 3, 2, 4]"), "{e}");
    let k = tinytune::Tensor::zeros(&[1, 3, 1, 4], DType::F32, &dev).unwrap();
    let e = attention(&q, &k, &k, &Mask::causal(0, None)).unwrap_err().to_string();
    assert!(e.contains("too few"), "{e}");
}

/// `--base-dtype auto` (the CLI's default): on the CPU the weights stay as stored; on a GPU
/// with shader-f16 the f32 matrices become f16 (norms stay f32, a bf16 checkpoint stays bf16),
/// and the logits stay within f16 rounding of transformers'.
#[test]
fn auto_base_dtype_is_f16_matrices_on_a_gpu_with_shader_f16() {
    use tinytune::quant::BaseDType;
    let dtypes = |m: &mut dyn models::CausalLm| {
        let mut v = Vec::new();
        m.visit_parameters(&mut |name, t| {
            v.push((name.to_string(), t.rank(), t.dtype()));
            Ok(())
        })
        .unwrap();
        v
    };
    let dir = fixture("tiny-llama");
    let mut cpu = models::load_with(&dir, &Device::Cpu, BaseDType::Auto).unwrap();
    let mut kept = models::load_with(&dir, &Device::Cpu, BaseDType::Keep).unwrap();
    assert_eq!(dtypes(cpu.as_mut()), dtypes(kept.as_mut()), "auto is keep on the CPU");
    let Some(gpu) = common::gpu_device() else { return };
    let Device::Gpu(g) = &gpu else { unreachable!() };
    if !g.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let mut m = models::load_with(&dir, &gpu, BaseDType::Auto).unwrap();
    let d = dtypes(m.as_mut());
    assert!(d.iter().filter(|(_, r, _)| *r == 2).all(|(_, _, t)| *t == DType::F16), "matrices in f16: {d:?}");
    assert!(d.iter().filter(|(_, r, _)| *r == 1).all(|(_, _, t)| *t == DType::F32), "norms stay f32: {d:?}");
    let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let ids = reference.load("ids", &gpu).unwrap().to_dtype(DType::U32).unwrap();
    let want = reference.load("logits", &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
    let got = m.forward(&ids, None).unwrap().to_vec::<f32>().unwrap();
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst > 0.0 && worst < 1e-2 * scale.max(1.0), "f16 weights: logits within f16 rounding ({worst} of {scale})");
    let mut bf = models::load_with(fixture("tiny-llama-tied-bf16"), &gpu, BaseDType::Auto).unwrap();
    assert!(dtypes(bf.as_mut()).iter().filter(|(_, r, _)| *r == 2).all(|(_, _, t)| *t == DType::BF16), "a bf16 checkpoint stays bf16");
}
