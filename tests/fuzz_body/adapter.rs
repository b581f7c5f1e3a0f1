// Shared body of the `adapter` fuzz target (fuzz/) and its smoke run (tests/fuzz_parsers.rs):
// bytes as a PEFT adapter directory (adapter_config.json, then adapter_model.safetensors; see
// `two_parts`) loaded onto the tiny Llama must give an adapter or an error, never a panic; a
// loaded adapter must then run a forward pass and merge (or refuse to) without a panic.

include!("shared.rs");

use tinytune::{models, peft::format, Device, Tensor};

pub fn run(data: &[u8]) {
    let (config, weights) = two_parts(data);
    let dir = scratch("adapter");
    let _ = std::fs::write(dir.join("adapter_config.json"), config);
    let _ = std::fs::write(dir.join("adapter_model.safetensors"), weights);
    let Ok(mut model) = models::load(fixtures().join("tiny-llama"), &Device::Cpu) else { return };
    if let Ok(loaded) = format::load(&dir, model.as_mut(), &Device::Cpu) {
        if let Ok(ids) = Tensor::from_vec(vec![1u32, 5, 9, 3], &[1, 4], &Device::Cpu) {
            let _ = model.forward(&ids, None);
            if let Some(head) = &loaded.head {
                let _ = head.num_classes();
            }
        }
        let _ = loaded.method.merge(model.as_mut());
    }
}
