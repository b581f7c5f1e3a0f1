//! What the real-model benches share: the asset lookup, the `--bench` gate, peak memory.

use std::path::PathBuf;

/// The SmolLM2 GGUF in `${TINYTUNE_ASSETS:-~/.cache/tinytune}`, when this is a real bench run
/// (`cargo bench` passes `--bench`; `cargo test --all-targets` runs the binary without it, and
/// then it only says what it would measure) and the file exists.
pub fn smollm2(bench: &str) -> Option<PathBuf> {
    asset(bench, "SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The fetched asset `name` when running under `cargo bench`; `None` (saying why) otherwise.
pub fn asset(bench: &str, name: &str) -> Option<PathBuf> {
    let path = tinytune::io::assets_dir().join(name);
    if !std::env::args().any(|a| a == "--bench") {
        println!("{bench} bench: run with `cargo bench --bench {bench}`");
        return None;
    }
    if !path.exists() {
        println!("{bench} bench skipped: {} not found (run scripts/fetch-assets.sh)", path.display());
        return None;
    }
    Some(path)
}

/// The peak resident memory of this process (VmHWM), MiB.
pub fn peak_rss_mib() -> f64 {
    tinytune::mem::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64)
}

/// Reset the peak-RSS counter (Linux), so the peak covers what follows only.
#[allow(dead_code)]
pub fn reset_peak() {
    tinytune::mem::reset_peak_rss();
}
