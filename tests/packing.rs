//! The padding-free forward (`nn::Decoder::forward` packing a right-padded batch into one row
//! of its real tokens, each attending only to its own sequence): logits and LoRA gradients equal,
//! in float64, those of each row run alone and those of the padded batch
//! (`nn::without_packing`), for LLaMA (tied and untied), Gemma 3 (local sliding-window layers)
//! and GPT-2 (learned positions); and the packed attention mask (`Mask::with_starts`) in the
//! fused kernel against the composed reference.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use tinytune::models::{self, CausalLm};
use tinytune::nn::{attention, attention_reference, without_packing, Mask};
use tinytune::peft::{LoraAdapter, LoraConfig};
use tinytune::{CrossEntropyReduction, DType, Device, Rng, Tensor};

fn load_f64(name: &str) -> Box<dyn CausalLm> {
    let mut m = models::load(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name), &Device::Cpu).unwrap();
    m.visit_parameters(&mut |_, t| {
        *t = t.to_dtype(DType::F64)?;
        Ok(())
    })
    .unwrap();
    m
}

/// Logits of the real positions of each row (row-major), and the LoRA gradients of the mean
/// next-token loss over them.
fn run(model: &dyn CausalLm, lora: &LoraAdapter, ids: &[Vec<u32>], t: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let b = ids.len();
    let mut flat = vec![0u32; b * t];
    let mut keep = vec![0f64; b * t];
    let mut targets = vec![-100i32; b * t];
    for (r, row) in ids.iter().enumerate() {
        for (j, &id) in row.iter().enumerate() {
            flat[r * t + j] = id;
            keep[r * t + j] = 1.0;
            if j + 1 < row.len() {
                targets[r * t + j] = row[j + 1] as i32;
            }
        }
    }
    let (idt, kt) = (Tensor::from_vec(flat, &[b, t], &Device::Cpu).unwrap(), Tensor::from_vec(keep, &[b, t], &Device::Cpu).unwrap());
    // Full rows need no mask: run them without one, as a caller would.
    let keep = if ids.iter().all(|r| r.len() == t) { None } else { Some(&kt) };
    let logits = model.forward(&idt, keep).unwrap();
    let v = model.vocab_size();
    let all = logits.to_vec::<f64>().unwrap();
    let real: Vec<Vec<f64>> = ids.iter().enumerate().map(|(r, row)| all[r * t * v..(r * t + row.len()) * v].to_vec()).collect();
    let loss = logits.cross_entropy(&Tensor::from_vec(targets, &[b, t], &Device::Cpu).unwrap(), -100, CrossEntropyReduction::Sum).unwrap();
    loss.backward().unwrap();
    let grads = lora
        .parameters()
        .iter()
        .map(|(_, p)| {
            let g = p.grad().unwrap().to_vec::<f64>().unwrap();
            p.zero_grad();
            g
        })
        .collect();
    (real, grads)
}

fn close(what: &str, a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-9 * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn packed_forward_equals_each_row_alone_and_the_padded_batch() {
    for name in ["tiny-llama", "tiny-llama-tied-bf16", "tiny-gemma3", "tiny-gpt2-f16"] {
        let mut model = load_f64(name);
        let cfg = LoraConfig { r: 2, alpha: 4.0, targets: vec!["all-linear".into()], ..LoraConfig::default() };
        let lora = LoraAdapter::attach(model.as_mut(), cfg).unwrap();
        // B = 0 at attach would make every gradient of A zero: randomise the adapter.
        for (i, (_, p)) in lora.parameters().iter().enumerate() {
            p.set_data(&Tensor::randn(p.shape(), 0.0, 0.2, DType::F64, &Device::Cpu, &mut Rng::new(i as u64)).unwrap()).unwrap();
        }
        let vocab = model.vocab_size() as u32;
        let t = 9;
        // Lengths 9, 4, 1 and 6: 20 of 36 positions real, so the batch is packed.
        let ids: Vec<Vec<u32>> = [9usize, 4, 1, 6]
            .iter()
            .enumerate()
            .map(|(r, &n)| (0..n as u32).map(|j| (7 + 13 * j + 5 * r as u32) % vocab).collect())
            .collect();
        let (packed, pg) = run(model.as_ref(), &lora, &ids, t);
        let (padded, padg) = without_packing(|| run(model.as_ref(), &lora, &ids, t));
        let mut alone_g: Vec<Vec<f64>> = Vec::new();
        for (r, row) in ids.iter().enumerate() {
            let (l, g) = run(model.as_ref(), &lora, std::slice::from_ref(row), row.len());
            close(&format!("{name} row {r} packed vs alone"), &packed[r], &l[0]);
            close(&format!("{name} row {r} padded vs alone"), &padded[r], &l[0]);
            if alone_g.is_empty() {
                alone_g = g;
            } else {
                alone_g.iter_mut().zip(&g).for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, g)| *a += g));
            }
        }
        for (k, ((p, q), a)) in pg.iter().zip(&padg).zip(&alone_g).enumerate() {
            close(&format!("{name} LoRA grad {k} packed vs padded"), p, q);
            close(&format!("{name} LoRA grad {k} packed vs rows alone"), p, a);
        }
    }
}

