#!/usr/bin/env bash
# Check `tinytune export` end to end on a real model and adapter:
#   1. the merged model as GGUF in f16, q8_0, q4_0 and q4_k, each checked with the `gguf`
#      Python package against the same merge as f32 safetensors (scripts/check_gguf_export.py),
#      read back by tinytune, with the held-out NLL change each type causes;
#   2. the adapter alone as a llama.cpp GGUF LoRA adapter, checked the same way;
#   3. with NODE_LLAMA_DIR (a directory where `npm i -E node-llama-cpp@3.21.1` was run), both
#      run in llama.cpp itself: the greedy continuation of a prompt by llama.cpp and by
#      tinytune, on the merged f16 file, and on the base with the GGUF adapter (`--lora`).
#
#   scripts/check_gguf_export.sh MODEL ADAPTER HELD_OUT.jsonl [WORKDIR]
#   PYTHON=/tmp/gg/bin/python NODE_LLAMA_DIR=/tmp/nl scripts/check_gguf_export.sh \
#       ~/.cache/tinytune/SmolLM2-135M-Instruct.Q4_1.gguf run/adapter austen50.jsonl
#
# MODEL is a GGUF file or a model directory (LLaMA family). PYTHON needs gguf, numpy and
# safetensors (pip install gguf numpy safetensors). Exits non-zero at the first failure.
set -euo pipefail

MODEL="$1"; ADAPTER="$2"; HELD="$3"; W="${4:-$(mktemp -d)}"
TT="${TINYTUNE:-target/release/tinytune}"
PY="${PYTHON:-python3}"
PROMPT="${PROMPT:-It is a truth universally acknowledged}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$W"
say() { printf 'check-gguf-export: %s\n' "$*"; }

"$TT" merge --model "$MODEL" --adapter "$ADAPTER" --out "$W/merged-f32" --dtype f32 >/dev/null
for t in f16 q8_0 q4_0 q4_k; do
    "$TT" export --model "$MODEL" --adapter "$ADAPTER" --out "$W/merged.$t.gguf" --type "$t" --eval-data "$HELD"
    "$PY" "$HERE/check_gguf_export.py" model --gguf "$W/merged.$t.gguf" --reference "$W/merged-f32"
done
"$TT" export --model "$MODEL" --adapter "$ADAPTER" --adapter-only --out "$W/adapter.gguf"
"$PY" "$HERE/check_gguf_export.py" adapter --gguf "$W/adapter.gguf" --adapter "$ADAPTER" --config "$W/merged-f32/config.json"

if [ -z "${NODE_LLAMA_DIR:-}" ]; then
    say "NODE_LLAMA_DIR not set: llama.cpp itself not run"
    exit 0
fi
cp "$HERE/check_llamacpp.mjs" "$NODE_LLAMA_DIR/"
N=24
ids() { "$PY" -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])[sys.argv[1]])' "$1"; }
compare() { # what, llama.cpp JSON, tinytune JSON
    local l t
    l="$(echo "$2" | ids generated)"; t="$(echo "$3" | ids ids)"
    say "$1: llama.cpp $l"
    say "$1: tinytune  $t"
    [ "$l" = "$t" ] || { say "FAIL: $1: the greedy continuations differ"; exit 1; }
}
L="$(node "$NODE_LLAMA_DIR/check_llamacpp.mjs" --model "$W/merged.f16.gguf" --prompt "$PROMPT" --n $N)"
T="$("$TT" generate --model "$W/merged.f16.gguf" --prompt "$PROMPT" --max-new-tokens $N --greedy --json)"
compare "merged f16 GGUF" "$L" "$T"
# The adapter is run over the base exported as F16, even when MODEL is a quantised GGUF file:
# on a quantised base llama.cpp multiplies with activations rounded to 8 bits (its q8 dot
# products), so its greedy tokens drift from tinytune's even for the base alone, with no
# adapter (SmolLM2 Q4_1: they part at token 9). Over F16 both compute in float and must agree.
"$TT" export --model "$MODEL" --out "$W/base.f16.gguf" --type f16 >/dev/null
BASE="$W/base.f16.gguf"
L="$(node "$NODE_LLAMA_DIR/check_llamacpp.mjs" --model "$BASE" --lora "$W/adapter.gguf" --prompt "$PROMPT" --n $N)"
T="$("$TT" generate --model "$BASE" --adapter "$ADAPTER" --prompt "$PROMPT" --max-new-tokens $N --greedy --json)"
compare "base + GGUF LoRA adapter" "$L" "$T"
say "ok: llama.cpp loads both files and continues the prompt as tinytune does"
