#!/usr/bin/env python3
"""Checksums of gguf-py's dequantisation of every tensor of the real GGUF files that
scripts/fetch-assets.sh fetches, for tests/gguf.rs to check tinytune's decoders against bit for
bit on real blocks (the committed fixtures of make_quant_fixtures.py are small and made up).

    python3 -m venv /tmp/gg && /tmp/gg/bin/pip install gguf numpy
    /tmp/gg/bin/python scripts/make_real_gguf_checksums.py   # writes tests/fixtures/gguf/real-checksums.json

For each tensor: its GGML type, element count, and
    checksum = Σ_i bits(x_i) · ((2i + 1) · 0x9E3779B97F4A7C15)   (mod 2^64)
over the f32 values x_i in the file's row-major order (bits: the IEEE-754 word). The factor is
odd, so a change in any one value's bits changes the checksum; it depends on the position, so
a reordering does too. `sum` (float64) is there to say how far off a mismatch is.
"""
import json
import pathlib
import sys

import gguf
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
ASSETS = pathlib.Path.home() / ".cache" / "tinytune"
FILES = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]
K = np.uint64(0x9E3779B97F4A7C15)


def checksum(x: np.ndarray) -> int:
    bits = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    i = np.arange(bits.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return int(np.sum(bits * ((np.uint64(2) * i + np.uint64(1)) * K), dtype=np.uint64))


def main():
    import os
    assets = pathlib.Path(os.environ.get("TINYTUNE_ASSETS", ASSETS))
    out = {}
    for name in FILES:
        r = gguf.GGUFReader(assets / name)
        tensors = {}
        for t in r.tensors:
            x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            tensors[t.name] = {
                "type": t.tensor_type.name,
                "elements": int(x.size),
                "checksum": str(checksum(x)),
                "sum": float(x.astype(np.float64).sum()),
            }
        out[name] = tensors
        print(f"{name}: {len(tensors)} tensors", file=sys.stderr)
    path = ROOT / "tests" / "fixtures" / "gguf" / "real-checksums.json"
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
