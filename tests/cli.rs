//! The `tinytune` binary on the committed fixtures: JSON output, numbers equal to the
//! library's (and so to transformers'), and errors that name what is wrong.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::tiny_model_dir;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).display().to_string()
}

fn tinytune(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tinytune")).args(args).output().expect("binary runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn inspect_reports_architecture_and_parameters() {
    let (ok, out, err) = tinytune(&["inspect", &fixture("tiny-llama"), "--json"]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["parameters"], 24736);
    assert_eq!(v["tensors"], 21);
    assert_eq!(v["config"]["num_key_value_heads"], 2);
}

#[test]
fn inspect_reads_gguf_files() {
    let (ok, out, err) = tinytune(&["inspect", &fixture("tiny-llama-gguf/tiny-llama.f32.gguf"), "--json"]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["parameters"], 24736);
    assert_eq!(v["config"]["llama.attention.head_count_kv"], 2);
}

#[test]
fn eval_and_generate_match_the_reference() {
    // ids of the fixture's first row: [1, 7] of reference.safetensors (read through the library).
    let r = tinytune::io::SafetensorsFile::open(PathBuf::from(fixture("tiny-llama")).join("reference.safetensors")).unwrap();
    let ids: Vec<i32> = r.load("ids", &tinytune::Device::Cpu).unwrap().to_vec().unwrap();
    let rows = format!(
        "{};{}",
        ids[..7].iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","),
        ids[7..].iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    );
    let want_loss = r.load("loss", &tinytune::Device::Cpu).unwrap().to_scalar().unwrap();
    let (ok, out, err) = tinytune(&["eval", "--model", &fixture("tiny-llama"), "--ids", &rows, "--device", "cpu", "--json"]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert!((v["mean_nll"].as_f64().unwrap() - want_loss).abs() < 1e-5, "{v}");
    assert_eq!(v["tokens"], 12);
    // --int8-dot is accepted and leaves f32 weights' products as they are (it applies to
    // GGUF Q4_0/Q4_1/Q8_0 blocks only; tests/int8_dot.rs tests those).
    let (ok, out, err) = tinytune(&["eval", "--model", &fixture("tiny-llama"), "--ids", &rows, "--device", "cpu", "--int8-dot", "--json"]);
    assert!(ok, "{err}");
    assert!((json(&out)["mean_nll"].as_f64().unwrap() - want_loss).abs() < 1e-5, "{out}");

    let greedy: Vec<i32> = r.load("greedy", &tinytune::Device::Cpu).unwrap().to_vec().unwrap();
    let prompt = ids[..5].iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let (ok, out, err) = tinytune(&[
        "generate",
        "--model",
        &fixture("tiny-llama"),
        "--ids",
        &prompt,
        "--max-new-tokens",
        "8",
        "--greedy",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    let got: Vec<i64> = json(&out)["ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!(got, greedy.iter().map(|&x| x as i64).collect::<Vec<_>>());
}

#[test]
fn bad_input_fails_with_a_message() {
    let (ok, _, err) = tinytune(&["eval", "--model", "/no/such/model", "--ids", "1,2", "--device", "cpu"]);
    assert!(!ok && err.contains("/no/such/model/config.json"), "{err}");
    let (ok, _, err) = tinytune(&["generate", "--model", &fixture("tiny-llama"), "--ids", "1,x", "--device", "cpu"]);
    assert!(!ok && err.contains("'x' is not a token id"), "{err}");
    let (ok, _, err) = tinytune(&["generate", "--model", &fixture("tiny-llama"), "--ids", "1,500", "--device", "cpu"]);
    assert!(!ok && err.contains("token id 500 is not in the model's vocabulary"), "{err}");
    let (ok, _, err) = tinytune(&["eval", "--model", &fixture("tiny-llama"), "--ids", "1,2", "--device", "tpu"]);
    assert!(!ok && err.contains("tpu"), "{err}");
    let (ok, out, _) = tinytune(&["generate", "--help"]);
    assert!(ok && out.contains("--max-new-tokens") && out.contains("--top-p"));
}

// ---- fine-tuning: `finetune`, `--config`, `merge`, `--adapter` on eval/generate, and a run
// killed mid-way then resumed ----

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tinytune-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `{"text"}` lines of unequal lengths built from the tokenizer's words.
fn write_lm_data(dir: &std::path::Path) -> PathBuf {
    let (animals, verbs, places) = (["cat", "dog", "bird", "fish"], ["sat", "ran", "slept", "ate"], ["mat", "box", "tree", "pond"]);
    let lines: Vec<String> = (0..40)
        .map(|i| {
            let mut t = format!("the {} {} on the {} .", animals[i % 4], verbs[(i / 4) % 4], places[(i / 3) % 4]);
            for _ in 0..i % 5 {
                t.push_str(" and then it ate the food .");
            }
            serde_json::json!({ "text": t }).to_string()
        })
        .collect();
    let p = dir.join("lm.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// `{"text", "label"}` lines: 1 for praise, 0 for complaints.
fn write_cls_data(dir: &std::path::Path) -> PathBuf {
    let subjects = ["the film", "the movie", "the story", "the acting", "the music", "the plot"];
    let (good, bad) = (["good", "great", "wonderful", "lovely"], ["bad", "awful", "dull", "boring", "poor"]);
    let lines: Vec<String> = (0..24)
        .map(|i| {
            let (adj, label) = if i % 2 == 0 { (good[(i / 2) % 4], 1) } else { (bad[(i / 2) % 5], 0) };
            let adverb = ["", "very ", "really "][(i / 3) % 3];
            serde_json::json!({ "text": format!("{} was {adverb}{adj} .", subjects[(i / 4) % 6]), "label": label }).to_string()
        })
        .collect();
    let p = dir.join("cls.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn path_str(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn read_json(p: &std::path::Path) -> serde_json::Value {
    json(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// The step lines of a metrics.jsonl without the wall-clock fields.
fn step_metrics(out: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(json)
        .filter(|v| v.get("step").is_some())
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("tokens_per_s");
            o.remove("elapsed_s");
            v
        })
        .collect()
}

const LORA_FLAGS: [&str; 8] = ["--rank", "2", "--alpha", "4", "--seq-len", "32", "--device", "cpu"];

/// `finetune` of the tiny model with LORA_FLAGS (the rank and alpha only for LoRA and DoRA:
/// another method refuses them) and `extra`.
fn finetune_args(model: &std::path::Path, data: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let head = ["finetune", "--model", path_str(model), "--data", path_str(data), "--out", path_str(out)];
    let lora = !extra.windows(2).any(|w| w[0] == "--method" && !matches!(w[1], "lora" | "dora"));
    let flags = if lora { &LORA_FLAGS[..] } else { &LORA_FLAGS[4..] };
    head.iter().chain(flags).chain(extra).map(|s| s.to_string()).collect()
}

/// Run the binary, which must succeed; its stderr.
fn run_ok(args: &[String]) -> String {
    let (ok, _, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{args:?} failed: {err}");
    err
}

fn finetune(model: &std::path::Path, data: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let args = finetune_args(model, data, out, &[extra, &["--json"]].concat());
    let (ok, stdout, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "finetune {extra:?} failed: {err}");
    json(&stdout)
}

fn mean_nll(args: &[&str]) -> f64 {
    let (ok, out, err) = tinytune(args);
    assert!(ok, "{args:?}: {err}");
    json(&out)["mean_nll"].as_f64().unwrap()
}

#[test]
fn finetune_merge_and_adapters_end_to_end() {
    let dir = scratch("e2e");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    let ids = "3,4,5,6,7,8,9,10;3,5,9,7,6,8";
    let base_nll = mean_nll(&["eval", "--model", path_str(&model), "--ids", ids, "--device", "cpu", "--json"]);
    for method in ["lora", "dora"] {
        let out = dir.join(method);
        let report = finetune(
            &model,
            &data,
            &out,
            &["--method", method, "--max-steps", "12", "--target-modules", "q_proj,v_proj,down_proj", "--lr", "1e-2", "--batch-size", "4"],
        );
        assert_eq!(report["steps"], 12);
        let (before, after) = (report["before"]["loss"].as_f64().unwrap(), report["after"]["loss"].as_f64().unwrap());
        assert!(after < before, "{method}: held-out loss {before} -> {after}");
        assert_eq!(report["before"]["examples"], 4, "10% of 40 lines held out by default");
        let adapter = out.join("adapter");
        let config = read_json(&adapter.join("adapter_config.json"));
        assert_eq!(
            (config["peft_type"].as_str(), config["r"].as_u64(), config["use_dora"].as_bool()),
            (Some("LORA"), Some(2), Some(method == "dora"))
        );
        assert_eq!(config["target_modules"], serde_json::json!(["down_proj", "q_proj", "v_proj"]));
        let weights = tinytune::io::SafetensorsFile::open(adapter.join("adapter_model.safetensors")).unwrap();
        assert_eq!(weights.names().len(), 2 * 3 * if method == "dora" { 3 } else { 2 });
        assert!(weights.names().contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
        assert!(std::fs::read_to_string(out.join("loss.svg")).unwrap().starts_with("<svg"));
        assert_eq!(step_metrics(&out).len(), 12);
        let rep = read_json(&out.join("report.json"));
        assert_eq!((rep["steps"].as_u64(), rep["final_loss"].as_f64()), (Some(12), report["final_loss"].as_f64()));

        // merge: the merged model's numbers are the base model's with the adapter.
        let merged = dir.join(format!("{method}-merged"));
        let (ok, stdout, err) =
            tinytune(&["merge", "--model", path_str(&model), "--adapter", path_str(&adapter), "--out", path_str(&merged)]);
        assert!(ok && stdout.contains("merged 6 adapter layers"), "{stdout}{err}");
        let with_adapter =
            mean_nll(&["eval", "--model", path_str(&model), "--adapter", path_str(&adapter), "--ids", ids, "--device", "cpu", "--json"]);
        let merged_nll = mean_nll(&["eval", "--model", path_str(&merged), "--ids", ids, "--device", "cpu", "--json"]);
        assert!((merged_nll - with_adapter).abs() < 1e-5 * with_adapter, "{method}: merged {merged_nll}, base + adapter {with_adapter}");
        assert!((with_adapter - base_nll).abs() > 1e-3, "{method}: the adapter changes the model ({with_adapter} vs {base_nll})");

        // generate with the adapter: greedy tokens equal the merged model's. (The model's 96
        // ids outnumber the tokenizer's 61, so ids are compared on copies without a tokenizer:
        // the output is then ids only, and an id the tokenizer lacks cannot fail decoding.)
        let untokenized = |m: &std::path::Path, name: &str| {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            for f in ["config.json", "model.safetensors"] {
                std::fs::copy(m.join(f), d.join(f)).unwrap();
            }
            d
        };
        let (bare, bare_merged) = (untokenized(&model, "bare"), untokenized(&merged, &format!("{method}-bare-merged")));
        let greedy = |m: &std::path::Path, adapter: Option<&std::path::Path>| {
            let mut args = vec!["generate", "--model", path_str(m), "--ids", "3,4,5", "--max-new-tokens", "6", "--device", "cpu", "--json"];
            if let Some(a) = adapter {
                args.extend(["--adapter", path_str(a)]);
            }
            let (ok, out, err) = tinytune(&args);
            assert!(ok, "{err}");
            let v = json(&out);
            assert_eq!(v["ids"].as_array().map(Vec::len), Some(6), "{v}");
            v["ids"].clone()
        };
        assert_eq!(greedy(&bare, Some(&adapter)), greedy(&bare_merged, None), "{method}: greedy tokens with the adapter and merged");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn finetune_reads_a_config_file_that_flags_override() {
    let dir = scratch("config");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    let toml = dir.join("run.toml");
    std::fs::write(
        &toml,
        format!(
            "model = {:?}\ndata = {:?}\nmax-steps = 3\nrank = 4\ntarget_modules = [\"q_proj\", \"o_proj\"]\neval-split = 0.25\nbatch-size = 4\nseq-len = 32\ndevice = \"cpu\"\n",
            path_str(&model),
            path_str(&data)
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let (ok, stdout, err) = tinytune(&["finetune", "--config", path_str(&toml), "--rank", "2", "--out", path_str(&out), "--json"]);
    assert!(ok, "{err}");
    let v = json(&stdout);
    assert_eq!(v["steps"], 3, "max-steps from the file");
    assert_eq!(v["before"]["examples"], 10, "eval-split from the file");
    let config = read_json(&out.join("adapter/adapter_config.json"));
    assert_eq!(config["r"], 2, "the flag wins over the file");
    assert_eq!(config["target_modules"], serde_json::json!(["o_proj", "q_proj"]), "snake_case keys are read too");

    std::fs::write(&toml, "max-steps = 3\nlearning-rate = 0.1\n").unwrap();
    let (ok, _, err) = tinytune(&["finetune", "--config", path_str(&toml), "--model", path_str(&model), "--data", path_str(&data)]);
    assert!(!ok && err.contains("run.toml") && err.contains("learning-rate"), "{err}");
    let (ok, _, err) = tinytune(&["finetune", "--config", path_str(&dir.join("missing.toml")), "--model", path_str(&model)]);
    assert!(!ok && err.contains("missing.toml"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_with_a_head_adapter_reports_accuracy() {
    let dir = scratch("head");
    let (model, data) = (tiny_model_dir(&dir), write_cls_data(&dir));
    let out = dir.join("out");
    let report = finetune(
        &model,
        &data,
        &out,
        &["--method", "head", "--eval-data", path_str(&data), "--max-steps", "40", "--lr", "5e-2", "--batch-size", "4"],
    );
    let (before, after) = (report["before"]["accuracy"].as_f64().unwrap(), report["after"]["accuracy"].as_f64().unwrap());
    assert!(after > before && after >= 0.85, "accuracy {before} -> {after}");
    // A setting of another method is refused, naming it and its owners.
    let mut args = finetune_args(&model, &data, &dir.join("wrong"), &["--method", "head", "--rank", "4"]);
    args.push("--max-steps=1".into());
    let (ok, _, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !ok && err.contains("--rank does not apply to method head (it is a setting of lora, dora, lora-xs, lora-sb, finegates)"),
        "{err}"
    );
    assert!(report["after"]["loss"].as_f64() < report["before"]["loss"].as_f64(), "{report}");
    let adapter = out.join("adapter");
    let (ok, stdout, err) = tinytune(&[
        "eval",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&adapter),
        "--data",
        path_str(&data),
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = json(&stdout);
    assert_eq!(v["accuracy"].as_f64(), Some(after), "eval --adapter on the same data: {v}");
    assert_eq!(v["examples"], 24);
    let loss = report["after"]["loss"].as_f64().unwrap();
    assert!((v["mean_loss"].as_f64().unwrap() - loss).abs() < 1e-5, "{v} vs {loss}");
    // Labelled data needs the head.
    let (ok, _, err) = tinytune(&["eval", "--model", path_str(&model), "--data", path_str(&data), "--device", "cpu"]);
    assert!(!ok && err.contains("--adapter"), "{err}");
    // A head alone cannot be merged into the language model.
    let (ok, _, err) =
        tinytune(&["merge", "--model", path_str(&model), "--adapter", path_str(&adapter), "--out", path_str(&dir.join("m"))]);
    assert!(!ok && err.contains("no LoRA/DoRA weights"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_killed_finetune_resumes_to_the_same_adapter() {
    let dir = scratch("kill");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    // Dropout on, 2 micro-batches a step, a checkpoint every step.
    let steps = 60;
    let n = steps.to_string();
    let extra =
        ["--dropout", "0.1", "--lr", "1e-2", "--grad-accum", "2", "--batch-size", "2", "--max-steps", &n, "--save-every", "1", "--json"];
    let args = |out: &std::path::Path| finetune_args(&model, &data, out, &extra);
    let (straight, killed) = (dir.join("straight"), dir.join("killed"));
    run_ok(&args(&straight));

    let mut child = Command::new(env!("CARGO_BIN_EXE_tinytune"))
        .args(args(&killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = killed.join("checkpoint/state.json");
    let saved_step = || {
        std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
    };
    let t0 = std::time::Instant::now();
    while saved_step().is_none_or(|s| s < 3) {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let at = saved_step().unwrap();
    assert!(!status.success() && at < steps, "the run was cut short (status {status}, checkpoint at step {at} of {steps})");
    assert!(!killed.join("adapter").exists());
    eprintln!("killed after the checkpoint of step {at} of {steps}");

    let mut resume = args(&killed);
    resume.push("--resume".into());
    assert!(run_ok(&resume).contains("resuming from step"));
    let bytes = |o: &std::path::Path| std::fs::read(o.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes(&straight) == bytes(&killed), "the resumed adapter (from step {at}) differs from the uninterrupted one");
    assert_eq!(step_metrics(&straight), step_metrics(&killed));
    let leftovers: Vec<String> =
        std::fs::read_dir(killed.join("checkpoint")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(leftovers.len(), 2, "state.json and one tensors file, no temporary files: {leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn finetune_checks_its_options() {
    let dir = scratch("options");
    let model = tiny_model_dir(&dir);
    // A 100-token line: cut to the model's 64 positions by default, an error with a longer --seq-len.
    let long = dir.join("long.jsonl");
    let words = "the cat sat on the mat . ".repeat(14);
    std::fs::write(&long, format!("{}\n{}\n", serde_json::json!({ "text": "the dog ran ." }), serde_json::json!({ "text": words })))
        .unwrap();
    let base =
        ["finetune", "--model", path_str(&model), "--data", path_str(&long), "--device", "cpu", "--max-steps", "1", "--eval-split", "0"];
    let with = |extra: &[&str]| {
        let out = dir.join("out");
        let mut a: Vec<&str> = base.to_vec();
        a.extend(["--out", path_str(&out), "--overwrite"]);
        a.extend(extra);
        tinytune(&a)
    };
    let (ok, _, err) = with(&[]);
    assert!(ok, "{err}");
    let (ok, _, err) = with(&["--seq-len", "100"]);
    assert!(!ok && err.contains("line 2") && err.contains("context of 64"), "{err}");
    let (ok, _, err) = with(&["--clip=-1"]);
    assert!(!ok && err.contains("--clip") && err.contains("-1"), "{err}");
    let (ok, _, err) = with(&["--method", "prefix-tuning"]);
    assert!(
        !ok && err.contains("unknown method 'prefix-tuning'")
            && err.contains("lora, dora, lora-xs, lora-sb, finegates, full, head, ia3, prefix, prompt, adapter"),
        "{err}"
    );
    let (ok, _, err) = with(&["--target-modules", "attn"]);
    assert!(!ok && err.contains("'attn'") && err.contains("q_proj"), "{err}");
    let (ok, _, err) = tinytune(&["finetune", "--model", path_str(&model)]);
    assert!(!ok && err.contains("--data is required"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ctrl_c_writes_a_checkpoint_that_resumes_to_the_same_adapter() {
    let dir = scratch("sigint");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    let steps = 1500;
    let n = steps.to_string();
    // No periodic checkpoint: the one on disk after Ctrl-C is the interrupt's.
    let extra = ["--dropout", "0.1", "--batch-size", "2", "--max-steps", &n, "--save-every", "100000"];
    let args = |out: &std::path::Path| finetune_args(&model, &data, out, &extra);
    let (straight, stopped) = (dir.join("straight"), dir.join("stopped"));
    run_ok(&args(&straight));

    let child = Command::new(env!("CARGO_BIN_EXE_tinytune"))
        .args(args(&stopped))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(stopped.join("metrics.jsonl")).map_or(0, |m| m.matches("\"step\"").count()) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an interrupted run exits with an error status");
    assert!(err.contains("stopped at step") && err.contains("--resume"), "{err}");
    let state = read_json(&stopped.join("checkpoint/state.json"));
    let at = state["step"].as_u64().unwrap();
    assert!((3..steps).contains(&at), "checkpoint at step {at}");
    assert!(!stopped.join("adapter").exists());

    let mut resume = args(&stopped);
    resume.push("--resume".into());
    run_ok(&resume);
    let bytes = |o: &std::path::Path| std::fs::read(o.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes(&straight) == bytes(&stopped), "the adapter resumed from step {at} differs from the uninterrupted one");
    std::fs::remove_dir_all(&dir).ok();
}

/// The site methods through the CLI: `--method ia3`, `adapter`, `prefix` and `prompt` train,
/// save their own `peft_type`, and load with `eval --adapter`; (IA)³ merges, the others do
/// not (they add layers or positions) and say so.
#[test]
fn ia3_and_bottleneck_adapters_from_the_cli() {
    let dir = scratch("sites");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    let ids = "3,4,5,6,7,8,9,10;3,5,9,7,6,8";
    let nll =
        |extra: &[&str]| mean_nll(&[&["eval", "--model", path_str(&model), "--ids", ids, "--device", "cpu", "--json"], extra].concat());
    let base_nll = nll(&[]);
    for (name, flags, peft_type) in [
        ("ia3", vec!["--method", "ia3", "--lr", "5e-2"], "IA3"),
        ("pfeiffer", vec!["--method", "adapter", "--adapter-kind", "pfeiffer", "--reduction-factor", "4", "--lr", "1e-2"], "BOTTLENECK"),
        ("prefix", vec!["--method", "prefix", "--num-virtual-tokens", "4", "--lr", "1e-1"], "PREFIX_TUNING"),
        (
            "prompt",
            vec!["--method", "prompt", "--num-virtual-tokens", "4", "--prompt-init-text", "the cat sat", "--lr", "1e-1"],
            "PROMPT_TUNING",
        ),
    ] {
        let out = dir.join(name);
        let report = finetune(&model, &data, &out, &[&flags[..], &["--max-steps", "12", "--batch-size", "4"]].concat());
        let (before, after) = (report["before"]["loss"].as_f64().unwrap(), report["after"]["loss"].as_f64().unwrap());
        assert!(after < before, "{name}: held-out loss {before} -> {after}");
        let adapter = out.join("adapter");
        assert_eq!(read_json(&adapter.join("adapter_config.json"))["peft_type"], peft_type);
        let with_adapter = nll(&["--adapter", path_str(&adapter)]);
        assert!((with_adapter - base_nll).abs() > 1e-4, "{name}: the adapter changes the model ({with_adapter} vs {base_nll})");
        let merged = dir.join(format!("{name}-merged"));
        let (ok, stdout, err) =
            tinytune(&["merge", "--model", path_str(&model), "--adapter", path_str(&adapter), "--out", path_str(&merged)]);
        if name == "ia3" {
            assert!(ok && stdout.contains("merged 6 adapter layers"), "{stdout}{err}");
            let merged_nll = mean_nll(&["eval", "--model", path_str(&merged), "--ids", ids, "--device", "cpu", "--json"]);
            assert!((merged_nll - with_adapter).abs() < 1e-5 * with_adapter, "ia3: merged {merged_nll} vs {with_adapter}");
        } else {
            assert!(!ok && err.contains("cannot be merged") && err.contains("--adapter"), "{err}");
        }
    }
    // A setting of another method is refused.
    let args = finetune_args(&model, &data, &dir.join("x"), &["--method", "ia3", "--reduction-factor", "4"]);
    let (ok, _, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("--reduction-factor does not apply to method ia3 (it is a setting of adapter)"), "{err}");
    // Any setting by name with --set (what a method without flags of its own is given).
    let out = dir.join("set");
    let report =
        finetune(&model, &data, &out, &["--method", "prefix", "--set", "num-virtual-tokens=3", "--max-steps", "2", "--batch-size", "4"]);
    assert_eq!(report["steps"], 2);
    assert_eq!(read_json(&out.join("adapter/adapter_config.json"))["num_virtual_tokens"], 3);
    let args = finetune_args(&model, &data, &dir.join("y"), &["--method", "prefix", "--set", "virtual-tokens=3"]);
    let (ok, _, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("--virtual-tokens does not apply to method prefix"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// LoRA-XS and LoRA-SB trained from the command line, then rewritten as plain PEFT LoRA
/// adapters that evaluate, and merge, to the same model.
#[test]
fn lora_xs_from_the_cli_and_as_a_plain_lora_adapter() {
    let dir = scratch("lora-xs");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    let ids = "3,4,5,6,7,8,9,10;3,5,9,7,6,8";
    let nll =
        |extra: &[&str]| mean_nll(&[&["eval", "--model", path_str(&model), "--ids", ids, "--device", "cpu", "--json"], extra].concat());
    let mut lora = dir.clone();
    for (method, peft_type, extra) in
        [("lora-xs", "LORA_XS", &[][..]), ("lora-sb", "LORA_SB", &["--init-examples", "8", "--warmup", "2"][..])]
    {
        let out = dir.join(method);
        let flags = [
            &[
                "--method",
                method,
                "--rank",
                "4",
                "--target-modules",
                "all-linear",
                "--lr",
                "5e-2",
                "--max-steps",
                "12",
                "--batch-size",
                "4",
            ][..],
            extra,
        ]
        .concat();
        let report = finetune(&model, &data, &out, &flags);
        let (before, after) = (report["before"]["loss"].as_f64().unwrap(), report["after"]["loss"].as_f64().unwrap());
        assert!(after < before, "{method}: held-out loss {before} -> {after}");
        assert_eq!(report["trainable_parameters"].as_u64(), Some(16 * 7 * 2), "r² on each of 7 linears in 2 blocks");
        let adapter = out.join("adapter");
        assert_eq!(read_json(&adapter.join("adapter_config.json"))["peft_type"], peft_type);
        let xs_nll = nll(&["--adapter", path_str(&adapter)]);
        lora = dir.join(format!("{method}-as-lora"));
        let (ok, stdout, err) =
            tinytune(&["export", "--model", path_str(&model), "--adapter", path_str(&adapter), "--peft-lora", "--out", path_str(&lora)]);
        assert!(
            ok && stdout.contains(&format!("a PEFT LoRA adapter of 14 sites, rank 4 (lora_B = s·B R of the {method} adapter)")),
            "{stdout}{err}"
        );
        let config = read_json(&lora.join("adapter_config.json"));
        assert_eq!((config["peft_type"].as_str(), config["r"].as_u64(), config["lora_alpha"].as_u64()), (Some("LORA"), Some(4), Some(4)));
        let lora_nll = nll(&["--adapter", path_str(&lora)]);
        assert!((lora_nll - xs_nll).abs() < 1e-5 * xs_nll, "{method}: the LoRA export {lora_nll} vs {xs_nll}");
        let merged = dir.join(format!("{method}-merged"));
        let (ok, _, err) = tinytune(&["merge", "--model", path_str(&model), "--adapter", path_str(&adapter), "--out", path_str(&merged)]);
        assert!(ok, "{err}");
        let merged_nll = mean_nll(&["eval", "--model", path_str(&merged), "--ids", ids, "--device", "cpu", "--json"]);
        assert!((merged_nll - xs_nll).abs() < 1e-5 * xs_nll, "{method}: merged {merged_nll} vs {xs_nll}");
    }
    // Only LoRA-XS is rewritten; a setting LoRA-XS does not read is refused.
    let (ok, _, err) = tinytune(&[
        "export",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&lora),
        "--peft-lora",
        "--out",
        path_str(&dir.join("again")),
    ]);
    assert!(!ok && err.contains("--peft-lora rewrites LoRA-XS and LoRA-SB adapters"), "{err}");
    let args = finetune_args(&model, &data, &dir.join("x"), &["--method", "lora-xs", "--dropout", "0.1"]);
    let (ok, _, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("--dropout does not apply to method lora-xs"), "{err}");
    let args = finetune_args(&model, &data, &dir.join("x"), &["--method", "lora", "--init-examples", "8"]);
    let (ok, _, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("--init-examples does not apply to method lora (it is a setting of lora-sb)"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_flag_of_every_command_says_what_it_does_with_an_example() {
    for cmd in ["inspect", "tokenize", "eval", "finetune", "classify", "merge", "generate"] {
        let (ok, out, err) = tinytune(&[cmd, "-h"]);
        assert!(ok, "{cmd} -h: {err}");
        let examples = out.split_once("Example").map(|(_, e)| e).unwrap_or_default();
        assert!(examples.contains(&format!("tinytune {cmd} --")), "{cmd} -h shows no example of itself:\n{out}");
        // clap puts a description beside the flag, or (long help) on the lines below it.
        let lines: Vec<&str> = out.lines().collect();
        let described = |i: usize| {
            let beside = lines[i].trim().split("  ").filter(|p| !p.trim().is_empty()).count() >= 2;
            let below = lines.get(i + 1).is_some_and(|n| !n.trim().is_empty() && !n.trim_start().starts_with('-'));
            beside || below
        };
        let bare: Vec<&str> =
            (0..lines.len()).filter(|&i| lines[i].trim_start().starts_with('-') && !described(i)).map(|i| lines[i]).collect();
        assert!(bare.is_empty(), "{cmd}: flags without a description: {bare:?}");
    }
}

/// The data step of the demo works where there is no apt-get (macOS, Fedora, Arch): the Austen
/// data, which only needs Debian, is skipped with a warning. Runs on a copy of the cached
/// movie-review files (fetched assets), with apt-get and dpkg-deb left out of PATH.
#[cfg(unix)]
#[test]
fn the_data_step_works_without_apt_get() {
    let cache = tinytune::io::assets_dir();
    let names = ["movie_reviews.jsonl", "movie_reviews.train.jsonl", "movie_reviews.eval.jsonl"];
    if !names.iter().all(|n| cache.join("data").join(n).exists()) {
        assert!(std::env::var_os("TINYTUNE_REQUIRE_ASSETS").is_none(), "the movie-review data is not in {}", cache.display());
        return;
    }
    let dir = scratch("no-apt");
    let assets = dir.join("assets");
    std::fs::create_dir_all(assets.join("data")).unwrap();
    for n in names {
        std::fs::copy(cache.join("data").join(n), assets.join("data").join(n)).unwrap();
    }
    // A PATH of everything on this one but apt-get and dpkg-deb.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap()) {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name();
            if name != "apt-get" && name != "dpkg-deb" && !bin.join(&name).exists() {
                let _ = std::os::unix::fs::symlink(e.path(), bin.join(&name));
            }
        }
    }
    let out = Command::new("bash")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-data.sh"))
        .env("PATH", &bin)
        .env("TINYTUNE_ASSETS", &assets)
        .env_remove("TINYTUNE_REQUIRE_ASSETS")
        .output()
        .unwrap();
    let err = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fetch-data.sh without apt-get: {err}");
    assert!(err.contains("skipping austen.jsonl"), "{err}");
    // Where the assets are required (CI), the missing tool is an error.
    let out = Command::new("bash")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-data.sh"))
        .env("PATH", &bin)
        .env("TINYTUNE_ASSETS", &assets)
        .env("TINYTUNE_REQUIRE_ASSETS", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn merge_writes_the_dtype_asked_for_and_refuses_a_used_out() {
    let dir = scratch("merge-dtype");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    let out = dir.join("run");
    finetune(&model, &data, &out, &["--max-steps", "2", "--lr", "1e-2"]);
    // The same --out again is refused (it holds a run), --overwrite replaces it.
    let again = finetune_args(&model, &data, &out, &["--max-steps", "2"]);
    let (ok, _, err) = tinytune(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("already holds a run's checkpoint (step 2)") && err.contains("--overwrite"), "{err}");
    finetune(&model, &data, &out, &["--max-steps", "2", "--lr", "1e-2", "--overwrite"]);
    let adapter = out.join("adapter");
    let ids = "1,5,9,13,17,21,25,29";
    let with_adapter =
        mean_nll(&["eval", "--model", path_str(&model), "--adapter", path_str(&adapter), "--ids", ids, "--device", "cpu", "--json"]);
    for (dtype, stored, torch) in [(None, "F32", "float32"), (Some("f16"), "F16", "float16"), (Some("bf16"), "BF16", "bfloat16")] {
        let merged = dir.join(format!("merged-{stored}"));
        let mut args = vec!["merge", "--model", path_str(&model), "--adapter", path_str(&adapter), "--out", path_str(&merged)];
        if let Some(d) = dtype {
            args.extend(["--dtype", d]);
        }
        let (ok, _, err) = tinytune(&args);
        assert!(ok, "{err}");
        let (ok, info, err) = tinytune(&["inspect", "--model", path_str(&merged), "--json"]);
        assert!(ok, "{err}");
        let info = json(&info);
        assert_eq!(info["dtypes"].as_object().unwrap().keys().collect::<Vec<_>>(), vec![stored], "{info}");
        assert_eq!(info["config"]["torch_dtype"], torch);
        let nll = mean_nll(&["eval", "--model", path_str(&merged), "--ids", ids, "--device", "cpu", "--json"]);
        let tol = if stored == "F32" { 1e-5 } else { 2e-2 };
        assert!((nll - with_adapter).abs() < tol * with_adapter, "{stored}: merged {nll}, base + adapter {with_adapter}");
    }
    let (ok, _, err) = tinytune(&[
        "merge",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&adapter),
        "--out",
        path_str(&dir.join("x")),
        "--dtype",
        "f8",
    ]);
    assert!(!ok && err.contains("'f8' is not f32, f16 or bf16"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn classify_with_a_head_agrees_with_eval_and_zero_shot_with_the_likelihoods() {
    let dir = scratch("classify");
    let (model, data) = (tiny_model_dir(&dir), write_cls_data(&dir));
    let out = dir.join("out");
    finetune(
        &model,
        &data,
        &out,
        &["--method", "head", "--eval-data", path_str(&data), "--max-steps", "40", "--lr", "5e-2", "--batch-size", "4"],
    );
    let adapter = out.join("adapter");
    let (ok, stdout, err) = tinytune(&[
        "eval",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&adapter),
        "--data",
        path_str(&data),
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    let eval_acc = json(&stdout)["accuracy"].as_f64().unwrap();
    let classify = |extra: &[&str]| {
        let mut a = vec!["classify", "--model", path_str(&model), "--device", "cpu"];
        a.extend(extra);
        let (ok, stdout, err) = tinytune(&a);
        assert!(ok, "{extra:?}: {err}");
        stdout
    };
    let v = json(&classify(&["--adapter", path_str(&adapter), "--data", path_str(&data), "--labels", "bad,good", "--json"]));
    assert_eq!(v["accuracy"].as_f64(), Some(eval_acc), "classify and eval agree on the same data: {v}");
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 24);
    for p in preds {
        let probs: Vec<f64> = p["probabilities"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9 && probs.len() == 2, "{p}");
        assert_eq!(p["name"], ["bad", "good"][p["label"].as_u64().unwrap() as usize]);
    }
    let confusion = v["confusion"].as_array().unwrap();
    let total: u64 = confusion.iter().flat_map(|r| r.as_array().unwrap()).map(|n| n.as_u64().unwrap()).sum();
    let diagonal: u64 = (0..2).map(|i| confusion[i][i].as_u64().unwrap()).sum();
    assert_eq!((total, diagonal as f64 / 24.0), (24, eval_acc), "{v}");
    // Plain --text: one line per text with its label and probabilities.
    let text = classify(&["--adapter", path_str(&adapter), "--text", "the film was great .", "--text", "the plot was dull ."]);
    assert_eq!(text.lines().count(), 2, "{text}");
    // eval of unlabelled text with a head adapter points to classify instead of an LM number.
    let (ok, _, err) = tinytune(&[
        "eval",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&adapter),
        "--text",
        "the film was great .",
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("tinytune classify"), "{err}");

    // Zero-shot: the probabilities are the softmax of each label's log-likelihood after the
    // prompt, which eval --ids gives independently (sum NLL of prompt+label minus the prompt's).
    let v = json(&classify(&["--labels", "good,bad", "--prompt-template", "{text} it was", "--text", "the film was", "--json"]));
    let probs: Vec<f64> = v["predictions"][0]["probabilities"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let ids = |t: &str, special: bool| {
        let mut a = vec!["tokenize", "--model", path_str(&model), "--text", t, "--json"];
        if !special {
            a.push("--no-special-tokens");
        }
        let (ok, out, err) = tinytune(&a);
        assert!(ok, "{err}");
        json(&out)["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect::<Vec<_>>()
    };
    let prompt = ids("the film was it was", true);
    let sum_nll = |seq: &[u64]| {
        let s = seq.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        mean_nll(&["eval", "--model", path_str(&model), "--ids", &s, "--device", "cpu", "--json"]) * (seq.len() - 1) as f64
    };
    let loglik: Vec<f64> = ["good", "bad"]
        .iter()
        .map(|l| {
            let seq: Vec<u64> = prompt.iter().copied().chain(ids(&format!(" {l}"), false)).collect();
            sum_nll(&prompt) - sum_nll(&seq)
        })
        .collect();
    let z: f64 = loglik.iter().map(|l| l.exp()).sum();
    for (p, l) in probs.iter().zip(&loglik) {
        assert!((p - l.exp() / z).abs() < 1e-4, "zero-shot {probs:?} vs likelihoods {loglik:?}");
    }
    let (ok, _, err) = tinytune(&["classify", "--model", path_str(&model), "--text", "x", "--device", "cpu"]);
    assert!(!ok && err.contains("--adapter") && err.contains("--labels"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_run_in_a_log_file_says_what_it_is_doing() {
    let dir = scratch("log");
    let (model, data) = (tiny_model_dir(&dir), write_cls_data(&dir));
    let out = dir.join("out");
    // stderr is a pipe here, as in a log file or CI: the bar is hidden, lines are printed.
    let args = finetune_args(&model, &data, &out, &["--max-steps", "10", "--eval-every", "5", "--json"]);
    let (ok, stdout, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(err.contains("s/step, ETA 0:00:") && err.contains(" elapsed"), "step lines carry time per step and ETA: {err}");
    assert_eq!(err.matches("evaluating 2 held-out examples").count(), 3, "before, at step 5, after: {err}");
    assert!(err.contains("a new, untrained head: chance level"), "{err}");
    // The adapter records the length it was trained with; eval and classify cut to it.
    let extra = read_json(&out.join("adapter/tinytune.json"));
    assert_eq!(extra["seq_len"], 32, "LORA_FLAGS' --seq-len: {extra}");
    // The picture: titled with the method, model, data and settings; accuracy on its own axis.
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.contains("lora · model · cls.jsonl · r 2, alpha 4.0, lr 0.0002"), "{}", &svg[..400.min(svg.len())]);
    assert!(svg.contains("eval accuracy (%)") && svg.matches(r#"width="7" height="7""#).count() == 3, "before, step 5, after");
    assert!(!svg.contains("running mean"), "10 steps: no running mean that would repeat the raw curve");
    assert!(json(&stdout)["after"]["accuracy"].as_f64().is_some());
    let adapter = out.join("adapter");
    let (ok, o, err) = tinytune(&[
        "eval",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&adapter),
        "--data",
        path_str(&data),
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(json(&o)["accuracy"].as_f64().is_some());
    // generate with a classification adapter says what it does.
    let (ok, _, err) = tinytune(&[
        "generate",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&adapter),
        "--ids",
        "1,5",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(ok && err.contains("trained for classification"), "{err}");
    // --skip-eval-before: no "before".
    let args = finetune_args(&model, &data, &dir.join("nobefore"), &["--max-steps", "2", "--skip-eval-before", "--json"]);
    let (ok, stdout, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(json(&stdout)["before"].is_null() && err.matches("evaluating").count() == 1, "{stdout} {err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_adapter_can_name_its_base_and_its_encoding() {
    let dir = scratch("base-name");
    let (model, data) = (tiny_model_dir(&dir), write_cls_data(&dir));
    let out = dir.join("out");
    finetune(&model, &data, &out, &["--max-steps", "1", "--base-model-name", "HuggingFaceTB/SmolLM2-135M-Instruct", "--no-special-tokens"]);
    let config = read_json(&out.join("adapter/adapter_config.json"));
    assert_eq!(config["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(read_json(&out.join("adapter/tinytune.json"))["add_special_tokens"], false);
    let plain = dir.join("plain");
    finetune(&model, &data, &plain, &["--max-steps", "1"]);
    assert_eq!(read_json(&plain.join("adapter/adapter_config.json"))["base_model_name_or_path"], path_str(&model));
    assert!(read_json(&plain.join("adapter/tinytune.json")).get("add_special_tokens").is_none());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_with_the_seq_len_of_a_run_reproduces_its_held_out_nll() {
    let dir = scratch("heldout-nll");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    // Held-out documents, some longer than LORA_FLAGS' --seq-len 32 (cut), as finetune's --eval-data.
    let lines: Vec<String> = std::fs::read_to_string(&data).unwrap().lines().skip(30).map(str::to_string).collect();
    let held = dir.join("held.jsonl");
    std::fs::write(&held, lines.join("\n")).unwrap();
    let out = dir.join("run");
    let report = finetune(&model, &data, &out, &["--eval-data", path_str(&held), "--max-steps", "3", "--lr", "1e-2"]);
    let (before, after) = (&report["before"], &report["after"]);
    let eval = |adapter: Option<&std::path::Path>, extra: &[&str]| {
        let mut args = vec!["eval", "--model", path_str(&model), "--data", path_str(&held), "--device", "cpu", "--json"];
        args.extend(extra);
        if let Some(a) = adapter {
            args.extend(["--adapter", path_str(a)]);
        }
        let (ok, stdout, err) = tinytune(&args);
        assert!(ok, "{args:?}: {err}");
        (json(&stdout), err)
    };
    let (base, err) = eval(None, &["--seq-len", "32"]);
    assert!(err.contains("were longer than 32 tokens and were cut"), "{err}");
    let close = |a: &serde_json::Value, b: &serde_json::Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5;
    assert!(close(&base["mean_nll"], &before["loss"]), "eval {base} vs the run's before {before}");
    assert_eq!(base["tokens"], before["tokens"], "the same tokens scored");
    let adapter = out.join("adapter");
    let (tuned, _) = eval(Some(&adapter), &["--seq-len", "32"]);
    assert!(close(&tuned["mean_nll"], &after["loss"]), "eval {tuned} vs the run's after {after}");
    // Without --seq-len, eval scores every token of each document as written (no EOS, no cut),
    // as transformers' loss does: other tokens, another number.
    let (whole, _) = eval(None, &[]);
    assert_ne!(whole["tokens"], base["tokens"], "{whole} vs {base}");
    assert!(!close(&whole["mean_nll"], &base["mean_nll"]), "{whole} vs {base}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `tinytune bench` on the tiny model: every case runs, the profile prints, and with
/// `--python` the reference's JSON is read and the ratio computed. (The "python" here is a
/// stand-in script printing a fixed measurement: this tests the plumbing, not PyTorch.)
#[cfg(unix)]
#[test]
fn bench_times_every_case_profiles_and_reads_the_reference() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("bench");
    let (model, data) = (tiny_model_dir(&dir), write_cls_data(&dir));
    let python = dir.join("python");
    std::fs::write(
        &python,
        "#!/bin/sh\necho 'a log line'\necho '{\"s_per_step\": 2.0, \"peak_rss_mib\": 100.0, \"versions\": {\"torch\": \"x\"}}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, stdout, err) = tinytune(&[
        "bench",
        "--model",
        path_str(&model),
        "--data",
        path_str(&data),
        "--device",
        "cpu",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--profile",
        "--python",
        path_str(&python),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = json(&stdout);
    let cases = v["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["case"].as_str().unwrap()).collect();
    // The integer-product cases run where the CPU has AVX-512 VNNI, and say they are skipped
    // elsewhere.
    let int8 = tinytune::backend::cpu::qgemm::supported();
    let want: Vec<&str> = [
        ("lora-step", true),
        ("cls-step", true),
        ("cls-eval", true),
        ("cls-eval-int8", int8),
        ("prefill", true),
        ("prefill-int8", int8),
        ("decode", true),
        ("full-step", true),
        ("linears", true),
        ("attention-128", true),
        ("attention-512", true),
        ("attention-2048", true),
    ]
    .into_iter()
    .filter_map(|(c, runs)| runs.then_some(c))
    .collect();
    assert_eq!(names, want);
    if !int8 {
        assert!(err.contains("cls-eval-int8 skipped") && err.contains("prefill-int8 skipped"), "{err}");
    }
    for c in cases {
        let s = c["s_per_step"].as_f64().unwrap();
        assert!(s > 0.0 && c["tokens"].as_u64().unwrap() > 0, "{c}");
        assert!((c["speedup"].as_f64().unwrap() - 2.0 / s).abs() < 1e-9 * (2.0 / s), "{c}");
    }
    let case = |name: &str| cases.iter().find(|c| c["case"] == name).unwrap();
    assert_eq!(case("cls-step")["tokens"], case("cls-eval")["tokens"], "the step and the eval see the same batch");
    assert_eq!(case("decode")["tokens"], 64, "decode times 64 generated tokens");
    // One profile per case, and one more for each attention case's composed reference.
    assert_eq!(err.matches("(outside kernels)").count(), names.len() + 3, "one profile per case:\n{err}");
    for t in [128, 512, 2048] {
        assert!(err.contains(&format!("attention-{t}: fused ")) && err.contains("composed"), "{err}");
    }
    assert!(err.contains("backward:lora_linear") && err.contains("optimizer"), "{err}");
    let (ok, _, err) = tinytune(&["bench", "--model", path_str(&model), "--data", path_str(&data), "--cases", "nope"]);
    assert!(!ok && err.contains("unknown case 'nope'"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `tinytune bench --device gpu…`: one repetition of each model case is counted on the GPU
/// (dispatches, requested and unique bytes per kernel) and printed beside the case's analytic
/// floor.
#[test]
fn bench_on_the_gpu_reports_traffic_against_the_floor() {
    if common::gpu_device().is_none() {
        return;
    }
    let dir = scratch("bench-gpu");
    let (model, data) = (tiny_model_dir(&dir), write_cls_data(&dir));
    let (ok, _, err) = tinytune(&[
        "bench",
        "--model",
        path_str(&model),
        "--data",
        path_str(&data),
        "--device",
        "gpu-software",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--cases",
        "lora-step,cls-eval,prefill",
    ]);
    assert!(ok, "{err}");
    assert_eq!(err.matches("one repetition on the GPU").count(), 3, "{err}");
    for line in err.lines().filter(|l| l.contains("one repetition on the GPU")) {
        let num = |after: &str| -> f64 {
            let rest = &line[line.find(after).unwrap_or_else(|| panic!("{after} in {line}")) + after.len()..];
            rest.trim_start().split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap().parse().unwrap()
        };
        // Re-reads make the requested bytes at least the unique ones, and no step moves less
        // than its floor (each weight once per pass, the trainable state, ids and outputs).
        let (requested, unique, floor) = (num("dispatches;"), num("stores,"), num("floor"));
        assert!(num("GPU:") > 0.0 && floor > 0.0 && requested >= unique && unique >= floor, "{line}");
    }
    assert!(err.contains("matmul") && err.contains("MB unique") && err.contains("MB written"), "per-kernel rows: {err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `--base-dtype`: LoRA trains through the ordinary CLI over a quantised base (int8 here: the
/// tiny model's rows of 32 are too short for NF4's blocks of 64, which is refused with the
/// tensor and shape named), `eval` over the same base gives the run's NLL, and `inspect`
/// reports the bytes the weights take.
#[test]
fn lora_trains_over_a_quantised_base_through_the_cli() {
    let dir = scratch("base-dtype");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    let out = dir.join("int8");
    let report = finetune(&model, &data, &out, &["--max-steps", "8", "--lr", "1e-2", "--batch-size", "4", "--base-dtype", "int8"]);
    let (before, after) = (report["before"]["loss"].as_f64().unwrap(), report["after"]["loss"].as_f64().unwrap());
    assert!(after < before, "held-out loss {before} -> {after}");
    let adapter = out.join("adapter");
    assert!(adapter.join("adapter_model.safetensors").exists());
    let ids = "3,4,5,6,7,8,9,10";
    let m = path_str(&model);
    let eval = |extra: &[&str]| mean_nll(&[&["eval", "--model", m, "--ids", ids, "--device", "cpu", "--json"], extra].concat());
    let (f32_nll, int8_nll) = (eval(&["--base-dtype", "f32"]), eval(&["--base-dtype", "int8"]));
    assert!(f32_nll != int8_nll && (f32_nll - int8_nll).abs() < 0.05, "int8 base NLL {int8_nll} vs f32 {f32_nll}");
    assert_eq!(eval(&[]), f32_nll, "keep on an f32 checkpoint is f32");
    assert!(eval(&["--base-dtype", "int8", "--adapter", path_str(&adapter)]).is_finite());

    let (ok, _, err) = tinytune(
        &finetune_args(&model, &data, &dir.join("nf4"), &["--max-steps", "1", "--base-dtype", "nf4"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!ok && err.contains("q_proj.weight") && err.contains("blocks of 64") && err.contains("[32, 32]"), "{err}");
    let (ok, _, err) = tinytune(&["eval", "--model", m, "--ids", ids, "--base-dtype", "q3", "--device", "cpu"]);
    assert!(!ok && err.contains("keep, f32, f16, bf16, nf4, int8"), "{err}");

    let bytes = |b: &str| {
        let (ok, out, err) = tinytune(&["inspect", m, "--base-dtype", b, "--json"]);
        assert!(ok, "{err}");
        json(&out)["memory"]["bytes"].as_u64().unwrap()
    };
    let (f32_b, int8_b, bf16_b) = (bytes("f32"), bytes("int8"), bytes("bf16"));
    assert!(bf16_b < f32_b && 2 * bf16_b > f32_b, "bf16 {bf16_b} vs f32 {f32_b}: half, but norms stay f32");
    assert!(int8_b < bf16_b, "int8 {int8_b} vs bf16 {bf16_b}");
}

/// `{"prompt", "chosen", "rejected"}` lines: praise chosen over complaints.
fn write_pair_data(dir: &std::path::Path) -> PathBuf {
    let subjects = ["the film", "the movie", "the story", "the acting", "the music", "the plot"];
    let (good, bad) = (["good", "great", "wonderful", "lovely"], ["bad", "awful", "dull", "boring", "poor"]);
    let lines: Vec<String> = (0..24)
        .map(|i| {
            let adverb = ["", " very", " really"][(i / 3) % 3];
            serde_json::json!({ "prompt": format!("{} was", subjects[i % 6]), "chosen": format!("{adverb} {} .", good[i % 4]),
                                "rejected": format!("{adverb} {} .", bad[(i / 2) % 5]) })
            .to_string()
        })
        .collect();
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// The preference commands end to end: a reward model and DPO through `finetune`, the reward
/// model in `eval` (pairs and texts), `sample` with rewards, log-probs, pairs and prompts out,
/// GRPO on those prompts; and the errors of mismatched data and objectives.
#[test]
fn preference_tuning_from_the_command_line() {
    let dir = scratch("preference");
    let model = common::tiny_model_dir(&dir);
    let pairs = write_pair_data(&dir);
    let rm = dir.join("rm");
    let r = finetune(&model, &pairs, &rm, &["--objective", "reward", "--lr", "2e-2", "--max-steps", "12", "--batch-size", "4"]);
    assert!(r["after"]["rewards/accuracies"].as_f64().unwrap() >= r["before"]["rewards/accuracies"].as_f64().unwrap(), "{r}");
    let adapter = rm.join("adapter");
    let (ok, out, err) = tinytune(&[
        "eval",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&adapter),
        "--data",
        path_str(&pairs),
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let e = json(&out);
    assert_eq!(e["pairs"], 24);
    assert!(e["preferred"].as_f64().unwrap() > 0.5, "{e}");
    let (ok, out, err) = tinytune(&[
        "eval",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&adapter),
        "--text",
        "the film was good .",
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    assert_eq!(json(&out)["rewards"].as_array().unwrap().len(), 1);

    let dpo = finetune(
        &model,
        &pairs,
        &dir.join("dpo"),
        &["--objective", "dpo", "--beta", "0.1", "--lr", "2e-2", "--max-steps", "6", "--batch-size", "4"],
    );
    assert!((dpo["before"]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{dpo}");
    assert!(dpo["after"]["rewards/margins"].as_f64().is_some(), "{dpo}");

    let prompts = dir.join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"the film was\"}\n{\"prompt\": \"the music was\"}\n{\"prompt\": \"the plot was\"}\n").unwrap();
    let (samples, pairs_out, prompts_out) = (dir.join("s.jsonl"), dir.join("p.jsonl"), dir.join("q.jsonl"));
    let args = [
        "sample",
        "--model",
        path_str(&model),
        "--prompts",
        path_str(&prompts),
        "--num-samples",
        "3",
        "--max-new-tokens",
        "4",
        "--log-probs",
        "--reward-model",
        path_str(&adapter),
        "--out",
        path_str(&samples),
        "--pairs-out",
        path_str(&pairs_out),
        "--prompts-out",
        path_str(&prompts_out),
        "--prompt-tokens",
        "1-2",
        "--json",
        "--device",
        "cpu",
    ];
    let (ok, out, err) = tinytune(&args);
    assert!(ok, "{err}");
    assert_eq!(json(&out)["completions"], 9);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&samples).unwrap().lines().map(json).collect();
    assert_eq!(lines.len(), 9);
    // No adapter: the policy is its reference.
    assert!(lines.iter().all(|l| l["logp"] == l["ref_logp"] && l["reward"].is_f64() && l["tokens"].as_u64().unwrap() >= 1), "{lines:?}");
    let kept: Vec<serde_json::Value> = std::fs::read_to_string(&prompts_out).unwrap().lines().map(json).collect();
    assert_eq!(kept.len(), 3);
    assert!(std::fs::read_to_string(&pairs_out).unwrap().lines().count() <= 3);

    let g = finetune(
        &model,
        &prompts_out,
        &dir.join("grpo"),
        &[
            "--objective",
            "grpo",
            "--reward-model",
            path_str(&adapter),
            "--num-generations",
            "4",
            "--max-new-tokens",
            "3",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--eval-split",
            "0",
        ],
    );
    assert_eq!(g["steps"], 2, "{g}");
    let ppo = finetune(
        &model,
        &prompts_out,
        &dir.join("ppo"),
        &[
            "--objective",
            "ppo",
            "--reward-model",
            path_str(&adapter),
            "--ppo-epochs",
            "2",
            "--max-new-tokens",
            "3",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--eval-split",
            "0",
        ],
    );
    assert_eq!(ppo["steps"], 2, "{ppo}");
    let steps: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.join("ppo/metrics.jsonl")).unwrap().lines().map(json).filter(|v| v.get("step").is_some()).collect();
    assert!(steps.iter().all(|v| v["kl"].is_f64() && v["value_loss"].is_f64() && v["clipfrac"].is_f64()), "{steps:?}");
    // The step's tokens are the prompts' and the sampled ones (at least one prompt and its completion).
    assert!(steps.iter().all(|v| v["tokens"].as_f64().unwrap() >= v["completion_length"].as_f64().unwrap() + 1.0), "{steps:?}");

    // Mismatches are errors that say what fits.
    let (ok, _, err) = tinytune(
        &finetune_args(&model, &prompts_out, &dir.join("x0"), &["--objective", "grpo", "--ppo-epochs", "2"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!ok && err.contains("--ppo-epochs is a setting of --objective ppo"), "{err}");
    let (ok, _, err) = tinytune(
        &finetune_args(&model, &prompts_out, &dir.join("x1"), &["--objective", "dpo"]).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!ok && err.contains("grpo and ppo train on"), "{err}");
    let (ok, _, err) = tinytune(&finetune_args(&model, &prompts_out, &dir.join("x2"), &[]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("--reward-model"), "{err}");
    let (ok, _, err) = tinytune(&[
        "sample",
        "--model",
        path_str(&model),
        "--prompts",
        path_str(&prompts),
        "--pairs-out",
        path_str(&pairs_out),
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("--num-samples 2"), "{err}");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let (ok, _, err) = tinytune(&["sample", "--model", path_str(&model), "--prompts", path_str(&empty), "--device", "cpu"]);
    assert!(!ok && err.contains("empty.jsonl") && err.contains("no prompts"), "{err}");
}

/// `select-layers` prints the table and the chosen blocks (and its chart); `finetune --layers
/// auto:1` trains LoRA on the block it chooses and keeps the selection beside the run; a
/// method that does not attach per layer and a budget above the layers are refused, naming them.
#[test]
fn layer_selection_from_the_cli() {
    let dir = scratch("select-layers");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    let svg = dir.join("layers.svg");
    let (ok, stdout, err) =
        tinytune(&["select-layers", "--model", path_str(&model), "--data", path_str(&data), "--device", "cpu", "--svg", path_str(&svg)]);
    assert!(ok && stdout.contains("lm-head reading of 40 examples") && stdout.contains("chosen: --layers"), "{stdout}{err}");
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    let (ok, stdout, err) =
        tinytune(&["select-layers", "--model", path_str(&model), "--data", path_str(&data), "--device", "cpu", "--budget", "1", "--json"]);
    assert!(ok, "{err}");
    let sel = json(&stdout);
    let chosen = sel["chosen"].as_array().unwrap().clone();
    assert_eq!((chosen.len(), sel["deviations"].as_array().unwrap().len()), (1, 3));
    let out = dir.join("auto");
    let report = finetune(&model, &data, &out, &["--layers", "auto:1", "--max-steps", "4", "--batch-size", "4"]);
    assert_eq!(read_json(&out.join("layer-selection.json"))["chosen"], serde_json::Value::Array(chosen.clone()));
    // LoRA r=2 (the tests' finetune_args) on q_proj (32 → 32) and v_proj (32 → 16) of the one chosen block.
    assert_eq!(report["trainable_parameters"].as_u64(), Some(2 * (32 + 32) + 2 * (32 + 16)));
    let config = read_json(&out.join("adapter/adapter_config.json"));
    assert_eq!(config["layers_to_transform"], serde_json::Value::Array(chosen));
    let args = finetune_args(&model, &data, &dir.join("x"), &["--method", "full", "--layers", "auto"]);
    let (ok, _, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("method full does not attach per layer"), "{err}");
    let args = finetune_args(&model, &data, &dir.join("y"), &["--layers", "auto:5"]);
    let (ok, _, err) = tinytune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("a layer budget of 5 is not between 1 and the model's 2 layers"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// FineGates from the command line: trained towards a target sparsity, then `merge --compress`
/// writes a smaller model (per-layer report) that evaluates as the gated adapter does and
/// generates; a compression of another method's adapter is refused.
#[test]
fn finegates_from_the_cli_and_a_compressed_model() {
    let dir = scratch("finegates");
    let (model, data) = (tiny_model_dir(&dir), write_lm_data(&dir));
    let ids = "3,4,5,6,7,8,9,10;3,5,9,7,6,8";
    let out = dir.join("fg");
    let report = finetune(
        &model,
        &data,
        &out,
        &["--method", "finegates", "--target-sparsity", "0.5", "--lr", "1e-2", "--max-steps", "30", "--batch-size", "4"],
    );
    assert!(report["after"]["loss"].as_f64().unwrap().is_finite());
    let adapter = out.join("adapter");
    assert_eq!(read_json(&adapter.join("adapter_config.json"))["peft_type"], "FINEGATES");
    let gated =
        mean_nll(&["eval", "--model", path_str(&model), "--adapter", path_str(&adapter), "--ids", ids, "--device", "cpu", "--json"]);
    let small = dir.join("small");
    let (ok, stdout, err) =
        tinytune(&["merge", "--model", path_str(&model), "--adapter", path_str(&adapter), "--compress", "--out", path_str(&small)]);
    assert!(ok && stdout.contains("MLP units removed") && stdout.contains("linear weights:"), "{stdout}{err}");
    assert!(read_json(&small.join("config.json"))["intermediate_sizes"].is_array(), "per-block widths");
    let compressed = mean_nll(&["eval", "--model", path_str(&small), "--ids", ids, "--device", "cpu", "--json"]);
    assert!((compressed - gated).abs() < 1e-4 * gated, "compressed {compressed} vs gated {gated}");
    let (ok, _, err) = tinytune(&["generate", "--model", path_str(&small), "--ids", "3,4,5", "--max-new-tokens", "4", "--device", "cpu"]);
    assert!(ok, "{err}");
    // A classifier: merge keeps its head beside the compressed model, which then scores the
    // labelled data as the gated classifier does.
    let cls = write_cls_data(&dir);
    let fg_cls = dir.join("fg-cls");
    finetune(
        &model,
        &cls,
        &fg_cls,
        &["--method", "finegates", "--target-sparsity", "0.5", "--lr", "1e-2", "--max-steps", "20", "--batch-size", "4"],
    );
    let adapter = fg_cls.join("adapter");
    let score = |args: &[&str]| -> serde_json::Value {
        let (ok, stdout, err) = tinytune(args);
        assert!(ok, "{err}");
        json(&stdout)
    };
    let gated = score(&[
        "eval",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&adapter),
        "--data",
        path_str(&cls),
        "--device",
        "cpu",
        "--json",
    ]);
    let small = dir.join("small-cls");
    let (ok, stdout, err) =
        tinytune(&["merge", "--model", path_str(&model), "--adapter", path_str(&adapter), "--compress", "--out", path_str(&small)]);
    assert!(ok && err.contains("small-cls/head"), "the head's directory is named: {stdout}{err}");
    let head = small.join("head");
    let compressed =
        score(&["eval", "--model", path_str(&small), "--adapter", path_str(&head), "--data", path_str(&cls), "--device", "cpu", "--json"]);
    assert_eq!(compressed["accuracy"], gated["accuracy"], "compressed {compressed} vs gated {gated}");
    let (g, c) = (gated["mean_loss"].as_f64().unwrap(), compressed["mean_loss"].as_f64().unwrap());
    assert!((g - c).abs() < 1e-4 * g.max(1e-3), "mean loss: compressed {c} vs gated {g}");
    let lora = dir.join("lora");
    finetune(&model, &data, &lora, &["--max-steps", "2"]);
    let (ok, _, err) = tinytune(&[
        "merge",
        "--model",
        path_str(&model),
        "--adapter",
        path_str(&lora.join("adapter")),
        "--compress",
        "--out",
        path_str(&dir.join("no")),
    ]);
    assert!(!ok && err.contains("--compress removes what FineGates' closed gates make dead"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `--model org/name` from a Hugging Face hub cache laid out as `huggingface_hub` lays it out
/// (`models--org--name/refs/main` naming a `snapshots/<commit>` directory), found through
/// `$HF_HUB_CACHE` without the network, with `@revision`; the adapter a run writes names the id
/// as its base; an id not in the cache is an error that says where it looked.
#[test]
fn models_by_hugging_face_id_from_the_local_cache() {
    let tmp = std::env::temp_dir().join(format!("tinytune-hfcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let repo = tmp.join("hub/models--tiny-org--tiny-llama");
    let (main, old) = ("0123abcd", "89efcafe");
    for commit in [main, old] {
        let snap = tiny_model_dir(&tmp.join(commit));
        std::fs::create_dir_all(repo.join("snapshots")).unwrap();
        std::fs::rename(&snap, repo.join("snapshots").join(commit)).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), format!("{main}\n")).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tinytune")).env("HF_HUB_CACHE", tmp.join("hub")).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, out, err) = run(&["inspect", "--model", "tiny-org/tiny-llama", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(json(&out)["architecture"], "llama");
    // The same numbers as the directory itself gives, through the id and through @revision.
    let text = "the cat sat on the mat";
    let by_path = run(&["eval", "--model", &repo.join("snapshots").join(main).display().to_string(), "--text", text, "--json"]);
    let by_id = run(&["eval", "--model", "tiny-org/tiny-llama", "--text", text, "--json"]);
    let by_rev = run(&["eval", "--model", &format!("tiny-org/tiny-llama@{old}"), "--text", text, "--json"]);
    assert!(by_path.0 && by_id.0 && by_rev.0, "{} {} {}", by_path.2, by_id.2, by_rev.2);
    assert_eq!(json(&by_id.1)["mean_nll"], json(&by_path.1)["mean_nll"]);
    assert_eq!(json(&by_rev.1)["mean_nll"], json(&by_path.1)["mean_nll"]);
    // A run on the id names it as the adapter's base.
    let data = tmp.join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"the cat sat on the mat\"}\n".repeat(8)).unwrap();
    let out_dir = tmp.join("run");
    let (ok, _, err) = run(&[
        "finetune",
        "--model",
        "tiny-org/tiny-llama",
        "--data",
        &data.display().to_string(),
        "--out",
        &out_dir.display().to_string(),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "8",
        "--eval-data",
        &data.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let cfg = json(&std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap());
    assert_eq!(cfg["base_model_name_or_path"], "tiny-org/tiny-llama");
    // Not in the cache: the error names the id and where it looked.
    let (ok, _, err) = run(&["eval", "--model", "tiny-org/missing-model", "--text", text]);
    assert!(!ok);
    assert!(
        err.contains("tiny-org/missing-model") && err.contains("models--tiny-org--missing-model") && err.contains("HF_HUB_CACHE"),
        "{err}"
    );
    let (ok, _, err) = run(&["eval", "--model", "tiny-org/tiny-llama@nope", "--text", text]);
    assert!(!ok && err.contains("refs/nope"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}
