#!/usr/bin/env bash
# Check that adapters saved by tinytune load in the Python PEFT library with the same logits.
#
#     scripts/check_peft_export.sh [EXPORT_DIR]
#
# 1. runs tests/peft_export.rs with TINYTUNE_EXPORT_DIR=EXPORT_DIR (default: a fresh temporary
#    directory), which saves one adapter per case to EXPORT_DIR/<case>/ with expect.json (the
#    base model directory, the inputs and tinytune's logits);
# 2. runs scripts/check_peft_adapter.py on every case: PEFT must take up every saved tensor and
#    give logits within TOL (default 1e-5) of tinytune's;
# 3. prints a table of the max abs logit differences; exits 1 if any case fails.
#
# Environment: PYTHON (default: python3 on PATH; it needs torch, transformers, peft and
# safetensors: `python3 -m venv ~/.venvs/pyref && ~/.venvs/pyref/bin/pip install torch
# transformers peft safetensors`, then PYTHON=~/.venvs/pyref/bin/python),
# TOL, CARGO_TARGET_DIR as for cargo.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
tol="${TOL:-1e-5}"
out="${1:-$(mktemp -d "${TMPDIR:-/tmp}/tinytune-peft-export.XXXXXX")}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

if ! "$python" -c "import peft, transformers, torch, safetensors" 2>/dev/null; then
    echo "error: $python cannot import peft/transformers/torch/safetensors; install them" >&2
    echo "  (python3 -m venv ~/.venvs/pyref && ~/.venvs/pyref/bin/pip install torch transformers peft safetensors)" >&2
    echo "  and run with PYTHON=~/.venvs/pyref/bin/python" >&2
    exit 2
fi

echo "== saving adapters with tinytune into $out"
(cd "$root" && TINYTUNE_EXPORT_DIR="$out" cargo test --release --test peft_export -- --nocapture)

shopt -s nullglob
cases=("$out"/*/expect.json)
if [ ${#cases[@]} -eq 0 ]; then
    echo "error: the test wrote no case to $out" >&2
    exit 2
fi

failed=0
rows=()
for expect in "${cases[@]}"; do
    dir="$(dirname "$expect")"
    case="$(basename "$dir")"
    base="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["base"])' "$expect")"
    echo "== $case (base $base)"
    log="$dir/check.log"
    if "$python" "$root/scripts/check_peft_adapter.py" --base "$base" --adapter "$dir" --expect "$expect" --tol "$tol" >"$log" 2>&1; then
        status=ok
    else
        status=FAIL
        failed=1
    fi
    cat "$log"
    # "logits [2, 7, 96]: max abs diff 1.234e-07 over 12 unpadded positions (tol 1e-05)"
    diff="$(sed -n 's/^logits .*max abs diff \([^ ]*\) .*/\1/p' "$log" | tail -n 1)"
    task="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("task_type"))' "$dir/adapter_config.json")"
    rows+=("$(printf '%-26s %-10s %-12s %s' "$case" "$task" "${diff:-n/a}" "$status")")
done

echo
printf '%-26s %-10s %-12s %s\n' case task max_abs_diff status
for r in "${rows[@]}"; do
    echo "$r"
done
if [ "$failed" -ne 0 ]; then
    echo "MISMATCH: at least one adapter does not load in PEFT with tinytune's logits (tol $tol)"
    exit 1
fi
echo "all ${#cases[@]} adapters load in PEFT with tinytune's logits (tol $tol)"
