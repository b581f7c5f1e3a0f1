#!/usr/bin/env python3
"""Gemma 3 parity fixtures: tiny random checkpoints saved by transformers, and reference numbers
for the real Gemma 3 270M Q4_K_M GGUF that scripts/fetch-assets.sh fetches.

- tests/fixtures/tiny-gemma3/: a Gemma3ForCausalLM (3 layers: local, global, local; sliding
  window 3; 4 query heads over 2 key/value heads of width 8; query_pre_attn_scalar 12, not the
  head width; linear RoPE scaling on the global layer; norm weights drawn at random so that
  Gemma's `1 + w` matters) with reference.safetensors as scripts/make_fixtures.py writes it
  (ids, keep-mask, logits with and without padding, losses, a greedy continuation).
- tests/fixtures/tiny-gemma3-gguf/: another tiny Gemma 3 (6 layers, llama.cpp's default
  pattern of five local then one global) written as a GGUF the way llama.cpp's converter writes
  one (gemma3.* metadata, blk.N.* names, every norm weight stored as 1 + w), with the reference
  transformers computes from the Hugging Face weights.
- tests/fixtures/gemma3_reference.json: for the real 270M GGUF, token ids of awkward strings,
  a text's mean NLL, and the greedy answer to a chat prompt, as transformers gives them for the
  same file (dequantised to float32, the tokenizer built from the GGUF).

    /tmp/pyref/bin/pip install torch transformers gguf safetensors
    scripts/fetch-assets.sh && /tmp/pyref/bin/python scripts/make_gemma3_fixtures.py
"""
import json
import os
import pathlib
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_fixtures import OUT, save  # noqa: E402

NAME = "gemma-3-270m-q4_k_m.gguf"
ASSETS = pathlib.Path(os.environ.get("TINYTUNE_ASSETS", pathlib.Path.home() / ".cache" / "tinytune"))

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.\nHowever little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters."
)
# What Gemma 3's own chat template renders for one user turn with the generation prompt.
CHAT_PROMPT = "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
AWKWARD = [
    "Hello world",
    " leading space",
    "   three leading spaces and two  inside",
    "trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "emoji 🤖🦀 and 漢字 and ü ß é",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "<bos>inside text<eos>",
    "\u0001\u007f control bytes",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "1234567890 3.14159 1e-6",
    "",
    "    ",
]


def randomize_norms(model, std=0.3):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, std)


def tiny_hf():
    torch.manual_seed(3)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
        sliding_window=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
        max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.25, pad_token_id=0,
    )
    model = transformers.Gemma3ForCausalLM(cfg)
    randomize_norms(model)
    save(model, "tiny-gemma3", 96)


def tiny_gguf():
    import gguf

    torch.manual_seed(4)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=3, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.25, pad_token_id=0,
    )
    model = transformers.Gemma3ForCausalLM(cfg)
    randomize_norms(model)
    # The reference comes from the Hugging Face weights (save() reloads them in f32).
    save(model, "tiny-gemma3-gguf", 64)
    d = OUT / "tiny-gemma3-gguf"
    for f in ["config.json", "generation_config.json", "model.safetensors"]:
        (d / f).unlink(missing_ok=True)
    w = gguf.GGUFWriter(str(d / "tiny-gemma3.f32.gguf"), "gemma3")
    w.add_uint32("gemma3.context_length", 64)
    w.add_uint32("gemma3.embedding_length", 32)
    w.add_uint32("gemma3.block_count", 6)
    w.add_uint32("gemma3.feed_forward_length", 40)
    w.add_uint32("gemma3.attention.head_count", 2)
    w.add_uint32("gemma3.attention.head_count_kv", 1)
    w.add_uint32("gemma3.attention.key_length", 16)
    w.add_uint32("gemma3.attention.value_length", 16)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("gemma3.rope.freq_base", 1_000_000.0)
    w.add_uint32("gemma3.attention.sliding_window", 3)
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    }
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        x = p.float().numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            x = x + 1.0  # llama.cpp stores Gemma's norms as 1 + w
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module = rest.removesuffix(".weight")
            g = f"blk.{layer}.{names[module]}.weight"
        w.add_tensor(g, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"tiny-gemma3-gguf -> {d}")


def real():
    if not (ASSETS / NAME).exists():
        print(f"skipped the real-model reference: no {ASSETS / NAME} (run scripts/fetch-assets.sh)")
        return
    tok = AutoTokenizer.from_pretrained(ASSETS, gguf_file=NAME)
    model = AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=NAME, dtype=torch.float32).eval()
    ids = tok(TEXT)["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    prompt_ids = tok(CHAT_PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False, max_new_tokens=16, pad_token_id=0,
        )[0, len(prompt_ids):].tolist()
    awkward = [{"text": s, "ids": tok(s)["input_ids"], "decoded": tok.decode(tok(s)["input_ids"], skip_special_tokens=True)} for s in AWKWARD]
    ref = {
        "made_by": f"scripts/make_gemma3_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "text": TEXT,
        "text_ids": ids,
        "mean_nll": loss,
        "chat_prompt": CHAT_PROMPT,
        "chat_prompt_ids": prompt_ids,
        "greedy_ids": out,
        "greedy_text": tok.decode(out, skip_special_tokens=False),
        "awkward": awkward,
    }
    (OUT / "gemma3_reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    print(f"mean NLL {loss:.6f}, {len(ids)} tokens; greedy: {ref['greedy_text']!r}")


if __name__ == "__main__":
    tiny_hf()
    tiny_gguf()
    if "--tiny-only" not in sys.argv:
        real()
