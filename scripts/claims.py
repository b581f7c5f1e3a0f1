#!/usr/bin/env python3
"""The research methods' claims (issue 12), reproduced on the main job's real data in one run.

    cargo build --release && bash scripts/fetch-assets.sh
    python3 scripts/claims.py                       # everything, into /tmp/tinytune-claims
    python3 scripts/claims.py sb gates layers       # a part: sb (LoRA, LoRA-XS, LoRA-SB),
                                                    # gates (FineGates + compression), layers
    OUT=/tmp/c SPARSITIES=0.2,0.4 GATE_LR_SCALE=100 python3 scripts/claims.py gates
    OUT=/tmp/c REUSE_LORA=1 SB_LR=1e-2 XS_LR=1e-2 REPORT=sb-lr.md python3 scripts/claims.py sb

Every run is `target/release/tinytune finetune` on SmolLM2-135M-Instruct with a new 2-class
head on the movie reviews of scripts/fetch-assets.sh, with the main job's split and budget
(scripts/finetune-demo.sh: the first 800 training and 200 held-out examples of the seeded
order, sequences of ≤ 48 tokens, 50 steps of 16, warm-up 5, linear decay, seed 0, the CPU).
Only the method and its learning rate change. Results: a Markdown report on stdout (and
`$OUT/report.md`, or `$OUT/$REPORT`), the runs' directories under `$OUT`, and `$OUT/gates-scaleS.svg`, the removed
fraction against accuracy over the target sparsities.

- sb: LoRA r=8 on q,v (the main job) against LoRA-XS and LoRA-SB at r=16 on q,v (their
  default rates); the claim: LoRA-SB ≥ LoRA's accuracy with ≥ 20× fewer trainable parameters.
- gates: FineGates' LoRA variant (r=8, gates on all seven projections) at each target
  sparsity in $SPARSITIES; each is merged with --compress and the compressed model is
  evaluated and timed (`tinytune bench --cases prefill`, 512 tokens) beside the merged,
  uncompressed one, alternating, $ROUNDS rounds; the claim: ≥ 20% of the gated weights removed
  with ≤ 1 point lost, and prefill ≥ 15% faster.
- layers: `tinytune select-layers` (256 examples) chooses the blocks; LoRA on them against
  LoRA on every block, both under TINYTUNE_PROFILE=1, whose per-phase table gives the seconds
  spent in backward kernels; the claim: ≥ 30% less backward time per step, ≤ 1 point lost.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
ASSETS = pathlib.Path(os.environ.get("TINYTUNE_ASSETS", pathlib.Path.home() / ".cache" / "tinytune"))
MODEL = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN = ASSETS / "data/movie_reviews.train.jsonl"
EVAL = ASSETS / "data/movie_reviews.eval.jsonl"
BIN = pathlib.Path(os.environ.get("TINYTUNE", ROOT / "target" / "release" / "tinytune"))
OUT = pathlib.Path(os.environ.get("OUT", "/tmp/tinytune-claims"))
DEVICE = os.environ.get("DEVICE", "cpu")
# The main job's split and budget (scripts/finetune-demo.sh).
BUDGET = ["--data", str(TRAIN), "--eval-data", str(EVAL), "--max-train-examples", "800", "--max-eval-examples", "200",
          "--seq-len", "48", "--batch-size", "16", "--warmup", "5", "--schedule", "linear", "--seed", "0"]
if os.environ.get("STEPS"):  # a shorter run, to try the script out (not the claims' budget)
    BUDGET = [("1" if a == "5" and BUDGET[i - 1] == "--warmup" else a) for i, a in enumerate(BUDGET)]
    BUDGET += ["--max-steps", os.environ["STEPS"]]
LORA = ["--method", "lora", "--rank", "8", "--alpha", "16", "--dropout", "0.05", "--target-modules", "q_proj,v_proj", "--lr", "3e-3"]


def log(msg):
    print(f"claims: {msg}", file=sys.stderr, flush=True)


def run(args, out_dir=None, env=None, what=""):
    """Run a tinytune command; its stdout, stderr and wall time. Exits with the command's error."""
    t0 = time.time()
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.time() - t0
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "stdout.txt").write_text(proc.stdout)
        (out_dir / "stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"claims: {what or args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, proc.stderr, wall


def finetune(name, flags, env=None):
    """One training run with the main job's budget; its JSON report and wall time."""
    out = OUT / name
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    log(f"training {name}")
    stdout, stderr, wall = run(["finetune", "--model", str(MODEL), *BUDGET, *flags, "--device", DEVICE, "--out", str(out), "--json"],
                               out, env, f"finetune {name}")
    rep = json.loads(stdout.strip().splitlines()[-1])
    rep["wall_s"] = wall
    rep["stderr"] = stderr
    log(f"{name}: accuracy {100 * rep['after']['accuracy']:.1f}%, {rep['trainable_parameters']:,} trainable, {wall:.0f} s")
    return rep


def pct(x):
    return f"{100 * x:.1f}%"


def part_sb():
    rows = []
    # XS_LR / SB_LR: a rate of their own (default: the methods' defaults, 2e-3).
    rate = lambda var, name: (["--lr", os.environ[var]], f"{name}-lr{os.environ[var]}") if os.environ.get(var) else ([], name)
    (xs_lr, xs_name), (sb_lr, sb_name) = rate("XS_LR", "lora-xs"), rate("SB_LR", "lora-sb")
    for name, flags in [("lora", LORA),
                        (xs_name, ["--method", "lora-xs", "--rank", "16", "--target-modules", "q_proj,v_proj", *xs_lr]),
                        (sb_name, ["--method", "lora-sb", "--rank", "16", "--target-modules", "q_proj,v_proj", *sb_lr])]:
        out = OUT / name / "stdout.txt"
        if name == "lora" and out.exists() and os.environ.get("REUSE_LORA"):  # the same run, kept from before
            rep = json.loads(out.read_text().strip().splitlines()[-1])
            rep["wall_s"] = float("nan")
            rows.append((name, rep))
            continue
        rows.append((name, finetune(name, flags)))
    base = rows[0][1]
    lines = ["## LoRA-SB and LoRA-XS against LoRA", "",
             "| method | accuracy (before → after) | trainable parameters | fewer than LoRA | wall (s) |", "|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {pct(r['before']['accuracy'])} → {pct(r['after']['accuracy'])} | {r['trainable_parameters']:,} | "
                     f"{base['trainable_parameters'] / r['trainable_parameters']:.1f}× | {r['wall_s']:.0f} |")
    sb = rows[2][1]
    holds = sb["after"]["accuracy"] >= base["after"]["accuracy"] and base["trainable_parameters"] >= 20 * sb["trainable_parameters"]
    lines += ["", f"Claim (LoRA-SB ≥ LoRA's accuracy with ≥ 20× fewer parameters): {'holds' if holds else 'does not hold'} here."]
    return lines


def prefill_seconds(model_dir):
    stdout, _, _ = run(["bench", "--model", str(model_dir), "--cases", "prefill", "--steps", "3", "--device", DEVICE, "--json"],
                       what=f"bench {model_dir}")
    rep = json.loads(stdout.strip().splitlines()[-1])
    return find_prefill(rep)


def find_prefill(rep):
    """The prefill case's seconds per step in `tinytune bench --json`'s object."""
    for case in rep.get("cases", []):
        if case.get("case") == "prefill":
            return case["s_per_step"]
    sys.exit(f"claims: no prefill case in the bench's output: {rep}")


def removed_fraction(stdout):
    """The fraction of the blocks' linear weights (all gated here) that `merge --compress`
    removed, from its summary line `linear weights: A -> B (x% removed)`."""
    m = re.search(r"linear weights: ([0-9]+) -> ([0-9]+)", stdout)
    if not m:
        sys.exit(f"claims: merge --compress printed no 'linear weights: A -> B' line:\n{stdout[-2000:]}")
    return 1 - int(m.group(2)) / int(m.group(1))


def evaluate(model_dir):
    """Accuracy of a merged model with the head `merge` wrote beside it, on the whole held-out file."""
    stdout, _, _ = run(["eval", "--model", str(model_dir), "--adapter", str(model_dir / "head"), "--data", str(EVAL),
                        "--device", DEVICE, "--json"], what=f"eval {model_dir}")
    rep = json.loads(stdout.strip().splitlines()[-1])
    return rep["accuracy"], rep["examples"]


def part_gates(lora_accuracy):
    sparsities = [float(s) for s in os.environ.get("SPARSITIES", "0.2,0.4,0.6").split(",")]
    rounds = int(os.environ.get("ROUNDS", "3"))
    rows = []
    for kappa in sparsities:
        scale = os.environ.get("GATE_LR_SCALE", "30")
        name = f"finegates-{kappa:g}" + ("" if scale == "30" else f"-scale{scale}")
        rep = finetune(name, ["--method", "finegates", "--rank", "8", "--alpha", "16", "--target-sparsity", str(kappa),
                              "--gate-lr-scale", scale])
        merged, small = OUT / name / "merged", OUT / name / "compressed"
        run(["merge", "--model", str(MODEL), "--adapter", str(OUT / name / "adapter"), "--out", str(merged)], what="merge")
        stdout, _, _ = run(["merge", "--model", str(MODEL), "--adapter", str(OUT / name / "adapter"), "--compress", "--out", str(small)],
                           OUT / name / "compress", what="merge --compress")
        frac = removed_fraction(stdout)
        acc_full, n_eval = evaluate(merged)
        acc_small, _ = evaluate(small)
        t_full, t_small = [], []
        for _ in range(rounds):  # alternating, so both see the same machine
            t_full.append(prefill_seconds(merged))
            t_small.append(prefill_seconds(small))
        rows.append((kappa, rep, frac, acc_small, min(t_full), min(t_small), acc_full, n_eval))
        log(f"{name}: removed {pct(frac)}, compressed accuracy {pct(acc_small)}, prefill {min(t_full):.3f} → {min(t_small):.3f} s")
    lines = [f"## FineGates (LoRA r=8 variant, --gate-lr-scale {os.environ.get('GATE_LR_SCALE', '30')}): removed fraction, accuracy and prefill speed", "",
             f"LoRA r=8 on q,v at the same budget: {pct(lora_accuracy)}." if lora_accuracy is not None else "",
             "", "Accuracy: the run's own (200 held-out examples), then the merged and the compressed model with the head "
             f"`merge` keeps beside them on the whole held-out file ({rows[0][7] if rows else 0} examples).", "",
             "| target sparsity | weights removed | accuracy (run) | merged → compressed (whole file) | "
             "prefill 512 tokens, merged → compressed (s) | speed-up |", "|---|---|---|---|---|---|"]
    for kappa, rep, frac, acc_small, tf, ts, acc_full, _ in rows:
        lines.append(f"| {kappa:g} | {pct(frac)} | {pct(rep['after']['accuracy'])} | {pct(acc_full)} → {pct(acc_small)} | "
                     f"{tf:.3f} → {ts:.3f} | {tf / ts:.2f}× |")
    svg = OUT / f"gates-scale{os.environ.get('GATE_LR_SCALE', '30')}.svg"
    plot_gates(rows, svg)
    lines += ["", f"![removed fraction against accuracy]({svg.name})"]
    return lines


def plot_gates(rows, path):
    """Removed fraction (x) against compressed accuracy (y), one point per target sparsity."""
    w, h, pad = 480, 320, 50
    xs = [r[2] for r in rows]
    ys = [r[3] for r in rows]
    ylo, yhi = min(ys + [0.5]) - 0.02, max(ys + [0.9]) + 0.02
    px = lambda x: pad + x * (w - 2 * pad)
    py = lambda y: h - pad - (y - ylo) / (yhi - ylo) * (h - 2 * pad)
    pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    dots = "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4"/><text x="{px(x) + 6:.1f}" y="{py(y) - 6:.1f}" '
                   f'font-size="11">κ={r[0]:g}</text>' for x, y, r in zip(xs, ys, rows))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">'
           f'<rect width="{w}" height="{h}" fill="white"/>'
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>'
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>'
           f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle" font-size="12">fraction of gated weights removed</text>'
           f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle" font-size="12">held-out accuracy</text>'
           f'<text x="{pad}" y="{h - pad + 14}" font-size="10">0</text><text x="{w - pad}" y="{h - pad + 14}" font-size="10">1</text>'
           f'<text x="{pad - 4}" y="{py(ylo):.1f}" text-anchor="end" font-size="10">{ylo:.2f}</text>'
           f'<text x="{pad - 4}" y="{py(yhi):.1f}" text-anchor="end" font-size="10">{yhi:.2f}</text>'
           f'<polyline points="{pts}" fill="none" stroke="steelblue"/>{dots}</svg>')
    path.write_text(svg)


