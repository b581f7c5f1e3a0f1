//! `tinytune bench`: the training and inference work of the project's two jobs, timed on this
//! machine; with `--python`, the same work in PyTorch + PEFT (`scripts/bench_peft.py`) in the
//! same run, and the ratios; with `--profile`, where one step's time goes, kernel by kernel.
//!
//! Cases (SmolLM2-135M-Instruct unless `--model`):
//! - `lora-step`: LoRA r=8 (α 16, no dropout) on q_proj, v_proj; 4 × 128 tokens; mean
//!   next-token cross-entropy, backward, AdamW (lr 1e-4, weight decay 0.01).
//! - `cls-step`: the main job's step: 16 real movie reviews cut to ≤ 64 tokens (padded to the
//!   longest), LoRA r=8 on all seven projections plus a new 2-class head, AdamW.
//! - `cls-eval`: the same batch forward only (no graph), as evaluation and `classify` run it.
//! - `prefill`: one 512-token sequence forward only, the logits of every position.
//! - `cls-eval-int8`, `prefill-int8`: the same with the integer products on
//!   (`TINYTUNE_INT8_DOT=1`: activations rounded to int8 per block of 32, multiplied by the
//!   Q4/Q8 weights as stored); CPUs with AVX-512 VNNI only, skipped elsewhere. PyTorch's side
//!   is its f32 `cls-eval` / `prefill`.
//! - `decode`: 64 tokens generated greedily one at a time with the KV cache after a 16-token
//!   prompt (the prompt's prefill is not timed).
//! - `full-step`: full fine-tuning, every weight trainable in f32; 4 × 128 tokens, mean
//!   next-token cross-entropy, AdamW (lr 2e-5, weight decay 0.01).
//! - `linears`: the linear products of one SmolLM2 layer on 512 tokens with f32 weights, each
//!   in the three orders a training step runs it (`x Wᵀ`, `dy W`, `dyᵀ x`): the GEMM alone.
//! - `attention-128`, `attention-512`, `attention-2048`: causal attention forward + backward of
//!   one SmolLM2 layer (9 query heads over 3 key/value heads, width 64) at that length, the
//!   fused kernel; the composed reference (scores materialised) is timed in the same run and
//!   printed beside it. PyTorch's side is `scaled_dot_product_attention`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde_json::{json, Value};
use tinytune::io::Tokenizer;
use tinytune::models::CausalLm;
use tinytune::optim::{AdamW, Optimizer, ParamGroup};
use tinytune::peft::LoraConfig;
use tinytune::quant::BaseDType;
use tinytune::train::data::{DataKind, DataOptions, Dataset};
use tinytune::train::{self, TrainConfig};
use tinytune::{profile, CrossEntropyReduction, Device, Error, Result, Tensor};

const CASES: [&str; 12] = [
    "lora-step",
    "cls-step",
    "cls-eval",
    "cls-eval-int8",
    "prefill",
    "prefill-int8",
    "decode",
    "full-step",
    "linears",
    "attention-128",
    "attention-512",
    "attention-2048",
];

