//! Coverage-guided fuzzing of the JSON readers: arbitrary bytes as a model `config.json` and
//! as a `tokenizer.json` must give a value or an error, never a panic.
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run config_tokenizer` from the repository root.
#![no_main]

use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(raw) = tinytune::io::config::RawConfig::parse(Path::new("config.json"), text) {
            let _ = tinytune::models::llama::LlamaConfig::from_raw(&raw);
            let _ = tinytune::models::gpt2::Gpt2Config::from_raw(&raw);
        }
    }
    if let Ok(tok) = tinytune::io::Tokenizer::from_hf_json_bytes(data, "tokenizer.json") {
        if let Ok(ids) = tok.encode("Hello <|im_start|> wörld 123 🎉", true) {
            let _ = tok.decode(&ids, false);
        }
    }
});
