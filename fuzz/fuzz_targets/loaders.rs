//! Coverage-guided fuzzing of the checkpoint readers: arbitrary bytes as a GGUF file and as a
//! safetensors file must give a value or an error, never a panic or an out-of-bounds read.
//! `cargo +nightly fuzz run loaders` from the repository root.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(f) = tinytune::io::GgufFile::from_bytes("fuzz.gguf", data.to_vec()) {
        let _ = f.tokenizer();
        for t in f.tensors().to_vec() {
            let _ = f.dequantize(&t.name);
        }
    }
    let path = std::env::temp_dir().join(format!("tinytune-fuzz-{}.safetensors", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        if let Ok(f) = tinytune::io::SafetensorsFile::open(&path) {
            for n in f.names().iter().map(|s| s.to_string()).collect::<Vec<_>>() {
                let _ = f.load(&n, &tinytune::Device::Cpu);
            }
        }
    }
});