#[derive(Args)]
pub struct BenchArgs {
    /// Model directory or .gguf file [default: the SmolLM2-135M-Instruct GGUF that
    /// scripts/fetch-assets.sh puts in ~/.cache/tinytune].
    #[arg(long, value_parser = tinytune::io::model_arg)]
    model: Option<PathBuf>,
    /// {"text", "label"} lines for the classification cases [default: the cached movie reviews].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which cases, comma-separated: lora-step, cls-step, cls-eval, cls-eval-int8, prefill,
    /// prefill-int8, decode, full-step, linears, attention-128, attention-512, attention-2048
    /// [default: all].
    #[arg(long, value_delimiter = ',')]
    cases: Option<Vec<String>>,
    /// Timed repetitions of each case (their mean is reported).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed repetitions before them.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Print where one repetition of each case spends its time, kernel by kernel.
    #[arg(long)]
    profile: bool,
    /// A Python with torch, transformers and peft: run the same cases in PyTorch
    /// (scripts/bench_peft.py) in this run and print the ratios.
    #[arg(long)]
    python: Option<PathBuf>,
    /// auto, cpu, gpu or gpu-software [default: $TINYTUNE_DEVICE or auto].
    #[arg(long)]
    device: Option<String>,
    /// How the frozen weights are held: auto (as stored, f32 matrices in f16 on a GPU with
    /// shader-f16), keep (as stored: Q4_1 blocks for the default model), f32 (what PyTorch
    /// computes with after loading the GGUF), bf16, nf4, int8 [default: auto].
    #[arg(long, default_value = "auto")]
    base_dtype: BaseDType,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// One case's measurement.
struct Measured {
    s_per_step: f64,
    tokens: usize,
    peak_rss: Option<u64>,
}

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// One repetition's result: the tokens it processed and, when only part of it is to be timed
/// (decoding after an untimed prompt), that part's seconds.
struct Rep {
    tokens: usize,
    timed_s: Option<f64>,
}

/// A repetition all of whose time counts.
fn all(tokens: usize) -> Result<Rep> {
    Ok(Rep { tokens, timed_s: None })
}

/// A repeatable unit of work.
type Work<'a> = Box<dyn FnMut() -> Result<Rep> + 'a>;

/// Time `work`: `warmup` untimed runs, one profiled run when asked, then `steps` timed runs.
fn measure(name: &str, mut work: Work, args: &BenchArgs, device: &Device, floor: Option<Floor>) -> Result<Measured> {
    for _ in 0..args.warmup {
        work()?;
    }
    if let (Device::Gpu(g), Some(floor)) = (device, floor) {
        device.synchronize()?;
        let before = g.kernel_counts();
        work()?;
        device.synchronize()?;
        note!("{}", traffic_report(name, &before, &g.kernel_counts(), &floor));
    }
    if args.profile {
        profile::set_enabled(true);
        profile::reset();
        work()?;
        device.synchronize()?;
        profile::set_enabled(false);
        note!("== {name}: one repetition\n{}", profile::table());
    }
    device.synchronize()?;
    // The peak covers this case's timed steps: memory freed earlier goes back first.
    tinytune::mem::release_free_memory();
    tinytune::mem::reset_peak_rss();
    let (t0, mut tokens, mut parts) = (Instant::now(), 0, Some(0.0));
    for _ in 0..args.steps.max(1) {
        let rep = work()?;
        tokens = rep.tokens;
        parts = parts.zip(rep.timed_s).map(|(a, b)| a + b);
    }
    device.synchronize()?;
    let total = parts.unwrap_or_else(|| t0.elapsed().as_secs_f64());
    Ok(Measured { s_per_step: total / args.steps.max(1) as f64, tokens, peak_rss: tinytune::mem::peak_rss_bytes() })
}

/// The bytes a step cannot avoid moving on a GPU, which the counted traffic is printed beside
/// (`--device gpu`): every frozen tensor the step uses, in its stored bytes, read once per pass
/// that needs it (`passes`: the forward, and the backward's `dx` products again); every
/// trainable f32 element read in the forward, its gradient written, and AdamW reading weight,
/// gradient and both moments and writing three of them (36 bytes); the token ids in and the
/// outputs the case returns. Activations are not counted: what a step moves above this floor
/// is theirs (saved for backward, re-read, and every intermediate a kernel writes).
#[derive(Clone, Copy, Debug)]
struct Floor {
    weights: u64,
    trainable: u64,
    io: u64,
}

impl Floor {
    /// The floor of a case on `model` (methods attached): `lm_head` whether the output layer
    /// is used (a classification case uses only the rows of the embedding its tokens pick),
    /// `positions` token positions in, `outputs` bytes returned.
    fn of(
        model: &mut dyn CausalLm,
        trainable: &[(String, Tensor)],
        lm_head: bool,
        passes: usize,
        positions: usize,
        outputs: u64,
    ) -> Result<Floor> {
        let mut frozen = Vec::new();
        model.visit_parameters(&mut |name, t| {
            if !t.requires_grad_flag() {
                frozen.push((name.to_string(), t.storage_bytes() as u64, t.shape().first().copied().unwrap_or(1)));
            }
            Ok(())
        })?;
        let is_head = |n: &str| n.starts_with("lm_head") || n.starts_with("score");
        let tied = !frozen.iter().any(|p| is_head(&p.0));
        let mut weights = 0u64;
        for (name, bytes, rows) in &frozen {
            let picked = bytes / (*rows).max(1) as u64 * positions as u64;
            if name.contains("embed_tokens") || name.contains("wte") {
                // The lookup reads the rows it picks; a tied output layer reads it all.
                weights += picked + if lm_head && tied { bytes * passes as u64 } else { 0 };
            } else if name.contains("wpe") {
                weights += picked; // learned positions: the rows of the positions in use
            } else if !is_head(name) || lm_head {
                weights += bytes * passes as u64;
            }
        }
        // The method's tensors (LoRA, a new head; every weight when fully fine-tuned).
        let trainable = trainable.iter().map(|(_, t)| 36 * t.numel() as u64).sum();
        Ok(Floor { weights, trainable, io: 4 * positions as u64 + outputs })
    }

