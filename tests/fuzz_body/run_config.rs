// Shared body of the `run_config` fuzz target (fuzz/) and its smoke run
// (tests/fuzz_parsers.rs): bytes as a `finetune --config run.toml` file must parse to options
// or give an error naming the file, never a panic; the method settings they give must
// configure a method or be refused, and a configured method must attach to the tiny Llama or
// be refused, never panic or allocate without bound.

include!("shared.rs");

use tinytune::cli::FinetuneArgs;
use tinytune::{models, peft, Device};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(args) = FinetuneArgs::from_toml_str(text, std::path::Path::new("run.toml")) else { return };
    // Prompt-init text as byte ids: some beyond the tiny vocabulary, which must be refused.
    let Ok(settings) = args.method_settings(&|t| Ok(t.bytes().map(u32::from).collect())) else { return };
    let Ok(method) = peft::configure(args.method.as_deref().unwrap_or("lora"), &settings) else { return };
    let _ = (method.fingerprint(), method.default_lr(), method.head_only());
    if let Ok(mut model) = models::load(fixtures().join("tiny-llama"), &Device::Cpu) {
        let _ = method.attach(model.as_mut(), args.seed.unwrap_or(0));
    }
}