/// On the GPU the packed batch runs through the fused attention kernel (the starts in its mask
/// buffer) and gives the logits of the CPU's padded batch at every real position.
#[test]
fn gpu_packed_forward_matches_the_cpu() {
    let Some(gpu) = common::gpu_device() else { return };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["tiny-llama", "tiny-gemma3"] {
        let cpu_model = models::load(dir.join(name), &Device::Cpu).unwrap();
        let gpu_model = models::load(dir.join(name), &gpu).unwrap();
        let (b, t, v) = (3usize, 8usize, cpu_model.vocab_size());
        let lens = [8usize, 3, 5];
        let ids: Vec<u32> = (0..b * t).map(|i| (11 + 7 * i as u32) % v as u32).collect();
        let keep: Vec<f32> = (0..b * t).map(|i| f32::from(u8::from(i % t < lens[i / t]))).collect();
        let run = |m: &dyn CausalLm, d: &Device| {
            let idt = Tensor::from_vec(ids.clone(), &[b, t], d).unwrap();
            let kt = Tensor::from_vec(keep.clone(), &[b, t], d).unwrap();
            m.forward(&idt, Some(&kt)).unwrap().to_vec::<f32>().unwrap()
        };
        let want = without_packing(|| run(cpu_model.as_ref(), &Device::Cpu));
        let Device::Gpu(g) = &gpu else { unreachable!() };
        let before = common::dispatches(g, "attn_fwd");
        let got = run(gpu_model.as_ref(), &gpu);
        assert!(common::dispatches(g, "attn_fwd") > before, "{name}: the GPU's fused attention ran");
        for r in 0..b {
            for j in 0..lens[r] {
                let at = (r * t + j) * v;
                for c in 0..v {
                    let (x, y) = (got[at + c], want[at + c]);
                    assert!((x - y).abs() < 2e-4 * (1.0 + y.abs()), "{name} row {r} pos {j} logit {c}: gpu {x} cpu {y}");
                }
            }
        }
    }
}

/// A padded batch that does not pack (too little padding) reads its padding mask from the GPU
/// once a forward: the packing decision's read serves the masks of the global and the local
/// layers (each would read it again, a sync each).
#[test]
fn gpu_padding_flags_are_read_once_a_forward() {
    if common::gpu_device().is_none() {
        return;
    }
    let own = common::own_gpu();
    let gpu = Device::Gpu(own.clone());
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["tiny-llama", "tiny-gemma3"] {
        let model = models::load(dir.join(name), &gpu).unwrap();
        let (b, t) = (3usize, 8usize);
        // One padding position of 24: below the 1/8 that packing needs.
        let keep: Vec<f32> = (0..b * t).map(|i| f32::from(u8::from(i != b * t - 1))).collect();
        let ids = Tensor::from_vec((0..b * t).map(|i| (5 + 3 * i as u32) % 50).collect::<Vec<u32>>(), &[b, t], &gpu).unwrap();
        let kt = Tensor::from_vec(keep, &[b, t], &gpu).unwrap();
        let before = own.memory_stats().bytes_downloaded;
        let logits = model.forward(&ids, Some(&kt)).unwrap();
        assert_eq!(own.memory_stats().bytes_downloaded - before, (4 * b * t) as u64, "{name}: one read of the [b, t] f32 mask");
        drop(logits);
    }
}

