#!/usr/bin/env python3
"""Make the PEFT adapter fixtures in tests/fixtures/peft/ with the Python `peft` library.

Each fixture `tests/fixtures/peft/<name>/` is an adapter saved by PEFT's `save_pretrained`
(`adapter_config.json` + `adapter_model.safetensors`) on one of the tiny base checkpoints in
tests/fixtures/ (tiny-llama, tiny-gpt2-f16), plus `reference.json`. Three edits after saving:
base_model_name_or_path is made relative to the repository root, target_modules (and IA3's
feedforward_modules) is sorted (PEFT writes its set in hash order) and the boilerplate model-card
README.md is dropped. reference.json:

    base            the base fixture directory, relative to tests/fixtures/
    model_class     the transformers class the adapter was made on
    input_ids       [2][7] ints; row 1 is right-padded after 5 tokens with pad id 0
    attention_mask  [2][7] ints (1 = real token); every logits entry is computed with it
    pad_token_id    0 (the classifier pools the last token whose id is not this)
    logits          {"shape", "data"} adapted model in eval mode (flattened row-major f32);
                    prompt tuning: only the 7 real positions (PEFT returns p + 7, see logits_virtual)
    logits_virtual  prompt tuning only: PEFT's logits at the p virtual-token positions, [2, p, vocab]
    logits_merged   LoRA and IA3 only: the same after `merge_and_unload()` (equal to `logits` up to
                    rounding); prefix and prompt tuning have nothing to merge
    logits_base     the base model alone (differs: the adapter changes the output)
    loss            eval-mode loss of the adapted model (LM: labels = input ids, padding
                    -100, next-token shift inside transformers; SEQ_CLS: `labels`, mean CE;
                    prompt tuning: PEFT prepends p labels -100, see its notes)
    labels          SEQ_CLS only: the class labels used for `loss`
    grads           {saved key: {"shape", "data"}}: d loss / d every trainable tensor, eval mode
                    (no dropout), keyed like the adapter file (DoRA: the weight column norm is
                    detached in PEFT, i.e. treated as a constant in backward; prefix and prompt
                    tuning: the one key `prompt_embeddings`, taken with the adapter loaded for
                    inference and its gradient switched on, since PEFT will not load a prompt-
                    learning adapter as trainable)
    scaling         LoRA only: PEFT's scaling per target module (alpha/r, or alpha/sqrt(r) for rsLoRA)
    num_virtual_tokens  prefix and prompt tuning only: p
    adapter_keys    {key: {"shape", "dtype"}} every tensor in adapter_model.safetensors
    notes           what PEFT did that a reader of the format may not expect

Logits at padded positions (row 1, positions 5 and 6) are what transformers computes there
(the padded query still attends the 5 real keys, and with a prefix the p prefix keys too);
compare only where attention_mask is 1 if your implementation does something else at padded
positions.

Fixtures: llama-lora, llama-rslora-all, llama-dora, gpt2-lora, llama-seqcls (LoRA variants);
llama-prefix, gpt2-prefix (prefix tuning, p = 3, no projection); llama-prompt (prompt tuning,
p = 3, RANDOM init); llama-ia3, gpt2-ia3 (IA3). The prefix and prompt embeddings are re-drawn
N(0, 0.5²) and the IA3 vectors 1 + N(0, 0.3²), seeded, since PEFT's default init would leave the
output (nearly) unchanged. The prefix and prompt fixtures are also checked here against the base
model fed the documented layout by hand (and llama-prefix against a plain-torch forward), so the
conventions in their notes are asserted, not only observed.

Made with torch 2.15.0, transformers 5.23.0, peft 0.21.2, safetensors 0.8.0 (CPU, float32).
Run once and commit the output; name fixtures to make only those (no name: all of them):

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install torch transformers safetensors peft
    /tmp/pyref/bin/python scripts/make_peft_fixtures.py [NAME ...] [--out DIR]
"""
import argparse
import json
import math
import pathlib
import shutil

