//! Fine-tuning methods on tiny models: gradients of every method's parameters against
//! central finite differences (float64 models), training drives the loss down, merge equals
//! unmerged, gradient checkpointing changes no gradient, only trainable tensors get one.

mod common;

use std::path::PathBuf;

use tinytune::models::{self, CausalLm};
use tinytune::nn::{with_adapters_off, BlockHook};
use tinytune::peft::{
    format, full, head, AdapterKind, BottleneckAdapter, BottleneckConfig, ClassifierHead, Ia3Adapter, Ia3Config, LoraAdapter, LoraConfig,
    Method, MethodConfig, Pooling, PrefixConfig, PromptConfig,
};
use tinytune::{CrossEntropyReduction, DType, Device, Rng, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load(name: &str, dtype: DType) -> Box<dyn CausalLm> {
    let mut m = models::load(fixture(name), &Device::Cpu).unwrap();
    m.visit_parameters(&mut |_, t| {
        *t = t.to_dtype(dtype)?;
        Ok(())
    })
    .unwrap();
    m
}

/// Two rows of 6 tokens, the second right-padded after 4.
fn batch(dev: &Device) -> (Tensor, Tensor, Tensor) {
    let ids = Tensor::from_vec(vec![3u32, 17, 5, 9, 22, 1, 7, 7, 30, 2, 0, 0], &[2, 6], dev).unwrap();
    let keep = Tensor::from_vec(vec![1f32, 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0.], &[2, 6], dev).unwrap();
    // next-token targets, -100 on the last position and on padding
    let targets = Tensor::from_vec(vec![17i32, 5, 9, 22, 1, -100, 7, 30, 2, -100, -100, -100], &[2, 6], dev).unwrap();
    (ids, keep, targets)
}

fn lm_loss(model: &dyn CausalLm) -> Tensor {
    let (ids, keep, targets) = batch(&Device::Cpu);
    let keep = keep.to_dtype(model.lm_head().weight.dtype()).unwrap();
    model.forward(&ids, Some(&keep)).unwrap().cross_entropy(&targets, -100, CrossEntropyReduction::Mean).unwrap()
}

/// Fill a tensor with seeded normal values (so `B = 0` does not make a check vacuous).
fn randomize(t: &Tensor, std: f64, seed: u64) {
    let v = Tensor::randn(t.shape(), 0.0, std, t.dtype(), t.device(), &mut Rng::new(seed)).unwrap();
    t.set_data(&v).unwrap();
}

/// Central differences of `loss` with respect to a few entries of `p`, against `p.grad()`.
fn check_grad(name: &str, p: &Tensor, loss: &dyn Fn() -> f64) {
    let g = p.grad().unwrap_or_else(|| panic!("{name}: no gradient")).to_vec_f64().unwrap();
    let base = p.to_vec_f64().unwrap();
    let n = base.len();
    let picks: Vec<usize> = [0, 1, n / 3, n / 2, n - 1].into_iter().filter(|&i| i < n).collect();
    let eps = 1e-5;
    for i in picks {
        let at = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            p.set_data(&Tensor::from_vec(v, p.shape(), p.device()).unwrap()).unwrap();
            loss()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        p.set_data(&Tensor::from_vec(base.clone(), p.shape(), p.device()).unwrap()).unwrap();
        assert!((fd - g[i]).abs() <= 1e-6 + 1e-5 * fd.abs(), "{name}[{i}]: finite difference {fd}, autograd {}", g[i]);
    }
}

fn lora_config(targets: &[&str]) -> LoraConfig {
    LoraConfig { r: 2, alpha: 4.0, targets: targets.iter().map(|s| s.to_string()).collect(), ..LoraConfig::default() }
}

#[test]
fn lora_gradients_match_finite_differences() {
    for (rslora, targets) in [(false, vec!["q_proj", "v_proj"]), (true, vec!["all-linear"])] {
        let mut model = load("tiny-llama", DType::F64);
        let cfg = LoraConfig { rslora, ..lora_config(&targets) };
        let lora = LoraAdapter::attach(model.as_mut(), cfg).unwrap();
        for (i, (_, p)) in lora.parameters().iter().enumerate() {
            randomize(p, 0.2, i as u64);
        }
        lm_loss(model.as_ref()).backward().unwrap();
        for (name, p) in lora.parameters().iter().step_by(3) {
            check_grad(name, p, &|| lm_loss(model.as_ref()).to_scalar().unwrap());
        }
    }
}

#[test]
fn gpt2_lora_gradients_match_finite_differences() {
    let mut model = load("tiny-gpt2-f16", DType::F64);
    let lora = LoraAdapter::attach(model.as_mut(), lora_config(&["c_attn", "c_proj"])).unwrap();
    assert_eq!(lora.layers.len(), 2 * 3, "c_attn, attn.c_proj and mlp.c_proj in each of 2 blocks");
    for (i, (_, p)) in lora.parameters().iter().enumerate() {
        randomize(p, 0.2, i as u64);
    }
    lm_loss(model.as_ref()).backward().unwrap();
    for (name, p) in lora.parameters().iter().step_by(5) {
        check_grad(name, p, &|| lm_loss(model.as_ref()).to_scalar().unwrap());
    }
}

#[test]
fn full_finetuning_gradients_match_finite_differences() {
    let mut model = load("tiny-llama", DType::F64);
    let params = full::make_trainable(model.as_mut()).unwrap();
    assert_eq!(params.len(), 1 + 2 * 9 + 2, "embedding, 2 × (2 norms + 7 linears), final norm, lm_head");
    lm_loss(model.as_ref()).backward().unwrap();
    for (name, p) in params.iter().step_by(4) {
        check_grad(name, p, &|| lm_loss(model.as_ref()).to_scalar().unwrap());
    }
}

#[test]
fn tied_embeddings_stay_tied_in_full_finetuning() {
    let mut model = load("tiny-llama-tied-bf16", DType::F32);
    let params = full::make_trainable(model.as_mut()).unwrap();
    assert!(params.iter().all(|(n, _)| n != "lm_head.weight"), "a tied head is the embedding");
    let embed = &params.iter().find(|(n, _)| n == "model.embed_tokens.weight").unwrap().1;
    assert_eq!(model.lm_head().weight.id(), embed.id());
}

#[test]
fn dora_gradients_treat_the_norm_as_constant() {
    // One DoRA site: y = (m / n0) ⊙ (x W0ᵀ + s x Aᵀ Bᵀ) with n0 = ‖W0 + s B A‖_row held fixed.
    let mut model = load("tiny-llama", DType::F64);
    let cfg = LoraConfig { dora: true, ..lora_config(&["model.layers.0.self_attn.v_proj"]) };
    let lora = LoraAdapter::attach(model.as_mut(), cfg).unwrap();
    let layer = lora.layers[0].clone();
    let m = layer.magnitude.clone().unwrap();
    // m starts at the row norms of W0.
    let lin = model.linears_mut().into_iter().find(|l| l.name == layer.site).unwrap().clone();
    let w0 = lin.weight.to_vec_f64().unwrap();
    let (out, inp, r) = (lin.out_features(), lin.in_features(), 2);
    for (o, mo) in m.to_vec_f64().unwrap().iter().enumerate() {
        let norm = w0[o * inp..(o + 1) * inp].iter().map(|w| w * w).sum::<f64>().sqrt();
        assert!((mo - norm).abs() < 1e-12);
    }
    randomize(&layer.a, 0.3, 1);
    randomize(&layer.b, 0.3, 2);
    let mut rng = Rng::new(5);
    let x = Tensor::randn(&[3, inp], 0.0, 1.0, DType::F64, &Device::Cpu, &mut rng).unwrap();
    let g = Tensor::randn(&[3, out], 0.0, 1.0, DType::F64, &Device::Cpu, &mut rng).unwrap();
    let perturbed = m.add(&Tensor::randn(&[out], 0.0, 0.1, DType::F64, &Device::Cpu, &mut rng).unwrap()).unwrap();
    m.set_data(&perturbed).unwrap();
    let s = layer.scale;
    // Plain-loop reference with the norm computed from the current A, B (or frozen ones).
    let reference = |a: &[f64], b: &[f64], m: &[f64], n0: Option<&[f64]>| -> (f64, Vec<f64>) {
        let mut w = w0.clone();
        for o in 0..out {
            for i in 0..inp {
                w[o * inp + i] += s * (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum::<f64>();
            }
        }
        let norms: Vec<f64> = (0..out).map(|o| w[o * inp..(o + 1) * inp].iter().map(|v| v * v).sum::<f64>().sqrt()).collect();
        let n = n0.map_or(norms.clone(), |n| n.to_vec());
        let (xv, gv) = (x.to_vec_f64().unwrap(), g.to_vec_f64().unwrap());
        let mut total = 0.0;
        for row in 0..3 {
            for o in 0..out {
                let y: f64 = (0..inp).map(|i| xv[row * inp + i] * w[o * inp + i]).sum::<f64>() * m[o] / n[o];
                total += y * gv[row * out + o];
            }
        }
        (total, norms)
    };
    let y = lin.forward(&x).unwrap();
    let loss = y.mul(&g).unwrap().sum_all().unwrap();
    let (a0, b0, m0) = (layer.a.to_vec_f64().unwrap(), layer.b.to_vec_f64().unwrap(), m.to_vec_f64().unwrap());
    let (want, n0) = reference(&a0, &b0, &m0, None);
    assert!((loss.to_scalar().unwrap() - want).abs() < 1e-9 * want.abs().max(1.0), "DoRA forward");
    loss.backward().unwrap();
    let eps = 1e-6;
    for (name, p, which) in [("A", &layer.a, 0), ("B", &layer.b, 1), ("m", &m, 2)] {
        let grad = p.grad().unwrap().to_vec_f64().unwrap();
        let base = p.to_vec_f64().unwrap();
        for i in [0, base.len() / 2, base.len() - 1] {
            let f = |d: f64| {
                let mut v = [a0.clone(), b0.clone(), m0.clone()];
                v[which][i] += d;
                reference(&v[0], &v[1], &v[2], Some(&n0)).0
            };
            let fd = (f(eps) - f(-eps)) / (2.0 * eps);
            assert!((fd - grad[i]).abs() < 1e-6 * fd.abs().max(1.0), "DoRA d{name}[{i}]: fd {fd} vs {}", grad[i]);
        }
    }
}

#[test]
fn head_gradients_and_pooling() {
    for pooling in [Pooling::Last, Pooling::Mean] {
        let model = load("tiny-llama", DType::F64);
        let mut h = ClassifierHead::new(model.hidden_size(), 3, pooling, &mut Rng::new(1), &Device::Cpu).unwrap();
        h.linear.weight = h.linear.weight.to_dtype(DType::F64).unwrap().requires_grad().unwrap();
        let (ids, keep, _) = batch(&Device::Cpu);
        let keep = keep.to_dtype(DType::F64).unwrap();
        let labels = Tensor::from_vec(vec![2i32, 0], &[2], &Device::Cpu).unwrap();
        let loss = || {
            let hidden = model.hidden_states(&ids, Some(&keep), None).unwrap();
            h.forward(&hidden, Some(&keep)).unwrap().cross_entropy(&labels, -100, CrossEntropyReduction::Mean).unwrap()
        };
        loss().backward().unwrap();
        check_grad("score.weight", &h.linear.weight, &|| loss().to_scalar().unwrap());
        // Pooling picks the last real token (position 3 of row 1) or the mean over real ones.
        let hidden = model.hidden_states(&ids, Some(&keep), None).unwrap();
        let pooled = h.pool(&hidden, Some(&keep)).unwrap().to_vec_f64().unwrap();
        let hv = hidden.to_vec_f64().unwrap();
        let d = model.hidden_size();
        let at = |b: usize, t: usize| &hv[(b * 6 + t) * d..(b * 6 + t + 1) * d];
        let want: Vec<f64> = match pooling {
            Pooling::Last => at(1, 3).to_vec(),
            Pooling::Mean => (0..d).map(|j| (0..4).map(|t| at(1, t)[j]).sum::<f64>() / 4.0).collect(),
        };
        for j in 0..d {
            assert!((pooled[d + j] - want[j]).abs() < 1e-12, "{pooling:?} pooling");
        }
    }
}

#[test]
fn growing_a_head_keeps_the_learned_rows() {
    let mut h = ClassifierHead::new(8, 4, Pooling::Last, &mut Rng::new(3), &Device::Cpu).unwrap();
    let before = h.linear.weight.to_vec_f64().unwrap();
    h.grow(6, &mut Rng::new(4)).unwrap();
    assert_eq!(h.linear.weight.shape(), &[6, 8]);
    let after = h.linear.weight.to_vec_f64().unwrap();
    assert_eq!(&after[..32], &before[..]);
    assert!(after[32..].iter().any(|&v| v != 0.0));
    assert!(h.linear.weight.requires_grad_flag());
    assert!(h.grow(5, &mut Rng::new(4)).is_err(), "shrinking is refused");
}

#[test]
fn merged_equals_unmerged_and_unmerge_restores() {
    for (dora, rslora) in [(false, false), (false, true), (true, false)] {
        let mut model = load("tiny-llama", DType::F32);
        let base = model.linears_mut()[0].weight.to_vec::<f32>().unwrap();
        let cfg = LoraConfig { dora, rslora, ..lora_config(&["q_proj", "k_proj", "down_proj"]) };
        let lora = LoraAdapter::attach(model.as_mut(), cfg).unwrap();
        for (i, (_, p)) in lora.parameters().iter().enumerate() {
            let noise = Tensor::randn(p.shape(), 0.0, 0.2, p.dtype(), p.device(), &mut Rng::new(i as u64)).unwrap();
            p.set_data(&p.add(&noise).unwrap()).unwrap();
        }
        let (ids, keep, _) = batch(&Device::Cpu);
        let plain = load("tiny-llama", DType::F32).forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
        let unmerged = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
        let merged_state = lora.merge(model.as_mut()).unwrap();
        assert!(model.linears_mut().iter().all(|l| l.adapters.is_empty()));
        let merged = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
        let worst = unmerged.iter().zip(&merged).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let changed = unmerged.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "dora={dora}: merged differs from unmerged by {worst}");
        assert!(changed > 1e-2, "the adapter must change the output ({changed})");
        lora.unmerge(model.as_mut(), merged_state).unwrap();
        let restored = model.linears_mut()[0].weight.to_vec::<f32>().unwrap();
        let worst = base.iter().zip(&restored).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "unmerge restores W0 (off by {worst})");
        let again = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
        let worst = unmerged.iter().zip(&again).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "unmerged again ({worst})");
    }
}

