#!/usr/bin/env python3
"""The PyTorch + PEFT reference of `tinytune bench` (and of `cargo bench --bench finetune`).

SmolLM2-135M-Instruct (the project's Q4_1 GGUF from ${TINYTUNE_ASSETS:-~/.cache/tinytune},
dequantised to float32 by transformers, as in scripts/bench_transformers.py; fetch it with
scripts/fetch-assets.sh). The cases are those of `tinytune bench` (src/bin/tinytune/bench.rs):

    lora-step   LoRA r=8, alpha=16, dropout 0 on q_proj and v_proj, AdamW (lr 1e-4, weight
                decay 0.01, betas (0.9, 0.999), eps 1e-8) over the LoRA tensors only; one step
                on 4 x 128 seeded random token ids: forward, mean next-token cross entropy with
                labels = input ids, backward, optimizer step, zero_grad.
    cls-step    the main job's step: the first 16 lines of --data ({"text", "label"}), cut to
                64 tokens and padded to the longest, AutoModelForSequenceClassification
                (2 labels, pad_token_id set) with LoRA r=8 on all seven projections and the
                new `score` head trained (task SEQ_CLS), AdamW as above.
    cls-eval    the same batch forward only, under torch.no_grad(), model.eval().
    prefill     one 512-token sequence forward only (logits of every position).
    decode      64 tokens generated greedily one at a time with the KV cache (past_key_values)
                after a 16-token prompt whose prefill is not timed.
    full-step   full fine-tuning: every weight trainable (float32), 4 x 128 ids as lora-step,
                AdamW lr 2e-5, weight decay 0.01.
    linears     the linear products of one SmolLM2 layer (q, k, v, o, gate, up, down) on 512
                tokens with float32 weights, each as x W^T, dy W and dy^T x (no model loaded).
    attention-T causal scaled_dot_product_attention forward + backward of one SmolLM2 layer
                (9 query heads over 3 key/value heads, width 64, enable_gqa) at T = 128, 512 or
                2048 (no model loaded).

Each case: --warmup untimed repetitions, then --steps timed ones. Prints one JSON line:

    s_per_step      mean wall seconds of a timed repetition
    tokens_per_s    real tokens of a repetition / s_per_step
    peak_rss_mib    the process's peak resident memory during the timed repetitions (VmHWM
                    after resetting it via /proc/self/clear_refs once the model is loaded;
                    null where that is not possible), and peak_rss_total_mib including the load
    torch_threads   torch.get_num_threads() (set to os.cpu_count())
    losses          the loss of every repetition (training cases)
    versions        torch, transformers, peft

    /tmp/pyref/bin/python scripts/bench_peft.py [--case lora-step] [--steps 10 --warmup 2 --device cpu|cuda]

Written against torch 2.15.0, transformers 5.24.0, peft 0.21.2, gguf (transformers' GGUF
loader), Python 3.11.
"""
import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import time

import torch

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS = pathlib.Path(os.environ.get("TINYTUNE_ASSETS", pathlib.Path.home() / ".cache" / "tinytune"))


def vm_kib(field):
    """A `VmXXX:` line of /proc/self/status in KiB, or None off Linux."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); True when it worked."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def kernel_case(args, dev):
    """`linears` and `attention-T`: the products alone, on random float32 operands."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g).to(dev)
    if args.case == "linears":
        rows = 512
        ops = [(randn(rows, i), randn(o, i), randn(rows, o)) for i, o in
               [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]]

        def step():
            for x, w, dy in ops:
                x @ w.T
                dy @ w
                dy.T @ x
        tokens = rows
    else:
        t = int(args.case.split("-")[1])
        q = randn(1, 9, t, 64).requires_grad_()
        k, v = randn(1, 3, t, 64).requires_grad_(), randn(1, 3, t, 64).requires_grad_()

        def step():
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            y.sum().backward()
            for x in (q, k, v):
                x.grad = None
        tokens = t

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    with torch.no_grad() if args.case == "linears" else torch.enable_grad():
        for _ in range(args.warmup):
            step()
        sync()
        rss_reset = reset_peak_rss()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        dt = (time.perf_counter() - t0) / args.steps
    hwm = vm_kib("VmHWM")
    print(json.dumps({
        "case": args.case, "s_per_step": round(dt, 6), "tokens": tokens, "tokens_per_s": round(tokens / dt, 1),
        "peak_rss_mib": round(hwm / 1024, 1) if rss_reset and hwm is not None else None,
        "torch_threads": torch.get_num_threads(), "device": str(dev), "steps": args.steps,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }))


