#!/usr/bin/env python3
"""Check tinytune's GGUF exports with the `gguf` Python package (llama.cpp's own reader).

A merged model (`tinytune export --type T`) against the same merge written as f32
safetensors (`tinytune merge --dtype f32`):
  * metadata: architecture, the llama.* hyper-parameters against config.json, the tokenizer
    (as many tokens as embedding rows), general.file_type;
  * tensors: llama.cpp's names for every weight of the checkpoint, shapes, types (norms f32);
  * values: q/k rows permuted as llama.cpp's converter permutes them; F32 equal, F16/BF16
    equal to numpy's rounding of the f32 weights, Q8_0/Q5_0/Q4_0 byte for byte equal to
    gguf-py's own quantiser; Q4_K (which gguf-py cannot write) decoded by gguf-py within
    a bound of the weights; matrices kept in the blocks they were loaded in decoded by gguf-py
    equal to the reference (which holds those values dequantised).

A LoRA adapter (`tinytune export --adapter-only`) against the PEFT adapter directory:
  general.type = adapter, adapter.type = lora, adapter.lora.alpha = scale·r, and for every
  PEFT lora_A / lora_B: `<name>.lora_a` equal to A, `<name>.lora_b` equal to B with the q/k
  permutation.

  python3 scripts/check_gguf_export.py model --gguf merged.q4_k.gguf --reference merged-f32/
  python3 scripts/check_gguf_export.py adapter --gguf adapter.gguf --adapter run/adapter --config merged-f32/config.json

Needs: pip install gguf numpy safetensors. Exits 1 naming the first check that fails.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants
from safetensors.numpy import load_file

BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")
    assert parts[:2] == ["model", "layers"], hf
    module, param = ".".join(parts[3:-1]), parts[-1]
    return f"blk.{parts[2]}.{BLOCK[module]}.{param}"


def permute(w, n_head):
    """llama.cpp's converter (LlamaModel.permute): rows of each head's two RoPE halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_for(name, config):
    if ".attn_q." in name:
        return config["num_attention_heads"]
    if ".attn_k." in name:
        return config.get("num_key_value_heads", config["num_attention_heads"])
    return None


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i] for i in f.data]
    return f.parts[f.data[0]][0]


def tensor_values(t):
    """gguf-py's dequantisation, in the PyTorch shape."""
    shape = tuple(int(d) for d in reversed(t.shape))
    return quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


def check_model(args):
    reader = gguf.GGUFReader(args.gguf)
    ref_dir = Path(args.reference)
    config = json.loads((ref_dir / "config.json").read_text())
    ref = load_file(ref_dir / "model.safetensors")

    if field(reader, "general.architecture") != "llama":
        fail(f"general.architecture = {field(reader, 'general.architecture')!r}")
    for key, cfg in [("llama.block_count", "num_hidden_layers"), ("llama.embedding_length", "hidden_size"),
                     ("llama.feed_forward_length", "intermediate_size"), ("llama.attention.head_count", "num_attention_heads"),
                     ("llama.attention.head_count_kv", "num_key_value_heads")]:
        if int(field(reader, key)) != config[cfg]:
            fail(f"{key} = {field(reader, key)}, config.json {cfg} = {config[cfg]}")
    if abs(float(field(reader, "llama.rope.freq_base")) - config["rope_theta"]) > 1e-3 * config["rope_theta"]:
        fail("llama.rope.freq_base")
    if abs(float(field(reader, "llama.attention.layer_norm_rms_epsilon")) - config["rms_norm_eps"]) > 1e-9:
        fail("llama.attention.layer_norm_rms_epsilon")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if tokens is None or len(tokens) != config["vocab_size"]:
        fail(f"tokenizer.ggml.tokens has {None if tokens is None else len(tokens)} entries, vocab_size {config['vocab_size']}")
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        fail("tokenizer.ggml.model")

    tied = config.get("tie_word_embeddings", False)
    expected = {gguf_name(n): n for n in ref if not (tied and n == "lm_head.weight")}
    got = {t.name: t for t in reader.tensors}
    if set(got) != set(expected):
        fail(f"tensor names differ: missing {sorted(set(expected) - set(got))[:5]}, extra {sorted(set(got) - set(expected))[:5]}")
    counts = {}
    for name, t in got.items():
        w = ref[expected[name]].astype(np.float32)
        n = heads_for(name, config)
        if n is not None:
            w = permute(w, n)
        shape = tuple(int(d) for d in reversed(t.shape))
        if shape != w.shape:
            fail(f"{name}: shape {shape}, checkpoint {w.shape}")
        ty = t.tensor_type
        counts[ty.name] = counts.get(ty.name, 0) + 1
        if w.ndim == 1 and ty != T.F32:
            fail(f"{name}: a norm written as {ty.name}")
        if ty == T.F32:
            ok = np.array_equal(tensor_values(t), w)
        elif ty == T.F16:
            ok = np.array_equal(tensor_values(t), w.astype(np.float16).astype(np.float32))
        elif ty in (T.BF16, T.Q8_0, T.Q5_0, T.Q4_0):
            # gguf-py's reference quantiser must give the very bytes tinytune wrote (or, for a
            # matrix kept in the blocks it was loaded in, gguf-py decodes it to the reference).
            written = np.asarray(t.data).reshape(-1).view(np.uint8)
            ok = np.array_equal(written, quants.quantize(w, ty).reshape(-1).view(np.uint8)) or np.array_equal(tensor_values(t), w)
        elif ty == T.Q4_K:
            v = tensor_values(t)
            rel = float(np.sqrt(np.mean((v - w) ** 2)) / (np.sqrt(np.mean(w ** 2)) + 1e-12))
            ok = rel < 0.12
            if not ok:
                fail(f"{name}: Q4_K decodes {rel:.3f} (relative rms) away from the weights")
        else:
            # Kept as loaded (a GGUF base's own blocks): the reference holds those values.
            ok = np.array_equal(tensor_values(t), w)
        if not ok:
            fail(f"{name} ({ty.name}): values differ from the checkpoint's")
    print(f"ok: {args.gguf}: {len(got)} tensors ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}), "
          f"metadata and values as llama.cpp's converter and gguf-py write them")