/// The mask of packed sequences in the fused kernel and the composed reference (CPU, f64), and
/// the GPU's fused kernel against the CPU, forward and backward.
#[test]
fn packed_attention_mask_fused_matches_composed() {
    let mut rng = Rng::new(5);
    let starts: Vec<usize> = [0usize, 0, 0, 3, 3, 5, 5, 5, 5, 5, 10].to_vec();
    let n = starts.len();
    // (batch, cache offset, window): the starts hold for every batch row; with an offset the
    // queries are the last n − offset positions.
    for (b, offset, window) in [(1, 0, None), (1, 0, Some(2)), (2, 4, None), (2, 4, Some(3))] {
        let tq = n - offset;
        let mask = Mask::causal(offset, None).with_window(window).with_starts(Arc::new(starts.clone()));
        let r = |h: usize, t: usize, rng: &mut Rng| {
            Tensor::randn(&[b, h, t, 5], 0.0, 1.0, DType::F64, &Device::Cpu, rng).unwrap().requires_grad().unwrap()
        };
        let (q, k, v) = (r(4, tq, &mut rng), r(2, n, &mut rng), r(2, n, &mut rng));
        let w = Tensor::randn(&[b, 4, tq, 5], 0.0, 1.0, DType::F64, &Device::Cpu, &mut rng).unwrap();
        let mut outs = Vec::new();
        for f in [attention, attention_reference] {
            let y = f(&q, &k, &v, &mask).unwrap();
            y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let gs: Vec<Vec<f64>> = [&q, &k, &v]
                .iter()
                .map(|x| {
                    let g = x.grad().unwrap().to_vec::<f64>().unwrap();
                    x.zero_grad();
                    g
                })
                .collect();
            outs.push((y.to_vec::<f64>().unwrap(), gs));
        }
        close(&format!("window {window:?} y"), &outs[0].0, &outs[1].0);
        for (i, (a, b)) in outs[0].1.iter().zip(&outs[1].1).enumerate() {
            close(&format!("window {window:?} grad {i}"), a, b);
        }
        // Row 3 starts a sequence: it sees only itself, so its output is v at position 3.
        let y = outs[0].0.clone();
        let vv = v.to_vec::<f64>().unwrap();
        for d in 0..5 {
            if (b, offset) == (1, 0) {
                assert!((y[3 * 5 + d] - vv[3 * 5 + d]).abs() < 1e-12, "a sequence's first token attends to itself only");
            }
        }
        if let Some(gpu) = common::gpu_device() {
            let up = |x: &Tensor| x.detach().to_dtype(DType::F32).unwrap().to_device(&gpu).unwrap().requires_grad().unwrap();
            let (qg, kg, vg) = (up(&q), up(&k), up(&v));
            let yg = attention(&qg, &kg, &vg, &mask).unwrap();
            yg.mul(&w.to_dtype(DType::F32).unwrap().to_device(&gpu).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            for (i, (a, b)) in yg.to_vec_f64().unwrap().iter().zip(&y).enumerate() {
                assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "gpu [{i}]: {a} vs {b}");
            }
            for (x, want) in [&qg, &kg, &vg].iter().zip(&outs[0].1) {
                for (i, (a, b)) in x.grad().unwrap().to_vec_f64().unwrap().iter().zip(want).enumerate() {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "gpu grad [{i}]: {a} vs {b}");
                }
            }
            // The starts go to the GPU once per mask (every layer of a forward shares it): a
            // second call with this mask uploads nothing, a fresh mask with the same starts
            // uploads them again, once per batch row. On a device of its own, so that other
            // tests' uploads do not count.
            let own = common::own_gpu();
            let od = Device::Gpu(own.clone());
            let (qo, ko, vo) = (
                q.to_dtype(DType::F32).unwrap().to_device(&od).unwrap(),
                k.to_dtype(DType::F32).unwrap().to_device(&od).unwrap(),
                v.to_dtype(DType::F32).unwrap().to_device(&od).unwrap(),
            );
            let uploaded = || own.memory_stats().bytes_uploaded;
            let mask = mask.clone().with_starts(Arc::new(starts.clone()));
            attention(&qo, &ko, &vo, &mask).unwrap();
            let before = uploaded();
            attention(&qo, &ko, &vo, &mask).unwrap();
            assert_eq!(uploaded() - before, 0, "the mask's device copy is reused");
            let fresh = mask.clone().with_starts(Arc::new(starts.clone()));
            let before = uploaded();
            attention(&qo, &ko, &vo, &fresh).unwrap();
            assert_eq!(uploaded() - before, (4 * b * n) as u64, "a new mask uploads its starts");
        }
    }
    // Starts that go backwards or past their own position are errors.
    let q = Tensor::zeros(&[1, 1, 3, 2], DType::F64, &Device::Cpu).unwrap();
    for bad in [vec![0usize, 2, 1], vec![0, 0], vec![1, 1, 1]] {
        let mask = Mask::causal(0, None).with_starts(Arc::new(bad.clone()));
        let e = attention(&q, &q, &q, &mask).unwrap_err().to_string();
        assert!(e.contains("starts"), "{bad:?}: {e}");
    }
}
