// Shared body of the `data` fuzz target (fuzz/) and its smoke run (tests/fuzz_parsers.rs):
// bytes as a JSONL training file (every format: text, prompt/completion, messages, labelled),
// read with options taken from the first byte, must give a data set or an error naming the
// line, never a panic; a data set must then split, subset and batch without a panic.

include!("shared.rs");

use tinytune::io::Tokenizer;
use tinytune::train::data::{DataOptions, Dataset, Holdout};
use tinytune::Device;

fn tokenizer() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| Tokenizer::for_model(tiny_model_dir()).expect("the tokenizer fixture"))
}

pub fn run(data: &[u8]) {
    let Some((&o, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let opts = DataOptions {
        seq_len: 1 + (o & 15) as usize,
        context: if o & 16 != 0 { Some(12) } else { None },
        pack: o & 32 != 0,
        add_eos: o & 64 != 0,
        add_special_tokens: o & 128 == 0,
    };
    let Ok(ds) = Dataset::from_jsonl_str(&text, "fuzz.jsonl", tokenizer(), &opts) else { return };
    let _ = ds.num_classes();
    let _ = ds.check_labels(2);
    let _ = ds.epoch_order(1, 7);
    let _ = ds.split_holdout(Holdout::Fraction(0.3), 1);
    let _ = ds.split_holdout(Holdout::Count(1), 1);
    let _ = ds.subset(2, 3);
    let idx: Vec<usize> = (0..ds.len().min(5)).collect();
    if let Ok(b) = ds.batch(&idx, &Device::Cpu) {
        let _ = b.n_tokens;
    }
}
