#!/usr/bin/env python3
"""Reference outputs for tinytune's quantised formats (tests/quant.rs reads them).

    /tmp/pyref/bin/pip install gguf numpy torch bitsandbytes safetensors
    /tmp/pyref/bin/python scripts/make_quant_fixtures.py

Writes tests/fixtures/quant/reference.safetensors:
- for each GGML block format (Q4_0 ... Q6_K): `{name}.blocks` (u8, the stored bytes of a
  [3, 512] matrix: random code bytes with f16 scales of a sane size, or gguf-py's own
  quantisation for the formats it writes) and `{name}.values` (f32, gguf-py's dequantisation);
- NF4 (bitsandbytes `quantize_4bit(quant_type="nf4", blocksize=64)` on the CPU):
  `nf4.input` [8, 512] f32, `nf4.codes` (packed u8), `nf4.absmax` (f32, single quantisation),
  and with `compress_statistics=True`: `nf4dq.absmax_q` (u8), `nf4dq.absmax_scale` (f32, one
  per 256), `nf4dq.offset` (f32 [1]), `nf4dq.values` (bitsandbytes' dequantisation), and
  `nf4.dynamic_code` (the 256-value code the scales are quantised with).
"""
import pathlib

import bitsandbytes.functional as F
import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "quant" / "reference.safetensors"

# Byte offsets of the f16 scales inside one block.
SCALES = {
    Q.Q4_0: [0], Q.Q5_0: [0], Q.Q8_0: [0], Q.Q4_1: [0, 2], Q.Q5_1: [0, 2],
    Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q6_K: [208],
}


def main():
    rng = np.random.default_rng(11)
    out = {}
    rows, cols = 3, 512
    for qt, fields in SCALES.items():
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        if qt in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
            x = rng.standard_normal((rows, cols)).astype(np.float32)
            x[0, :32] = 0.0
            blocks = gguf.quants.quantize(x, qt)
        else:
            nblk = rows * cols // bs
            blocks = rng.integers(0, 256, size=(nblk, ts), dtype=np.uint8)
            for at in fields:
                d = (0.01 + 0.05 * rng.random(nblk)).astype(np.float16)
                blocks[:, at : at + 2] = d.view(np.uint8).reshape(nblk, 2)
            blocks = blocks.reshape(rows, cols // bs * ts)
        vals = gguf.quants.dequantize(blocks, qt).astype(np.float32).reshape(rows, cols)
        out[f"{qt.name}.blocks"] = np.ascontiguousarray(blocks.reshape(-1))
        out[f"{qt.name}.values"] = np.ascontiguousarray(vals)

    x = torch.from_numpy(rng.standard_normal((8, 512)).astype(np.float32))
    x[0, 5] = 9.0  # an outlier
    x[1, :64] = 0.0  # an all-zero block
    codes, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
    out["nf4.input"] = x.numpy()
    out["nf4.codes"] = codes.reshape(-1).numpy()
    out["nf4.absmax"] = st.absmax.float().numpy()
    codes2, st2 = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(codes, codes2)
    out["nf4dq.absmax_q"] = st2.absmax.reshape(-1).numpy()
    out["nf4dq.absmax_scale"] = st2.state2.absmax.float().numpy()
    out["nf4dq.offset"] = np.array([float(st2.offset)], dtype=np.float32)
    out["nf4dq.values"] = F.dequantize_4bit(codes2, st2, quant_type="nf4").float().numpy()
    out["nf4.dynamic_code"] = st2.state2.code.float().numpy()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(OUT), metadata={"gguf": version("gguf"), "bitsandbytes": version("bitsandbytes")})
    print(f"{len(out)} tensors -> {OUT}")


def version(pkg):
    from importlib.metadata import version as v

    return v(pkg)


if __name__ == "__main__":
    main()
