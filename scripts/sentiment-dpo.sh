#!/usr/bin/env bash
# The DPO paper's controlled sentiment generation (Rafailov et al. 2023, section 6.1) with the
# project's own data and model, end to end on a fresh machine:
#
#   1. the reward: a sentiment classifier tinytune trains on the human ratings of the movie-review
#      sentences (the main job's run: LoRA + a head on SmolLM2-135M-Instruct); the reward of a
#      text is its probability of "positive";
#   2. prompts: the first 2–8 tokens of real review sentences (training prompts from the train
#      file, held-out prompts from the eval file);
#   3. preference pairs: samples of the base policy per training prompt (4), the best and the
#      worst by the reward (the paper's protocol with two: `tinytune sample --pairs-out`);
#   4. DPO with LoRA at a few β, the reference being the policy with its adapter off;
#   4b. GRPO and PPO with LoRA on the training prompts, the same reward, online (PPO with a
#      value head on the policy, 4 updates per rollout);
#   5. on held-out prompts, each policy's mean reward and its KL from the reference
#      (mean of log π − log π_ref over its own samples), and the reward–KL picture (the paper's
#      Figure 2, left).
#
#   scripts/sentiment-dpo.sh                      # into ./tinytune-demo/dpo-DATE
#   OUT=/tmp/dpo TRAIN_PROMPTS=64 EVAL_PROMPTS=32 BETAS="0.1" scripts/sentiment-dpo.sh   # quicker
#
# Results (numbers, pairs, samples, adapters, rewards.svg) go to $OUT; results.json sums up.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS="${TINYTUNE_ASSETS:-$HOME/.cache/tinytune}"
OUT="${OUT:-tinytune-demo/dpo-$(date +%Y%m%d-%H%M%S)}"
TRAIN_PROMPTS="${TRAIN_PROMPTS:-192}"
EVAL_PROMPTS="${EVAL_PROMPTS:-64}"
PAIR_SAMPLES="${PAIR_SAMPLES:-4}"
BETAS="${BETAS:-0.1 0.5}"
EPOCHS="${EPOCHS:-3}"
LR="${LR:-1e-3}"
GRPO_PROMPTS="${GRPO_PROMPTS:-64}"
GRPO_GROUP="${GRPO_GROUP:-4}"
GRPO_LR="${GRPO_LR:-1e-3}"
PPO_PROMPTS="${PPO_PROMPTS:-64}"
PPO_LR="${PPO_LR:-1e-3}"
NEW_TOKENS="${NEW_TOKENS:-24}"
DEVICE="${DEVICE:-auto}"
MODEL="$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf"
# TINYTUNE=path: use that binary (no build).
TT="${TINYTUNE:-target/release/tinytune}"

if ! command -v cargo >/dev/null 2>&1; then
    echo "sentiment-dpo: cargo not found: install Rust 1.89 or newer (https://rustup.rs), then run this again" >&2
    exit 1
fi
bash scripts/fetch-assets.sh
[ -n "${TINYTUNE:-}" ] || cargo build --release
mkdir -p "$OUT"
log() { echo "sentiment-dpo: $*" >&2; }

# 1. The reward model: the main job's classifier (reused when $OUT already holds it).
if [ ! -f "$OUT/reward/adapter/adapter_config.json" ]; then
    log "training the sentiment classifier (the reward)"
    $TT finetune --model "$MODEL" --data "$ASSETS/data/movie_reviews.train.jsonl" \
        --eval-data "$ASSETS/data/movie_reviews.eval.jsonl" \
        --method lora --rank 8 --alpha 16 --dropout 0.05 --target-modules q_proj,v_proj \
        --max-train-examples 800 --max-eval-examples 200 --seq-len 48 \
        --batch-size 16 --lr 3e-3 --warmup 5 --seed 0 --device "$DEVICE" --out "$OUT/reward" --overwrite
fi
REWARD=(--reward-model "$OUT/reward/adapter" --reward-label 1)
SAMPLE=(--max-new-tokens "$NEW_TOKENS" --temperature 1 --prompt-tokens 2-8 --device "$DEVICE")

# 2–3. Pairs from samples of the base policy per training prompt: the best and the worst by reward
# (kept when $OUT already holds them: a rerun trains and evaluates again on the same pairs).
if [ ! -s "$OUT/pairs.jsonl" ] || [ ! -s "$OUT/train-prompts.jsonl" ]; then
log "sampling the base policy on $TRAIN_PROMPTS training prompts, $PAIR_SAMPLES each, ranked by the reward"
$TT sample --model "$MODEL" --prompts "$ASSETS/data/movie_reviews.train.jsonl" --max-prompts "$TRAIN_PROMPTS" \
    --num-samples "$PAIR_SAMPLES" "${SAMPLE[@]}" --seed 1 "${REWARD[@]}" --out "$OUT/train-samples.jsonl" --pairs-out "$OUT/pairs.jsonl" \
    --prompts-out "$OUT/train-prompts.jsonl"
fi

# 5 (before). The base policy on held-out prompts (its KL from itself is 0).
evaluate() { # name, adapter args...
    local name=$1
    shift
    log "sampling $name on $EVAL_PROMPTS held-out prompts"
    $TT sample --model "$MODEL" "$@" --prompts "$ASSETS/data/movie_reviews.eval.jsonl" --max-prompts "$EVAL_PROMPTS" \
        --num-samples 2 "${SAMPLE[@]}" --seed 2 "${REWARD[@]}" --log-probs --json --out "$OUT/eval-$name.jsonl" > "$OUT/eval-$name.json"
}
evaluate base
POLICIES=base