import peft
import safetensors
import torch
import torch.nn.functional as F
import transformers
from peft import IA3Config, LoraConfig, PeftType, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from peft.tuners.prompt_tuning import PromptTuningInit
from safetensors import safe_open
from transformers import DynamicCache

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
    a `modules_to_save` copy is written under the original module's name, the DoRA
    magnitude `<m>.lora_magnitude_vector.default.weight` as `<m>.lora_magnitude_vector`, an IA3
    vector `<m>.ia3_l.default` as `<m>.ia3_l`, and a prefix or prompt embedding
    `prompt_encoder.default.embedding.weight` as `prompt_embeddings`."""
    if param_name.startswith("prompt_encoder."):
        return "prompt_embeddings"
    name = param_name.replace(".modules_to_save.default.", ".")
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(".default.", ".")
    return name.removesuffix(".default")


def randomize(model, adapter_name="default"):
    """PEFT starts lora_B at zero (the adapter is then a no-op, a vacuous test). Overwrite A and B
    with seeded N(0, 0.1²) and scale each DoRA magnitude by (1 + 0.1·N(0,1)). IA3 vectors start at
    exactly 1 (a no-op too): draw them as 1 + N(0, 0.3²). Prefix and prompt embeddings: N(0, 0.5²),
    so the p virtual tokens visibly change the logits."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith(".ia3_l.default"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.startswith("prompt_encoder."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def run(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return out.logits, out.loss


def kv_heads(cfg):
    """(number of K/V heads, head_dim) of a base config (GPT-2 has neither field: no GQA)."""
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def prefix_kv(emb, layers, heads, head_dim, batch):
    """The documented prefix layout: prompt_embeddings [p, layers*2*heads*head_dim] -> per layer
    (K, V), each [batch, heads, p, head_dim]. Column ((l*2 + i)*heads + h)*head_dim + d of row j is
    layer l's key (i = 0) or value (i = 1), K/V head h, prefix slot j, component d. (PEFT spells it
    view [batch, p, layers*2, heads, head_dim], permute (2, 0, 3, 1, 4), split into pairs.)"""
    p = emb.shape[0]
    t = emb.view(p, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)  # [layers, 2, heads, p, head_dim]
    return [(t[l, 0].expand(batch, -1, -1, -1), t[l, 1].expand(batch, -1, -1, -1)) for l in range(layers)]


