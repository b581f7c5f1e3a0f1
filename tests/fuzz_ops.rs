//! A stable-Rust smoke run of the `tensor_ops` fuzz target on pseudo-random inputs: every
//! decoded op must return a value or an error, never panic. The coverage-guided run lives in
//! `fuzz/` (`cargo +nightly fuzz run tensor_ops`).

mod common;
mod body {
    include!("fuzz_body/tensor_ops.rs");
}

#[test]
fn random_op_sequences_never_panic() {
    let mut rng = common::TestRng::new(1234);
    for _ in 0..3000 {
        let len = rng.below(64);
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        body::run(&data);
    }
}
