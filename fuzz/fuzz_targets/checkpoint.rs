//! Coverage-guided fuzzing of training checkpoints (state.json + tensors) resumed by a LoRA
//! run, exactly and weights-only: `RUSTC_BOOTSTRAP=1 cargo fuzz run checkpoint`. The body is
//! shared with the smoke run in `tests/fuzz_parsers.rs`.
#![no_main]

mod body {
    include!("../../tests/fuzz_body/checkpoint.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
