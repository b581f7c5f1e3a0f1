//! Hostile-but-realistic use of the `tinytune` binary on the tiny fixtures: every case that
//! once panicked, aborted, hung or succeeded wrongly now fails with exit status 1 (or, for a
//! closed pipe, 141) and a message naming what is wrong; and drills for the data a run makes:
//! chains of kill -9 at random moments resume bit for bit, a full disk keeps the previous
//! checkpoint whole, damaged checkpoints are refused, one run owns an output directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tinytune-reliability-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the tiny model whose config.json has `edit` applied.
fn edited_model(dir: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let m = common::tiny_model_dir(&dir.join(name));
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    m
}

fn write(dir: &Path, name: &str, lines: &[serde_json::Value]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    p
}

/// 24 labelled lines: 1 for praise, 0 for complaints.
fn cls_lines() -> Vec<serde_json::Value> {
    (0..24)
        .map(|i| json!({ "text": if i % 2 == 0 { "the film was good ." } else { "the film was bad ." }, "label": (i % 2 == 0) as u32 }))
        .collect()
}

/// 40 `{"text"}` lines of unequal lengths.
fn lm_lines() -> Vec<serde_json::Value> {
    let (animals, verbs, places) = (["cat", "dog", "bird", "fish"], ["sat", "ran", "slept", "ate"], ["mat", "box", "tree", "pond"]);
    (0..40)
        .map(|i| {
            let mut t = format!("the {} {} on the {} .", animals[i % 4], verbs[(i / 4) % 4], places[(i / 3) % 4]);
            for _ in 0..i % 5 {
                t.push_str(" and then it ate the food .");
            }
            json!({ "text": t })
        })
        .collect()
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_tinytune")).args(args).env("TINYTUNE_DEVICE", "cpu").output().expect("binary runs");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// The command fails cleanly (status 1, no panic) with a message containing every `needle`.
fn refused(what: &str, args: &[&str], needles: &[&str]) {
    let o = run(args);
    assert_eq!(o.code, Some(1), "{what}: expected a clean failure (status 1), got {:?}: {}", o.code, o.stderr);
    assert!(!o.stderr.contains("panicked"), "{what}: panicked: {}", o.stderr);
    for n in needles {
        assert!(o.stderr.contains(n), "{what}: the message should name {n:?}: {}", o.stderr);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn absurd_sizes_and_bad_settings_are_refused_naming_them() {
    let dir = scratch("sizes");
    let model = common::tiny_model_dir(&dir);
    let cls = write(&dir, "cls.jsonl", &cls_lines());
    let out = dir.join("out");
    let ft = |extra: &[&str]| -> Vec<String> {
        ["finetune", "--model", s(&model), "--data", s(&cls), "--out", s(&out), "--max-steps", "2", "--batch-size", "4"]
            .iter()
            .chain(extra)
            .map(|x| x.to_string())
            .collect()
    };
    let check = |what: &str, extra: &[&str], needles: &[&str]| {
        let a = ft(extra);
        refused(what, &a.iter().map(String::as_str).collect::<Vec<_>>(), needles)
    };
    check("--eval-every 0", &["--eval-every", "0"], &["eval_every must be at least 1"]);
    check("--num-classes 10^10", &["--num-classes", "10000000000"], &["10000000000 classes", "out of memory"]);
    check("--rank 10^9", &["--rank", "1000000000"], &["rank 1000000000", "q_proj", "at most 32"]);
    check("--grad-accum 10^9", &["--grad-accum", "1000000000"], &["grad_accum 1000000000", "training examples"]);
    let no_max: Vec<String> = ["finetune", "--model", s(&model), "--data", s(&cls), "--out", s(&out), "--epochs", "3689348814741910324"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    refused("--epochs 3689348814741910324", &no_max.iter().map(String::as_str).collect::<Vec<_>>(), &["more than any run takes"]);
    let overflow: Vec<String> =
        no_max.iter().map(|x| if x == "3689348814741910324" { "9223372036854775807".to_string() } else { x.clone() }).collect();
    refused("--epochs 2^63", &overflow.iter().map(String::as_str).collect::<Vec<_>>(), &["overflows the step count"]);
    check("--on-divergence maybe", &["--on-divergence", "maybe"], &["--on-divergence", "maybe"]);

    let mut big = cls_lines();
    big.push(json!({ "text": "the film was good .", "label": 4_000_000_000u64 }));
    let big = write(&dir, "big.jsonl", &big);
    refused(
        "a label of 4·10^9",
        &["finetune", "--model", s(&model), "--data", s(&big), "--out", s(&out)],
        &["big.jsonl", "line 25", "too large"],
    );
    let mut stray = cls_lines();
    stray.push(json!({ "text": "the film was good .", "label": 100000 }));
    let stray = write(&dir, "stray.jsonl", &stray);
    refused(
        "one stray label 100000",
        &["finetune", "--model", s(&model), "--data", s(&stray), "--out", s(&out)],
        &["stray.jsonl", "line 25", "label 100000", "--num-classes"],
    );
    // An explicit count makes the stray label an error naming its line, as before.
    refused(
        "a label beyond --num-classes",
        &["finetune", "--model", s(&model), "--data", s(&stray), "--out", s(&out), "--num-classes", "2"],
        &["line 25", "out of range for 2 classes"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn configs_that_change_the_math_are_strict() {
    let dir = scratch("configs");
    let eval = |m: &Path| -> Vec<String> { ["eval", "--model", s(m), "--text", "the cat sat"].iter().map(|x| x.to_string()).collect() };
    let check = |name: &str, edit: &dyn Fn(&mut serde_json::Value), needles: &[&str]| {
        let m = edited_model(&dir, name, edit);
        let a = eval(&m);
        refused(name, &a.iter().map(String::as_str).collect::<Vec<_>>(), &[&["config.json"][..], needles].concat());
    };
    check("theta-string", &|c| c["rope_parameters"]["rope_theta"] = json!("50000"), &["rope_parameters.rope_theta", "must be a number"]);
    check("theta-negative", &|c| c["rope_parameters"]["rope_theta"] = json!(-5.0), &["rope_theta = -5"]);
    check("eps-negative", &|c| c["rms_norm_eps"] = json!(-1e-5), &["rms_norm_eps"]);
    check("context-huge", &|c| c["max_position_embeddings"] = json!(1_000_000_000_000_000u64), &["max_position_embeddings"]);
    check("fewer-layers", &|c| c["num_hidden_layers"] = json!(1), &["num_hidden_layers = 1", "holds 2 blocks"]);
    // Unchanged, the same command works (the cases above fail for their edit alone).
    let m = common::tiny_model_dir(&dir.join("plain"));
    let a = eval(&m);
    let o = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inputs_outside_the_model_are_named() {
    let dir = scratch("inputs");
    let model = common::tiny_model_dir(&dir);
    refused("a bad token id", &["eval", "--model", s(&model), "--ids", "1,99999"], &["token id 99999", "vocabulary"]);
    refused(
        "--max-len past the context",
        &["eval", "--model", s(&model), "--text", "the cat", "--max-len", "1024"],
        &["--max-len 1024", "context of 64"],
    );
    let long = "the cat ".repeat(40);
    let o = run(&["generate", "--model", s(&model), "--prompt", &long, "--max-new-tokens", "100"]);
    assert_eq!(o.code, Some(1), "an 80-token prompt is longer than the 64-token context: {}", o.stderr);
    assert!(o.stderr.contains("context of 64"), "{}", o.stderr);
    let o = run(&["generate", "--model", s(&model), "--prompt", "the cat", "--max-new-tokens", "100", "--json"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stderr.contains("at most 62 new tokens"), "capping at the context is said: {}", o.stderr);
    let generated = serde_json::from_str::<serde_json::Value>(o.stdout.trim()).unwrap()["ids"].as_array().unwrap().len();
    assert!(generated <= 62, "{generated} tokens generated past the context");
    // A BOM is not text, in eval as in finetune.
    let bom = dir.join("bom.jsonl");
    std::fs::write(&bom, "\u{feff}{\"text\": \"the cat sat on the mat .\"}\n").unwrap();
    let o = run(&["eval", "--model", s(&model), "--data", s(&bom), "--json"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    // A GGUF fixture's made-up vocabulary: the problem named, not the BPE crate's words.
    refused(
        "a malformed GGUF vocabulary",
        &["tokenize", "--model", s(&fixture("tiny-llama-gguf/tiny-llama.f32.gguf")), "--text", "the cat"],
        &["tiny-llama.f32.gguf", "merge", "vocabulary does not have"],
    );
    #[cfg(unix)]
    {
        // A FIFO where a model file belongs is refused at once instead of blocking forever.
        let fifo = dir.join("model.gguf");
        assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let t0 = std::time::Instant::now();
        refused("a FIFO model", &["eval", "--model", s(&fifo), "--text", "the cat"], &["model.gguf", "not a regular file"]);
        assert!(t0.elapsed().as_secs() < 30);
    }
    // merge never writes over its own input.
    let data = write(&dir, "lm.jsonl", &lm_lines());
    let out = dir.join("run");
    let o = run(&["finetune", "--model", s(&model), "--data", s(&data), "--out", s(&out), "--max-steps", "1", "--rank", "2"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let adapter = out.join("adapter");
    refused(
        "merge --out = --model",
        &["merge", "--model", s(&model), "--adapter", s(&adapter), "--out", s(&model)],
        &["is the --model it reads"],
    );
    let dotted = format!("{}/../model/.", model.display());
    refused(
        "merge --out = --model, spelled otherwise",
        &["merge", "--model", s(&model), "--adapter", s(&adapter), "--out", &dotted],
        &["--model"],
    );
    refused("merge --out = --adapter", &["merge", "--model", s(&model), "--adapter", s(&adapter), "--out", s(&adapter)], &["--adapter"]);
    assert!(std::fs::read(model.join("model.safetensors")).unwrap() == before, "the base model is untouched");
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(target_os = "linux")]
#[test]
fn output_that_cannot_be_written_never_panics() {
    let dir = scratch("output");
    let model = common::tiny_model_dir(&dir);
    let data = write(&dir, "lm.jsonl", &lm_lines());
    let bin = env!("CARGO_BIN_EXE_tinytune");
    let sh = |script: &str| {
        let o = Command::new("bash").arg("-o").arg("pipefail").arg("-c").arg(script).env("TINYTUNE_DEVICE", "cpu").output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    // A full device: a clear error naming standard output, after the run's files are safe.
    let out = dir.join("full");
    let (code, err) =
        sh(&format!("{bin} finetune --model {} --data {} --out {} --max-steps 2 --rank 2 > /dev/full", s(&model), s(&data), s(&out)));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("standard output") && err.contains("No space left"), "{err}");
    assert!(out.join("adapter/adapter_model.safetensors").exists(), "the adapter was saved before the report failed");
    let (code, err) = sh(&format!("{bin} inspect {} --json > /dev/full", s(&model)));
    assert!(code == Some(1) && !err.contains("panicked"), "{code:?} {err}");
    // A closed pipe: quiet, with the status of a process killed by SIGPIPE. The reader is gone
    // before the generation starts (`head -c 1` raced it: a fast enough run wrote everything
    // into the pipe's buffer before head closed it, and exited 0).
    let (code, err) = sh(&format!("{{ sleep 0.3; {bin} generate --model {} --prompt 'the cat' --max-new-tokens 40; }} | true", s(&model)));
    assert_eq!(code, Some(141), "{err}");
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
    // stderr closed or full: the work still gets done.
    let (code, err) = sh(&format!("{bin} eval --model {} --text 'the cat sat' 2> /dev/full", s(&model)));
    assert_eq!(code, Some(0), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---- drills: the data a run makes ----

fn finetune_args(model: &Path, data: &Path, out: &Path, steps: u64) -> Vec<String> {
    let n = steps.to_string();
    [
        "finetune",
        "--model",
        s(model),
        "--data",
        s(data),
        "--out",
        s(out),
        "--rank",
        "2",
        "--alpha",
        "4",
        "--dropout",
        "0.1",
        "--lr",
        "1e-2",
        "--grad-accum",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--max-steps",
        &n,
        "--save-every",
        "1",
        "--eval-every",
        "7",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

/// metrics.jsonl without its wall-clock fields.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("tokens_per_s");
                o.remove("elapsed_s");
            }
            v
        })
        .collect()
}

#[test]
fn chains_of_kill_9_at_random_moments_resume_bit_for_bit() {
    let dir = scratch("kills");
    let (model, data) = (common::tiny_model_dir(&dir), write(&dir, "lm.jsonl", &lm_lines()));
    let steps = 40;
    let straight = dir.join("straight");
    let t0 = std::time::Instant::now();
    let o = run(&finetune_args(&model, &data, &straight, steps).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let full_ms = t0.elapsed().as_millis() as u64;
    let want = (adapter_bytes(&straight), metrics(&straight));
    let mut rng = common::TestRng::new(0x9111);
    let (chains, mut equal, mut kills) = (5, 0, 0);
    for chain in 0..chains {
        let out = dir.join(format!("chain-{chain}"));
        // Up to 6 kills at random moments of a run, each run resuming the last checkpoint (or
        // starting over when none was written yet), then a run to the end.
        for _ in 0..6 {
            let mut args = finetune_args(&model, &data, &out, steps);
            // Resume the last checkpoint, or start over (replacing what a run killed before its
            // first checkpoint left) when there is none yet.
            args.push(if out.join("checkpoint/state.json").exists() { "--resume" } else { "--overwrite" }.into());
            let logged = |out: &Path| std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
            let before = logged(&out);
            let mut child = Command::new(env!("CARGO_BIN_EXE_tinytune"))
                .args(&args)
                .env("TINYTUNE_DEVICE", "cpu")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // The moment: once the run has logged a random number of steps (so the drill does
            // not depend on how fast this machine is compared with the straight run's timing,
            // which other tests running beside it skew), then up to two steps' time more, so
            // kills land anywhere in a step or a checkpoint write.
            // Steps are counted from what earlier runs of the chain logged (read before the
            // run started), so kills spread over what is left of the run.
            let target = before + 1 + rng.below((steps as usize).saturating_sub(before).max(1));
            let waited = std::time::Instant::now();
            while logged(&out) < target && child.try_wait().unwrap().is_none() && waited.elapsed().as_secs() < 120 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            std::thread::sleep(std::time::Duration::from_millis(rng.below((2 * full_ms / steps) as usize + 1) as u64));
            match child.try_wait().unwrap() {
                Some(status) => assert!(status.success(), "chain {chain}: a run ended with {status}"),
                None => {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    kills += 1;
                }
            }
        }
        let mut args = finetune_args(&model, &data, &out, steps);
        args.push(if out.join("checkpoint/state.json").exists() { "--resume" } else { "--overwrite" }.into());
        let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(o.code, Some(0), "chain {chain}: {}", o.stderr);
        if (adapter_bytes(&out), metrics(&out)) == want {
            equal += 1;
        }
    }
    eprintln!("kill -9 drill: {kills} kills in {chains} chains; {equal} of {chains} final adapters and metrics bitwise equal");
    assert!(kills >= chains, "the drill killed runs ({kills} kills)");
    assert_eq!(equal, chains, "every chain ends bit for bit where the uninterrupted run does");
    std::fs::remove_dir_all(&dir).ok();
}

/// The checkpoint in `out` is complete: resuming it to the end gives the uninterrupted result.
fn resumes_to(model: &Path, data: &Path, out: &Path, steps: u64, want: &[u8]) {
    let mut args = finetune_args(model, data, out, steps);
    args.push("--resume".into());
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(adapter_bytes(out) == want, "the resumed adapter equals the uninterrupted one");
}

/// The temporary files a killed run's writes left in its output directory (SIGKILL during an
/// atomic write leaves `.NAME.tmp-PID`) are removed by the next run that takes the directory,
/// before it writes anything; other files stay.
#[test]
fn a_run_removes_the_temporary_files_a_killed_run_left() {
    let dir = scratch("stray");
    let (model, data) = (common::tiny_model_dir(&dir), write(&dir, "lm.jsonl", &lm_lines()));
    let out = dir.join("run");
    std::fs::create_dir_all(out.join("checkpoint")).unwrap();
    let strays = [out.join(".adapter_model.safetensors.tmp-4000001"), out.join("checkpoint/.step-7.safetensors.tmp-4000002")];
    for p in &strays {
        std::fs::write(p, b"half a write").unwrap();
    }
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    let o = run(&finetune_args(&model, &data, &out, 2).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    for p in &strays {
        assert!(!p.exists(), "{} was left", p.display());
    }
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
}

#[test]
fn checkpoints_survive_a_full_disk_and_refuse_damage() {
    let dir = scratch("disk");
    let (model, data) = (common::tiny_model_dir(&dir), write(&dir, "lm.jsonl", &lm_lines()));
    let steps = 30;
    let straight = dir.join("straight");
    let o = run(&finetune_args(&model, &data, &straight, steps).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let want = adapter_bytes(&straight);
    // A run killed after a checkpoint (step k ≥ 3 of 30).
    let out = dir.join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tinytune"))
        .args(finetune_args(&model, &data, &out, steps))
        .env("TINYTUNE_DEVICE", "cpu")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = out.join("checkpoint/state.json");
    let saved_step =
        || -> Option<u64> { serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&state).ok()?).ok()?["step"].as_u64() };
    let t0 = std::time::Instant::now();
    while saved_step().is_none_or(|s| s < 3) {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let k = saved_step().unwrap();
    assert!(k < steps, "killed before the end (checkpoint of step {k})");
    let tensors = format!("step-{k}.safetensors");

    #[cfg(target_os = "linux")]
    {
        // A full disk: a file-size limit below the tensors file, with SIGXFSZ ignored so that
        // the write fails (EFBIG) as on a full disk instead of killing the process.
        let mut args = finetune_args(&model, &data, &out, steps);
        args.push("--resume".into());
        let cmd = format!("trap '' XFSZ; ulimit -f 8; exec {} {}", env!("CARGO_BIN_EXE_tinytune"), args.join(" "));
        let o = Command::new("bash").arg("-c").arg(&cmd).env("TINYTUNE_DEVICE", "cpu").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("step-{}.safetensors", k + 1)) && err.contains("File too large"), "the failed write is named: {err}");
        let now: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        assert_eq!(now["step"], k, "the previous checkpoint is still the one named");
        let names: Vec<String> =
            std::fs::read_dir(out.join("checkpoint")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert!(!names.iter().any(|n| n.contains(".tmp-")), "no temporary file is left: {names:?}");
    }

    // Damage is refused: a flipped byte, missing optimizer moments, a missing fingerprint, a
    // step beyond the run. Each on a copy of the good checkpoint.
    let copy = |name: &str| {
        let c = dir.join(name);
        std::fs::create_dir_all(c.join("checkpoint")).unwrap();
        for e in std::fs::read_dir(out.join("checkpoint")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), c.join("checkpoint").join(e.file_name())).unwrap();
        }
        c
    };
    let resume_args = |o: &Path, extra: &[&str]| -> Vec<String> {
        let mut a = finetune_args(&model, &data, o, steps);
        a.push("--resume".into());
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let edit_state = |o: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = o.join("checkpoint/state.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    };
    let flipped = copy("flipped");
    let t = flipped.join("checkpoint").join(&tensors);
    let mut bytes = std::fs::read(&t).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x10;
    std::fs::write(&t, bytes).unwrap();
    refused(
        "flipped tensor bytes",
        &resume_args(&flipped, &[]).iter().map(String::as_str).collect::<Vec<_>>(),
        &[tensors.as_str(), "checksum", "damaged"],
    );
    let no_fp = copy("no-fingerprint");
    edit_state(&no_fp, &|v| {
        v.as_object_mut().unwrap().remove("config");
    });
    refused(
        "no fingerprint",
        &resume_args(&no_fp, &[]).iter().map(String::as_str).collect::<Vec<_>>(),
        &["state.json", "fingerprint", "--resume-weights-only"],
    );
    let no_moments = copy("no-moments");
    edit_state(&no_moments, &|v| v["optimizer_entries"] = json!(0));
    refused(
        "missing optimizer moments",
        &resume_args(&no_moments, &[]).iter().map(String::as_str).collect::<Vec<_>>(),
        &["optimizer state entries"],
    );
    let beyond = copy("beyond");
    edit_state(&beyond, &|v| {
        v["step"] = json!(40);
        v["micro_batches"] = json!(80);
    });
    refused(
        "a step beyond the run",
        &resume_args(&beyond, &[]).iter().map(String::as_str).collect::<Vec<_>>(),
        &["step 40 is beyond", "30 steps"],
    );
    let other_lr = copy("other-lr");
    let with_lr = |mut a: Vec<String>, lr: &str| {
        let i = a.iter().position(|x| x == "--lr").unwrap();
        a[i + 1] = lr.into();
        a
    };
    let a = with_lr(resume_args(&other_lr, &[]), "5e-3");
    refused("another learning rate", &a.iter().map(String::as_str).collect::<Vec<_>>(), &["lr = 0.01", "lr = 0.005"]);
    // ... which --resume-weights-only accepts on purpose: a new run from those weights.
    let mut a = with_lr(finetune_args(&model, &data, &other_lr, steps), "5e-3");
    a.push("--resume-weights-only".into());
    let o = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.code, Some(0), "{}", o.stderr);

    // After all that, the good checkpoint still resumes to the uninterrupted result.
    resumes_to(&model, &data, &out, steps, &want);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn one_run_owns_an_output_directory() {
    let dir = scratch("lock");
    let (model, data) = (common::tiny_model_dir(&dir), write(&dir, "lm.jsonl", &lm_lines()));
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // Another run holds the lock (this process, standing in for it).
    let lock = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(out.join(".tinytune.lock")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(out.join(".tinytune.lock"), "424242\n").unwrap();
    let args = finetune_args(&model, &data, &out, 2);
    let t0 = std::time::Instant::now();
    refused(
        "a second run on one --out",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &["in use by another run", "process 424242"],
    );
    assert!(t0.elapsed().as_secs() < 30, "it fails at once");
    assert!(!out.join("metrics.jsonl").exists(), "the refused run wrote nothing");
    // The owner ends (a crash releases the lock the same way): the lock file left behind is no obstacle.
    lock.unlock().unwrap();
    drop(lock);
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_diverging_run_stops_naming_the_last_checkpoint() {
    let dir = scratch("diverge");
    let model = common::tiny_model_dir(&dir);
    let cls = write(&dir, "cls.jsonl", &cls_lines());
    let out = dir.join("out");
    let base = [
        "finetune",
        "--model",
        s(&model),
        "--data",
        s(&cls),
        "--out",
        s(&out),
        "--method",
        "full",
        "--lr",
        "5",
        "--clip",
        "0",
        "--max-steps",
        "30",
        "--batch-size",
        "4",
        "--save-every",
        "1",
    ];
    refused("full fine-tuning at lr 5", &base, &["diverged", "the last checkpoint (step", "--on-divergence warn"]);
    let mut warn = base.to_vec();
    warn.extend(["--on-divergence", "warn", "--overwrite"]);
    let o = run(&warn);
    assert!(o.stderr.contains("warning:") && o.stderr.contains("diverged"), "warn mode warns: {}", o.stderr);
    assert_eq!(o.stderr.matches("diverged").count(), 1, "once: {}", o.stderr);
    std::fs::remove_dir_all(&dir).ok();
}
