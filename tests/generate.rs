//! Generation: the KV cache gives the same logits as a full forward, greedy decoding matches
//! `transformers`' `generate`, and the sampling controls behave as specified.

mod common;

use std::path::PathBuf;

use tinytune::io::SafetensorsFile;
use tinytune::models::{self, generate::pick_token, GenerateOptions, KvCache, Sampling};
use tinytune::{Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn reference_ids(name: &str, key: &str) -> Vec<u32> {
    let r = SafetensorsFile::open(fixture(name).join("reference.safetensors")).unwrap();
    r.load(key, &Device::Cpu).unwrap().to_vec::<i32>().unwrap().into_iter().map(|x| x as u32).collect()
}

#[test]
fn cached_steps_equal_a_full_forward() {
    let dev = Device::Cpu;
    for name in ["tiny-llama", "tiny-gpt2-f16"] {
        let model = models::load(fixture(name), &dev).unwrap();
        let ids: Vec<u32> = reference_ids(name, "ids")[..7].to_vec();
        let full = model.forward(&Tensor::from_vec(ids.clone(), &[1, 7], &dev).unwrap(), None).unwrap().to_vec::<f32>().unwrap();
        // Prefill 3 tokens, then 1, then 3 more.
        let mut cache = KvCache::new(model.num_layers());
        let mut got = Vec::new();
        for (a, b) in [(0, 3), (3, 4), (4, 7)] {
            let step = Tensor::from_vec(ids[a..b].to_vec(), &[1, b - a], &dev).unwrap();
            got.extend(model.forward_cached(&step, None, Some(&mut cache)).unwrap().to_vec::<f32>().unwrap());
        }
        assert_eq!(cache.len(), 7);
        let worst = got.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{name}: cached logits differ by {worst}");
    }
}

#[test]
fn greedy_matches_transformers() {
    for name in ["tiny-llama", "tiny-llama-tied-bf16", "tiny-gpt2-f16"] {
        let model = models::load(fixture(name), &Device::Cpu).unwrap();
        let prompt = reference_ids(name, "ids")[..5].to_vec();
        let want = reference_ids(name, "greedy");
        let mut streamed = Vec::new();
        let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
        let got = models::generate(
            model.as_ref(),
            &prompt,
            &opts,
            &mut |t| {
                streamed.push(t);
                Ok(())
            },
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(got, want, "{name}");
        assert_eq!(streamed, want);
        // A stop token ends generation right after it is emitted.
        let stop = GenerateOptions { max_new_tokens: 8, stop_tokens: vec![want[2]], ..Default::default() };
        let got = models::generate(model.as_ref(), &prompt, &stop, &mut |_| Ok(()), &Device::Cpu).unwrap();
        assert_eq!(got, want[..=want.iter().position(|&t| t == want[2]).unwrap()].to_vec());
    }
}

#[test]
fn greedy_and_nll_on_the_gpu_match_the_cpu() {
    let Some(gpu) = common::gpu_device() else { return };
    for name in ["tiny-llama", "tiny-gpt2-f16"] {
        let model = models::load(fixture(name), &gpu).unwrap();
        let ids = reference_ids(name, "ids");
        let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
        let got = models::generate(model.as_ref(), &ids[..5], &opts, &mut |_| Ok(()), &gpu).unwrap();
        assert_eq!(got, reference_ids(name, "greedy"), "{name} on gpu");
        let rows: Vec<Vec<u32>> = vec![ids[..7].to_vec(), ids[7..12].to_vec()];
        let cpu_model = models::load(fixture(name), &Device::Cpu).unwrap();
        let a = models::sequence_nll(model.as_ref(), &rows, 2, &gpu).unwrap();
        let b = models::sequence_nll(cpu_model.as_ref(), &rows, 2, &Device::Cpu).unwrap();
        assert!((a.mean_nll() - b.mean_nll()).abs() < 1e-5, "{name}: gpu {} vs cpu {}", a.mean_nll(), b.mean_nll());
    }
}

#[test]
fn sampling_is_seeded_and_respects_its_controls() {
    let model = models::load(fixture("tiny-llama"), &Device::Cpu).unwrap();
    let prompt = [3u32, 14, 15];
    let sample = |seed, temperature, top_k, top_p| {
        let o =
            GenerateOptions { max_new_tokens: 12, sampling: Sampling::Sample { temperature, top_k, top_p }, seed, ..Default::default() };
        models::generate(model.as_ref(), &prompt, &o, &mut |_| Ok(()), &Device::Cpu).unwrap()
    };
    assert_eq!(sample(7, 1.0, None, None), sample(7, 1.0, None, None), "same seed, same tokens");
    assert_ne!(sample(7, 1.5, None, None), sample(8, 1.5, None, None), "another seed, other tokens");
    let greedy = models::generate(
        model.as_ref(),
        &prompt,
        &GenerateOptions { max_new_tokens: 12, ..Default::default() },
        &mut |_| Ok(()),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(sample(3, 1.0, Some(1), None), greedy, "top_k = 1 is greedy");
    assert_eq!(sample(3, 1.0, None, Some(1e-6)), greedy, "a tiny top_p keeps only the most likely token");

    // pick_token on hand-made logits.
    let l = [1.0f32, 3.0, 2.0, -1.0];
    let g = GenerateOptions::default();
    assert_eq!(pick_token(&l, &[], &g, 0.5).unwrap(), 1);
    // Repetition penalty 4 on token 1: 3/4 < 2, so token 2 wins; a negative logit is multiplied.
    let p = GenerateOptions { repetition_penalty: 4.0, ..Default::default() };
    assert_eq!(pick_token(&l, &[1, 1], &p, 0.5).unwrap(), 2);
    assert_eq!(pick_token(&[-1.0, -0.5], &[1], &p, 0.5).unwrap(), 0);
    // Draws follow the softmax: with u below p(0) the first token, else later ones.
    let s = GenerateOptions { sampling: Sampling::Sample { temperature: 1.0, top_k: None, top_p: None }, ..Default::default() };
    let probs: Vec<f64> = {
        let e: Vec<f64> = l.iter().map(|&x| (x as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect()
    };
    assert_eq!(pick_token(&l, &[], &s, (probs[0] * 0.99) as f32).unwrap(), 0);
    assert_eq!(pick_token(&l, &[], &s, ((probs[0] + probs[1]) * 1.01) as f32).unwrap(), 2);
    // top_k = 2 leaves tokens 1 and 2; top_p = 0.5 leaves token 1 only (p(1) ≈ 0.64).
    let k2 = GenerateOptions { sampling: Sampling::Sample { temperature: 1.0, top_k: Some(2), top_p: None }, ..Default::default() };
    assert_eq!(pick_token(&l, &[], &k2, 0.0).unwrap(), 1);
    assert_eq!(pick_token(&l, &[], &k2, 0.99).unwrap(), 2);
    let p5 = GenerateOptions { sampling: Sampling::Sample { temperature: 1.0, top_k: None, top_p: Some(0.5) }, ..Default::default() };
    assert_eq!(pick_token(&l, &[], &p5, 0.99).unwrap(), 1);
    // Invalid controls are errors.
    for bad in [
        GenerateOptions { repetition_penalty: 0.0, ..Default::default() },
        GenerateOptions { sampling: Sampling::Sample { temperature: 0.0, top_k: None, top_p: None }, ..Default::default() },
        GenerateOptions { sampling: Sampling::Sample { temperature: 1.0, top_k: Some(0), top_p: None }, ..Default::default() },
        GenerateOptions { sampling: Sampling::Sample { temperature: 1.0, top_k: None, top_p: Some(1.5) }, ..Default::default() },
    ] {
        assert!(pick_token(&l, &[], &bad, 0.5).is_err(), "{bad:?}");
    }
    assert!(models::generate(model.as_ref(), &[], &g, &mut |_| Ok(()), &Device::Cpu).is_err());
}

#[test]
fn mean_nll_matches_the_transformers_loss() {
    for name in ["tiny-llama", "tiny-llama-tied-bf16", "tiny-gpt2-f16"] {
        let model = models::load(fixture(name), &Device::Cpu).unwrap();
        let r = SafetensorsFile::open(fixture(name).join("reference.safetensors")).unwrap();
        let loss = |k: &str| r.load(k, &Device::Cpu).unwrap().to_scalar().unwrap();
        let ids = reference_ids(name, "ids");
        let rows: Vec<Vec<u32>> = ids.chunks(7).map(|c| c.to_vec()).collect();
        // Both rows full length, in one batch and one at a time.
        for bs in [1, 2] {
            let rep = models::sequence_nll(model.as_ref(), &rows, bs, &Device::Cpu).unwrap();
            assert_eq!(rep.tokens, 12);
            assert!((rep.mean_nll() - loss("loss")).abs() < 1e-5, "{name} bs {bs}: {} vs {}", rep.mean_nll(), loss("loss"));
        }
        // The second row cut to its 5 real tokens: padding inside the batch.
        let ragged = vec![rows[0].clone(), rows[1][..5].to_vec()];
        let rep = models::sequence_nll(model.as_ref(), &ragged, 2, &Device::Cpu).unwrap();
        assert_eq!(rep.tokens, 10);
        assert!((rep.mean_nll() - loss("loss_masked")).abs() < 1e-5, "{name} padded: {} vs {}", rep.mean_nll(), loss("loss_masked"));
        assert!((rep.perplexity() - rep.mean_nll().exp()).abs() < 1e-9);
    }
    let model = models::load(fixture("tiny-llama"), &Device::Cpu).unwrap();
    assert!(models::sequence_nll(model.as_ref(), &[vec![1]], 1, &Device::Cpu).is_err());
    assert!(models::sequence_nll(model.as_ref(), &[vec![1, 2]], 0, &Device::Cpu).is_err());
}

/// Several samples of one prompt decoded as a batch: one sample is `generate`'s; each of `k`
/// greedy samples is the greedy continuation; sampled rows differ, are reproducible, and each
/// equals the sequence its own draws give when it is decoded alone (its logits step by step).
#[test]
fn batched_samples_equal_their_one_by_one_decoding() {
    let dev = Device::Cpu;
    let model = models::load(fixture("tiny-llama"), &dev).unwrap();
    let prompt: Vec<u32> = reference_ids("tiny-llama", "ids")[..5].to_vec();
    let sample = GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling::Sample { temperature: 1.0, top_k: None, top_p: None },
        seed: 9,
        ..Default::default()
    };
    let one = models::generate(model.as_ref(), &prompt, &sample, &mut |_| Ok(()), &dev).unwrap();
    assert_eq!(models::generate_samples(model.as_ref(), &prompt, 1, &sample, &dev).unwrap(), vec![one]);

    let greedy = GenerateOptions { max_new_tokens: 12, ..Default::default() };
    let want = models::generate(model.as_ref(), &prompt, &greedy, &mut |_| Ok(()), &dev).unwrap();
    assert_eq!(models::generate_samples(model.as_ref(), &prompt, 3, &greedy, &dev).unwrap(), vec![want.clone(), want.clone(), want]);

    let k = 4;
    let rows = models::generate_samples(model.as_ref(), &prompt, k, &sample, &dev).unwrap();
    assert_eq!(rows, models::generate_samples(model.as_ref(), &prompt, k, &sample, &dev).unwrap(), "seeded");
    assert!(rows.iter().any(|r| r != &rows[0]), "the samples differ: {rows:?}");
    for (j, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), 12);
        // Replay sample j alone: the full forward's logits at each step, its draws (s, j).
        let mut seq = prompt.clone();
        for (s, &tok) in row.iter().enumerate() {
            let logits = model.forward(&Tensor::from_vec(seq.clone(), &[1, seq.len()], &dev).unwrap(), None).unwrap();
            let v = model.vocab_size();
            let last = logits.narrow(1, seq.len() - 1, 1).unwrap().to_vec::<f32>().unwrap();
            let u = tinytune::rng::uniform_at(sample.seed, s as u64, j as u64);
            assert_eq!(pick_token(&last[..v], &seq, &sample, u).unwrap(), tok, "sample {j}, step {s}");
            seq.push(tok);
        }
    }
}
