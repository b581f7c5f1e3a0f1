#!/usr/bin/env python3
"""Make the small model-parity fixtures in tests/fixtures/ with the Hugging Face stack.

Each fixture is a tiny randomly initialised checkpoint saved by `transformers`
(config.json + model.safetensors) and `reference.safetensors` holding fixed input ids, a
padding keep-mask, and the logits `transformers` computes for them. The Rust tests load the
checkpoint and must reproduce the logits. Run once and commit the output (torch is large):

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install torch transformers safetensors
    /tmp/pyref/bin/python scripts/make_fixtures.py
"""
import pathlib

import torch
import transformers
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def inputs(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    keep = torch.ones(2, 7, dtype=torch.long)
    keep[1, 5:] = 0  # the second row is right-padded after 5 tokens
    return ids, keep


def save(model, name, vocab, dtype=None):
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model.to(dtype)  # store the weights in a storage dtype
    model.save_pretrained(d, safe_serialization=True)
    # The reference reloads what was saved, in f32: the same rounded weights tinytune reads,
    # and buffers (RoPE frequencies) recomputed in full precision.
    model = type(model).from_pretrained(d, dtype=torch.float32).eval()
    ids, keep = inputs(vocab)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        masked = model(input_ids=ids, attention_mask=keep).logits
        # Mean next-token NLL as `transformers` reports it (labels = input ids; padding = -100).
        loss = model(input_ids=ids, labels=ids).loss
        labels = ids.masked_fill(keep == 0, -100)
        loss_masked = model(input_ids=ids, attention_mask=keep, labels=labels).loss
        # Greedy continuation of the first 5 ids (min_new_tokens keeps EOS from stopping it).
        prompt = ids[:1, :5]
        greedy = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0
        )[0, 5:]
    save_file(
        {
            "ids": ids.to(torch.int32).contiguous(),
            "keep": keep.to(torch.int32).contiguous(),
            "logits": full.float().contiguous(),
            "logits_masked": masked.float().contiguous(),
            "greedy": greedy.to(torch.int32).contiguous(),
            "loss": loss.reshape(1).float(),
            "loss_masked": loss_masked.reshape(1).float(),
        },
        str(d / "reference.safetensors"),
        metadata={"transformers": transformers.__version__, "torch": torch.__version__},
    )
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {d}")


def main():
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=False,
        initializer_range=0.25,  # large enough that logits differ clearly between tokens
    )
    save(transformers.LlamaForCausalLM(llama), "tiny-llama", 96)

    torch.manual_seed(1)
    tied = transformers.LlamaConfig(
        vocab_size=80, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
        num_attention_heads=3, num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
        rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.25,
    )
    save(transformers.LlamaForCausalLM(tied), "tiny-llama-tied-bf16", 80, dtype=torch.bfloat16)

    torch.manual_seed(2)
    gpt2 = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.25)
    save(transformers.GPT2LMHeadModel(gpt2), "tiny-gpt2-f16", 96, dtype=torch.float16)


if __name__ == "__main__":
    main()
