#!/usr/bin/env python3
"""Make the GGUF test fixtures with the `gguf` Python package (gguf-py, llama.cpp's own writer).

    /tmp/pyref/bin/pip install gguf            # beside torch, transformers, safetensors
    /tmp/pyref/bin/python scripts/make_gguf_fixtures.py          # the committed fixtures
    /tmp/pyref/bin/python scripts/make_gguf_fixtures.py smollm2  # the SmolLM2 reference NLL

Committed outputs:
- tests/fixtures/gguf/types.gguf: tensors in F32, F16, BF16, Q8_0, Q4_0, Q4_1 with odd shapes,
  metadata of every value type (nested arrays too), `general.alignment` = 64 (not the default).
  tests/fixtures/gguf/types.reference.safetensors: gguf-py's dequantisation of each tensor (f32,
  PyTorch axis order), which tinytune must reproduce.
- tests/fixtures/tiny-llama-gguf/*.gguf: the tiny-llama checkpoints of make_fixtures.py written
  as llama.cpp's converter writes them (tensor names, reversed dims, q/k rows permuted for its
  RoPE layout, llama.* metadata, a made-up tokenizer vocabulary). tests/fixtures/<hf dir>/
  reference.safetensors holds the logits transformers computed; loading the GGUF must give them.

`smollm2` prints the mean NLL that transformers computes on SmolLM2-135M-Instruct.Q4_1.gguf
(fetched by scripts/fetch-assets.sh) for fixed token ids; tests/gguf.rs hard-codes it.
"""
import json
import os
import pathlib
import sys

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


def types_fixture():
    out = FIX / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(out / "types.gguf", arch="test")
    w.add_custom_alignment(64)
    # One key of each value type, and arrays (of numbers, strings, bools, nested arrays).
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 1.5)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo, 世界 🌍")
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", -2.25e-300)
    w.add_array("test.array_i32", [1, -2, 3])
    w.add_array("test.array_f32", [0.5, -0.25])
    w.add_array("test.array_str", ["a", "", "ü"])
    w.add_array("test.array_bool", [True, False])
    w.add_array("test.array_nested", [[1, 2], [3]])

    rng = np.random.default_rng(0)

    def randn(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        x.flat[0] = 7.0  # an outlier, so blocks use their whole range
        return x

    # (name, numpy shape in PyTorch order = reversed ggml ne, type). Quantised rows (the last
    # axis) must be whole blocks of 32.
    specs = [
        ("f32", (3, 5, 7), Q.F32),
        ("f16", (13, 11), Q.F16),
        ("bf16", (9, 2), Q.BF16),
        ("q8_0", (3, 96), Q.Q8_0),
        ("q8_0_1d", (64,), Q.Q8_0),
        ("q4_0", (5, 64), Q.Q4_0),
        ("q4_1", (7, 32), Q.Q4_1),
        ("q4_1_3d", (2, 3, 64), Q.Q4_1),
    ]
    ref = {}
    for name, shape, qtype in specs:
        x = randn(*shape)
        if qtype in (Q.Q4_0, Q.Q4_1):
            x[-1, :32] = 0.0  # an all-zero block (d = 0)
        if qtype == Q.Q4_1:
            x[0, 32 % shape[-1] :] += 3.0  # a block with a large minimum m
        data = gguf.quants.quantize(x, qtype)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        ref[name] = np.ascontiguousarray(gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(ref, str(out / "types.reference.safetensors"), metadata={"gguf": gguf_version()})
    print(f"types.gguf: {len(specs)} tensors -> {out}")


def gguf_version():
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:
        return "unknown"


def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders the rows of q_proj (n_head = attention heads) and k_proj
    (n_head = KV heads): within each head of d rows, HF row j·d/2 + i (j ∈ {0, 1}, i < d/2)
    becomes row 2i + j, i.e. the two rotated halves are interleaved pairwise. As an array op:
    reshape [n_head, 2, d/2, in], swap axes 1 and 2, reshape back."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_gguf(hf_dir: pathlib.Path, out_path: pathlib.Path, storage: Q):
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"]
    vocab = cfg["vocab_size"]
    w = gguf.GGUFWriter(out_path, arch="llama")
    w.add_name(hf_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(d)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    head_dim = cfg.get("head_dim") or d // heads
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta", 10000.0)
    w.add_rope_freq_base(theta)
    w.add_file_type(0 if storage == Q.F32 else 32)  # ALL_F32 / MOSTLY_BF16
    # A made-up vocabulary, so the tokenizer metadata has something to carry.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)]
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(["t 1", "t 2", "t1 0"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    rename = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, t in sd.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.get("tie_word_embeddings"):
                continue
            gname = "output.weight"
        else:
            parts = name.split(".")  # model.layers.N.<module...>.weight
            module = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{rename[module]}.weight"
        if ".attn_q." in gname:
            t = torch.from_numpy(permute_for_llama_cpp(t.float().numpy(), heads)).to(t.dtype)
        elif ".attn_k." in gname:
            t = torch.from_numpy(permute_for_llama_cpp(t.float().numpy(), kv)).to(t.dtype)
        # Norms stay F32 as llama.cpp keeps them; the rest in the storage type.
        if t.ndim == 1 or storage == Q.F32:
            w.add_tensor(gname, t.float().numpy())
        else:
            assert t.dtype == torch.bfloat16, "BF16 storage expects a bf16 checkpoint"
            bits = t.contiguous().view(torch.int16).numpy().view(np.uint8).reshape(t.shape[0], -1)
            w.add_tensor(gname, bits, raw_shape=bits.shape, raw_dtype=Q.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{out_path.name} <- {hf_dir.name}")


# The SmolLM2 check: fixed token ids, obtained once from the tokenizer transformers builds from
# the GGUF for the text below, and the mean NLL of ids[1:] given ids[:-1].
SMOL_TEXT = "The quick brown fox jumps over the lazy dog. Rust is a systems programming language that runs blazingly fast and prevents segfaults."


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = pathlib.Path(os.environ.get("TINYTUNE_ASSETS", pathlib.Path.home() / ".cache" / "tinytune"))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (assets / name).exists():
        sys.exit(f"{assets / name} missing: run scripts/fetch-assets.sh")
    tok = AutoTokenizer.from_pretrained(assets, gguf_file=name)
    ids = tok(SMOL_TEXT)["input_ids"][:20]
    model = AutoModelForCausalLM.from_pretrained(assets, gguf_file=name, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
    print("ids =", ids)
    print(f"mean NLL = {out.loss.item():.6f}")
    print("greedy next tokens =", out.logits[0].argmax(-1).tolist())


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1:] == ["smollm2"]:
        smollm2()
    else:
        types_fixture()
        (FIX / "tiny-llama-gguf").mkdir(parents=True, exist_ok=True)
        llama_gguf(FIX / "tiny-llama", FIX / "tiny-llama-gguf" / "tiny-llama.f32.gguf", Q.F32)
        llama_gguf(FIX / "tiny-llama-tied-bf16", FIX / "tiny-llama-gguf" / "tiny-llama-tied.bf16.gguf", Q.BF16)
