#!/usr/bin/env python3
"""Make the PEFT adapter fixtures in tests/fixtures/peft/ with the Python `peft` library.

Each fixture `tests/fixtures/peft/<name>/` is an adapter saved by PEFT's `save_pretrained`
(`adapter_config.json` + `adapter_model.safetensors`) on one of the tiny base checkpoints in
tests/fixtures/ (tiny-llama, tiny-gpt2-f16), plus `reference.json`. Three edits after saving:
base_model_name_or_path is made relative to the repository root, target_modules is sorted (PEFT
writes its set in hash order) and the boilerplate model-card README.md is dropped. reference.json:

    base            the base fixture directory, relative to tests/fixtures/
    model_class     the transformers class the adapter was made on
    input_ids       [2][7] ints; row 1 is right-padded after 5 tokens with pad id 0
    attention_mask  [2][7] ints (1 = real token); every logits entry is computed with it
    pad_token_id    0 (the classifier pools the last token whose id is not this)
    logits          {"shape", "data"} adapted model in eval mode (flattened row-major f32)
    logits_merged   the same after `merge_and_unload()` (equal to `logits` up to rounding)
    logits_base     the base model alone (differs: the adapter changes the output)
    loss            eval-mode loss of the adapted model (LM: labels = input ids, padding
                    -100, next-token shift inside transformers; SEQ_CLS: `labels`, mean CE)
    labels          SEQ_CLS only: the class labels used for `loss`
    grads           {saved key: {"shape", "data"}}: d loss / d every trainable tensor, eval mode
                    (no dropout), keyed like the adapter file (DoRA: the weight column norm is
                    detached in PEFT, i.e. treated as a constant in backward)
    scaling         PEFT's LoRA scaling per target module (alpha/r, or alpha/sqrt(r) for rsLoRA)
    adapter_keys    {key: {"shape", "dtype"}} every tensor in adapter_model.safetensors
    notes           what PEFT did that a reader of the format may not expect

Logits at padded positions (row 1, positions 5 and 6) are what transformers computes there
(the padded query still attends the 5 real keys); compare only where attention_mask is 1
if your implementation does something else at padded positions.

Made with torch 2.15.0, transformers 5.23.0, peft 0.21.2, safetensors 0.8.0 (CPU, float32).
Run once and commit the output:

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install torch transformers safetensors peft
    /tmp/pyref/bin/python scripts/make_peft_fixtures.py
"""
import json
import math
import pathlib
import shutil

import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, TaskType, get_peft_model
from safetensors import safe_open

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
OUT = FIXTURES / "peft"
PAD = 0
SEED = 1234


def inputs(vocab):
    """Two rows of 7 ids in 1..vocab; row 1 is right-padded after 5 tokens with PAD."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:] = PAD
    return ids, mask


def flat(t):
    """{"shape", "data"} with each f32 value written with 9 significant digits (round-trips f32)."""
    t = t.detach().float().contiguous()
    return {"shape": list(t.shape), "data": [float(f"{v:.9g}") for v in t.reshape(-1).tolist()]}


def dumps(v, indent=0):
    """JSON with dicts one entry per line and every list on one line (compact, diff-friendly)."""
    if isinstance(v, dict) and v:
        pad = " " * (indent + 1)
        items = [f"{pad}{json.dumps(k)}: {dumps(x, indent + 1)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return json.dumps(v, separators=(",", ":"))


def saved_key(param_name):
    """The key PEFT writes for a trainable parameter: the adapter name `default` is dropped,
    a `modules_to_save` copy is written under the original module's name, and the DoRA
    magnitude `<m>.lora_magnitude_vector.default.weight` as `<m>.lora_magnitude_vector`."""
    name = param_name.replace(".modules_to_save.default.", ".")
    return name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(".default.", ".")


def randomize(model, adapter_name="default"):
    """PEFT starts lora_B at zero (the adapter is then a no-op, a vacuous test). Overwrite A and B
    with seeded N(0, 0.1²) and scale each DoRA magnitude by (1 + 0.1·N(0,1))."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def run(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return out.logits, out.loss