def main():
    ap = argparse.ArgumentParser(description="PyTorch + PEFT reference of tinytune bench")
    ap.add_argument("--case", default="lora-step", choices=["lora-step", "cls-step", "cls-eval", "prefill", "decode", "full-step", "linears",
                                                           "attention-128", "attention-512", "attention-2048"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--data", default=str(ASSETS / "data" / "movie_reviews.train.jsonl"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(os.cpu_count())
    path = ASSETS / NAME
    if not path.is_file():
        sys.exit(f"{path} is missing: run scripts/fetch-assets.sh")
    dev = torch.device(args.device)
    losses = []
    if args.case == "linears" or args.case.startswith("attention-"):
        return kernel_case(args, dev)
    if args.case in ("lora-step", "full-step"):
        model = transformers.AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=NAME, dtype=torch.float32)
        model.config.use_cache = False
        if args.case == "lora-step":
            cfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
            model = get_peft_model(model, cfg)
        model = model.to(dev)
        model.train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(dev)
        inputs, tokens = {"input_ids": ids, "labels": ids}, args.batch * args.seq
    elif args.case in ("cls-step", "cls-eval"):
        tok = transformers.AutoTokenizer.from_pretrained(ASSETS, gguf_file=NAME)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            ASSETS, gguf_file=NAME, dtype=torch.float32, num_labels=2, pad_token_id=pad)
        model.config.use_cache = False
        rows = [json.loads(l) for l in pathlib.Path(args.data).read_text().splitlines() if l.strip()][:16]
        tok.pad_token_id = pad
        enc = tok([r["text"] for r in rows], truncation=True, max_length=64, padding="longest", return_tensors="pt")
        labels = torch.tensor([int(r["label"]) for r in rows])
        cfg = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, cfg).to(dev)
        inputs = {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev), "labels": labels.to(dev)}
        tokens = int(enc["attention_mask"].sum())
        if args.case == "cls-eval":
            model.eval()
        else:
            model.train()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=NAME, dtype=torch.float32).to(dev)
        model.config.use_cache = args.case == "decode"
        model.eval()
        g = torch.Generator().manual_seed(0)
        inputs, tokens = {"input_ids": torch.randint(0, model.config.vocab_size, (1, 512), generator=g).to(dev)}, 512
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    training = args.case in ("lora-step", "cls-step", "full-step")
    lr = 2e-5 if args.case == "full-step" else 1e-4
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01) if training else None
    timed = None
    if args.case == "decode":
        tokens = 64

    def step():
        nonlocal timed
        if args.case == "decode":
            with torch.no_grad():
                out = model(input_ids=inputs["input_ids"][:, :16], use_cache=True)
                pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(tokens):
                    out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
                    pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                int(nxt[0, 0])  # waits for a GPU
                timed = (timed or 0.0) + time.perf_counter() - t0
                return 0.0
        if not training:
            with torch.no_grad():
                logits = model(**inputs).logits
                if args.case == "prefill":
                    # Wait for the logits without reading them, as tinytune's side does.
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    return 0.0
                return float(logits.float().sum())  # float() waits for a GPU
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # .item() also waits for a GPU to finish

    for _ in range(args.warmup):
        losses.append(step())
    rss_reset = reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    timed = None
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    dt = (timed if timed is not None else time.perf_counter() - t0) / args.steps
    hwm = vm_kib("VmHWM")
    out = {
        "case": args.case,
        "s_per_step": round(dt, 4),
        "tokens": tokens,
        "tokens_per_s": round(tokens / dt, 1),
        "peak_rss_mib": round(hwm / 1024, 1) if rss_reset and hwm is not None else None,
        "peak_rss_total_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(dev),
        "warmup": args.warmup,
        "steps": args.steps,
        "trainable_params": n_train,
        "total_params": n_total,
        "losses": [round(v, 5) for v in losses] if training else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    if dev.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name(dev)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