#[test]
fn only_trainable_tensors_get_gradients() {
    let mut model = load("tiny-llama", DType::F32);
    let lora = LoraAdapter::attach(model.as_mut(), lora_config(&["q_proj"])).unwrap();
    lm_loss(model.as_ref()).backward().unwrap();
    let params = models::parameters(model.as_mut()).unwrap();
    assert!(params.iter().all(|(_, t)| !t.requires_grad_flag() && t.grad().is_none()), "frozen weights have no gradient");
    // B = 0 at init, so A gets a zero gradient but B a non-zero one.
    let (_, b) = &lora.parameters()[1];
    assert!(b.grad().unwrap().to_vec_f64().unwrap().iter().any(|&v| v != 0.0));
}

#[test]
fn gradient_checkpointing_changes_no_gradient() {
    for dropout in [0.0, 0.3] {
        let grads = |ckpt: bool| {
            let mut model = load("tiny-llama", DType::F64);
            model.set_gradient_checkpointing(ckpt);
            let params = full::make_trainable(model.as_mut()).unwrap();
            let cfg = LoraConfig { dropout, ..lora_config(&["q_proj", "up_proj"]) };
            let lora = LoraAdapter::attach(model.as_mut(), cfg).unwrap();
            lora.set_training(true);
            for (i, (_, p)) in lora.parameters().iter().enumerate() {
                randomize(p, 0.2, i as u64);
            }
            lm_loss(model.as_ref()).backward().unwrap();
            params
                .iter()
                .chain(lora.parameters().iter())
                .map(|(n, p)| (n.clone(), p.grad().unwrap().to_vec_f64().unwrap()))
                .collect::<Vec<_>>()
        };
        let (plain, ckpt) = (grads(false), grads(true));
        assert_eq!(plain.len(), ckpt.len());
        for ((n, a), (_, b)) in plain.iter().zip(&ckpt) {
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max);
            assert!(worst < 1e-12, "dropout {dropout}: {n} differs by {worst} with checkpointing");
        }
    }
}

/// A few plain SGD steps (the optimizers are tested on their own).
fn sgd_run(params: &[(String, Tensor)], steps: usize, lr: f64, loss: &dyn Fn() -> Tensor) -> (f64, f64) {
    let first = loss().to_scalar().unwrap();
    for _ in 0..steps {
        for (_, p) in params {
            p.zero_grad();
        }
        loss().backward().unwrap();
        for (_, p) in params {
            if let Some(g) = p.grad() {
                p.set_data(&p.sub(&g.mul_scalar(lr).unwrap()).unwrap()).unwrap();
            }
        }
    }
    (first, loss().to_scalar().unwrap())
}

