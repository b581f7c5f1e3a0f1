//! Prefill and decode speed of the real SmolLM2-135M-Instruct (Q4_1 GGUF, its weights as stored
//! and as f32, in one run) with peak memory (the RSS peak is the process's so far): `cargo bench --bench generate` (after scripts/fetch-assets.sh). Compare
//! with `python3 scripts/bench_transformers.py`, the same measurement through `transformers`.
//! Device: $TINYTUNE_DEVICE (default auto). Prints one line per measurement.

mod common;

use std::time::Instant;

use tinytune::models::{self, KvCache};
use tinytune::{no_grad, Device, Tensor};

fn main() {
    use tinytune::quant::BaseDType;
    let Some(path) = common::smollm2("generate") else { return };
    let device = Device::from_env().expect("device");
    // The weights as stored (Q4_1 blocks, Q8_0 embedding) and as f32, measured in one run: the
    // decode ratio is what keeping the weights small buys.
    let mut decode = Vec::new();
    for (name, base) in [("q4_1 as stored", BaseDType::Keep), ("f32", BaseDType::F32)] {
        let model = models::load_with(&path, &device, base).expect("model loads");
        let _g = no_grad();
        let (prompt_len, decode_len) = (128usize, 32usize);
        let ids: Vec<u32> = (0..prompt_len as u32).map(|i| 100 + (i * 37) % 4000).collect();
        let ids_t = Tensor::from_vec(ids, &[1, prompt_len], &device).unwrap();
        // Warm-up, then the best of 3.
        let mut best_prefill = f64::INFINITY;
        let mut best_decode = f64::INFINITY;
        for _ in 0..4 {
            let mut cache = KvCache::new(model.num_layers());
            let t0 = Instant::now();
            let logits = model.forward_cached(&ids_t, None, Some(&mut cache)).unwrap();
            let mut next = logits.narrow(1, prompt_len - 1, 1).unwrap().argmax(-1, false).unwrap().to_vec::<u32>().unwrap()[0];
            let t1 = Instant::now();
            for _ in 0..decode_len {
                let step = Tensor::from_vec(vec![next], &[1, 1], &device).unwrap();
                let l = model.forward_cached(&step, None, Some(&mut cache)).unwrap();
                next = l.argmax(-1, false).unwrap().to_vec::<u32>().unwrap()[0];
            }
            let t2 = Instant::now();
            best_prefill = best_prefill.min((t1 - t0).as_secs_f64());
            best_decode = best_decode.min((t2 - t1).as_secs_f64());
        }
        decode.push(decode_len as f64 / best_decode);
        println!(
            "smollm2-135m {name} on {device}: prefill {prompt_len} tokens {:.1} tok/s, decode {decode_len} tokens {:.1} tok/s, peak RSS {:.0} MiB",
            prompt_len as f64 / best_prefill,
            decode_len as f64 / best_decode,
            common::peak_rss_mib()
        );
    }
    println!("decode as stored / f32: {:.2}x", decode[0] / decode[1]);
}