def backward_seconds(stderr):
    """Seconds in backward kernels: the sum of the `backward…` phase lines of the profile table."""
    text = stderr.split("phase / kernel")[-1] if "phase / kernel" in stderr else ""
    total, seen = 0.0, False
    for line in text.splitlines()[1:]:
        if line.startswith("backward"):
            total += float(line.split()[1])
            seen = True
    if not seen:
        sys.exit("claims: the run printed no profile table with backward phases (TINYTUNE_PROFILE=1)")
    return total


def part_layers():
    log("select-layers (256 examples)")
    stdout, _, _ = run(["select-layers", "--model", str(MODEL), "--data", str(TRAIN), "--examples", "256", "--device", DEVICE,
                        "--json", "--svg", str(OUT / "layers.svg")], what="select-layers")
    sel = json.loads(stdout.strip().splitlines()[-1])
    chosen, spec = sel["chosen"], sel["layers"]
    rows = []
    for name, extra in [("layers-all", []), ("layers-chosen", ["--layers", spec])]:
        rep = finetune(name, LORA + extra, env={"TINYTUNE_PROFILE": "1"})
        rows.append((name, rep, backward_seconds(rep["stderr"])))
    (_, all_rep, all_bw), (_, sel_rep, sel_bw) = rows
    steps = int(os.environ.get("STEPS", "50"))
    lines = ["## Layer selection", "", f"Chosen by `select-layers` (256 examples): blocks {spec} ({len(chosen)} of 30).", "",
             "| layers | accuracy | trainable parameters | backward kernels per step (s) | wall (s) |", "|---|---|---|---|---|"]
    for name, rep, bw in rows:
        lines.append(f"| {name[7:]} | {pct(rep['after']['accuracy'])} | {rep['trainable_parameters']:,} | {bw / steps:.3f} | {rep['wall_s']:.0f} |")
    saved = 1 - sel_bw / all_bw
    lost = all_rep["after"]["accuracy"] - sel_rep["after"]["accuracy"]
    lines += ["", f"Backward time saved: {pct(saved)}; accuracy lost: {100 * lost:.1f} points. Claim (≥ 30% saved, ≤ 1 point lost): "
              f"{'holds' if saved >= 0.3 and lost <= 0.01 else 'does not hold'} here."]
    return lines


def main():
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    parts = sys.argv[1:] or ["sb", "gates", "layers"]
    for p in parts:
        if p not in ("sb", "gates", "layers"):
            sys.exit(f"claims: unknown part {p!r} (sb, gates, layers)")
    for p in (MODEL, TRAIN, EVAL, BIN):
        if not p.exists():
            sys.exit(f"claims: {p} is missing: run scripts/fetch-assets.sh and cargo build --release first")
    OUT.mkdir(parents=True, exist_ok=True)
    report = [f"# Claims of issue 12, measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({DEVICE})", ""]
    lora_acc = None
    if "sb" in parts:
        report += part_sb() + [""]
        lora_acc = json.loads((OUT / "lora" / "stdout.txt").read_text().strip().splitlines()[-1])["after"]["accuracy"]
    if "gates" in parts:
        report += part_gates(lora_acc) + [""]
    if "layers" in parts:
        report += part_layers() + [""]
    text = "\n".join(report)
    (OUT / os.environ.get("REPORT", "report.md")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
