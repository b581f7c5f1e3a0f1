//! The real SmolLM2-135M-Instruct (Q4_1 GGUF, fetched by scripts/fetch-assets.sh) against the
//! numbers transformers gives for the same file (tests/fixtures/smollm2_reference.json, made by
//! scripts/make_smollm2_reference.py): token ids of a text, its mean NLL to 1e-3, the greedy
//! answer to a chat prompt — on the CPU, on the GPU, and through the CLI.

mod common;

use std::process::Command;

use tinytune::io::Tokenizer;
use tinytune::models::{self, GenerateOptions};
use tinytune::Device;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

struct Reference {
    text: String,
    text_ids: Vec<u32>,
    mean_nll: f64,
    chat_prompt: String,
    chat_prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

fn reference() -> Reference {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |k: &str| v[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    Reference {
        text: v["text"].as_str().unwrap().to_string(),
        text_ids: ids("text_ids"),
        mean_nll: v["mean_nll"].as_f64().unwrap(),
        chat_prompt: v["chat_prompt"].as_str().unwrap().to_string(),
        chat_prompt_ids: ids("chat_prompt_ids"),
        greedy_ids: ids("greedy_ids"),
    }
}

fn check_on(device: &Device) {
    let Some(path) = common::asset(MODEL) else { return };
    let r = reference();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    assert_eq!(tok.encode(&r.text, true).unwrap(), r.text_ids, "token ids of the text");
    assert_eq!(tok.apply_chat_template(&[("user", "What is the capital of France?")], true).unwrap(), r.chat_prompt);
    assert_eq!(tok.encode(&r.chat_prompt, true).unwrap(), r.chat_prompt_ids, "token ids of the chat prompt");

    let model = models::load(&path, device).unwrap();
    let nll = models::sequence_nll(model.as_ref(), std::slice::from_ref(&r.text_ids), 1, device).unwrap();
    assert!((nll.mean_nll() - r.mean_nll).abs() < 1e-3, "mean NLL {} vs transformers {}", nll.mean_nll(), r.mean_nll);

    let opts = GenerateOptions { max_new_tokens: 16, stop_tokens: tok.eos_id().into_iter().collect(), ..Default::default() };
    let got = models::generate(model.as_ref(), &r.chat_prompt_ids, &opts, &mut |_| Ok(()), device).unwrap();
    assert_eq!(got, r.greedy_ids, "greedy answer: {:?}", tok.decode(&got, false));
}

#[test]
fn smollm2_matches_transformers_on_the_cpu() {
    check_on(&Device::Cpu);
}

#[test]
fn smollm2_matches_transformers_on_the_gpu() {
    let Some(gpu) = common::gpu_device() else { return };
    check_on(&gpu);
}

#[test]
fn smollm2_through_the_cli() {
    let Some(path) = common::asset(MODEL) else { return };
    let r = reference();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tinytune")).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let m = path.to_str().unwrap();
    let v = run(&["tokenize", "--model", m, "--text", &r.text, "--json"]);
    assert_eq!(v["ids"].as_array().unwrap().len(), r.text_ids.len());
    let v = run(&["eval", "--model", m, "--text", &r.text, "--device", "cpu", "--json"]);
    assert!((v["mean_nll"].as_f64().unwrap() - r.mean_nll).abs() < 1e-3, "{v}");
    assert_eq!(v["tokens"], r.text_ids.len() - 1);
    let v = run(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-new-tokens",
        "16",
        "--device",
        "cpu",
        "--json",
    ]);
    let ids: Vec<u32> = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, r.greedy_ids);
    assert_eq!(v["text"], "The capital of France is Paris.");
}

/// `tinytune chat` in a pseudo-terminal (util-linux `script` gives it one): the first answer
/// is the greedy answer `generate --chat` gives to the same question, the history goes through
/// the chat template (a follow-up question is answered in context), and /save, /system,
/// /reset do what they say; a /save that cannot be written is reported and the chat goes on.
#[test]
fn chat_in_a_terminal() {
    let Some(path) = common::asset(MODEL) else { return };
    if Command::new("script").arg("--version").output().is_err() {
        assert!(std::env::var("CI").is_err(), "util-linux `script` is needed for the pseudo-terminal");
        println!("skipped: no `script` (util-linux) for a pseudo-terminal");
        return;
    }
    let m = path.to_str().unwrap();
    let question = "What is the capital of France?";
    let out = Command::new(env!("CARGO_BIN_EXE_tinytune"))
        .args(["generate", "--model", m, "--device", "cpu", "--chat", "--prompt", question, "--max-new-tokens", "16", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["text"].as_str().unwrap().trim().to_string();
    let dir = std::env::temp_dir().join(format!("tinytune-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let saved = dir.join("chat.jsonl");
    let input = format!(
        "{question}\n/save {s}\n/save {d}/missing/dir/x.jsonl\n/system Answer in one word.\nAnd of Italy?\n/save {s}\n/reset\n/save {s}\n/quit\n",
        s = saved.display(),
        d = dir.display()
    );
    let cmd = format!("{} chat --model {m} --device cpu --max-new-tokens 16", env!("CARGO_BIN_EXE_tinytune"));
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains(&format!("> {want}")), "the first answer should be generate's ({want:?}):\n{screen}");
    assert!(screen.contains("(system message set)") && screen.contains("(conversation cleared)"), "{screen}");
    assert!(screen.contains("error:") && screen.contains("missing/dir"), "the failed /save is reported:\n{screen}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&saved).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let roles = |v: &serde_json::Value| -> Vec<String> {
        v["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(roles(&lines[0]), ["user", "assistant"]);
    assert_eq!(lines[0]["messages"][1]["content"].as_str().unwrap().trim(), want);
    assert_eq!(roles(&lines[1]), ["system", "user", "assistant", "user", "assistant"]);
    assert_eq!(lines[1]["messages"][0]["content"], "Answer in one word.");
    assert!(lines[1]["messages"][4]["content"].as_str().unwrap().contains("Rome"), "{}", lines[1]);
    assert_eq!(roles(&lines[2]), ["system"]);
    let _ = std::fs::remove_dir_all(&dir);
}