def llama_prefix_forward(base, ids, mask, kv, p, rotate_prefix=False):
    """Plain-torch LLaMA forward with a K/V prefix, written from the conventions in llama-prefix's
    notes: real tokens at positions p.., prefix keys not rotated (rotate_prefix=True rotates them as
    if at positions 0..p-1, to show that this is distinguishable), every query sees all p prefix
    slots, K/V head h serves query heads h*rep .. h*rep+rep-1."""
    cfg, sd = base.config, base.state_dict()
    nh, (kvh, hd) = cfg.num_attention_heads, kv_heads(cfg)
    b, s = ids.shape
    inv = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)

    def rope(x, start):
        ang = torch.arange(start, start + x.shape[2], dtype=torch.float32)[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        return x * ang.cos() + torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1) * ang.sin()

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def lin(x, key):
        return x @ sd[key].T

    keys_ok = torch.cat([torch.ones(b, p, dtype=torch.bool), mask.bool()], 1)  # [b, p+s]
    allowed = torch.ones(s, p + s, dtype=torch.bool).tril(p)[None] & keys_ok[:, None, :]  # query i: keys <= p+i
    h = sd["model.embed_tokens.weight"][ids]
    for l in range(cfg.num_hidden_layers):
        pre = f"model.layers.{l}."
        x = rms(h, sd[pre + "input_layernorm.weight"])
        q = lin(x, pre + "self_attn.q_proj.weight").view(b, s, nh, hd).transpose(1, 2)
        k = lin(x, pre + "self_attn.k_proj.weight").view(b, s, kvh, hd).transpose(1, 2)
        v = lin(x, pre + "self_attn.v_proj.weight").view(b, s, kvh, hd).transpose(1, 2)
        pk, pv = kv[l]
        k = torch.cat([rope(pk, 0) if rotate_prefix else pk, rope(k, p)], 2).repeat_interleave(nh // kvh, 1)
        v = torch.cat([pv, v], 2).repeat_interleave(nh // kvh, 1)
        att = (rope(q, p) @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        h = h + lin((att @ v).transpose(1, 2).reshape(b, s, nh * hd), pre + "self_attn.o_proj.weight")
        x = rms(h, sd[pre + "post_attention_layernorm.weight"])
        mlp = F.silu(lin(x, pre + "mlp.gate_proj.weight")) * lin(x, pre + "mlp.up_proj.weight")
        h = h + lin(mlp, pre + "mlp.down_proj.weight")
    return lin(rms(h, sd["model.norm.weight"]), "lm_head.weight")


def check_prefix(name, base, ids, mask, labels, logits, loss, grad, emb, p):
    """The base model fed the saved prefix by hand (documented layout, mask with p leading ones)
    reproduces PEFT's logits, loss and prompt_embeddings gradient with position ids p.., not with
    0..; for LLaMA also a plain-torch forward with unrotated prefix keys, and not with rotated ones."""
    cfg = base.config
    heads, head_dim = kv_heads(cfg)
    assert emb.shape == (p, cfg.num_hidden_layers * 2 * heads * head_dim), f"{name}: prompt_embeddings {emb.shape}"
    b, s = ids.shape
    full_mask = torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], 1)

    def at(start, e):
        cache = DynamicCache(prefix_kv(e, cfg.num_hidden_layers, heads, head_dim, b))
        pos = torch.arange(start, start + s)[None].expand(b, -1)
        return base(input_ids=ids, attention_mask=full_mask, past_key_values=cache, position_ids=pos, labels=labels)

    leaf = emb.clone().requires_grad_(True)
    from_p = at(p, leaf)
    from_p.loss.backward()
    with torch.no_grad():
        from_0 = at(0, emb)
    d_p, d_0 = (from_p.logits - logits).abs().max().item(), (from_0.logits - logits).abs().max().item()
    assert d_p < 1e-5 and abs(from_p.loss.item() - loss.item()) < 1e-5, f"{name}: layout/positions p.. differ by {d_p}"
    d_g = (leaf.grad - grad).abs().max().item()
    assert d_g < 1e-5, f"{name}: prompt_embeddings gradient differs by {d_g}"
    assert d_0 > 1e-3, f"{name}: positions 0.. are indistinguishable ({d_0})"
    print(f"{name}: hand-fed prefix, positions from {p}: {d_p:.1e} (grad {d_g:.1e}); from 0: {d_0:.3f}")
    if cfg.model_type == "llama":
        kv = prefix_kv(emb, cfg.num_hidden_layers, heads, head_dim, b)
        with torch.no_grad():
            plain = llama_prefix_forward(base, ids, mask, kv, p)
            rotated = llama_prefix_forward(base, ids, mask, kv, p, rotate_prefix=True)
        d_plain, d_rot = (plain - logits).abs().max().item(), (rotated - logits).abs().max().item()
        assert d_plain < 1e-4, f"{name}: plain-torch forward differs by {d_plain}"
        assert d_rot > 1e-3, f"{name}: rotating the prefix keys is indistinguishable ({d_rot})"
        print(f"{name}: plain-torch forward, prefix keys unrotated: {d_plain:.1e}; rotated: {d_rot:.3f}")


def check_prompt(name, base, ids, mask, labels, logits, loss, grad, emb, p):
    """inputs_embeds = [prompt_embeddings; embed_tokens(ids)] with positions 0..p+seq-1 and p
    leading mask ones reproduces PEFT's [batch, p+seq] logits and prompt_embeddings gradient, and the
    loss is the mean CE of the seq targets predicted from positions p-1 .. p+seq-2 (the last virtual
    token predicts token 0)."""
    b, s = ids.shape
    leaf = emb.clone().requires_grad_(True)
    x = torch.cat([leaf.expand(b, -1, -1), base.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], 1)
    ref = base(inputs_embeds=x, attention_mask=full_mask, position_ids=torch.arange(p + s)[None].expand(b, -1)).logits
    d = (ref - logits).abs().max().item()
    assert d < 1e-5, f"{name}: hand-fed prompt differs by {d}"
    pred = ref[:, p - 1 : -1]  # position p-1+j predicts ids[:, j]
    manual = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert abs(manual.item() - loss.item()) < 1e-5, f"{name}: loss {loss.item()} != {manual.item()}"
    manual.backward()
    d_g = (leaf.grad - grad).abs().max().item()
    assert d_g < 1e-5, f"{name}: prompt_embeddings gradient differs by {d_g}"
    print(f"{name}: hand-fed prompt {d:.1e} (grad {d_g:.1e}); loss over {(labels != -100).sum().item()} targets matches")


def make(name, base_dir, model_class, config, notes, num_labels=None, base_kwargs=None, check=None):
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
    # PEFT keeps target_modules (IA3: feedforward_modules too) as a set and writes it in hash order;
    # sort it so reruns are byte-identical (a reader must treat it as a set either way).
    for field in ("target_modules", "feedforward_modules"):
        if isinstance(cfg.get(field), list):
            cfg[field] = sorted(cfg[field])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # Reload what was saved, so the reference is exactly what a reader of the files gets.
    if config.is_prompt_learning:
        # PEFT refuses to load a prefix or prompt adapter as trainable; load it for inference (it then
        # uses the saved weight as is, repeated over the batch) and switch its gradient on by hand.
        model = peft.PeftModel.from_pretrained(load_base(), d).eval()
        model.prompt_encoder.requires_grad_(True)
    else:
        model = peft.PeftModel.from_pretrained(load_base(), d, is_trainable=True).eval()
    for p in model.parameters():
        if p.grad is not None:
            p.grad = None
    logits, loss = run(model, ids, mask, labels)
    loss.backward()
    with safe_open(d / "adapter_model.safetensors", "pt") as f:
        adapter_keys = {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": f.get_slice(k).get_dtype()} for k in sorted(f.keys())}
        prompt_embeddings = f.get_tensor("prompt_embeddings") if config.is_prompt_learning else None
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

    if check is not None:
        grad = model.prompt_encoder["default"].embedding.weight.grad
        check(name, load_base(), ids, mask, labels, logits.detach(), loss.detach(), grad, prompt_embeddings, config.num_virtual_tokens)
    logits_virtual = None
    if config.peft_type == PeftType.PROMPT_TUNING:
        # PEFT returns logits for the p virtual tokens too; keep the real positions apart.
        logits_virtual, logits = logits[:, : config.num_virtual_tokens], logits[:, config.num_virtual_tokens :]

    logits_merged = None
    if not config.is_prompt_learning:  # prefix and prompt tuning have no weights to merge
        with torch.no_grad():
            merged = model.merge_and_unload().eval()
            logits_merged, _ = run(merged, ids, mask, labels)
        diff_merge = (logits - logits_merged).abs().max().item()
        assert diff_merge < 1e-4, f"{name}: merged differs by {diff_merge}"
    diff_base = (logits - logits_base).abs().max().item()
    assert diff_base > 1e-2, f"{name}: adapter barely changes the output ({diff_base})"

    ref = {
        "base": base_dir,
        "model_class": model_class,
        "task_type": config.task_type,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "pad_token_id": PAD,
        "logits": flat(logits),
    }
    if logits_virtual is not None:
        ref["logits_virtual"] = flat(logits_virtual)
    if logits_merged is not None:
        ref["logits_merged"] = flat(logits_merged)
    ref["logits_base"] = flat(logits_base)
    ref["loss"] = float(f"{loss.item():.9g}")
    ref["grads"] = grads
    if scaling:
        ref["scaling"] = scaling
    ref["adapter_keys"] = adapter_keys
    if logits_merged is not None:
        ref["max_abs_diff_merged"] = diff_merge
    ref["max_abs_diff_base"] = diff_base
    ref["notes"] = notes
    ref["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "safetensors": safetensors.__version__}
    if num_labels is not None:
        ref["num_labels"] = num_labels
        ref["labels"] = labels.tolist()
    if config.is_prompt_learning:
        ref["num_virtual_tokens"] = config.num_virtual_tokens
    (d / "reference.json").write_text(dumps(ref) + "\n")
    size = sum(f.stat().st_size for f in d.iterdir())
    merged_msg = f"merged diff {diff_merge:.2e}, " if logits_merged is not None else ""
    print(f"{name}: {len(adapter_keys)} tensors, {merged_msg}base diff {diff_base:.3f}, {size / 1024:.0f} KiB")
    for k, v in adapter_keys.items():
        print(f"    {k} {v['shape']} {v['dtype']}")


PREFIX_COMMON = [
    "Attention mask: PEFT prepends p ones to attention_mask (a [batch, p + seq] mask); every query, padded "
    "ones included, attends all p prefix slots, then the real keys causally; padded keys stay masked.",
    "The prefix is only K/V: it does not pass through the embedding, a norm or any projection (no bias is "
    "added), and it has no logits and no labels: logits are [batch, seq, vocab] and the loss is the plain "
    "LM loss of the real tokens.",
    "Loaded for inference (inference_mode true, as saved) PEFT uses the saved tensor directly, repeated "
    "over the batch; for training it is the weight of an Embedding looked up at 0..p-1: the same values.",
    "Checked here: the base model fed this layout by hand as past_key_values, with the mask above and "
    "position ids p.., reproduces PEFT's logits and loss; with position ids 0.. it does not.",
]


def fixtures():
    """{name: keyword arguments of make} for every fixture, in the order they are made."""
    return {
        "llama-lora": dict(
            base_dir="tiny-llama",
            model_class="LlamaForCausalLM",
            config=LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
            notes=["LoRA r=4 alpha=8 on q_proj,v_proj: scaling alpha/r = 2.",
                   "lora_A.weight is [r, in], lora_B.weight is [out, r]; v_proj out = 16 (2 kv heads x head_dim 8)."],
        ),
        "llama-rslora-all": dict(
            base_dir="tiny-llama",
            model_class="LlamaForCausalLM",
            config=LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=16, use_rslora=True, layers_to_transform=[0],
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
            notes=["rsLoRA r=4 alpha=16: scaling alpha/sqrt(r) = 8.",
                   "layers_to_transform=[0] is written as a list; layers_pattern stays null: PEFT matches the layer "
                   "index after the common pattern 'layers' in the module name (model.layers.<i>.). Only layer 0 is adapted."],
        ),
        "llama-dora": dict(
            base_dir="tiny-llama",
            model_class="LlamaForCausalLM",
            config=LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            notes=["DoRA r=4 alpha=8: W' = m * (W0 + s B A) / ||W0 + s B A||_row, the norm over each output row "
                   "(dim 1 of the [out, in] weight), one magnitude per output feature; the norm is detached in backward.",
                   "The magnitude is saved as '<module>.lora_magnitude_vector' (no '.weight' suffix), shape [out]."],
        ),
        "gpt2-lora": dict(
            base_dir="tiny-gpt2-f16",
            model_class="GPT2LMHeadModel",
            config=LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]),
            notes=["GPT-2 Conv1D stores weight as [in, out]; fan_in_fan_out=True makes PEFT transpose B A when merging. "
                   "lora_A.weight is still [r, in] and lora_B.weight [out, r] (nn.Linear layout), e.g. c_attn A [4, 32], B [96, 4].",
                   "target 'c_proj' matches by suffix both attn.c_proj [32->32] and mlp.c_proj [128->32].",
                   "The base weights are float16 on disk and loaded as float32."],
        ),
        "llama-seqcls": dict(
            base_dir="tiny-llama",
            model_class="LlamaForSequenceClassification",
            config=LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]),
            notes=["SEQ_CLS: LlamaForSequenceClassification with num_labels=3, pad_token_id=0; logits are [batch, 3], "
                   "taken at the last token whose id is not pad_token_id (row 1: position 4).",
                   "The head 'score' (Linear 32->3, no bias) is in modules_to_save and is written as "
                   "'base_model.model.score.weight' (the full trained copy, not a LoRA pair).",
                   "The score head's initial value is random; the saved copy is what a loader must use."],
            num_labels=3,
            base_kwargs={"num_labels": 3, "pad_token_id": PAD},
        ),
        "llama-prefix": dict(
            base_dir="tiny-llama",
            model_class="LlamaForCausalLM",
            config=PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
            notes=["Prefix tuning, p = num_virtual_tokens = 3, prefix_projection false: adapter_model.safetensors holds the "
                   "one tensor 'prompt_embeddings' [p, num_layers*2*kv_dim] = [3, 64] (2 layers x K,V x 2 kv heads x "
                   "head_dim 8), float32; the base model is unchanged. The embedding was re-drawn N(0, 0.5²), seeded.",
                   "tiny-llama uses grouped-query attention: num_key_value_heads 2 < num_attention_heads 4 (head_dim 8). "
                   "PEFT sizes the prefix for the K/V heads and writes that into adapter_config.json: token_dim 16 "
                   "(kv heads x head_dim, not hidden_size 32) and num_attention_heads 2 (the kv heads, not the model's 4). "
                   "Query head q attends prefix K/V head q // 2, as for the model's own K/V (repeat_kv).",
                   "Layout: PEFT views the [batch, p, layers*2*kv_dim] prefix as [batch, p, layers*2, kv_heads, head_dim], "
                   "permutes it (2, 0, 3, 1, 4) to [layers*2, batch, kv_heads, p, head_dim] and splits that in pairs: layer "
                   "l's key is index 2l, its value 2l+1. So column ((l*2 + i)*kv_heads + h)*head_dim + d of row j is layer "
                   "l's key (i = 0) or value (i = 1), kv head h, prefix slot j, component d.",
                   "The prefix goes into the KV cache (past_key_values) and its keys are used as stored: they are NOT "
                   "rotated by RoPE (transformers rotates only the new tokens' keys before appending them to the cache). "
                   "Checked here with a plain-torch forward: unrotated prefix keys match; rotating them (as at positions "
                   "0..p-1) changes the logits.",
                   "Position ids: the real tokens get positions p..p+seq-1 (here 3..9), not 0..seq-1: PEFT passes no "
                   "position_ids and transformers starts them at the cache length p (user-given position_ids are offset "
                   "by p by PEFT too). RoPE of the queries and of the real keys uses these positions."] + PREFIX_COMMON,
            check=check_prefix,
        ),
        "gpt2-prefix": dict(
            base_dir="tiny-gpt2-f16",
            model_class="GPT2LMHeadModel",
            config=PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
            notes=["Prefix tuning, p = 3, prefix_projection false: one tensor 'prompt_embeddings' [p, num_layers*2*n_embd] "
                   "= [3, 128] (2 layers x K,V x 4 heads x head_dim 8), float32, re-drawn N(0, 0.5²), seeded. GPT-2 has no "
                   "grouped-query attention: adapter_config.json has token_dim 32 (n_embd) and num_attention_heads 4.",
                   "Layout as in llama-prefix: view [batch, p, layers*2, heads, head_dim], permute (2, 0, 3, 1, 4), split "
                   "in pairs; column ((l*2 + i)*heads + h)*head_dim + d of row j is layer l's key (i = 0) or value "
                   "(i = 1), head h, prefix slot j. The K/V are used as stored (the c_attn weight and bias are not applied).",
                   "Position ids: the real tokens get positions p..p+seq-1 (here 3..9): the learned position embedding "
                   "wpe is looked up at 3..9, not 0..6 (transformers starts at the cache length).",
                   "The base weights are float16 on disk and loaded as float32."] + PREFIX_COMMON,
            check=check_prefix,
        ),
        "llama-prompt": dict(
            base_dir="tiny-llama",
            model_class="LlamaForCausalLM",
            config=PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3, prompt_tuning_init=PromptTuningInit.RANDOM),
            notes=["Prompt tuning, p = 3, prompt_tuning_init RANDOM: one tensor 'prompt_embeddings' [p, hidden_size] = "
                   "[3, 32], float32, re-drawn N(0, 0.5²), seeded. These are input embeddings of p virtual tokens: PEFT "
                   "builds inputs_embeds = [prompt_embeddings; embed_tokens(input_ids)], [batch, p + seq, hidden] (no "
                   "embedding scale in LLaMA), and runs the unchanged base model on it.",
                   "Attention mask: p ones prepended ([batch, p + seq]). Position ids: 0..p+seq-1 over the whole "
                   "sequence (virtual tokens 0..p-1, real tokens p..p+seq-1); RoPE treats the virtual tokens as ordinary "
                   "tokens (their keys are rotated, unlike a prefix-tuning prefix).",
                   "PEFT returns logits [batch, p + seq, vocab]; 'logits' here holds only the real positions "
                   "(PEFT's logits[:, p:], [2, 7, 96]) and 'logits_virtual' the first p (logits[:, :p]).",
                   "Loss: PEFT prepends p labels -100 to labels (input ids, padding -100) and transformers shifts by one, "
                   "so the LAST virtual position predicts the FIRST real token: loss = mean CE of "
                   "[logits_virtual[:, p-1]; logits[:, :-1]] against labels, 12 targets here (7 + 5), not the 10 of a plain "
                   "LM loss over the real logits. Checked here.",
                   "adapter_config.json also records token_dim 32, num_attention_heads 4 and num_layers 2 (not used by "
                   "prompt tuning)."],
            check=check_prompt,
        ),
        "llama-ia3": dict(
            base_dir="tiny-llama",
            model_class="LlamaForCausalLM",
            config=IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            notes=["IA3: one vector per target module, saved as '<module>.ia3_l' (no '.weight' suffix, no adapter name), "
                   "float32, re-drawn 1 + N(0, 0.3²), seeded (PEFT starts them at exactly 1, a no-op).",
                   "k_proj and v_proj are not feed-forward: ia3_l has shape [out, 1] = [16, 1] and scales the OUTPUT, "
                   "y = (x W^T) * l[:, 0]. down_proj is in feedforward_modules: shape [1, in] = [1, 64], scales the INPUT, "
                   "y = (x * l[0]) W^T.",
                   "Merging: W[o, i] *= l[o] for an output vector, W[o, i] *= l[i] for an input vector (nn.Linear "
                   "[out, in]); a bias (LLaMA has none) would be scaled by output vectors only.",
                   "feedforward_modules must be a subset of target_modules; both are matched as name suffixes."],
        ),
        "gpt2-ia3": dict(
            base_dir="tiny-gpt2-f16",
            model_class="GPT2LMHeadModel",
            config=IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
            notes=["IA3 on GPT-2: '<module>.ia3_l', float32, re-drawn 1 + N(0, 0.3²), seeded. attn.c_attn is not "
                   "feed-forward: [out, 1] = [96, 1], scales the output, all of q, k and v and the c_attn BIAS with them: "
                   "y = (x W + b) * l[:, 0]. mlp.c_proj is feed-forward: [1, in] = [1, 128], scales its input (the MLP "
                   "activations), y = (x * l[0]) W + b, the bias unscaled.",
                   "The shapes are in terms of the layer's in/out features, whatever the weight layout: Conv1D stores "
                   "weight as [in, out], so merging is W[i, o] *= l[o] (output vector) or W[i, o] *= l[i] (input vector), "
                   "and b *= l for an output vector. PEFT forces fan_in_fan_out true for Conv1D (passed explicitly here).",
                   "target 'mlp.c_proj' matches h.<i>.mlp.c_proj only, not attn.c_proj (suffix match on a '.' boundary).",
                   "The base weights are float16 on disk and loaded as float32."],
        ),
    }


def main():
    specs = fixtures()
    ap = argparse.ArgumentParser(description="Make the PEFT adapter fixtures (all of them when no name is given).")
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"fixtures to make: {', '.join(specs)}")
    ap.add_argument("--out", type=pathlib.Path, default=OUT, help="where the fixture directories go (default: tests/fixtures/peft)")
    args = ap.parse_args()
    unknown = [n for n in args.names if n not in specs]
    if unknown:
        ap.error(f"unknown fixture(s) {', '.join(unknown)}; known: {', '.join(specs)}")
    globals()["OUT"] = args.out
    torch.use_deterministic_algorithms(True)
    for name in args.names or specs:
        make(name, **specs[name])


if __name__ == "__main__":
    main()
