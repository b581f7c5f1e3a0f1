#!/usr/bin/env python3
"""Reference numbers for the real-model tests (tests/real_model.rs) on SmolLM2-135M-Instruct.

transformers loads the same Q4_1 GGUF that scripts/fetch-assets.sh fetches (dequantised to
float32) with the tokenizer it builds from the GGUF, and records for a fixed text its token
ids (special tokens added as the tokenizer's default does) and its mean NLL as `loss` with
labels = input_ids, and for a fixed chat prompt the greedy continuation. Output:
tests/fixtures/smollm2_reference.json (small; the model itself is never committed).

    /tmp/pyref/bin/pip install torch transformers gguf accelerate
    scripts/fetch-assets.sh && /tmp/pyref/bin/python scripts/make_smollm2_reference.py
"""
import json
import os
import pathlib

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS = pathlib.Path(os.environ.get("TINYTUNE_ASSETS", pathlib.Path.home() / ".cache" / "tinytune"))
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2_reference.json"

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.\nHowever little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters."
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def main():
    tok = AutoTokenizer.from_pretrained(ASSETS, gguf_file=NAME)
    model = AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=NAME, dtype=torch.float32).eval()
    ids = tok(TEXT)["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id or 0,
        )[0, len(prompt_ids):].tolist()
    ref = {
        "made_by": f"scripts/make_smollm2_reference.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "text": TEXT,
        "text_ids": ids,
        "mean_nll": loss,
        "chat_prompt": prompt,
        "chat_prompt_ids": prompt_ids,
        "greedy_ids": out,
        "greedy_text": tok.decode(out, skip_special_tokens=False),
    }
    OUT.write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    print(f"mean NLL {loss:.6f}, {len(ids)} tokens; greedy: {ref['greedy_text']!r}")


if __name__ == "__main__":
    main()
