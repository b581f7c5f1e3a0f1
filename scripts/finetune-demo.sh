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
# Each run gets a directory of its own: an earlier run's results are never overwritten.
OUT="${OUT:-tinytune-demo/run-$(date +%Y%m%d-%H%M%S)}"

# Check the tools before downloading ~100 MB.
if ! command -v cargo >/dev/null 2>&1; then
    echo "finetune-demo: cargo not found: install Rust 1.89 or newer (https://rustup.rs), then run this again" >&2
    exit 1
fi
bash scripts/fetch-assets.sh --demo
echo "finetune-demo: building tinytune (release; the first build takes a few minutes)"
cargo build --release
target/release/tinytune finetune \
    --model "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --data "$ASSETS/data/movie_reviews.train.jsonl" \
    --eval-data "$ASSETS/data/movie_reviews.eval.jsonl" \
    --method lora --rank 8 --alpha 16 --dropout 0.05 --target-modules q_proj,v_proj \
    --max-train-examples 800 --max-eval-examples 200 --seq-len 48 \
    --batch-size 16 --length-buckets 8 --lr 3e-3 --warmup 5 --schedule linear --seed 0 \
    --device "${DEVICE:-auto}" --out "$OUT" "$@"
echo
echo "== three fresh sentences, zero-shot by the base model and then by the fine-tuned adapter"
SENTENCES=(--text "A warm, funny and beautifully acted film." --text "Two hours I will never get back." --text "The plot is thin, but the music carries it.")
target/release/tinytune classify --model "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" --labels negative,positive \
    --device "${DEVICE:-auto}" "${SENTENCES[@]}"
target/release/tinytune classify --model "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" --adapter "$OUT/adapter" \
    --labels negative,positive --max-len 48 --device "${DEVICE:-auto}" "${SENTENCES[@]}"
echo
echo "adapter: $OUT/adapter (load it with --adapter; in Python, on the same base as a classifier:"
echo "  base = transformers.AutoModelForSequenceClassification.from_pretrained(<SmolLM2-135M-Instruct>, num_labels=2,"
echo "           pad_token_id=tokenizer.pad_token_id)"
echo "  model = peft.PeftModel.from_pretrained(base, \"$OUT/adapter\")"
echo "  where <SmolLM2-135M-Instruct> is the Hugging Face id HuggingFaceTB/SmolLM2-135M-Instruct or a local copy;"
echo "  README.md, 'Load the outputs in Python', has the whole snippet)"
echo "evaluate it again: target/release/tinytune eval --model $ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf --adapter $OUT/adapter --data $ASSETS/data/movie_reviews.eval.jsonl"
