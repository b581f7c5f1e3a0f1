//! Prefill and decode speed of the real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to f32)
//! with peak memory: `cargo bench --bench generate` (after scripts/fetch-assets.sh). Compare
//! with `python3 scripts/bench_transformers.py`, the same measurement through `transformers`.
//! Device: $TINYTUNE_DEVICE (default auto). Prints one line per measurement.

mod common;

use std::time::Instant;

use tinytune::models::{self, KvCache};
use tinytune::{no_grad, Device, Tensor};

fn main() {
    let Some(path) = common::smollm2("generate") else { return };
    let device = Device::from_env().expect("device");
    let model = models::load(&path, &device).expect("model loads");
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
    println!(
        "smollm2-135m q4_1->f32 on {device}: prefill {prompt_len} tokens {:.1} tok/s, decode {decode_len} tokens {:.1} tok/s, peak RSS {:.0} MiB",
        prompt_len as f64 / best_prefill,
        decode_len as f64 / best_decode,
        common::peak_rss_mib()
    );
}
