//! Stable-Rust smoke runs of the parser fuzz targets (`fuzz/`: `adapter`, `data`,
//! `run_config`, `checkpoint`): each target's body runs on real inputs (the committed PEFT
//! adapters, the data fixtures, a run file, a checkpoint a real run wrote) and on a few
//! hundred mutations of them (bit flips, truncations, inserted bytes, digits made huge),
//! and must answer every one with a value or an error, never a panic. The unmutated seeds
//! must load, so the bodies are known to reach the success paths the fuzzer mutates from.
//! The coverage-guided runs: `RUSTC_BOOTSTRAP=1 cargo fuzz run <target>` (README, "Fuzzing").

mod common;

mod adapter {
    include!("fuzz_body/adapter.rs");
}
mod data {
    include!("fuzz_body/data.rs");
}
mod run_config {
    include!("fuzz_body/run_config.rs");
}
mod checkpoint {
    include!("fuzz_body/checkpoint.rs");
}

use std::path::{Path, PathBuf};

use common::TestRng;
use tinytune::train::Trainer;
use tinytune::{models, Device};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)
}

/// One random mutation of `seed`, of the kinds that break parsers: a flipped bit, a random
/// byte, a truncation, an inserted or deleted run, a run of digits made huge or negative.
fn mutate(seed: &[u8], rng: &mut TestRng) -> Vec<u8> {
    let mut v = seed.to_vec();
    let at = |rng: &mut TestRng, v: &Vec<u8>| rng.below(v.len().max(1));
    for _ in 0..1 + rng.below(3) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = at(rng, &v);
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = at(rng, &v);
                v[i] = rng.next_u64() as u8;
            }
            2 => v.truncate(at(rng, &v)),
            3 => {
                let i = at(rng, &v).min(v.len());
                let n = 1 + rng.below(8);
                const PIECES: &[u8] = b"{}[]\",:0-9e.\n\\ ";
                let bytes: Vec<u8> = (0..n).map(|_| PIECES[rng.below(PIECES.len())]).collect();
                v.splice(i..i, bytes);
            }
            4 if v.len() > 2 => {
                let i = at(rng, &v);
                let j = (i + 1 + rng.below(16)).min(v.len());
                v.drain(i..j);
            }
            5 => {
                // The first digit after a random point becomes a huge (or negative) number.
                let i = at(rng, &v);
                if let Some(p) = v.iter().skip(i).position(u8::is_ascii_digit) {
                    let huge: &[u8] = [&b"99999999999999999999"[..], b"4294967296", b"-1", b"1e308", b"0"][rng.below(5)];
                    v.splice(i + p..i + p + 1, huge.iter().copied());
                }
            }
            _ => {
                let i = at(rng, &v);
                let j = (i + rng.below(32)).min(v.len());
                let chunk = v[i..j].to_vec();
                v.splice(i..i, chunk);
            }
        }
    }
    v
}

/// With `TINYTUNE_FUZZ_CORPUS=DIR`, the seeds are also written to `DIR/<target>/` to start
/// the coverage-guided fuzzer from (`TINYTUNE_FUZZ_CORPUS=fuzz/corpus cargo test --release
/// --test fuzz_parsers`).
fn save_seeds(name: &str, seeds: &[Vec<u8>]) {
    if let Some(dir) = std::env::var_os("TINYTUNE_FUZZ_CORPUS") {
        let dir = PathBuf::from(dir).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
        }
    }
}

fn smoke(name: &str, seeds: &[Vec<u8>], runs: usize, body: fn(&[u8])) {
    save_seeds(name, seeds);
    let mut rng = TestRng::new(0xF022 ^ name.len() as u64);
    for s in seeds {
        body(s);
    }
    for _ in 0..runs {
        let s = &seeds[rng.below(seeds.len())];
        body(&mutate(s, &mut rng));
    }
}