    fn total(&self) -> u64 {
        self.weights + self.trainable + self.io
    }
}

/// What one repetition moved on the GPU (the engine's per-kernel counts between `before` and
/// `after`) beside its floor.
fn traffic_report(
    name: &str,
    before: &[(&'static str, tinytune::backend::gpu::KernelCount)],
    after: &[(&'static str, tinytune::backend::gpu::KernelCount)],
    floor: &Floor,
) -> String {
    let was = |k: &str| before.iter().find(|(n, _)| *n == k).map(|(_, c)| *c).unwrap_or_default();
    // (kernel, dispatches, requested read + written, unique read + written, read, written)
    let mut rows: Vec<(&str, u64, u64, u64, u64, u64)> = after
        .iter()
        .map(|(k, c)| {
            let b = was(k);
            let (r, w) = (c.bytes_read - b.bytes_read, c.bytes_written - b.bytes_written);
            let (ur, uw) = (c.unique_read - b.unique_read, c.unique_written - b.unique_written);
            (*k, c.dispatches - b.dispatches, r + w, ur + uw, r, w)
        })
        .filter(|r| r.1 > 0)
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.3));
    let (dispatches, requested, unique) = rows.iter().fold((0, 0, 0), |(d, b, u), r| (d + r.1, b + r.2, u + r.3));
    let mb = |b: u64| b as f64 / 1e6;
    let mut out = format!(
        "== {name}: one repetition on the GPU: {dispatches} dispatches; {:.3} MB requested by the shaders' loads and stores, \
         {:.3} MB unique per launch; floor {:.3} MB (weights {:.3}, trainable state {:.3}, ids and outputs {:.3}; \
         activations not counted): unique {:.2}× the floor\n",
        mb(requested),
        mb(unique),
        mb(floor.total()),
        mb(floor.weights),
        mb(floor.trainable),
        mb(floor.io),
        unique as f64 / floor.total().max(1) as f64
    );
    out += &format!("{:<28} {:>10} {:>12} {:>12} {:>12}\n", "kernel", "dispatches", "MB unique", "MB read", "MB written");
    for (k, d, _, u, r, w) in rows.iter().take(12) {
        out += &format!("{k:<28} {d:>10} {:>12.1} {:>12.1} {:>12.1}\n", mb(*u), mb(*r), mb(*w));
    }
    out
}

/// The language-modelling batch of `lora-step` and `full-step`: 4 × 128 ids and their next
/// tokens as targets (the last position of each row ignored), and the token count.
fn lm_batch(model: &dyn CausalLm, device: &Device) -> Result<(Tensor, Tensor, usize)> {
    let (b, t) = (4usize, 128.min(model.max_positions().unwrap_or(128)));
    let ids = spread_ids(b * t, model.vocab_size());
    let targets: Vec<i32> = (0..b * t).map(|i| if i % t == t - 1 { -100 } else { ids[i + 1] as i32 }).collect();
    Ok((Tensor::from_vec(ids, &[b, t], device)?, Tensor::from_vec(targets, &[b, t], device)?, b * t))
}

/// Deterministic ids spread over the vocabulary (the tokens do not change the work).
fn spread_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64).map(|i| ((i * 2_654_435_761 + 12_345) % vocab as u64) as u32).collect()
}

/// The first 16 examples of the labelled data, cut to 64 tokens.
fn review_batch(data: &Path, tok: &Tokenizer, model: &dyn CausalLm) -> Result<Dataset> {
    let text = tinytune::io::read_regular_string(data)?;
    let lines: String = text.lines().filter(|l| !l.trim().is_empty()).take(16).map(|l| format!("{l}\n")).collect();
    let opts = DataOptions { seq_len: 64, context: model.max_positions(), ..DataOptions::default() };
    let ds = Dataset::from_jsonl_str(&lines, &data.display().to_string(), tok, &opts)?;
    if ds.kind() != DataKind::Classification || ds.len() < 16 {
        return Err(Error::InvalidArgument {
            op: "bench",
            msg: format!("{}: the classification cases need 16 {{\"text\", \"label\"}} lines", data.display()),
        });
    }
    Ok(ds)
}

/// SmolLM2-135M's linear layers as (in, out) features: q, k, v, o, gate, up, down.
const SMOLLM2_LINEARS: [(usize, usize); 7] = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)];

