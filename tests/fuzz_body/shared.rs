// Helpers of the parser fuzz bodies (included by each; see tests/fuzz_parsers.rs).

/// `tests/fixtures`, from the repository (tests) or from `fuzz/` (cargo-fuzz).
#[allow(dead_code)]
fn fixtures() -> std::path::PathBuf {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let here = root.join("tests/fixtures");
    if here.is_dir() {
        here
    } else {
        root.join("../tests/fixtures")
    }
}

/// A scratch directory of this process for one target (cleared by the caller).
#[allow(dead_code)]
fn scratch(target: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tinytune-fuzz-{target}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Split fuzz bytes into two parts: the first two bytes (little-endian) give the first part's
/// length, clamped to what is there.
#[allow(dead_code)]
fn two_parts(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    data[2..].split_at(n)
}

/// The inverse of [`two_parts`], for building seeds.
#[allow(dead_code)]
pub fn join_parts(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = (a.len() as u16).to_le_bytes().to_vec();
    v.extend_from_slice(a);
    v.extend_from_slice(b);
    v
}

/// The tiny Llama with the word-level tokenizer, as a model directory (made once per process).
#[allow(dead_code)]
fn tiny_model_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let f = fixtures();
        let m = scratch("model");
        for name in ["config.json", "model.safetensors", "generation_config.json"] {
            std::fs::copy(f.join("tiny-llama").join(name), m.join(name)).expect("fixture");
        }
        std::fs::copy(f.join("tokenizer/tiny-words.json"), m.join("tokenizer.json")).expect("fixture");
        std::fs::copy(f.join("tokenizer/tiny-words_config.json"), m.join("tokenizer_config.json")).expect("fixture");
        m
    })
    .clone()
}
