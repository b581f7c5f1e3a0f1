#!/usr/bin/env python3
"""The reference for `cargo bench --bench generate`: prefill and decode tokens/s and peak
memory of a fetched GGUF (default SmolLM2-135M-Instruct Q4_1; `--model gemma-3-270m-q4_k_m.gguf`
for Gemma 3) dequantised to float32, through `transformers` on the CPU, same prompt length,
decode length and best-of-3 protocol.

    /tmp/pyref/bin/python scripts/bench_transformers.py [--model FILE]
"""
import os
import pathlib
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM

NAME = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS = pathlib.Path(os.environ.get("TINYTUNE_ASSETS", pathlib.Path.home() / ".cache" / "tinytune"))


def main():
    model = AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=NAME, dtype=torch.float32).eval()
    prompt_len, decode_len = 128, 32
    ids = torch.tensor([[100 + (i * 37) % 4000 for i in range(prompt_len)]])
    best_p, best_d = float("inf"), float("inf")
    with torch.no_grad():
        for _ in range(4):
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            for _ in range(decode_len):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{NAME}: transformers {torch.get_num_threads()} threads: prefill {prompt_len / best_p:.1f} tok/s, "
          f"decode {decode_len / best_d:.1f} tok/s, peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
