// Run a GGUF file (and optionally a GGUF LoRA adapter) in llama.cpp, through the
// node-llama-cpp package's prebuilt CPU binary, and print what it did as one JSON line:
// the prompt's token ids as llama.cpp tokenizes it, and the greedy continuation's ids.
// scripts/check_gguf_export.sh compares these with tinytune's on the same files.
//
//   npm i -E node-llama-cpp@3.21.1      (in some directory D; NODE_PATH is not needed:
//   node D/check_llamacpp.mjs ...        the script is copied next to node_modules)
//   node check_llamacpp.mjs --model M.gguf [--lora A.gguf] --prompt "text" [--n 24]
import { getLlama } from "node-llama-cpp";

const args = process.argv.slice(2);
const opt = (name, dflt) => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 ? args[i + 1] : dflt;
};
const modelPath = opt("model");
const lora = opt("lora");
const prompt = opt("prompt", "It is a truth universally acknowledged");
const n = Number(opt("n", "24"));
if (!modelPath) {
    console.error("usage: node check_llamacpp.mjs --model M.gguf [--lora A.gguf] --prompt TEXT [--n N]");
    process.exit(2);
}

const llama = await getLlama({ gpu: false, build: "never", logLevel: "error" });
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({
    contextSize: 256,
    ...(lora ? { lora: { adapters: [{ filePath: lora, scale: 1 }] } } : {}),
});
const seq = context.getSequence();
// As tinytune's generate: special tokens in the text are read as such; no BOS is added
// unless the tokenizer's add_bos_token says so.
const promptIds = model.tokenize(prompt, true);
const out = [];
for await (const t of seq.evaluate(promptIds, { temperature: 0 })) {
    out.push(t);
    if (out.length >= n || model.isEogToken?.(t)) break;
}
console.log(JSON.stringify({ prompt: Array.from(promptIds), generated: out, text: model.detokenize(out) }));
await context.dispose();
await model.dispose();