#[test]
fn every_method_drives_the_loss_down() {
    // LoRA, DoRA, full: language-modelling loss on one batch.
    for method in ["lora", "dora", "full"] {
        let mut model = load("tiny-llama", DType::F32);
        let params = match method {
            "full" => full::make_trainable(model.as_mut()).unwrap(),
            m => LoraAdapter::attach(model.as_mut(), LoraConfig { dora: m == "dora", r: 4, ..lora_config(&["all-linear"]) })
                .unwrap()
                .parameters(),
        };
        let (first, last) = sgd_run(&params, 30, if method == "full" { 0.5 } else { 2.0 }, &|| lm_loss(model.as_ref()));
        assert!(last < 0.7 * first, "{method}: loss {first} → {last}");
    }
    // Head alone (body frozen), then head + LoRA body.
    for with_body in [false, true] {
        let mut model = load("tiny-llama", DType::F32);
        let head = ClassifierHead::new(model.hidden_size(), 3, Pooling::Last, &mut Rng::new(1), &Device::Cpu).unwrap();
        let mut params = head.parameters();
        if with_body {
            params.extend(LoraAdapter::attach(model.as_mut(), lora_config(&["q_proj", "v_proj"])).unwrap().parameters());
        }
        let (ids, keep, _) = batch(&Device::Cpu);
        let labels = Tensor::from_vec(vec![2i32, 0], &[2], &Device::Cpu).unwrap();
        let loss = || {
            let hidden = model.hidden_states(&ids, Some(&keep), None).unwrap();
            head.forward(&hidden, Some(&keep)).unwrap().cross_entropy(&labels, -100, CrossEntropyReduction::Mean).unwrap()
        };
        let (first, last) = sgd_run(&params, 30, 1.0, &loss);
        assert!(last < 0.5 * first, "head (body: {with_body}): loss {first} → {last}");
        let hidden = model.hidden_states(&ids, Some(&keep), None).unwrap();
        assert_eq!(head::correct(&head.forward(&hidden, Some(&keep)).unwrap(), &labels).unwrap(), 2);
    }
}

#[test]
fn unknown_targets_and_layers_are_clear_errors() {
    let mut model = load("tiny-llama", DType::F32);
    let e = LoraAdapter::attach(model.as_mut(), lora_config(&["qkv_proj"])).unwrap_err().to_string();
    assert!(e.contains("qkv_proj") && e.contains("q_proj") && e.contains("gate_proj"), "{e}");
    let e = LoraAdapter::attach(model.as_mut(), LoraConfig { layers: Some(vec![7]), ..lora_config(&["q_proj"]) }).unwrap_err().to_string();
    assert!(e.contains("layer 7") && e.contains("0..2"), "{e}");
    let e = LoraAdapter::attach(model.as_mut(), LoraConfig { r: 0, ..lora_config(&["q_proj"]) }).unwrap_err().to_string();
    assert!(e.contains("rank"), "{e}");
    LoraAdapter::attach(model.as_mut(), lora_config(&["q_proj"])).unwrap();
    let e = LoraAdapter::attach(model.as_mut(), lora_config(&["q_proj"])).unwrap_err().to_string();
    assert!(e.contains("already has an adapter"), "{e}");
}

#[test]
fn merged_checkpoints_reload_to_the_same_logits() {
    // GPT-2 (Conv1D weights written back as in×out, tied head) and LLaMA (untied head).
    for name in ["tiny-gpt2-f16", "tiny-llama"] {
        let mut model = load(name, DType::F32);
        let targets: &[&str] = if name.contains("gpt2") { &["c_attn", "c_fc"] } else { &["q_proj", "down_proj"] };
        let lora = LoraAdapter::attach(model.as_mut(), lora_config(targets)).unwrap();
        for (i, (_, p)) in lora.parameters().iter().enumerate() {
            randomize(p, 0.2, i as u64);
        }
        let (ids, keep, _) = batch(&Device::Cpu);
        let want = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
        lora.merge(model.as_mut()).unwrap();
        let dir = std::env::temp_dir().join(format!("tinytune-merged-{}-{name}", std::process::id()));
        models::save_checkpoint(model.as_mut(), &dir).unwrap();
        let reloaded = models::load(&dir, &Device::Cpu).unwrap();
        let got = reloaded.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
        let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{name}: the merged checkpoint's logits differ by {worst}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

// ---- The sites, the adapters-off scope and the methods built on them ----

/// Every trainable tensor of `m`, set to `1 + N(0, std²)` (IA³) or `N(0, std²)`, seeded.
fn perturb(m: &dyn Method, std: f64, around_one: bool) {
    for (i, (_, p)) in m.parameters().iter().enumerate() {
        let v =
            Tensor::randn(p.shape(), if around_one { 1.0 } else { 0.0 }, std, p.dtype(), p.device(), &mut Rng::new(40 + i as u64)).unwrap();
        p.set_data(&v).unwrap();
    }
}

fn ia3_default() -> Ia3Config {
    Ia3Config::default()
}

fn bottleneck(kind: AdapterKind) -> BottleneckConfig {
    BottleneckConfig { kind, reduction_factor: 8, ..BottleneckConfig::default() }
}

#[test]
fn ia3_and_bottleneck_gradients_match_finite_differences() {
    for base in ["tiny-llama", "tiny-gpt2-f16"] {
        let configs: Vec<(&str, Box<dyn MethodConfig>, bool)> = vec![
            ("ia3", Box::new(ia3_default()), true),
            ("houlsby", Box::new(bottleneck(AdapterKind::Houlsby)), false),
            ("pfeiffer", Box::new(bottleneck(AdapterKind::Pfeiffer)), false),
        ];
        for (name, cfg, around_one) in configs {
            let mut model = load(base, DType::F64);
            let m = cfg.attach(model.as_mut(), 3).unwrap();
            assert!(!m.parameters().is_empty(), "{base} {name}");
            perturb(m.as_ref(), 0.3, around_one);
            lm_loss(model.as_ref()).backward().unwrap();
            for (pname, p) in m.parameters().iter().step_by(3) {
                check_grad(&format!("{base} {name} {pname}"), p, &|| lm_loss(model.as_ref()).to_scalar().unwrap());
            }
        }
    }
}

#[test]
fn ia3_sites_shapes_and_defaults() {
    // LLaMA: k, v scale their outputs (out, 1); down_proj its input (1, in), as PEFT.
    let mut model = load("tiny-llama", DType::F32);
    let ia3 = Ia3Adapter::attach(model.as_mut(), ia3_default()).unwrap();
    let names: Vec<String> = ia3.parameters().iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names.len(), 2 * 3, "{names:?}");
    let shape = |suffix: &str| ia3.parameters().into_iter().find(|(n, _)| n.ends_with(suffix)).unwrap().1.shape().to_vec();
    let d = model.hidden_size();
    let kv = model.linears_mut().into_iter().find(|l| l.name.ends_with("0.self_attn.k_proj")).unwrap().out_features();
    let inter = model.linears_mut().into_iter().find(|l| l.name.ends_with("0.mlp.down_proj")).unwrap().in_features();
    assert_eq!(shape("layers.0.self_attn.k_proj.ia3_l"), [kv, 1]);
    assert_eq!(shape("layers.0.mlp.down_proj.ia3_l"), [1, inter]);
    assert!(inter != d);
    // Init 1: the model is the base model.
    let (ids, keep, _) = batch(&Device::Cpu);
    let base = load("tiny-llama", DType::F32).forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
    assert_eq!(model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap(), base);
    // Bad targets name the field.
    let mut model = load("tiny-llama", DType::F32);
    let e =
        Ia3Adapter::attach(model.as_mut(), Ia3Config { targets: vec!["input_layernorm".into()], ..ia3_default() }).unwrap_err().to_string();
    assert!(e.contains("ia3 target_modules") && e.contains("input_layernorm") && e.contains("k_proj"), "{e}");
    let cfg = Ia3Config { targets: vec!["k_proj".into()], feedforward: vec!["down_proj".into()], layers: None };
    let e = Ia3Adapter::attach(model.as_mut(), cfg).unwrap_err().to_string();
    assert!(e.contains("feedforward_modules") && e.contains("subset"), "{e}");
}

#[test]
fn ia3_merged_equals_unmerged_and_unmerge_restores() {
    for base in ["tiny-llama", "tiny-gpt2-f16"] {
        let mut model = load(base, DType::F32);
        let w0: Vec<Vec<f32>> = model.linears_mut().iter().map(|l| l.weight.to_vec::<f32>().unwrap()).collect();
        let ia3 = Ia3Adapter::attach(model.as_mut(), ia3_default()).unwrap();
        perturb(&ia3, 0.3, true);
        let (ids, keep, _) = batch(&Device::Cpu);
        let plain = load(base, DType::F32).forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
        let unmerged = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
        Method::merge(&ia3, model.as_mut()).unwrap();
        assert!(model.linears_mut().iter().all(|l| l.adapters.is_empty()));
        let merged = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
        let worst = unmerged.iter().zip(&merged).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let changed = unmerged.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4 && changed > 1e-2, "{base}: merged vs unmerged {worst}, change {changed}");
        ia3.unmerge(model.as_mut()).unwrap();
        for (l, w) in model.linears_mut().iter().zip(&w0) {
            let worst = l.weight.to_vec::<f32>().unwrap().iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{base} {}: unmerge restores W0 (off by {worst})", l.name);
        }
        let again = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
        assert!(again.iter().zip(&unmerged).all(|(a, b)| (a - b).abs() < 1e-4));
    }
}