#[test]
fn adapter_files_never_panic() {
    let mut seeds = Vec::new();
    for name in ["llama-lora", "llama-dora", "llama-ia3", "llama-prefix", "llama-prompt", "llama-rslora-all", "llama-seqcls"] {
        let dir = fixture(&format!("peft/{name}"));
        let (config, weights) =
            (std::fs::read(dir.join("adapter_config.json")).unwrap(), std::fs::read(dir.join("adapter_model.safetensors")).unwrap());
        // The unmutated seed loads: the body reaches the loader's success path.
        let mut model = models::load(fixture("tiny-llama"), &Device::Cpu).unwrap();
        tinytune::peft::format::load(&dir, model.as_mut(), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        seeds.push(adapter::join_parts(&config, &weights));
    }
    smoke("adapter", &seeds, 400, adapter::run);
}

#[test]
fn data_files_never_panic() {
    let mut seeds = Vec::new();
    for name in ["classification", "messages", "prompt_completion", "text", "malformed", "missing_key", "empty"] {
        let text = std::fs::read(fixture(&format!("data/{name}.jsonl"))).unwrap();
        for opts in [0u8, 8 | 32 | 64, 16 | 4] {
            let mut s = vec![opts];
            s.extend_from_slice(&text);
            seeds.push(s);
        }
    }
    smoke("data", &seeds, 1500, data::run);
}

#[test]
fn run_files_never_panic() {
    let seeds: Vec<Vec<u8>> = [
        "method = \"lora\"\nrank = 4\nalpha = 8.0\ndropout = 0.1\ntarget-modules = [\"q_proj\", \"v_proj\"]\nlayers = \"0-1\"\nlr = 1e-3\nepochs = 2\nbatch-size = 4\n",
        "method = \"prefix\"\nnum_virtual_tokens = 4\nprefix_projection = true\nencoder_hidden_size = 16\nset = [\"num-virtual-tokens=3\"]\n",
        "method = \"prompt\"\nnum-virtual-tokens = 3\nprompt-init = \"text\"\nprompt-init-text = \"the cat\"\n",
        "method = \"adapter\"\nadapter-kind = \"pfeiffer\"\nreduction-factor = 4\nnon-linearity = \"gelu_tanh\"\n",
        "method = \"ia3\"\ntarget-modules = [\"k_proj\", \"down_proj\"]\nfeedforward-modules = [\"down_proj\"]\n",
        "method = \"dora\"\nrank = 2\nrslora = true\nmax-steps = 10\nwarmup = 2\nschedule = \"cosine\"\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    for s in &seeds {
        let args = tinytune::cli::FinetuneArgs::from_toml_str(std::str::from_utf8(s).unwrap(), Path::new("run.toml")).unwrap();
        let settings = args.method_settings(&|t| Ok(t.bytes().map(|b| u32::from(b) % 60).collect())).unwrap();
        tinytune::peft::configure(args.method.as_deref().unwrap(), &settings).unwrap();
    }
    smoke("run_config", &seeds, 1500, run_config::run);
}

#[test]
fn checkpoints_never_panic() {
    // A real checkpoint: the body's own run, one step.
    let out = std::env::temp_dir().join(format!("tinytune-fuzz-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut model = models::load(fixture("tiny-llama"), &Device::Cpu).unwrap();
    let cfg = checkpoint::config(out.clone());
    {
        let mut t = Trainer::new(model.as_mut(), checkpoint::dataset(), None, &cfg, &Device::Cpu).unwrap();
        t.step().unwrap();
        t.save_checkpoint().unwrap();
    }
    let dir = out.join("checkpoint");
    let (state, tensors) = (std::fs::read(dir.join("state.json")).unwrap(), std::fs::read(dir.join("step-1.safetensors")).unwrap());
    // The unmutated seed resumes exactly.
    let mut model = models::load(fixture("tiny-llama"), &Device::Cpu).unwrap();
    let resume = tinytune::train::TrainConfig { resume: true, ..cfg };
    let resumed = Trainer::new(model.as_mut(), checkpoint::dataset(), None, &resume, &Device::Cpu)
        .unwrap_or_else(|e| panic!("the seed checkpoint resumes: {e}"));
    assert_eq!(resumed.step_count(), 1);
    drop(resumed);
    std::fs::remove_dir_all(&out).ok();
    let seed = checkpoint::join_parts(&state, &tensors);
    // Mutations of the tensors file fail its checksum at once; those of state.json reach
    // every check after it, so most mutations go to the state.
    let state_only: Vec<Vec<u8>> = vec![seed.clone()];
    let mut rng = TestRng::new(99);
    for _ in 0..300 {
        let s = mutate(&state, &mut rng);
        checkpoint::run(&checkpoint::join_parts(&s, &tensors));
    }
    smoke("checkpoint", &state_only, 60, checkpoint::run);
}
