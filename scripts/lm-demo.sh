#!/usr/bin/env bash
# The second demo: LoRA language modelling on Jane Austen's novels. Fetches SmolLM2-135M-Instruct
# and the novels (Debian's r-cran-janeaustenr, so apt-get is needed for this one), packs
# paragraphs into 64-token windows, trains LoRA r=8 on every linear layer for a few minutes on 2
# CPU cores, and prints the held-out perplexity before and after and the same prompt continued
# by the base model and by the fine-tuned one, side by side.
#
#   scripts/lm-demo.sh                       # output in a new tinytune-lm-demo/run-DATE
#   STEPS=60 DEVICE=gpu scripts/lm-demo.sh   # longer, on a GPU
#   PROMPT="It is a truth universally" scripts/lm-demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS="${TINYTUNE_ASSETS:-$HOME/.cache/tinytune}"
OUT="${OUT:-tinytune-lm-demo/run-$(date +%Y%m%d-%H%M%S)}"
STEPS="${STEPS:-30}"
PROMPT="${PROMPT:-She had never seen him so}"
MODEL="$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf"

if ! command -v cargo >/dev/null 2>&1; then
    echo "lm-demo: cargo not found: install Rust 1.89 or newer (https://rustup.rs), then run this again" >&2
    exit 1
fi
TINYTUNE_REQUIRE_ASSETS=1 bash scripts/fetch-assets.sh
echo "lm-demo: building tinytune (release; the first build takes a few minutes)"
cargo build --release
BIN=target/release/tinytune
mkdir -p "$(dirname "$OUT")"

target/release/tinytune finetune --model "$MODEL" --data "$ASSETS/data/austen.jsonl" --pack \
    --method lora --rank 8 --alpha 16 --dropout 0.05 --target-modules all-linear \
    --max-train-examples 1200 --max-eval-examples 100 --seq-len 64 --batch-size 8 \
    --lr 1e-3 --warmup 3 --schedule linear --max-steps "$STEPS" --seed 0 \
    --device "${DEVICE:-auto}" --out "$OUT" --json > "$OUT.report.json"
before=$(python3 -c 'import json,sys,math; r=json.load(open(sys.argv[1])); print("%.2f" % math.exp(r["before"]["loss"]))' "$OUT.report.json")
after=$(python3 -c 'import json,sys,math; r=json.load(open(sys.argv[1])); print("%.2f" % math.exp(r["after"]["loss"]))' "$OUT.report.json")
mv "$OUT.report.json" "$OUT/run-report.json"
echo
echo "held-out perplexity (100 held-out 64-token windows of the novels): $before -> $after"
echo
gen() { "$BIN" generate --model "$MODEL" --prompt "$PROMPT" --max-new-tokens 40 --device "${DEVICE:-auto}" "$@" 2>/dev/null; }
echo "== the base model continues \"$PROMPT\":"
gen
echo
echo "== the fine-tuned model ($OUT/adapter):"
gen --adapter "$OUT/adapter"
echo
echo "loss curve: $OUT/loss.svg ; adapter: $OUT/adapter (peft.PeftModel.from_pretrained on AutoModelForCausalLM)"
