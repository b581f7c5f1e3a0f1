//! Prefill and decode speed with peak memory of the real models scripts/fetch-assets.sh fetches:
//! SmolLM2-135M-Instruct (Q4_1 GGUF; its weights as stored and as f32, in one run) and Gemma 3
//! 270M (Q4_K_M GGUF, as stored): `cargo bench --bench generate`. The peak RSS is reset before
//! each model. Compare with `scripts/bench_transformers.py [--model FILE]`, the same
//! measurement through `transformers`. Runs inside a rayon pool, as the CLI does. Device:
//! $TINYTUNE_DEVICE (default auto). Prints one line per measurement.

mod common;

use std::time::Instant;

use tinytune::models::{self, KvCache};
use tinytune::quant::BaseDType;
use tinytune::{no_grad, Device, Tensor};

/// Best-of-3 (after a warm-up) prefill and decode tokens/s.
fn measure(model: &dyn models::CausalLm, device: &Device) -> (f64, f64) {
    let _g = no_grad();
    let (prompt_len, decode_len) = (128usize, 32usize);
    let ids: Vec<u32> = (0..prompt_len as u32).map(|i| 100 + (i * 37) % 4000).collect();
    let ids_t = Tensor::from_vec(ids, &[1, prompt_len], device).unwrap();
    let mut best_prefill = f64::INFINITY;
    let mut best_decode = f64::INFINITY;
    for _ in 0..4 {
        let mut cache = KvCache::new(model.num_layers());
        let t0 = Instant::now();
        let logits = model.forward_cached(&ids_t, None, Some(&mut cache)).unwrap();
        let mut next = logits.narrow(1, prompt_len - 1, 1).unwrap().argmax(-1, false).unwrap().to_vec::<u32>().unwrap()[0];
        let t1 = Instant::now();
        for _ in 0..decode_len {
            let step = Tensor::from_vec(vec![next], &[1, 1], device).unwrap();
            let l = model.forward_cached(&step, None, Some(&mut cache)).unwrap();
            next = l.argmax(-1, false).unwrap().to_vec::<u32>().unwrap()[0];
        }
        let t2 = Instant::now();
        best_prefill = best_prefill.min((t1 - t0).as_secs_f64());
        best_decode = best_decode.min((t2 - t1).as_secs_f64());
    }
    (prompt_len as f64 / best_prefill, decode_len as f64 / best_decode)
}

fn main() {
    let Some(smollm2) = common::smollm2("generate") else { return };
    let device = Device::from_env().expect("device");
    let pool = rayon::ThreadPoolBuilder::new().build().expect("thread pool");
    pool.install(|| {
        // The weights as stored (Q4_1 blocks, Q8_0 embedding) and as f32, measured in one run:
        // the decode ratio is what keeping the weights small buys.
        let mut decode = Vec::new();
        let gemma = common::asset("generate", "gemma-3-270m-q4_k_m.gguf");
        let runs = [("smollm2-135m q4_1 as stored", Some(&smollm2), BaseDType::Keep), ("smollm2-135m f32", Some(&smollm2), BaseDType::F32)]
            .into_iter()
            .chain([("gemma3-270m q4_k_m as stored", gemma.as_ref(), BaseDType::Keep)]);
        for (name, path, base) in runs {
            let Some(path) = path else { continue };
            common::reset_peak();
            let model = models::load_with(path, &device, base).expect("model loads");
            let (prefill, dec) = measure(model.as_ref(), &device);
            decode.push(dec);
            println!(
                "{name} on {device}: prefill 128 tokens {prefill:.1} tok/s, decode 32 tokens {dec:.1} tok/s, peak RSS {:.0} MiB",
                common::peak_rss_mib()
            );
        }
        println!("smollm2 decode as stored / f32: {:.2}x", decode[0] / decode[1]);
    });
}