/// The cases that need no model: one layer's linear products, attention at length `t`.
fn run_kernel_case(case: &str, args: &BenchArgs, device: &Device) -> Result<Option<Measured>> {
    let mut rng = tinytune::Rng::new(0);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, 0.0, 1.0, tinytune::DType::F32, device, &mut rng);
    if case == "linears" {
        let rows = 512;
        let mut ops = Vec::new();
        for (fan_in, fan_out) in SMOLLM2_LINEARS {
            ops.push((randn(&[rows, fan_in])?, randn(&[fan_out, fan_in])?, randn(&[rows, fan_out])?));
        }
        let work = Box::new(move || {
            for (x, w, dy) in &ops {
                x.matmul(&w.t()?)?; // forward: x Wᵀ
                dy.matmul(w)?; // dx = dy W
                dy.t()?.matmul(x)?; // dW = dyᵀ x
            }
            all(rows)
        });
        return measure(case, work, args, device, None).map(Some);
    }
    let Some(t) = case.strip_prefix("attention-").and_then(|t| t.parse::<usize>().ok()) else { return Ok(None) };
    use tinytune::nn::{attention, attention_reference, Mask};
    let q = randn(&[1, 9, t, 64])?.requires_grad()?;
    let (k, v) = (randn(&[1, 3, t, 64])?.requires_grad()?, randn(&[1, 3, t, 64])?.requires_grad()?);
    type Attn = fn(&Tensor, &Tensor, &Tensor, &Mask) -> Result<Tensor>;
    let run = |f: Attn| -> Work {
        let (q, k, v) = (q.clone(), k.clone(), v.clone());
        Box::new(move || {
            f(&q, &k, &v, &Mask::causal(0, None))?.sum_all()?.backward()?;
            for x in [&q, &k, &v] {
                x.zero_grad();
            }
            all(t)
        })
    };
    let fused = measure(case, run(attention), args, device, None)?;
    let composed = measure(&format!("{case} composed"), run(attention_reference), args, device, None)?;
    note!(
        "{case}: fused {:.2} ms ({:.0} MiB peak), composed {:.2} ms ({:.0} MiB peak): fused {:.2}× faster",
        fused.s_per_step * 1e3,
        fused.peak_rss.unwrap_or(0) as f64 / (1 << 20) as f64,
        composed.s_per_step * 1e3,
        composed.peak_rss.unwrap_or(0) as f64 / (1 << 20) as f64,
        composed.s_per_step / fused.s_per_step
    );
    Ok(Some(fused))
}