# 4–5. DPO at each β, then its held-out samples.
for beta in $BETAS; do
    log "DPO with beta $beta"
    $TT finetune --model "$MODEL" --data "$OUT/pairs.jsonl" --objective dpo --beta "$beta" \
        --method lora --rank 8 --alpha 16 --dropout 0 --target-modules q_proj,k_proj,v_proj,o_proj \
        --epochs "$EPOCHS" --batch-size 8 --lr "$LR" --warmup 4 --seq-len 64 --eval-split 0.1 --seed 0 \
        --device "$DEVICE" --out "$OUT/dpo-$beta" --overwrite
    evaluate "dpo-$beta" --adapter "$OUT/dpo-$beta/adapter"
    POLICIES="$POLICIES dpo-$beta"
done

# GRPO beside it: online, on the first $GRPO_PROMPTS training prompts, $GRPO_GROUP samples each
# per step, the same reward (no value head, no pairs).
if [ "$GRPO_PROMPTS" -gt 0 ]; then
    log "GRPO on $GRPO_PROMPTS training prompts"
    head -n "$GRPO_PROMPTS" "$OUT/train-prompts.jsonl" > "$OUT/grpo-prompts.jsonl"
    $TT finetune --model "$MODEL" --data "$OUT/grpo-prompts.jsonl" --objective grpo "${REWARD[@]}" \
        --num-generations "$GRPO_GROUP" --max-new-tokens "$NEW_TOKENS" --beta 0.04 \
        --method lora --rank 8 --alpha 16 --dropout 0 --target-modules q_proj,k_proj,v_proj,o_proj \
        --epochs 1 --batch-size 4 --lr "$GRPO_LR" --eval-split 0 --seed 0 --device "$DEVICE" --out "$OUT/grpo" --overwrite
    evaluate grpo --adapter "$OUT/grpo/adapter"
    POLICIES="$POLICIES grpo"
fi

# PPO: online on the first $PPO_PROMPTS training prompts, one sample each, a value head on the
# policy's hidden states, the per-token KL penalty (TRL's defaults: kl_coef 0.05, 4 epochs).
if [ "$PPO_PROMPTS" -gt 0 ]; then
    log "PPO on $PPO_PROMPTS training prompts"
    head -n "$PPO_PROMPTS" "$OUT/train-prompts.jsonl" > "$OUT/ppo-prompts.jsonl"
    $TT finetune --model "$MODEL" --data "$OUT/ppo-prompts.jsonl" --objective ppo "${REWARD[@]}" \
        --max-new-tokens "$NEW_TOKENS" --beta 0.05 --ppo-epochs 4 \
        --method lora --rank 8 --alpha 16 --dropout 0 --target-modules q_proj,k_proj,v_proj,o_proj \
        --epochs 1 --batch-size 4 --lr "$PPO_LR" --eval-split 0 --seed 0 --device "$DEVICE" --out "$OUT/ppo" --overwrite
    evaluate ppo --adapter "$OUT/ppo/adapter"
    POLICIES="$POLICIES ppo"
fi

# The summary and the picture (standard-library Python; skipped without python3).
if command -v python3 >/dev/null 2>&1; then
    python3 - "$OUT" $POLICIES <<'PY'
import json, sys, pathlib
out, policies = pathlib.Path(sys.argv[1]), sys.argv[2:]
rows = []
for name in policies:
    s = json.loads((out / f"eval-{name}.json").read_text())
    rows.append({"policy": name, "mean_reward": s["mean_reward"], "kl": s["kl"], "completions": s["completions"]})
(out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
print(f"{'policy':<12} {'mean reward':>12} {'KL (nats)':>10}")
for r in rows:
    print(f"{r['policy']:<12} {r['mean_reward']:>12.4f} {r['kl']:>10.4f}")
# Reward against KL from the reference, one point per policy.
W, H, L, B = 520, 360, 60, 50
xs, ys = [r["kl"] for r in rows], [r["mean_reward"] for r in rows]
xmax = max(max(xs) * 1.15, 0.5)
ylo, yhi = min(ys) - 0.05, max(ys) + 0.05
X = lambda x: L + (W - L - 20) * x / xmax
Y = lambda y: H - B - (H - B - 30) * (y - ylo) / (yhi - ylo)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<text x="{W/2}" y="18" text-anchor="middle">SmolLM2-135M, movie-review prefixes: reward vs KL (LoRA)</text>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/><line x1="{L}" y1="30" x2="{L}" y2="{H-B}" stroke="black"/>',
       f'<text x="{W/2}" y="{H-12}" text-anchor="middle">KL(π ‖ π_ref), nats per completion</text>',
       f'<text x="16" y="{H/2}" transform="rotate(-90 16 {H/2})" text-anchor="middle">mean reward P(positive)</text>']
for i in range(5):
    x, y = xmax * i / 4, ylo + (yhi - ylo) * i / 4
    svg += [f'<text x="{X(x)}" y="{H-B+16}" text-anchor="middle">{x:.2f}</text>',
            f'<text x="{L-6}" y="{Y(y)+4}" text-anchor="end">{y:.2f}</text>']
for r in rows:
    color = "#1f77b4" if r["policy"] == "base" else "#d62728"
    svg += [f'<circle cx="{X(r["kl"])}" cy="{Y(r["mean_reward"])}" r="5" fill="{color}"/>',
            f'<text x="{X(r["kl"])+8}" y="{Y(r["mean_reward"])-6}">{r["policy"].replace("dpo-", "DPO β=").replace("grpo", "GRPO").replace("ppo", "PPO")}</text>']
svg.append("</svg>")
(out / "rewards.svg").write_text("\n".join(svg) + "\n")
print(f"picture: {out / 'rewards.svg'}")
PY
else
    log "python3 not found: skipping the summary table and the picture (the numbers are in $OUT/eval-*.json)"
fi
