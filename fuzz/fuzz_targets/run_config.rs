//! Coverage-guided fuzzing of `finetune --config run.toml` files, through the method registry
//! to an attached method: `RUSTC_BOOTSTRAP=1 cargo fuzz run run_config`. The body is shared
//! with the smoke run in `tests/fuzz_parsers.rs`.
#![no_main]

mod body {
    include!("../../tests/fuzz_body/run_config.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
