//! Coverage-guided fuzzing of the tensor API: `cargo +nightly fuzz run tensor_ops` from the
//! repository root. The decoding and checks are shared with `tests/fuzz_ops.rs`.
#![no_main]

mod body {
    include!("../../tests/fuzz_body/tensor_ops.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