def check_adapter(args):
    reader = gguf.GGUFReader(args.gguf)
    adir = Path(args.adapter)
    acfg = json.loads((adir / "adapter_config.json").read_text())
    config = json.loads(Path(args.config).read_text())
    for key, want in [("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", "llama")]:
        if field(reader, key) != want:
            fail(f"{key} = {field(reader, key)!r}, want {want!r}")
    r, alpha = acfg["r"], acfg["lora_alpha"]
    scale = alpha / np.sqrt(r) if acfg.get("use_rslora") else alpha / r
    got_alpha = float(field(reader, "adapter.lora.alpha"))
    if abs(got_alpha / r - scale) > 1e-5 * scale:
        fail(f"adapter.lora.alpha = {got_alpha}: llama.cpp's alpha/r = {got_alpha / r}, the adapter's scale {scale}")
    peft = load_file(adir / "adapter_model.safetensors")
    got = {t.name: t for t in reader.tensors}
    seen = 0
    for key, w in peft.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        base = key.replace("base_model.model.", "", 1)
        module = base.split(".lora_")[0]
        g = gguf_name(module + ".weight") + (".lora_a" if ".lora_A." in key else ".lora_b")
        if g not in got:
            fail(f"{g} (for {key}) is missing")
        w = w.astype(np.float32)
        n = heads_for(g, config)
        if n is not None and g.endswith(".lora_b"):
            w = permute(w, n)
        v = tensor_values(got[g])
        if v.shape != w.shape or not np.allclose(v, w, rtol=0, atol=1e-3 * (np.abs(w).max() + 1e-12) if got[g].tensor_type != T.F32 else 0):
            fail(f"{g}: differs from {key}")
        seen += 1
    if seen != len(got):
        fail(f"the file holds {len(got)} tensors, the adapter {seen}")
    print(f"ok: {args.gguf}: a llama.cpp LoRA adapter, {seen} tensors, alpha {got_alpha} (scale {scale:.6g})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model")
    m.add_argument("--gguf", required=True)
    m.add_argument("--reference", required=True, help="the merge as f32 safetensors (tinytune merge --dtype f32)")
    a = sub.add_parser("adapter")
    a.add_argument("--gguf", required=True)
    a.add_argument("--adapter", required=True, help="the PEFT adapter directory")
    a.add_argument("--config", required=True, help="the base model's config.json (heads for the q/k permutation)")
    args = p.parse_args()
    check_model(args) if args.what == "model" else check_adapter(args)


if __name__ == "__main__":
    main()