/// A case with the integer products on for the `-int8` cases and off for the others (whatever
/// `TINYTUNE_INT8_DOT` says), then as they were.
fn run_case(case: &str, model_path: &Path, data: &Path, args: &BenchArgs, device: &Device) -> Result<Measured> {
    use tinytune::backend::cpu::qgemm;
    let base = case.strip_suffix("-int8");
    if let (Some(b), true) = (base, args.profile) {
        note!("{case}: the {b} case with the integer products on");
    }
    let before = qgemm::enabled();
    qgemm::set_enabled(base.is_some());
    let m = run_case_f32_or_int8(base.unwrap_or(case), model_path, data, args, device);
    qgemm::set_enabled(before);
    m
}

fn run_case_f32_or_int8(case: &str, model_path: &Path, data: &Path, args: &BenchArgs, device: &Device) -> Result<Measured> {
    if let Some(m) = run_kernel_case(case, args, device)? {
        return Ok(m);
    }
    // Full fine-tuning trains the base weights: `auto` must not round them to f16 first.
    let base = if case == "full-step" && args.base_dtype == BaseDType::Auto { BaseDType::Keep } else { args.base_dtype };
    let mut model = super::load_model(model_path, device, base)?;
    match case {
        "decode" => {
            let (prompt, steps) = (16usize, 64usize);
            let ids = Tensor::from_vec(spread_ids(prompt, model.vocab_size()), &[1, prompt], device)?;
            // Every generated token reads every weight once and returns its logits (the
            // prompt's prefill, untimed, is part of the counted repetition too).
            let out_bytes = ((prompt + steps) * model.vocab_size() * 4) as u64;
            let floor = Floor::of(model.as_mut(), &[], true, steps + 1, prompt + steps, out_bytes)?;
            let m = model.as_ref();
            measure(
                case,
                Box::new(move || {
                    tinytune::autograd::with_no_grad(|| {
                        let mut cache = tinytune::models::KvCache::new(m.num_layers());
                        let logits = m.forward_cached(&ids, None, Some(&mut cache))?;
                        let mut next = logits.narrow(1, prompt - 1, 1)?.argmax(-1, false)?.to_vec::<u32>()?[0];
                        // Only the generated tokens count: the prompt's prefill is the `prefill` case.
                        let t0 = Instant::now();
                        for _ in 0..steps {
                            let step = Tensor::from_vec(vec![next], &[1, 1], device)?;
                            next = m.forward_cached(&step, None, Some(&mut cache))?.argmax(-1, false)?.to_vec::<u32>()?[0];
                        }
                        Ok(Rep { tokens: steps, timed_s: Some(t0.elapsed().as_secs_f64()) })
                    })
                }),
                args,
                device,
                Some(floor),
            )
        }
        "lora-step" | "full-step" => {
            // LoRA r=8 on q, v (lr 1e-4), or every weight trainable (lr 2e-5).
            let (params, lr) = if case == "full-step" {
                (tinytune::peft::full::make_trainable(model.as_mut())?, 2e-5)
            } else {
                let targets = vec!["q_proj".into(), "v_proj".into()];
                let cfg = LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, targets, ..LoraConfig::default() };
                (tinytune::peft::LoraAdapter::attach(model.as_mut(), cfg)?.parameters(), 1e-4)
            };
            let (ids, targets, tokens) = lm_batch(model.as_ref(), device)?;
            let floor = Floor::of(model.as_mut(), &params, true, 2, tokens, 4)?;
            let mut opt = AdamW::new(vec![ParamGroup::new("trained", params, 1.0, 0.01)])?;
            let m = model.as_ref();
            measure(
                case,
                Box::new(move || {
                    let loss = m.forward(&ids, None)?.cross_entropy(&targets, -100, CrossEntropyReduction::Mean)?;
                    loss.backward()?;
                    profile::in_phase("optimizer", || opt.step(lr))?;
                    opt.zero_grad();
                    loss.to_scalar()?;
                    all(tokens)
                }),
                args,
                device,
                Some(floor),
            )
        }
        "cls-step" | "cls-eval" => {
            let tok = Tokenizer::for_model(model_path)?;
            let ds = review_batch(data, &tok, model.as_ref())?;
            let lora = LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, targets: vec!["all-linear".into()], ..LoraConfig::default() };
            let cfg = TrainConfig { method: Arc::new(lora), num_classes: Some(2), ..TrainConfig::default() };
            let attached = train::attach(model.as_mut(), &cfg, DataKind::Classification, Some(2), device)?;
            let batch = ds.batch(&(0..ds.len()).collect::<Vec<_>>(), device)?;
            let tokens = batch.n_tokens;
            let positions = batch.ids.shape().iter().product();
            let trained = if case == "cls-eval" { Vec::new() } else { attached.params.clone() };
            let floor = Floor::of(model.as_mut(), &trained, false, if case == "cls-eval" { 1 } else { 2 }, positions, 4)?;
            let (m, objective) = (model.as_ref(), attached.objective);
            if case == "cls-eval" {
                attached.method.as_ref().set_training(false);
                return measure(
                    case,
                    Box::new(move || {
                        tinytune::autograd::with_no_grad(|| objective.batch_loss(m, &batch, true)?.sum.to_scalar())?;
                        all(tokens)
                    }),
                    args,
                    device,
                    Some(floor),
                );
            }
            let mut opt = AdamW::new(vec![ParamGroup::new("all", attached.params, 1.0, 0.01)])?;
            measure(
                case,
                Box::new(move || {
                    let loss = objective.batch_loss(m, &batch, false)?.sum.mul_scalar(1.0 / 16.0)?;
                    loss.backward()?;
                    profile::in_phase("optimizer", || opt.step(1e-4))?;
                    opt.zero_grad();
                    loss.to_scalar()?;
                    all(tokens)
                }),
                args,
                device,
                Some(floor),
            )
        }
        "prefill" => {
            let t = 512.min(model.max_positions().unwrap_or(512));
            let ids = Tensor::from_vec(spread_ids(t, model.vocab_size()), &[1, t], device)?;
            let out_bytes = (t * model.vocab_size() * 4) as u64;
            let floor = Floor::of(model.as_mut(), &[], true, 1, t, out_bytes)?;
            let (m, dev) = (model.as_ref(), device.clone());
            measure(
                case,
                Box::new(move || {
                    // Wait for the logits (a GPU runs asynchronously) without reading them.
                    let logits = tinytune::autograd::with_no_grad(|| m.forward(&ids, None))?;
                    dev.synchronize()?;
                    drop(logits);
                    all(t)
                }),
                args,
                device,
                Some(floor),
            )
        }
        other => Err(Error::InvalidArgument { op: "bench", msg: format!("unknown case '{other}' (one of {})", CASES.join(", ")) }),
    }
}