#[test]
fn every_method_saves_and_loads_to_the_same_logits() {
    let dir = std::env::temp_dir().join(format!("tinytune-methods-{}", std::process::id()));
    for base in ["tiny-llama", "tiny-gpt2-f16"] {
        let configs: Vec<(&str, Box<dyn MethodConfig>, bool)> = vec![
            ("ia3", Box::new(ia3_default()), true),
            ("houlsby", Box::new(BottleneckConfig { layers: Some(vec![1]), ..bottleneck(AdapterKind::Houlsby) }), false),
            ("pfeiffer", Box::new(bottleneck(AdapterKind::Pfeiffer)), false),
            ("prefix", Box::new(PrefixConfig { num_virtual_tokens: 3, ..PrefixConfig::default() }), false),
            (
                "prefix-projection",
                Box::new(PrefixConfig { num_virtual_tokens: 3, prefix_projection: true, encoder_hidden_size: 16 }),
                false,
            ),
            ("prompt", Box::new(PromptConfig { num_virtual_tokens: 3, ..PromptConfig::default() }), false),
            ("lora", Box::new(lora_config(&[if base == "tiny-llama" { "q_proj" } else { "c_attn" }])), false),
        ];
        for (name, cfg, around_one) in configs {
            let mut model = load(base, DType::F32);
            let m = cfg.attach(model.as_mut(), 5).unwrap();
            perturb(m.as_ref(), 0.3, around_one);
            let (ids, keep, _) = batch(&Device::Cpu);
            let want = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
            let out = dir.join(format!("{base}-{name}"));
            format::save(&out, model.as_mut(), Some(m.as_ref()), None, base).unwrap();
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
            let mut again = load(base, DType::F32);
            let loaded = format::load(&out, again.as_mut(), &Device::Cpu).unwrap_or_else(|e| panic!("{base} {name}: {e}"));
            assert!(loaded.warnings.is_empty(), "{base} {name}: {:?}", loaded.warnings);
            assert_eq!(loaded.method.name(), m.name(), "{base} {name}: {config}");
            let got = again.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
            assert_eq!(got, want, "{base} {name}: reloaded logits");
            // Taken off again, the model is the base model.
            loaded.method.remove(again.as_mut()).unwrap();
            let plain = load(base, DType::F32).forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
            assert_eq!(again.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap(), plain, "{base} {name}: removed");
        }
    }
    // A bottleneck adapter made for another model (other width, other layer count) is refused
    // naming the tensor or the module.
    let mut gpt2 = load("tiny-gpt2-f16", DType::F32);
    let e = format::load(&dir.join("tiny-llama-pfeiffer"), gpt2.as_mut(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp") && e.contains("not an attention or MLP module"), "{e}");
    let src = dir.join("tiny-llama-houlsby");
    let bad = dir.join("bad-width");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(src.join("adapter_model.safetensors"), bad.join("adapter_model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    std::fs::write(bad.join("adapter_config.json"), cfg.replace("\"bottleneck_size\": 4", "\"bottleneck_size\": 5")).unwrap();
    let e = format::load(&bad, load("tiny-llama", DType::F32).as_mut(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("bottleneck.down.weight has shape") && e.contains("bottleneck 5"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn adapters_off_is_the_base_model_also_when_recomputed() {
    let (ids, keep, targets) = batch(&Device::Cpu);
    // The reference: the plain model, its final norm trainable.
    let trainable_norm = |m: &mut dyn CausalLm| -> Tensor {
        let mut norm = None;
        m.visit_parameters(&mut |name, t| {
            if name == "model.norm.weight" {
                *t = t.requires_grad()?;
                norm = Some(t.clone());
            }
            Ok(())
        })
        .unwrap();
        norm.unwrap()
    };
    let mut plain = load("tiny-llama", DType::F64);
    let norm0 = trainable_norm(plain.as_mut());
    let loss = |m: &dyn CausalLm| {
        m.forward(&ids, Some(&keep.to_dtype(DType::F64).unwrap()))
            .unwrap()
            .cross_entropy(&targets, -100, CrossEntropyReduction::Mean)
            .unwrap()
    };
    let l0 = loss(plain.as_ref());
    l0.backward().unwrap();
    for checkpointing in [false, true] {
        let mut model = load("tiny-llama", DType::F64);
        let norm = trainable_norm(model.as_mut());
        model.set_gradient_checkpointing(checkpointing);
        let lora = LoraAdapter::attach(model.as_mut(), lora_config(&["q_proj", "v_proj"])).unwrap();
        perturb(&lora, 0.3, false);
        let adapters = Ia3Adapter::attach(model.as_mut(), ia3_default()).unwrap();
        perturb(&adapters, 0.3, true);
        let bn = BottleneckAdapter::attach(model.as_mut(), bottleneck(AdapterKind::Houlsby), 1).unwrap();
        perturb(&bn, 0.3, false);
        assert!((loss(model.as_ref()).to_scalar().unwrap() - l0.to_scalar().unwrap()).abs() > 1e-3, "the methods change the loss");
        // Off: the base model's loss; backward runs outside the scope, so a recomputation
        // must restore the forward's state to give the base model's gradient.
        let off = with_adapters_off(|| loss(model.as_ref()));
        assert!((off.to_scalar().unwrap() - l0.to_scalar().unwrap()).abs() < 1e-12, "checkpointing={checkpointing}");
        off.backward().unwrap();
        let (g, g0) = (norm.grad().unwrap().to_vec_f64().unwrap(), norm0.grad().unwrap().to_vec_f64().unwrap());
        let worst = g.iter().zip(&g0).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-12, "checkpointing={checkpointing}: the norm's gradient differs from the base model's by {worst}");
        for m in [&lora as &dyn Method, &adapters, &bn] {
            assert!(m.parameters().iter().all(|(_, p)| p.grad().is_none()), "{}: no gradient with adapters off", m.name());
        }
        assert!(tinytune::nn::adapters_enabled(), "the scope ends");
    }
}

/// A hook that records the residual stream after each block.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<(usize, Tensor)>>);

impl BlockHook for Recorder {
    fn block_out(&self, layer: usize, h: Tensor) -> tinytune::Result<Tensor> {
        self.0.lock().unwrap().push((layer, h.clone()));
        Ok(h)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn every_layers_hidden_states_as_transformers_returns_them() {
    for base in ["tiny-llama", "tiny-gpt2-f16"] {
        let mut model = load(base, DType::F32);
        let rec = std::sync::Arc::new(Recorder::default());
        for b in model.decoder_mut().blocks.iter_mut() {
            b.hooks.push(rec.clone());
        }
        let (ids, keep, _) = batch(&Device::Cpu);
        let h = model.forward_hidden(&ids, Some(&keep), None, true).unwrap();
        let n = model.num_layers();
        assert_eq!(h.all.len(), n + 1, "{base}: embeddings, each block but the last, the final normed states");
        assert_eq!(h.all[0].to_vec::<f32>().unwrap(), model.embed(&ids, 0).unwrap().to_vec::<f32>().unwrap());
        assert_eq!(h.all[n].to_vec::<f32>().unwrap(), h.last.to_vec::<f32>().unwrap());
        // Every layer's states come from the padded batch (no packing): the same forward.
        let plain = tinytune::nn::without_packing(|| model.hidden_states(&ids, Some(&keep), None)).unwrap();
        assert_eq!(h.last.to_vec::<f32>().unwrap(), plain.to_vec::<f32>().unwrap());
        let seen = rec.0.lock().unwrap();
        assert_eq!(seen.iter().map(|(l, _)| *l).take(n).collect::<Vec<_>>(), (0..n).collect::<Vec<_>>());
        for k in 1..n {
            assert_eq!(h.all[k].to_vec::<f32>().unwrap(), seen[k - 1].1.to_vec::<f32>().unwrap(), "{base}: layer {k}");
        }
    }
}

#[test]
fn prefix_gradients_match_finite_differences() {
    for base in ["tiny-llama", "tiny-gpt2-f16"] {
        for projection in [false, true] {
            let mut model = load(base, DType::F64);
            let cfg = PrefixConfig { num_virtual_tokens: 3, prefix_projection: projection, encoder_hidden_size: 8 };
            let m = cfg.attach(model.as_mut(), 1).unwrap();
            lm_loss(model.as_ref()).backward().unwrap();
            for (name, p) in m.parameters() {
                check_grad(&format!("{base} projection={projection} {name}"), &p, &|| lm_loss(model.as_ref()).to_scalar().unwrap());
            }
        }
    }
}

/// With a prefix, positions start after it (as Hugging Face counts a prefix in the cache),
/// the prefix keys are not rotated, and every query sees the prefix: the KV-cached forward,
/// one step at a time, gives the full forward's logits, and greedy generation is the same
/// with and without the cache.
#[test]
fn prefix_with_the_kv_cache_equals_the_full_forward() {
    use tinytune::models::KvCache;
    for base in ["tiny-llama", "tiny-gpt2-f16"] {
        let mut model = load(base, DType::F32);
        let m = PrefixConfig { num_virtual_tokens: 4, ..PrefixConfig::default() }.attach(model.as_mut(), 2).unwrap();
        perturb(m.as_ref(), 0.5, false);
        let ids: Vec<u32> = vec![3, 17, 5, 9, 22, 1, 7];
        let full = model.forward(&Tensor::from_vec(ids.clone(), &[1, 7], &Device::Cpu).unwrap(), None).unwrap().to_vec::<f32>().unwrap();
        let plain = load(base, DType::F32).forward(&Tensor::from_vec(ids.clone(), &[1, 7], &Device::Cpu).unwrap(), None).unwrap();
        let changed = full.iter().zip(plain.to_vec::<f32>().unwrap()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(changed > 1e-2, "{base}: the prefix changes the output ({changed})");
        let mut cache = KvCache::new(model.num_layers());
        let mut got = Vec::new();
        for (a, b) in [(0, 3), (3, 4), (4, 7)] {
            let step = Tensor::from_vec(ids[a..b].to_vec(), &[1, b - a], &Device::Cpu).unwrap();
            got.extend(model.forward_cached(&step, None, Some(&mut cache)).unwrap().to_vec::<f32>().unwrap());
        }
        assert_eq!(cache.len(), 7, "the cache counts real positions");
        let worst = got.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{base}: cached logits with a prefix differ by {worst}");
        // Greedy generation (KV cache) against argmax of full forwards.
        let opts = tinytune::models::GenerateOptions { max_new_tokens: 5, ..Default::default() };
        let gen = tinytune::models::generate(model.as_ref(), &ids[..3], &opts, &mut |_| Ok(()), &Device::Cpu).unwrap();
        let mut seq = ids[..3].to_vec();
        for _ in 0..5 {
            let logits = model.forward(&Tensor::from_vec(seq.clone(), &[1, seq.len()], &Device::Cpu).unwrap(), None).unwrap();
            let last = logits.narrow(1, seq.len() - 1, 1).unwrap().argmax(-1, false).unwrap().to_vec::<u32>().unwrap()[0];
            seq.push(last);
        }
        assert_eq!(gen, seq[3..], "{base}: greedy with the cache equals greedy without it");
    }
}

#[test]
fn prefix_bad_input_names_the_field() {
    // Longer than the context (64 positions) allows.
    let mut model = load("tiny-gpt2-f16", DType::F32);
    let e = PrefixConfig { num_virtual_tokens: 64, ..PrefixConfig::default() }.attach(model.as_mut(), 0).unwrap_err().to_string();
    assert!(e.contains("num_virtual_tokens = 64") && e.contains("64 positions"), "{e}");
    // A forward that, with the prefix, runs past the context.
    PrefixConfig { num_virtual_tokens: 60, ..PrefixConfig::default() }.attach(model.as_mut(), 0).unwrap();
    let ids = Tensor::from_vec(vec![1u32; 5], &[1, 5], &Device::Cpu).unwrap();
    let e = model.forward(&ids, None).unwrap_err().to_string();
    assert!(e.contains("exceeds n_positions 64"), "{e}");
    // An adapter for another model: layer count or width.
    let dir = std::env::temp_dir().join(format!("tinytune-prefix-{}", std::process::id()));
    let mut llama = load("tiny-llama", DType::F32);
    let m = PrefixConfig { num_virtual_tokens: 2, ..PrefixConfig::default() }.attach(llama.as_mut(), 0).unwrap();
    format::save(&dir, llama.as_mut(), Some(m.as_ref()), None, "tiny-llama").unwrap();
    // Another model: its key/value width differs (GQA LLaMA 16, GPT-2 32), named by the field;
    // without the field, by the table's shape.
    let e = format::load(&dir, load("tiny-gpt2-f16", DType::F32).as_mut(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("'token_dim' = 16, but the model has 32") && e.contains("another model"), "{e}");
    let cfg = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v.as_object_mut().unwrap().remove("token_dim");
    std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap();
    let e = format::load(&dir, load("tiny-gpt2-f16", DType::F32).as_mut(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("prompt_embeddings has shape [2, ") && e.contains("this model needs [2, "), "{e}");
    std::fs::write(dir.join("adapter_config.json"), cfg.replace("\"num_layers\": 2", "\"num_layers\": 3")).unwrap();
    let e = format::load(&dir, load("tiny-llama", DType::F32).as_mut(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("num_layers") && e.contains("another model"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Prompt tuning initialised from a text's token embeddings is the base model reading that
/// text first: positions 0..p for the virtual tokens, never padding, and only the real
/// tokens' logits returned.
#[test]
fn prompt_tuning_is_reading_virtual_tokens_first() {
    use tinytune::models::KvCache;
    use tinytune::peft::PromptInit;
    for base in ["tiny-llama", "tiny-gpt2-f16"] {
        let text = vec![11u32, 12, 13];
        let mut model = load(base, DType::F32);
        let cfg = PromptConfig { num_virtual_tokens: 4, init: PromptInit::Text { ids: text.clone(), text: "x".into() } };
        cfg.attach(model.as_mut(), 0).unwrap();
        let (ids, keep, _) = batch(&Device::Cpu);
        let got = model.forward(&ids, Some(&keep)).unwrap();
        assert_eq!(got.shape(), &[2, 6, model.vocab_size()], "{base}: real tokens only");
        // The base model on [11 12 13 11 ; ids] with the mask extended by ones.
        let virt = [11u32, 12, 13, 11];
        let (iv, kv) = (ids.to_vec::<u32>().unwrap(), keep.to_vec::<f32>().unwrap());
        let mut long_ids: Vec<u32> = Vec::new();
        let mut long_keep: Vec<f32> = Vec::new();
        for r in 0..2 {
            long_ids.extend(virt.iter().chain(&iv[r * 6..(r + 1) * 6]));
            long_keep.extend([1f32; 4].iter().chain(&kv[r * 6..(r + 1) * 6]));
        }
        let plain = load(base, DType::F32);
        let want = plain
            .forward(
                &Tensor::from_vec(long_ids.clone(), &[2, 10], &Device::Cpu).unwrap(),
                Some(&Tensor::from_vec(long_keep, &[2, 10], &Device::Cpu).unwrap()),
            )
            .unwrap()
            .narrow(1, 4, 6)
            .unwrap();
        let (g, w) = (got.to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{base}: prompt tuning vs the text read first: {worst}");
        // With the KV cache (the first forward adds the virtual tokens).
        let row: Vec<u32> = iv[..6].to_vec();
        let full = model.forward(&Tensor::from_vec(row.clone(), &[1, 6], &Device::Cpu).unwrap(), None).unwrap().to_vec::<f32>().unwrap();
        let mut cache = KvCache::new(model.num_layers());
        let mut steps = Vec::new();
        for (a, b) in [(0, 2), (2, 3), (3, 6)] {
            let step = Tensor::from_vec(row[a..b].to_vec(), &[1, b - a], &Device::Cpu).unwrap();
            steps.extend(model.forward_cached(&step, None, Some(&mut cache)).unwrap().to_vec::<f32>().unwrap());
        }
        assert_eq!(cache.len(), 4 + 6, "{base}: the cache holds the virtual tokens");
        let worst = steps.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{base}: cached prompt tuning differs by {worst}");
    }
}

#[test]
fn prompt_gradients_match_finite_differences_and_bad_input_is_named() {
    for base in ["tiny-llama", "tiny-gpt2-f16"] {
        let mut model = load(base, DType::F64);
        let m = PromptConfig { num_virtual_tokens: 3, ..PromptConfig::default() }.attach(model.as_mut(), 1).unwrap();
        lm_loss(model.as_ref()).backward().unwrap();
        for (name, p) in m.parameters() {
            check_grad(&format!("{base} {name}"), &p, &|| lm_loss(model.as_ref()).to_scalar().unwrap());
        }
        // Removed, the model is the base model again; adapters-off too.
        let (ids, keep, _) = batch(&Device::Cpu);
        let keep = keep.to_dtype(DType::F64).unwrap();
        let plain = load(base, DType::F64).forward(&ids, Some(&keep)).unwrap().to_vec_f64().unwrap();
        assert_eq!(with_adapters_off(|| model.forward(&ids, Some(&keep))).unwrap().to_vec_f64().unwrap(), plain);
        // Saving the model with virtual tokens still attached is refused (they are not weights).
        let dir = std::env::temp_dir().join(format!("tinytune-prompt-save-{}-{base}", std::process::id()));
        let e = models::save_checkpoint(model.as_mut(), &dir).unwrap_err().to_string();
        assert!(e.contains("virtual tokens attached"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        m.remove(model.as_mut()).unwrap();
        assert_eq!(model.forward(&ids, Some(&keep)).unwrap().to_vec_f64().unwrap(), plain);
    }
    let mut model = load("tiny-llama", DType::F32);
    let e = PromptConfig { num_virtual_tokens: 64, ..PromptConfig::default() }.attach(model.as_mut(), 0).unwrap_err().to_string();
    assert!(e.contains("num_virtual_tokens = 64") && e.contains("context of 64"), "{e}");
    // A prompt adapter whose table does not fit its config (or the model) names the shapes.
    let dir = std::env::temp_dir().join(format!("tinytune-prompt-{}", std::process::id()));
    let m = PromptConfig { num_virtual_tokens: 2, ..PromptConfig::default() }.attach(model.as_mut(), 0).unwrap();
    format::save(&dir, model.as_mut(), Some(m.as_ref()), None, "tiny-llama").unwrap();
    let cfg = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    std::fs::write(dir.join("adapter_config.json"), cfg.replace("\"num_virtual_tokens\": 2", "\"num_virtual_tokens\": 3")).unwrap();
    let e = format::load(&dir, load("tiny-llama", DType::F32).as_mut(), &Device::Cpu).unwrap_err().to_string();
    let d = model.hidden_size();
    assert!(e.contains(&format!("prompt_embeddings has shape [2, {d}], this model needs [3, {d}]")), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// LoRA-XS: `A`, `B` from the weight's truncated SVD (so `B A` is its best rank-r
/// approximation and `B` has orthonormal columns), `R` the only trainable tensor with `r²`
/// entries per site, its gradient against finite differences (float64 model), the loss driven
/// down, merge equal to unmerged, and the save → load and the export as a plain PEFT LoRA
/// adapter giving the same logits.
#[test]
fn lora_xs_initialises_from_the_svd_and_trains_r_alone() {
    use tinytune::peft::{LoraXsAdapter, LoraXsConfig};
    let targets = vec!["q_proj".to_string(), "down_proj".to_string()];
    let cfg = LoraXsConfig { r: 3, targets: targets.clone(), ..LoraXsConfig::default() };
    let mut model = load("tiny-llama", DType::F64);
    let w0: Vec<(String, Vec<f64>, usize, usize)> = model
        .linears_mut()
        .iter()
        .filter(|l| l.name.ends_with("q_proj") || l.name.ends_with("down_proj"))
        .map(|l| (l.name.clone(), l.weight.to_vec_f64().unwrap(), l.out_features(), l.in_features()))
        .collect();
    let xs = LoraXsAdapter::attach(model.as_mut(), cfg.clone()).unwrap();
    assert_eq!(xs.layers.len(), w0.len());
    for (layer, (name, w, out, inp)) in xs.layers.iter().zip(&w0) {
        assert_eq!(&layer.site, name);
        let (a, b) = (layer.a.to_vec_f64().unwrap(), layer.b.to_vec_f64().unwrap());
        let best = tinytune::linalg::svd(w, *out, *inp).unwrap().truncate(3).reconstruct();
        let ba = tinytune::linalg::matmul(&b, &a, *out, 3, *inp);
        let worst = ba.iter().zip(&best).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(worst < 1e-6 * scale, "{name}: B A is the best rank-3 approximation (off by {worst})");
        let btb = tinytune::linalg::matmul(&tinytune::linalg::transpose(&b, *out, 3), &b, 3, *out, 3);
        assert!((0..9).all(|i| (btb[i] - (i % 4 == 0) as u8 as f64).abs() < 1e-9), "{name}: BᵀB = I");
        assert!(!layer.a.requires_grad_flag() && !layer.b.requires_grad_flag() && layer.r.requires_grad_flag());
    }
    let params = xs.parameters();
    assert_eq!(params.iter().map(|(_, p)| p.numel()).sum::<usize>(), 9 * w0.len(), "r² a site");
    assert!(params.iter().all(|(n, _)| n.ends_with(".lora_xs_R.weight")));
    // R near 0: the model starts as the base model, to the init's 1e-5.
    let (ids, keep, _) = batch(&Device::Cpu);
    let plain = load("tiny-llama", DType::F64).forward(&ids, Some(&keep)).unwrap().to_vec_f64().unwrap();
    let start = model.forward(&ids, Some(&keep)).unwrap().to_vec_f64().unwrap();
    assert!(plain.iter().zip(&start).all(|(a, b)| (a - b).abs() < 1e-3));
    for (i, (_, p)) in params.iter().enumerate() {
        randomize(p, 0.3, 40 + i as u64);
    }
    lm_loss(model.as_ref()).backward().unwrap();
    for (name, p) in &params {
        check_grad(name, p, &|| lm_loss(model.as_ref()).to_scalar().unwrap());
    }

    // Training in float32 lowers the loss; merge = unmerged; save/load and the LoRA export agree.
    let mut model = load("tiny-llama", DType::F32);
    let xs = LoraXsAdapter::attach(model.as_mut(), LoraXsConfig { targets: vec!["all-linear".into()], ..cfg }).unwrap();
    let (first, last) = sgd_run(&xs.parameters(), 30, 3.0, &|| lm_loss(model.as_ref()));
    assert!(last < 0.9 * first, "lora-xs: loss {first} → {last}");
    let trained = model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap();
    let dir = std::env::temp_dir().join(format!("tinytune-loraxs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    format::save(&dir.join("xs"), model.as_mut(), Some(&xs), None, "tiny-llama").unwrap();
    xs.save_as_lora(&dir.join("lora"), model.as_mut(), None, "tiny-llama").unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("xs/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64()), (Some("LORA_XS"), Some(3)));
    let close = |got: &[f32], what: &str| {
        let worst = got.iter().zip(&trained).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{what} differs from the trained model by {worst}");
    };
    for (sub, method) in [("xs", "lora-xs"), ("lora", "lora")] {
        let mut fresh = load("tiny-llama", DType::F32);
        let loaded = format::load(&dir.join(sub), fresh.as_mut(), &Device::Cpu).unwrap();
        assert_eq!(loaded.method.name(), method);
        close(&fresh.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap(), sub);
    }
    xs.merge(model.as_mut()).unwrap();
    assert!(model.linears_mut().iter().all(|l| l.adapters.is_empty()));
    close(&model.forward(&ids, Some(&keep)).unwrap().to_vec::<f32>().unwrap(), "merged");
    // A rank above a site's smallest dimension is refused, naming the site.
    let e = LoraXsAdapter::attach(load("tiny-llama", DType::F32).as_mut(), LoraXsConfig { r: 1000, ..LoraXsConfig::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 1000") && e.contains("q_proj"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// LoRA-XS on the GPU (LoRA's fused kernel with `B R` as its `B`) against the CPU: the same
/// projections from the same SVD, the logits and `R`'s gradients.
#[test]
fn lora_xs_on_the_gpu_follows_the_cpu() {
    use tinytune::peft::{LoraXsAdapter, LoraXsConfig};
    let Some(gpu) = common::gpu_device() else { return };
    let mut out = Vec::new();
    for dev in [Device::Cpu, gpu] {
        let mut model = models::load(fixture("tiny-llama"), &dev).unwrap();
        let xs =
            LoraXsAdapter::attach(model.as_mut(), LoraXsConfig { r: 4, targets: vec!["all-linear".into()], ..Default::default() }).unwrap();
        for (i, (_, p)) in xs.parameters().iter().enumerate() {
            let v = Tensor::randn(p.shape(), 0.0, 0.3, DType::F32, &Device::Cpu, &mut Rng::new(60 + i as u64)).unwrap();
            p.set_data(&v.to_device(&dev).unwrap()).unwrap();
        }
        let (ids, keep, targets) = batch(&dev);
        let logits = model.forward(&ids, Some(&keep)).unwrap();
        logits.cross_entropy(&targets, -100, CrossEntropyReduction::Mean).unwrap().backward().unwrap();
        let grads: Vec<Vec<f32>> =
            xs.parameters().iter().map(|(_, p)| p.grad().unwrap().to_device(&Device::Cpu).unwrap().to_vec().unwrap()).collect();
        out.push((logits.to_device(&Device::Cpu).unwrap().to_vec::<f32>().unwrap(), grads));
    }
    let worst = out[0].0.iter().zip(&out[1].0).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-3, "logits differ by {worst}");
    for (i, (c, g)) in out[0].1.iter().zip(&out[1].1).enumerate() {
        let scale = c.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let worst = c.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 2e-3 * scale, "R gradient {i}: differs by {worst} (scale {scale})");
    }
}

/// FineGates: θ's gradient (through tanh, the noise and the clamp: exactly 0 where a gate is
/// clamped) and the sparsity objective's gradient against finite differences on the float64
/// model; at init every eval gate is open, so the model is the base model; merge (the eval
/// gates folded into the weights) equals the gated model; save → load gives its logits;
/// removed, the base model again; the LoRA variant trains LoRA between the gates.
#[test]
fn finegates_gates_the_rows_and_columns_and_fold_into_the_weights() {
    use tinytune::peft::{FineGates, FineGatesConfig, SparsityForm};
    let (ids, keep, _) = batch(&Device::Cpu);
    let logits =
        |m: &dyn CausalLm| m.forward(&ids, Some(&keep.to_dtype(m.lm_head().weight.dtype()).unwrap())).unwrap().to_vec_f64().unwrap();
    for (form, lora_rank) in [(SparsityForm::Target, None), (SparsityForm::L0, Some(2))] {
        let mut model = load("tiny-llama", DType::F64);
        let plain = logits(load("tiny-llama", DType::F64).as_ref());
        let cfg = FineGatesConfig { form, lora_rank, ..FineGatesConfig::default() };
        let g = FineGates::attach(model.as_mut(), cfg.clone()).unwrap();
        assert_eq!(g.gates.len(), 14, "the 7 linears of 2 blocks");
        let start = logits(model.as_ref());
        let worst = plain.iter().zip(&start).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-12, "every gate starts open: the base model (off by {worst})");
        // Gates inside (0, 1) and clamped ones: θ ~ N(0, 0.6²); LoRA's B off zero.
        for (i, (n, p)) in g.parameters().iter().enumerate() {
            randomize(p, if n.contains("finegates") { 0.6 } else { 0.3 }, 70 + i as u64);
        }
        g.set_training(true);
        g.set_step(3);
        let loss = || lm_loss(model.as_ref()).add(&g.sparsity_loss().unwrap().0).unwrap();
        loss().backward().unwrap();
        let params = g.parameters();
        assert_eq!(params.iter().filter(|(n, _)| n.ends_with("lora_A.weight")).count(), if lora_rank.is_some() { 14 } else { 0 });
        for (name, p) in &params {
            check_grad(name, p, &|| loss().to_scalar().unwrap());
        }
        // Where the (noisy) gate is clamped, only the sparsity term reaches θ; with λ = 0 nothing.
        for p in params.iter().map(|(_, p)| p) {
            p.zero_grad();
        }
        lm_loss(model.as_ref()).backward().unwrap();
        for (r, _) in &g.gates {
            let z = r.gates().unwrap().to_vec_f64().unwrap();
            let grad = r.theta.grad().unwrap().to_vec_f64().unwrap();
            for (zi, gi) in z.iter().zip(&grad) {
                if *zi == 0.0 || *zi == 1.0 {
                    assert_eq!(*gi, 0.0, "{}: a clamped gate gets no task gradient", r.site);
                }
            }
            assert!(z.iter().any(|&v| v > 0.0 && v < 1.0) && z.iter().any(|&v| v == 0.0 || v == 1.0), "{}: both kinds", r.site);
        }
        // Eval: deterministic gates; merge and save → load agree with the gated model.
        g.set_training(false);
        let gated = logits(model.as_ref());
        assert_eq!(gated, logits(model.as_ref()));
        let dir = std::env::temp_dir().join(format!("tinytune-finegates-{}-{}", std::process::id(), lora_rank.is_some()));
        let _ = std::fs::remove_dir_all(&dir);
        format::save(&dir, model.as_mut(), Some(&g), None, "tiny-llama").unwrap();
        let mut fresh = load("tiny-llama", DType::F64);
        let loaded = format::load(&dir, fresh.as_mut(), &Device::Cpu).unwrap();
        assert_eq!(loaded.method.name(), "finegates");
        loaded.method.set_training(false);
        let close = |got: &[f64], what: &str| {
            let worst = got.iter().zip(&gated).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-9, "{what} differs from the gated model by {worst}");
        };
        close(&logits(fresh.as_ref()), "loaded");
        loaded.method.merge(fresh.as_mut()).unwrap();
        assert!(fresh.linears_mut().iter().all(|l| l.adapters.is_empty()));
        close(&logits(fresh.as_ref()), "merged");
        let closed = g.closed().unwrap();
        let q = fresh.linears_mut().into_iter().find(|l| l.name == "model.layers.0.self_attn.q_proj").unwrap().weight.to_vec_f64().unwrap();
        let (_, shut_rows, rows, _, cols) = closed.iter().find(|c| c.0 == "model.layers.0.self_attn.q_proj").unwrap().clone();
        let zero_rows = (0..rows).filter(|r| q[r * cols..(r + 1) * cols].iter().all(|&v| v == 0.0)).count();
        assert!(shut_rows > 0 && zero_rows >= shut_rows, "closed rows are zero rows after the merge ({zero_rows} of {shut_rows})");
        g.remove(model.as_mut()).unwrap();
        assert_eq!(logits(model.as_ref()), plain, "removed: the base model");
        std::fs::remove_dir_all(&dir).ok();
    }
    let e = FineGates::attach(load("tiny-llama", DType::F32).as_mut(), FineGatesConfig { target_sparsity: 1.0, ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("target sparsity 1 is not in [0, 1)"), "{e}");
}

/// FineGates on the GPU against the CPU, in training mode (the same seeded noise on both): the
/// logits and every gate's and the sparsity objective's gradients.
#[test]
fn finegates_on_the_gpu_follows_the_cpu() {
    use tinytune::peft::{FineGates, FineGatesConfig};
    let Some(gpu) = common::gpu_device() else { return };
    let mut out = Vec::new();
    for dev in [Device::Cpu, gpu] {
        let mut model = models::load(fixture("tiny-llama"), &dev).unwrap();
        let g = FineGates::attach(model.as_mut(), FineGatesConfig { lora_rank: Some(2), ..Default::default() }).unwrap();
        for (i, (_, p)) in g.parameters().iter().enumerate() {
            let v = Tensor::randn(p.shape(), 0.0, 0.6, DType::F32, &Device::Cpu, &mut Rng::new(80 + i as u64)).unwrap();
            p.set_data(&v.to_device(&dev).unwrap()).unwrap();
        }
        g.set_training(true);
        g.set_step(5);
        let (ids, keep, targets) = batch(&dev);
        let logits = model.forward(&ids, Some(&keep)).unwrap();
        let loss = logits.cross_entropy(&targets, -100, CrossEntropyReduction::Mean).unwrap();
        loss.add(&g.sparsity_loss().unwrap().0).unwrap().backward().unwrap();
        let grads: Vec<Vec<f32>> =
            g.parameters().iter().map(|(_, p)| p.grad().unwrap().to_device(&Device::Cpu).unwrap().to_vec().unwrap()).collect();
        out.push((logits.to_device(&Device::Cpu).unwrap().to_vec::<f32>().unwrap(), grads));
    }
    let worst = out[0].0.iter().zip(&out[1].0).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-3, "logits differ by {worst}");
    for (i, (c, g)) in out[0].1.iter().zip(&out[1].1).enumerate() {
        let scale = c.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let worst = c.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 2e-3 * scale, "gradient {i}: differs by {worst} (scale {scale})");
    }
}

/// FineGates' fused path (one gated product per linear, the gates folded into LoRA's small
/// factors) against the composition it replaces (gates at the before/after sites around the
/// plain or LoRA product), in training mode with the same seeded noise: logits and every
/// trainable gradient, on the float64 CPU model, and on the GPU against the CPU composition.
#[test]
fn finegates_fused_product_equals_the_composition() {
    use tinytune::peft::{FineGates, FineGatesConfig, GatedProduct};
    let mut devices = vec![(Device::Cpu, DType::F64)];
    devices.extend(common::gpu_device().map(|g| (g, DType::F32)));
    for lora_rank in [None, Some(2)] {
        for (dev, dt) in &devices {
            let mut out = Vec::new();
            for composed in [true, false] {
                // The composition on the CPU, the fused product on the device.
                let (dev, dt) = if composed { (Device::Cpu, *dt) } else { (dev.clone(), *dt) };
                let mut model = if dt == DType::F64 { load("tiny-llama", dt) } else { models::load(fixture("tiny-llama"), &dev).unwrap() };
                let cfg = FineGatesConfig { lora_rank, train_biases: true, ..Default::default() };
                let g = FineGates::attach(model.as_mut(), cfg).unwrap();
                let fused_sites = model.linears_mut().iter().filter(|l| l.adapters.iter().any(|a| a.as_any().is::<GatedProduct>())).count();
                assert_eq!(fused_sites, 14, "every gated linear runs the fused product");
                if composed {
                    g.use_composition(model.as_mut()).unwrap();
                    assert!(model.linears_mut().iter().all(|l| l.adapters.iter().all(|a| !a.as_any().is::<GatedProduct>())));
                }
                for (i, (_, p)) in g.parameters().iter().enumerate() {
                    let v = Tensor::randn(p.shape(), 0.0, 0.6, dt, &Device::Cpu, &mut Rng::new(90 + i as u64)).unwrap();
                    p.set_data(&v.to_device(&dev).unwrap()).unwrap();
                }
                g.set_training(true);
                g.set_step(2);
                let (ids, keep, targets) = batch(&dev);
                let logits = model.forward(&ids, Some(&keep.to_dtype(dt).unwrap())).unwrap();
                logits.cross_entropy(&targets, -100, CrossEntropyReduction::Mean).unwrap().backward().unwrap();
                let grads: Vec<Vec<f64>> = g.parameters().iter().map(|(_, p)| p.grad().unwrap().to_vec_f64().unwrap()).collect();
                out.push((logits.to_vec_f64().unwrap(), grads));
            }
            let tol = if *dt == DType::F64 { 1e-10 } else { 1e-3 };
            let worst = out[0].0.iter().zip(&out[1].0).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(worst < tol, "lora {lora_rank:?} on {dev}: logits differ by {worst}");
            for (i, (c, f)) in out[0].1.iter().zip(&out[1].1).enumerate() {
                let scale = c.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-6);
                let worst = c.iter().zip(f).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(worst < 2.0 * tol * scale, "lora {lora_rank:?} on {dev}: gradient {i} differs by {worst} (scale {scale})");
            }
        }
    }
}

/// FineGates' compression: MLP units whose gate row, up row or down column is closed are
/// removed, so the blocks' MLPs narrow; the compressed model's logits equal the gated model's
/// in eval mode; saved as an ordinary checkpoint with per-block widths, it loads and gives them.
#[test]
fn finegates_compression_removes_dead_mlp_units_and_keeps_the_logits() {
    use tinytune::peft::{FineGates, FineGatesConfig};
    let (ids, keep, _) = batch(&Device::Cpu);
    let logits =
        |m: &dyn CausalLm| m.forward(&ids, Some(&keep.to_dtype(m.lm_head().weight.dtype()).unwrap())).unwrap().to_vec_f64().unwrap();
    for dtype in [DType::F64, DType::F32] {
        let mut model = load("tiny-llama", dtype);
        let g = FineGates::attach(model.as_mut(), FineGatesConfig { lora_rank: Some(2), ..FineGatesConfig::default() }).unwrap();
        for (i, (n, p)) in g.parameters().iter().enumerate() {
            let v = Tensor::randn(
                p.shape(),
                if n.contains("finegates") { -0.1 } else { 0.0 },
                0.6,
                dtype,
                &Device::Cpu,
                &mut Rng::new(90 + i as u64),
            )
            .unwrap();
            p.set_data(&v).unwrap();
        }
        // Dead attention heads: block 0 loses query head 0 and 2 (one per key/value group) by
        // their o_proj columns; block 1 loses key/value head 1 (so query heads 2 and 3) by its
        // v_proj rows. Every other o_proj column and v_proj row stays open.
        let theta = |len: usize, closed: &[std::ops::Range<usize>]| {
            let v: Vec<f64> = (0..len).map(|i| if closed.iter().any(|r| r.contains(&i)) { -3.0 } else { 2.0 }).collect();
            Tensor::from_vec(v, &[len], &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
        };
        for (r, c) in &g.gates {
            match r.site.as_str() {
                "model.layers.0.self_attn.o_proj" => c.theta.set_data(&theta(32, &[0..8, 16..24])).unwrap(),
                "model.layers.1.self_attn.o_proj" => c.theta.set_data(&theta(32, &[])).unwrap(),
                "model.layers.0.self_attn.v_proj" => r.theta.set_data(&theta(16, &[])).unwrap(),
                "model.layers.1.self_attn.v_proj" => r.theta.set_data(&theta(16, &[8..16])).unwrap(),
                _ => {}
            }
        }
        g.set_training(false);
        let gated = logits(model.as_ref());
        let report = g.compress(model.as_mut()).unwrap();
        eprintln!("{}", report.table());
        assert_eq!(report.heads, vec![(0, (4, 2), (2, 2)), (1, (4, 2), (2, 1))], "heads removed per block");
        for b in &model.decoder().blocks {
            let tinytune::nn::Qkv::Separate { q, k, v } = &b.attn.qkv else { unreachable!() };
            let (h, kv) = if b.index == 0 { (2, 2) } else { (2, 1) };
            assert_eq!((q.out_features(), k.out_features(), v.out_features(), b.attn.o.in_features()), (8 * h, 8 * kv, 8 * kv, 8 * h));
        }
        assert_eq!(report.mlp.len(), 2, "both blocks' MLPs shrink: {:?}", report.mlp);
        assert!(report.mlp.iter().all(|&(_, removed, width)| removed > 0 && removed < width && width == 64));
        assert!(report.params_after < report.params_before);
        for b in &model.decoder().blocks {
            let w = b.mlp.down.in_features();
            let (_, removed, _) = report.mlp.iter().find(|m| m.0 == b.index).unwrap();
            assert_eq!(
                (w, b.mlp.up.out_features(), b.mlp.gate.as_ref().unwrap().out_features()),
                (64 - removed, 64 - removed, 64 - removed)
            );
        }
        let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
        let worst = logits(model.as_ref()).iter().zip(&gated).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(worst < tol, "{dtype:?}: compressed vs gated logits differ by {worst}");
        if dtype == DType::F32 {
            let dir = std::env::temp_dir().join(format!("tinytune-compressed-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            models::save_checkpoint(model.as_mut(), &dir).unwrap();
            let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
            let widths: Vec<u64> = report.mlp.iter().map(|m| (m.2 - m.1) as u64).collect();
            assert_eq!(config["intermediate_sizes"], serde_json::json!(widths));
            assert_eq!(config["attention_heads"], serde_json::json!([[2, 2], [2, 1]]));
            let reloaded = models::load(&dir, &Device::Cpu).unwrap();
            let worst = logits(reloaded.as_ref()).iter().zip(&gated).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(worst < tol, "the saved compressed model differs by {worst}");
            // A width list that does not fit the layers is refused, naming the field.
            let mut bad = config.clone();
            bad["intermediate_sizes"] = serde_json::json!([8]);
            std::fs::write(dir.join("config.json"), bad.to_string()).unwrap();
            let e = models::load(&dir, &Device::Cpu).err().unwrap().to_string();
            assert!(e.contains("intermediate_sizes lists 1 widths for 2 layers"), "{e}");
            let mut bad = config.clone();
            bad["attention_heads"] = serde_json::json!([[2, 2], [3, 2]]);
            std::fs::write(dir.join("config.json"), bad.to_string()).unwrap();
            let e = models::load(&dir, &Device::Cpu).err().unwrap().to_string();
            assert!(e.contains("attention_heads[1] = [3, 2]"), "{e}");
            // Prefix tuning needs one key/value width for every block.
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            let mut reloaded = models::load(&dir, &Device::Cpu).unwrap();
            let e = tinytune::peft::PrefixAdapter::attach(reloaded.as_mut(), Default::default(), 0).unwrap_err().to_string();
            assert!(e.contains("block 1 has 1 key/value heads where the model has 2"), "{e}");
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}
