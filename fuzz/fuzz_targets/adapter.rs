//! Coverage-guided fuzzing of PEFT adapter directories (adapter_config.json +
//! adapter_model.safetensors) loaded onto the tiny Llama: `RUSTC_BOOTSTRAP=1 cargo fuzz run
//! adapter`. The body is shared with the smoke run in `tests/fuzz_parsers.rs`.
#![no_main]

mod body {
    include!("../../tests/fuzz_body/adapter.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