def make(name, base_dir, model_class, config, notes, num_labels=None, base_kwargs=None):
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    cls = getattr(transformers, model_class)
    kw = dict(dtype=torch.float32, **(base_kwargs or {}))
    torch.manual_seed(SEED)  # a classifier head (score) is initialised randomly on load

    def load_base():
        torch.manual_seed(SEED)
        return cls.from_pretrained(FIXTURES / base_dir, **kw).eval()

    base = load_base()
    vocab = base.config.vocab_size
    ids, mask = inputs(vocab)
    if num_labels is None:
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.tensor([2, 0])
    with torch.no_grad():
        logits_base, _ = run(base, ids, mask, labels)

    model = get_peft_model(load_base(), config)
    randomize(model)
    model.eval()
    model.save_pretrained(d, safe_serialization=True)
    # save_pretrained also writes a model-card README.md (boilerplate) and records the absolute
    # path of the base; keep the card out and point at the fixture relative to the repository root.
    (d / "README.md").unlink(missing_ok=True)
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = f"tests/fixtures/{base_dir}"
    # PEFT keeps target_modules as a set and writes it in hash order; sort it so reruns are
    # byte-identical (a reader must treat it as a set either way).
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # Reload what was saved, so the reference is exactly what a reader of the files gets.
    model = peft.PeftModel.from_pretrained(load_base(), d, is_trainable=True).eval()
    for p in model.parameters():
        if p.grad is not None:
            p.grad = None
    logits, loss = run(model, ids, mask, labels)
    loss.backward()
    with safe_open(d / "adapter_model.safetensors", "pt") as f:
        adapter_keys = {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": f.get_slice(k).get_dtype()} for k in sorted(f.keys())}
    grads = {}
    for pname, p in model.named_parameters():
        if p.requires_grad:
            k = saved_key(pname)
            assert k in adapter_keys, f"{name}: trainable {pname} -> {k} is not a saved key"
            assert p.grad is not None, f"{name}: no gradient for {pname}"
            grads[k] = flat(p.grad)
    assert set(grads) == set(adapter_keys), f"{name}: saved keys without gradient: {set(adapter_keys) - set(grads)}"
    scaling = {}
    for mname, m in model.named_modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict) and "default" in m.scaling:
            scaling[mname.removeprefix("base_model.model.")] = m.scaling["default"]

    with torch.no_grad():
        merged = model.merge_and_unload().eval()
        logits_merged, _ = run(merged, ids, mask, labels)

    diff_merge = (logits - logits_merged).abs().max().item()
    diff_base = (logits - logits_base).abs().max().item()
    assert diff_merge < 1e-4, f"{name}: merged differs by {diff_merge}"
    assert diff_base > 1e-2, f"{name}: adapter barely changes the output ({diff_base})"

    ref = {
        "base": base_dir,
        "model_class": model_class,
        "task_type": config.task_type,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "pad_token_id": PAD,
        "logits": flat(logits),
        "logits_merged": flat(logits_merged),
        "logits_base": flat(logits_base),
        "loss": float(f"{loss.item():.9g}"),
        "grads": grads,
        "scaling": scaling,
        "adapter_keys": adapter_keys,
        "max_abs_diff_merged": diff_merge,
        "max_abs_diff_base": diff_base,
        "notes": notes,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "safetensors": safetensors.__version__},
    }
    if num_labels is not None:
        ref["num_labels"] = num_labels
        ref["labels"] = labels.tolist()
    (d / "reference.json").write_text(dumps(ref) + "\n")
    size = sum(f.stat().st_size for f in d.iterdir())
    print(f"{name}: {len(adapter_keys)} tensors, merged diff {diff_merge:.2e}, base diff {diff_base:.3f}, {size / 1024:.0f} KiB")
    for k, v in adapter_keys.items():
        print(f"    {k} {v['shape']} {v['dtype']}")


def main():
    torch.use_deterministic_algorithms(True)
    make(
        "llama-lora",
        "tiny-llama",
        "LlamaForCausalLM",
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
        ["LoRA r=4 alpha=8 on q_proj,v_proj: scaling alpha/r = 2.",
         "lora_A.weight is [r, in], lora_B.weight is [out, r]; v_proj out = 16 (2 kv heads x head_dim 8)."],
    )
    make(
        "llama-rslora-all",
        "tiny-llama",
        "LlamaForCausalLM",
        LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=16, use_rslora=True, layers_to_transform=[0],
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        ["rsLoRA r=4 alpha=16: scaling alpha/sqrt(r) = 8.",
         "layers_to_transform=[0] is written as a list; layers_pattern stays null: PEFT matches the layer "
         "index after the common pattern 'layers' in the module name (model.layers.<i>.). Only layer 0 is adapted."],
    )
    make(
        "llama-dora",
        "tiny-llama",
        "LlamaForCausalLM",
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        ["DoRA r=4 alpha=8: W' = m * (W0 + s B A) / ||W0 + s B A||_row, the norm over each output row "
         "(dim 1 of the [out, in] weight), one magnitude per output feature; the norm is detached in backward.",
         "The magnitude is saved as '<module>.lora_magnitude_vector' (no '.weight' suffix), shape [out]."],
    )
    make(
        "gpt2-lora",
        "tiny-gpt2-f16",
        "GPT2LMHeadModel",
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]),
        ["GPT-2 Conv1D stores weight as [in, out]; fan_in_fan_out=True makes PEFT transpose B A when merging. "
         "lora_A.weight is still [r, in] and lora_B.weight [out, r] (nn.Linear layout), e.g. c_attn A [4, 32], B [96, 4].",
         "target 'c_proj' matches by suffix both attn.c_proj [32->32] and mlp.c_proj [128->32].",
         "The base weights are float16 on disk and loaded as float32."],
    )
    make(
        "llama-seqcls",
        "tiny-llama",
        "LlamaForSequenceClassification",
        LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]),
        ["SEQ_CLS: LlamaForSequenceClassification with num_labels=3, pad_token_id=0; logits are [batch, 3], "
         "taken at the last token whose id is not pad_token_id (row 1: position 4).",
         "The head 'score' (Linear 32->3, no bias) is in modules_to_save and is written as "
         "'base_model.model.score.weight' (the full trained copy, not a LoRA pair).",
         "The score head's initial value is random; the saved copy is what a loader must use."],
        num_labels=3,
        base_kwargs={"num_labels": 3, "pad_token_id": PAD},
    )


if __name__ == "__main__":
    main()
