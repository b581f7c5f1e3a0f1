#!/usr/bin/env python3
"""Reference timings for `cargo bench --bench ops`: the same shapes through NumPy (OpenBLAS) and,
when it is installed, PyTorch (its matmul: MKL or OpenBLAS, as built).

Run it in the same session as the Rust bench and report ratios. OpenBLAS picks its kernel by
CPU type; on these machines the environment may preset OPENBLAS_CORETYPE, which can select a
slow kernel: run once as is and once with OPENBLAS_CORETYPE=Haswell and take the best.
    pip install numpy && python3 scripts/bench_reference.py
"""
import os
import time

import numpy as np


def best_time(f, min_time=1.0, reps_min=3):
    f()
    times, start = [], time.perf_counter()
    while len(times) < reps_min or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def softmax(x):
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def matmuls():
    """(name, make) pairs: make(a, b) returns a function computing a @ b (transposed operands
    as views, as the Rust bench passes them); NumPy always, PyTorch when it is installed."""
    out = [("numpy", lambda a, b: (lambda: a @ b))]
    try:
        import torch

        out.append(("torch", lambda a, b: (lambda x, y: (lambda: x @ y))(torch.from_numpy(a), torch.from_numpy(b))))
    except ImportError:
        pass
    return out


def main():
    rng = np.random.default_rng(0)
    print(f"numpy {np.__version__}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
    for lib, mm in matmuls():
        for n in (256, 512, 1024, 2048):
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            row = []
            for name, x, y in (("nn", a, b), ("nt", a, b.T), ("tn", a.T, b), ("tt", a.T, b.T)):
                f = mm(x, y)
                row.append(f"{name} {2 * n**3 / best_time(f) / 1e9:6.1f}")
            print(f"{lib} matmul_f32 {n}: " + "  ".join(row) + "  GFLOP/s")
        for fan_in, fan_out in ((576, 576), (576, 192), (576, 1536), (1536, 576)):
            x = rng.standard_normal((512, fan_in), dtype=np.float32)
            w = rng.standard_normal((fan_out, fan_in), dtype=np.float32)
            dy = rng.standard_normal((512, fan_out), dtype=np.float32)
            flop = 2 * 512 * fan_in * fan_out
            row = [f"{name} {flop / best_time(mm(p, q)) / 1e9:6.1f}" for name, p, q in (("forward", x, w.T), ("dx", dy, w), ("dw", dy.T, x))]
            print(f"{lib} linear_f32 {fan_in}x{fan_out}: " + "  ".join(row) + "  GFLOP/s")
    for name, shape in (("softmax_attn_4x9x256x256", (4, 9, 256, 256)), ("softmax_logits_256x49152", (256, 49152))):
        x = rng.standard_normal(shape, dtype=np.float32)
        t = best_time(lambda: softmax(x))
        print(f"{name}: {x.size * 8 / t / 1e9:7.2f} GB/s")
    for rows, d in ((2048, 576), (2048, 2048)):
        x = rng.standard_normal((rows, d), dtype=np.float32)
        w = rng.standard_normal(d, dtype=np.float32)
        b = rng.standard_normal(d, dtype=np.float32)
        t = best_time(lambda: layer_norm(x, w, b))
        print(f"layer_norm_{rows}x{d}: {x.size * 8 / t / 1e9:7.2f} GB/s")


if __name__ == "__main__":
    main()
