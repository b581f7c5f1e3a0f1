//! The `tinytune` binary on the committed fixtures: JSON output, numbers equal to the
//! library's (and so to transformers'), and errors that name what is wrong.

use std::path::PathBuf;
use std::process::Command;

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
    assert!(!ok && err.contains("index 500"), "{err}");
    let (ok, _, err) = tinytune(&["eval", "--model", &fixture("tiny-llama"), "--ids", "1,2", "--device", "tpu"]);
    assert!(!ok && err.contains("tpu"), "{err}");
    let (ok, out, _) = tinytune(&["generate", "--help"]);
    assert!(ok && out.contains("--max-new-tokens") && out.contains("--top-p"));
}
