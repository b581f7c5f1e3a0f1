#!/usr/bin/env python3
"""Check that an adapter directory loads in the Python PEFT library and gives the expected logits.

    check_peft_adapter.py --base DIR --adapter DIR --expect FILE.json [--tol 1e-4] [--all-positions]

DIR (--base) is a transformers checkpoint (config.json + safetensors); --adapter is a PEFT
adapter directory (adapter_config.json + adapter_model.safetensors), e.g. one saved by tinytune.
FILE.json has the layout of tests/fixtures/peft/*/reference.json; only these fields are read:

    input_ids       [batch][seq] ints
    attention_mask  optional [batch][seq] ints (1 = real token); all ones when absent
    logits          {"shape": [...], "data": [flattened row-major floats]}: the expected output
    num_labels      SEQ_CLS only, optional: classes (default: rows of the saved score/classifier)
    pad_token_id    SEQ_CLS only: the id whose trailing positions are padding (transformers pools
                    the last token whose id is not this one)

The model class follows `task_type` in adapter_config.json: CAUSAL_LM (or none) loads
AutoModelForCausalLM, SEQ_CLS loads AutoModelForSequenceClassification. Both run in float32 on
the CPU in eval mode.

Checks, each printed; the exit status is 1 when any fails:
1. every tensor in adapter_model.safetensors was taken up by PEFT: the set of keys PEFT would
   save for the loaded model equals the set in the file, with equal shapes and values (PEFT
   itself only warns about keys it cannot place, which would make a wrong name pass silently);
2. max |logits - expected| <= tol, over positions whose attention_mask is 1 for [batch, seq,
   vocab] logits (padded positions are implementation-defined; --all-positions includes them),
   over everything for [batch, classes] logits.

Written against torch 2.15.0, transformers 5.23.0, peft 0.21.2, safetensors 0.8.0.
"""
import argparse
import json
import pathlib
import sys

import torch


def fail(msg):
    print(f"FAIL: {msg}")
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=pathlib.Path, help="transformers checkpoint directory")
    ap.add_argument("--adapter", required=True, type=pathlib.Path, help="PEFT adapter directory")
    ap.add_argument("--expect", required=True, type=pathlib.Path, help="JSON with input_ids, attention_mask, logits")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed absolute logit difference")
    ap.add_argument("--all-positions", action="store_true", help="also compare logits at padded positions")
    args = ap.parse_args()

    # Imported after argument parsing so that --help is fast.
    import peft
    import transformers
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    for path, what in [(args.base / "config.json", "base config"), (args.adapter / "adapter_config.json", "adapter config"),
                       (args.adapter / "adapter_model.safetensors", "adapter weights"), (args.expect, "expectation")]:
        if not path.is_file():
            print(f"error: {what} {path} does not exist")
            return 2
    expect = json.loads(args.expect.read_text())
    adapter_cfg = json.loads((args.adapter / "adapter_config.json").read_text())
    saved = load_file(str(args.adapter / "adapter_model.safetensors"))
    task = adapter_cfg.get("task_type") or "CAUSAL_LM"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; task {task}")

    kw = {"dtype": torch.float32}
    if task == "SEQ_CLS":
        num_labels = expect.get("num_labels")
        if num_labels is None:
            heads = [v for k, v in saved.items() if k.endswith((".score.weight", ".classifier.weight"))]
            if not heads:
                print("error: SEQ_CLS adapter without a saved score/classifier weight and no num_labels in the expectation")
                return 2
            num_labels = heads[0].shape[0]
        kw.update(num_labels=num_labels, pad_token_id=expect.get("pad_token_id"))
        cls = transformers.AutoModelForSequenceClassification
    elif task == "CAUSAL_LM":
        cls = transformers.AutoModelForCausalLM
    else:
        print(f"error: task_type {task!r} is not handled (CAUSAL_LM or SEQ_CLS)")
        return 2
    torch.manual_seed(0)
    base = cls.from_pretrained(args.base, **kw)
    model = PeftModel.from_pretrained(base, args.adapter).eval()

    ok = True
    # 1. Every saved tensor was placed in the model, under the same key, with the same value.
    loaded = get_peft_model_state_dict(model)
    missing, extra = sorted(set(loaded) - set(saved)), sorted(set(saved) - set(loaded))
    for k in missing:
        ok = fail(f"PEFT expects {k} {list(loaded[k].shape)} but the adapter file lacks it")
    for k in extra:
        ok = fail(f"the adapter file has {k} {list(saved[k].shape)} that PEFT did not place")
    for k in sorted(set(saved) & set(loaded)):
        a, b = saved[k].float(), loaded[k].detach().float().cpu()
        if a.shape != b.shape:
            ok = fail(f"{k}: file shape {list(a.shape)}, model shape {list(b.shape)}")
        elif not torch.equal(a, b):
            ok = fail(f"{k}: the model holds a value other than the file's (max diff {(a - b).abs().max().item():.3g})")
    print(f"adapter tensors: {len(saved)} in the file, {len(loaded)} expected by PEFT, {len(missing) + len(extra)} unmatched")

    # 2. The logits.
    try:
        ids = torch.tensor(expect["input_ids"], dtype=torch.long)
        mask = torch.tensor(expect["attention_mask"], dtype=torch.long) if "attention_mask" in expect else torch.ones_like(ids)
        want = torch.tensor(expect["logits"]["data"], dtype=torch.float32).reshape(expect["logits"]["shape"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        print(f"error: {args.expect}: input_ids / attention_mask / logits {{shape, data}} malformed: {e}")
        return 2
    if ids.ndim != 2 or mask.shape != ids.shape:
        print(f"error: {args.expect}: input_ids {list(ids.shape)} must be [batch, seq] and attention_mask the same shape ({list(mask.shape)})")
        return 2
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits.float()
    if adapter_cfg.get("peft_type") == "PROMPT_TUNING" and got.ndim == 3:
        # PEFT returns the virtual tokens' logits too; tinytune returns the real tokens' only.
        got = got[:, adapter_cfg["num_virtual_tokens"]:]
    if got.shape != want.shape:
        ok = fail(f"logits shape: PEFT gives {list(got.shape)}, expected {list(want.shape)}")
    else:
        diff = (got - want).abs()
        if diff.ndim == 3 and not args.all_positions:
            diff = diff[mask.bool()]
            where = f"{int(mask.sum())} unpadded positions"
        else:
            where = "all positions"
        worst = diff.max().item() if diff.numel() else 0.0
        print(f"logits {list(got.shape)}: max abs diff {worst:.3e} over {where} (tol {args.tol:g})")
        if not worst <= args.tol:  # also catches NaN
            ok = fail(f"max abs diff {worst:.3e} > tol {args.tol:g}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
