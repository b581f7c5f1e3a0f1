#!/usr/bin/env python3
"""Every fine-tuning method on the same real task, in one run: a Markdown table of the result
(accuracy or held-out NLL), trainable parameters, seconds per step and peak memory.

    python3 scripts/compare-methods.py reviews   # movie-review sentiment (the main job's task)
    python3 scripts/compare-methods.py austen    # Jane Austen language modelling
    STEPS=50 TRAIN=800 python3 scripts/compare-methods.py reviews

Runs `target/release/tinytune finetune --json` once per method (build it first:
`cargo build --release`) on SmolLM2-135M-Instruct and the data of scripts/fetch-assets.sh,
with the same data, steps, batch and seed for all; only the learning rate is per method
(the values below, not tuned per run). Seconds per step: the mean step time from
metrics.jsonl (evaluation excluded); peak memory: the process's peak RSS.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
ASSETS = pathlib.Path(os.environ.get("TINYTUNE_ASSETS", pathlib.Path.home() / ".cache" / "tinytune"))
MODEL = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
BIN = ROOT / "target" / "release" / "tinytune"

# name, flags, learning rate
METHODS = [
    ("LoRA r=8 (q,v)", ["--method", "lora", "--rank", "8", "--alpha", "16", "--target-modules", "q_proj,v_proj"], 3e-3),
    ("DoRA r=8 (q,v)", ["--method", "dora", "--rank", "8", "--alpha", "16", "--target-modules", "q_proj,v_proj"], 3e-3),
    ("prefix p=10", ["--method", "prefix", "--num-virtual-tokens", "10"], 3e-2),
    ("prompt p=10", ["--method", "prompt", "--num-virtual-tokens", "10"], 3e-2),
    ("IA3", ["--method", "ia3"], 3e-2),
    ("Houlsby (rf 16)", ["--method", "adapter", "--adapter-kind", "houlsby"], 3e-3),
    ("Pfeiffer (rf 16)", ["--method", "adapter", "--adapter-kind", "pfeiffer"], 3e-3),
    ("head only", ["--method", "head"], 1e-2),
]


def main():
    task = sys.argv[1] if len(sys.argv) > 1 else "reviews"
    steps = os.environ.get("STEPS", "25")
    out_root = pathlib.Path(os.environ.get("OUT", "/tmp/tinytune-compare")) / task
    if task == "reviews":
        data = ["--data", str(ASSETS / "data/movie_reviews.train.jsonl"), "--eval-data", str(ASSETS / "data/movie_reviews.eval.jsonl"),
                "--max-train-examples", os.environ.get("TRAIN", "400"), "--max-eval-examples", os.environ.get("EVAL", "200"),
                "--seq-len", "48", "--batch-size", "16"]
        methods = METHODS
    elif task == "austen":
        data = ["--data", str(ASSETS / "data/austen.jsonl"), "--max-train-examples", os.environ.get("TRAIN", "400"),
                "--max-eval-examples", os.environ.get("EVAL", "100"), "--seq-len", "64", "--batch-size", "8"]
        methods = [m for m in METHODS if m[0] != "head only"]
    else:
        sys.exit(f"unknown task {task!r} (reviews or austen)")
    for p in (MODEL, BIN):
        if not p.exists():
            sys.exit(f"{p} is missing: run scripts/fetch-assets.sh and cargo build --release first")
    rows = []
    for name, flags, lr in methods:
        out = out_root / name.split()[0].lower()
        args = [str(BIN), "finetune", "--model", str(MODEL), *data, *flags, "--lr", str(lr), "--max-steps", steps,
                "--warmup", "3", "--seed", "0", "--device", os.environ.get("DEVICE", "cpu"), "--out", str(out), "--json"]
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        out.mkdir(parents=True)
        t0 = time.time()
        with open(out / "stdout.txt", "w") as so, open(out / "stderr.txt", "w") as se:
            child = subprocess.Popen(args, stdout=so, stderr=se)
            _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS (KiB)
        wall = time.time() - t0
        peak = usage.ru_maxrss
        if status != 0:
            print(f"{name}: failed\n{(out / 'stderr.txt').read_text()[-2000:]}", file=sys.stderr)
            continue
        rep = json.loads((out / "stdout.txt").read_text().strip().splitlines()[-1])
        steps_rec = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in l and '"eval"' not in l]
        times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps_rec, steps_rec[1:])]
        per_step = sum(times) / len(times) if times else float("nan")
        b, a = rep["before"], rep["after"]
        if a.get("accuracy") is not None:
            result = f"{100 * b['accuracy']:.1f}% → {100 * a['accuracy']:.1f}%"
        else:
            result = f"{b['loss']:.3f} → {a['loss']:.3f}"
        rows.append((name, result, rep["trainable_parameters"], per_step, peak / 1024, wall))
        print(f"{name}: {result}, {rep['trainable_parameters']} trainable, {per_step:.2f} s/step, wall {wall:.0f} s", file=sys.stderr)
    what = "accuracy (before → after)" if task == "reviews" else "held-out NLL (before → after)"
    print(f"| method | {what} | trainable parameters | s / step | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for name, result, n, s, mib, _ in rows:
        print(f"| {name} | {result} | {n:,} | {s:.2f} | {mib:.0f} |")


if __name__ == "__main__":
    main()
