#!/usr/bin/env python3
"""Make the tokenizer test fixtures with Hugging Face `transformers` / `tokenizers`.

    /tmp/pyref/bin/python scripts/make_tokenizer_fixtures.py

Reads the assets of scripts/fetch-assets.sh from ${TINYTUNE_ASSETS:-$HOME/.cache/tinytune}
(never committed) and writes, under tests/fixtures/tokenizer/:

- reference.json: for each tokenizer, the ids `transformers` gives for a list of awkward strings
  (with and without special tokens), its decode of those ids (with and without skipping special
  tokens), and its special tokens. Tokenizers:
  - "gpt2": GPT-2 built from the original encoder.json + vocab.bpe (`GPT2Tokenizer(vocab, merges)`).
  - "smollm2": the tokenizer transformers builds from SmolLM2-135M-Instruct.Q4_1.gguf
    (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), plus `apply_chat_template` renderings.
  - "tiny_bytelevel", "tiny_sentencepiece": the two small tokenizer.json files below.
- tiny-bytelevel.json: a byte-level BPE (GPT-2/SmolLM style) trained here on a few sentences,
  with <|endoftext|>, <|im_start|>, <|im_end|> as special tokens; a few KB, so a test runs with
  no fetched asset.
- tiny-sentencepiece.json: a SentencePiece-style BPE (Llama 2/TinyLlama style: "▁" for spaces,
  byte fallback <0xNN>, BOS <s> added by the post-processor), also trained here.
- tiny-sentencepiece_config.json: a tokenizer_config.json for it (bos/eos/pad names).
- tiny-sentencepiece.gguf: a SentencePiece BPE model trained here with the sentencepiece library
  (byte fallback, a user-defined <tool> token) written as llama.cpp's converter writes a LLaMA
  vocabulary (tokenizer.ggml.model = "llama": tokens, scores, token types, no merges, BOS added,
  add_space_prefix); its reference ("tiny_sentencepiece_gguf") is what transformers builds from
  the GGUF. `--gguf-sentencepiece` remakes only this one and its entry in reference.json.
"""
import json
import os
import pathlib
import sys

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tokenizer"
ASSETS = pathlib.Path(os.environ.get("TINYTUNE_ASSETS", pathlib.Path.home() / ".cache" / "tinytune"))
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The awkward strings. Every one is encoded with and without special tokens and decoded back.
STRINGS = [
    "",
    "Hello world",
    " leading space",
    "trailing space ",
    "   three leading spaces",
    "multiple   inner    spaces",
    "two trailing  ",
    " ",
    "    ",
    "tab\tseparated\t\tvalues",
    "\t",
    "line one\nline two\n\nline four",
    "\n",
    "\n\n\n",
    "windows\r\nline endings\r\n",
    "Café, naïve, résumé, Ångström, façade",
    "e\u0301 (combining accent) vs \u00e9",
    "中文分词测试：你好，世界！",
    "日本語のテキストとカタカナ",
    "한국어 텍스트",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "digits 0 1 12 123 1234 12345",
    "3.14159265358979 and 1,000,000 and 2024-01-31",
    "123456789012345678901234567890",
    "don't can't won't I'm you're we've they'll he'd",
    "DON'T SHOUT, it's fine",
    "def add(a, b):\n    return a + b  # sum\n",
    'fn main() { println!("{}", x.len()); }',
    "<html><body class=\"x\">&amp;</body></html>",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "text<|endoftext|>more text",
    "<|endoftext|>",
    " <|im_end|> spaced <|im_start|> ",
    "<|im_start|><|im_end|>",
    "<|im_start",
    "a" * 64,
    "mixed ÀÉÎÕÜ ß ﬁ ligature ½ ™ … “quotes” ‘single’ — dash",
    "null\u0000byte and bell\u0007",
    "Ġ Ċ âĢ bytes-as-unicode letters",
]

CHATS = [
    ([("user", "Hello!")], True),
    ([("user", "Hello!")], False),
    ([("system", "You are terse."), ("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?")], True),
    ([("user", "Line one\nline two"), ("assistant", " spaced reply ")], False),
]

# Small training text for the two tiny tokenizers.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello tokenizer. Hello again!",
    "Fine-tuning language models without CUDA is fun.",
    "def add(a, b):\n    return a + b\n",
    "don't can't won't it's I'm you're",
    "Numbers 0123456789 and 2024.",
    "Café naïve résumé 中文 😀",
] * 4


