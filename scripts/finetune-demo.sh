#!/usr/bin/env bash
# The main job, end to end on a fresh machine: fetch a real model and a real labelled data set,
# fine-tune with LoRA (plus a new classification head), print accuracy before and after, and
# save the adapter (Hugging Face PEFT layout), the metrics and the loss curve.
#
#   scripts/finetune-demo.sh                 # into ./tinytune-demo
#   OUT=/tmp/run DEVICE=cpu scripts/finetune-demo.sh
#
# - Model: SmolLM2-135M-Instruct (Apache-2.0), fetched by scripts/fetch-assets.sh.
# - Data: 10,605 human-rated movie-review sentences (vaderSentiment 3.3.2 on PyPI, MIT;
#   label = mean rating > 0), split by scripts/fetch-data.sh into train/eval files.
# - A small, seeded subset and short sequences keep it to a few minutes on 2 CPU cores; the
#   device is a hardware GPU when there is one (DEVICE=auto), else the CPU.
# Extra arguments go to `tinytune finetune` (e.g. --max-train-examples 4000 --epochs 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS="${TINYTUNE_ASSETS:-$HOME/.cache/tinytune}"
OUT="${OUT:-tinytune-demo}"

bash scripts/fetch-assets.sh
cargo build --release --quiet
rm -rf "$OUT"
target/release/tinytune finetune \
    --model "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --data "$ASSETS/data/movie_reviews.train.jsonl" \
    --eval-data "$ASSETS/data/movie_reviews.eval.jsonl" \
    --method lora --rank 8 --alpha 16 --dropout 0.05 --target-modules q_proj,v_proj \
    --max-train-examples 800 --max-eval-examples 200 --seq-len 48 \
    --batch-size 16 --lr 3e-3 --warmup 5 --schedule linear --seed 0 \
    --device "${DEVICE:-auto}" --out "$OUT" "$@"
echo
echo "adapter: $OUT/adapter (load it with --adapter, or in Python with peft.PeftModel.from_pretrained)"
echo "evaluate it again: target/release/tinytune eval --model $ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf --adapter $OUT/adapter --data $ASSETS/data/movie_reviews.eval.jsonl"
