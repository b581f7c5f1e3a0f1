//! Coverage-guided fuzzing of the JSONL data formats (text, prompt/completion, messages,
//! labelled): `RUSTC_BOOTSTRAP=1 cargo fuzz run data`. The body is shared with the smoke run
//! in `tests/fuzz_parsers.rs`.
#![no_main]

mod body {
    include!("../../tests/fuzz_body/data.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