def reference(tok):
    cases = []
    for s in STRINGS:
        ids = tok(s, add_special_tokens=True)["input_ids"]
        plain = tok(s, add_special_tokens=False)["input_ids"]
        cases.append(
            {
                "text": s,
                "ids": ids,
                "ids_no_special": plain,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    special = {}
    for name in ("bos", "eos", "pad", "unk"):
        token = getattr(tok, f"{name}_token")
        special[name] = None if token is None else {"token": str(token), "id": tok.convert_tokens_to_ids(str(token))}
    added = [{"id": i, "content": t.content, "special": t.special} for i, t in sorted(tok.added_tokens_decoder.items())]
    return {"vocab_size": len(tok), "special": special, "added_tokens": added, "cases": cases}


def gpt2():
    d = ASSETS / "gpt2"
    vocab = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    lines = (d / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def smollm2():
    return AutoTokenizer.from_pretrained(str(ASSETS), gguf_file=SMOL)


def tiny_bytelevel(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 3 + 60, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path), pretty=False)
    # Special tokens as tokenizer_config.json would name them (SmolLM2's choice: no BOS added).
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )


def tiny_sentencepiece(path):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    trainer = trainers.BpeTrainer(vocab_size=3 + 120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    # As in Llama 2's vocabulary, the 256 byte tokens <0x00>..<0xFF> are ordinary vocabulary
    # entries right after the three control tokens (not added tokens): renumber to make room.
    j = json.loads(tok.to_str())
    trained = sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])
    order = [t for t, _ in trained[:3]] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in trained[3:]]
    j["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    tok = Tokenizer.from_str(json.dumps(j))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.save(str(path), pretty=False)
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "add_bos_token": True}
    (path.parent / (path.stem + "_config.json")).write_text(json.dumps(config, indent=1) + "\n")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_sentencepiece_gguf(path):
    import io

    import gguf
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=420, byte_fallback=True,
        user_defined_symbols=["<tool>"], hard_vocab_limit=False, character_coverage=1.0, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 4 if sp.id_to_piece(i) == "<tool>" else 1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def main():
    if "--gguf-sentencepiece" in sys.argv:
        out = json.loads((OUT / "reference.json").read_text(encoding="utf-8"))
        out["tiny_sentencepiece_gguf"] = reference(tiny_sentencepiece_gguf(OUT / "tiny-sentencepiece.gguf"))
        (OUT / "reference.json").write_text(json.dumps(out, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"wrote {OUT}/tiny-sentencepiece.gguf and its reference")
        return
    if not (ASSETS / "gpt2" / "encoder.json").exists() or not (ASSETS / SMOL).exists():
        sys.exit(f"assets missing in {ASSETS}: run scripts/fetch-assets.sh")
    OUT.mkdir(parents=True, exist_ok=True)
    out = {
        "note": "made by scripts/make_tokenizer_fixtures.py; ids and decodes are what transformers gives",
        "strings": STRINGS,
    }
    tiny = tiny_bytelevel(OUT / "tiny-bytelevel.json")
    out["tiny_bytelevel"] = reference(tiny)
    sp = tiny_sentencepiece(OUT / "tiny-sentencepiece.json")
    out["tiny_sentencepiece"] = reference(sp)
    out["gpt2"] = reference(gpt2())
    smol = smollm2()
    out["tiny_sentencepiece_gguf"] = reference(tiny_sentencepiece_gguf(OUT / "tiny-sentencepiece.gguf"))
    out["smollm2"] = reference(smol)
    out["smollm2"]["chat_template"] = smol.chat_template
    out["smollm2"]["chats"] = [
        {
            "messages": [list(m) for m in msgs],
            "add_generation_prompt": gen,
            "rendered": smol.apply_chat_template([{"role": r, "content": c} for r, c in msgs], tokenize=False, add_generation_prompt=gen),
        }
        for msgs, gen in CHATS
    ]
    text = json.dumps(out, ensure_ascii=False, indent=None, separators=(",", ":"))
    (OUT / "reference.json").write_text(text + "\n", encoding="utf-8")
    print(f"wrote {OUT}/reference.json ({len(text)} bytes)")


if __name__ == "__main__":
    main()