/// The PyTorch side of `case`, measured by `scripts/bench_peft.py` under `python`.
fn run_torch(python: &Path, case: &str, data: &Path, args: &BenchArgs, device: &Device) -> Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_peft.py");
    let dev = if device.is_gpu() { "cuda" } else { "cpu" };
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(["--case", case, "--steps", &args.steps.max(1).to_string(), "--warmup", &args.warmup.to_string(), "--device", dev])
        .arg("--data")
        .arg(data)
        .output()
        .map_err(|e| Error::Io { path: python.display().to_string(), msg: e.to_string() })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    match serde_json::from_str::<Value>(line) {
        Ok(v) if out.status.success() => Ok(v),
        _ => Err(Error::InvalidArgument {
            op: "bench --python",
            msg: format!("{} {} --case {case} failed: {}", python.display(), script.display(), String::from_utf8_lossy(&out.stderr).trim()),
        }),
    }
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let device = super::device_from(args.device.as_deref())?;
    let model = args.model.clone().unwrap_or_else(|| tinytune::io::assets_dir().join(GGUF));
    let data = args.data.clone().unwrap_or_else(|| tinytune::io::assets_dir().join("data/movie_reviews.train.jsonl"));
    for (p, what) in [(&model, "--model"), (&data, "--data")] {
        if !p.exists() {
            return Err(Error::InvalidArgument {
                op: "bench",
                msg: format!("{what} {} does not exist (scripts/fetch-assets.sh fetches the defaults)", p.display()),
            });
        }
    }
    let cases: Vec<String> = args.cases.clone().unwrap_or_else(|| CASES.iter().map(|c| c.to_string()).collect());
    if let Some(bad) = cases.iter().find(|c| !CASES.contains(&c.as_str())) {
        return Err(Error::InvalidArgument { op: "bench", msg: format!("unknown case '{bad}' (one of {})", CASES.join(", ")) });
    }
    let threads = rayon::current_num_threads();
    note!("bench: {} on {device}, {threads} threads; {} timed after {} warm-up repetitions", model.display(), args.steps, args.warmup);
    let mut rows = Vec::new();
    for case in &cases {
        let base_case = case.strip_suffix("-int8");
        if base_case.is_some() && (device.is_gpu() || !tinytune::backend::cpu::qgemm::supported()) {
            note!("bench: {case} skipped: the integer products run on CPUs with AVX-512 VNNI");
            continue;
        }
        let ours = run_case(case, &model, &data, &args, &device)?;
        let torch = match &args.python {
            Some(py) => Some(run_torch(py, base_case.unwrap_or(case), &data, &args, &device)?),
            None => None,
        };
        let torch_s = torch.as_ref().and_then(|v| v["s_per_step"].as_f64());
        let row = json!({
            "case": case,
            "tokens": ours.tokens,
            "s_per_step": ours.s_per_step,
            "tokens_per_s": ours.tokens as f64 / ours.s_per_step,
            "peak_rss_mib": ours.peak_rss.map(|b| b as f64 / (1 << 20) as f64),
            "torch_s_per_step": torch_s,
            "torch_peak_rss_mib": torch.as_ref().and_then(|v| v["peak_rss_mib"].as_f64()),
            "speedup": torch_s.map(|t| t / ours.s_per_step),
            "torch_versions": torch.as_ref().map(|v| v["versions"].clone()),
        });
        if !args.json {
            print_row(&row, rows.is_empty())?;
        }
        rows.push(row);
    }
    if args.json {
        outln!("{}", json!({ "device": device.to_string(), "threads": threads, "model": model, "cases": rows }));
    }
    Ok(())
}

fn print_row(r: &Value, first: bool) -> Result<()> {
    if first {
        outln!(
            "{:<14} {:>7} {:>10} {:>10} {:>9}   {:>10} {:>9} {:>8}",
            "case",
            "tokens",
            "s/step",
            "tokens/s",
            "peak MiB",
            "torch s",
            "torch MiB",
            "speedup"
        );
    }
    let f = |v: &Value, prec: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.prec$}"));
    outln!(
        "{:<14} {:>7} {:>10} {:>10} {:>9}   {:>10} {:>9} {:>8}",
        r["case"].as_str().unwrap_or(""),
        r["tokens"].as_u64().unwrap_or(0),
        f(&r["s_per_step"], 4),
        f(&r["tokens_per_s"], 0),
        f(&r["peak_rss_mib"], 0),
        f(&r["torch_s_per_step"], 4),
        f(&r["torch_peak_rss_mib"], 0),
        r["speedup"].as_f64().map_or("-".to_string(), |x| format!("{x:.2}×")),
    );
    Ok(())
}
