#!/usr/bin/env bash
# The GPU run of emloc's kernels, in two stages, so that the lent GPU machine (no Rust toolchain,
# no registry, 10 minutes a command) only runs prepared binaries:
#
#   benches/gpu.sh build [cuda|wgpu]
#       Here, on the CPU machine (same x86-64 architecture). Builds the kernel tests (`it`) and
#       `bench_kernels` with `--features cuda` (release), strips and compresses them into
#       target/gpu-bundle/ and checks the bundle fits the 64 MiB a device call carries. (The
#       held-bytes measurement of tests/held_memory.rs runs inside the sweep there.)
#       `wgpu` makes a bundle from the README's test build (debug, wgpu) instead, for a dry run
#       here.
#   benches/gpu.sh run [OUT_DIR]
#       On the GPU (OUT_DIR defaults to $OUT). In under 6 minutes: the kernel tests on
#       CUDA, emloc's sweep of benches/gpu_sizes.json (`bench_kernels cuda --sweep gpu`: Gram,
#       fused layer forward + backward on each product route and as unfused Burn ops, the
#       layer's held bytes, Cholesky + solve, a bf16 Gram past 2³² elements), the PyTorch/PEFT
#       peer on the same shapes (benches/peers/gpu_peer.py), then one report of ratios.
#       Results: OUT_DIR/gpu-report.md (the tables), gpu-results.jsonl (every measurement),
#       gpu-logs.txt (test summary and error tails). The report is printed last.
#
# The one device call (the `device` tool's run):
#   command: bash benches/gpu.sh run    carry: ["target/gpu-bundle"]    timeout_s: 420
# A dry run here (lavapipe and torch on the CPU, tiny sizes):
#   benches/gpu.sh build wgpu && EMLOC_GPU_DEVICE=wgpu EMLOC_GPU_SIZES=quick \
#       PYTHON=/work/pyref/bin/python benches/gpu.sh run /tmp/gpu-dry
#
# Why the stub object: cubecl-cuda always links cubecl-llvm's NVPTX code generator, and the
# only LLVM 23 bundle reachable offline (PyPI mlc-llvm-static, see .ci/run) has no NVPTX target.
# emloc's `cuda` feature compiles kernels with CubeCL's C++ backend through NVRTC, which never
# calls into it, so the four missing entry points are satisfied by benches/gpu/nvptx_stubs.c
# (they abort with a message if ever called). The stub goes to the final link only
# (`cargo rustc -- -C link-arg`), so no dependency is rebuilt for it.
set -uo pipefail
cd "$(dirname "$0")/.."

STAGE="${1:-}"
BUNDLE="${EMLOC_GPU_BUNDLE:-target/gpu-bundle}"
PYTHON="${PYTHON:-python3}"

build() {
    local backend="${1:-cuda}"
    mkdir -p "$BUNDLE"
    rm -f "$BUNDLE"/*
    if [ "$backend" = cuda ]; then
        export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
        mkdir -p "$CARGO_TARGET_DIR/stubs"
        cc -O2 -c benches/gpu/nvptx_stubs.c -o "$CARGO_TARGET_DIR/stubs/nvptx_stubs.o" || return 1
        local stub
        stub="$(cd "$CARGO_TARGET_DIR/stubs" && pwd)/nvptx_stubs.o"
        for target in "--example bench_kernels" "--test it"; do
            # shellcheck disable=SC2086
            cargo rustc --release --features cuda $target --message-format=json-render-diagnostics \
                -- -C link-arg="$stub" > "$BUNDLE/.artifacts.json" || return 1
            "$PYTHON" - "$BUNDLE" "$BUNDLE/.artifacts.json" <<'PY' || return 1
import json, shutil, sys
with open(sys.argv[2]) as f:
    exe = [m for m in map(json.loads, f)
           if m.get("reason") == "compiler-artifact" and m.get("executable")]
shutil.copy(exe[-1]["executable"], f"{sys.argv[1]}/{exe[-1]['target']['name']}")
PY
        done
        rm -f "$BUNDLE/.artifacts.json"
    else
        # The README's test build: its binaries (debug, wgpu) run the same stages on lavapipe.
        cargo test --workspace --features emloc/wgpu --no-run --message-format=json \
            2>/dev/null | "$PYTHON" -c '
import json, shutil, sys
for m in map(json.loads, sys.stdin):
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe:
        name = m["target"]["name"]
        if name in ("it", "bench_kernels"):
            shutil.copy(exe, sys.argv[1] + "/" + name)
' "$BUNDLE" || return 1
    fi
    strip "$BUNDLE"/* || return 1
    ls -l "$BUNDLE"
    xz -9 -T0 "$BUNDLE"/* || return 1
    local bytes
    bytes=$(du -cb "$BUNDLE"/* | tail -1 | cut -f1)
    ls -l "$BUNDLE"
    echo "bundle: $((bytes / 1048576)) MiB (xz) in $BUNDLE (a device call carries 64 MiB in all)"
    # The working tree travels too (about 10 MB).
    [ "$bytes" -lt $((52 * 1048576)) ] || { echo "bundle too large" >&2; return 1; }
}

run() {
    local out="${1:-${OUT:-}}"
    [ -n "$out" ] || { echo "usage: benches/gpu.sh run OUT_DIR (or set \$OUT)" >&2; return 2; }
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    local device="${EMLOC_GPU_DEVICE:-cuda}" sizes="${EMLOC_GPU_SIZES:-gpu}" status=0
    local logs="$out/gpu-logs.txt"
    : > "$logs"
    log() { echo "$*" | tee -a "$logs"; }
    local bin_dir
    bin_dir="$(mktemp -d)"
    for bin in it bench_kernels; do
        [ -f "$BUNDLE/$bin.xz" ] || { log "missing $BUNDLE/$bin.xz: run benches/gpu.sh build first"; return 1; }
        xz -dc "$BUNDLE/$bin.xz" > "$bin_dir/$bin" && chmod +x "$bin_dir/$bin" || return 1
    done
    # The driver (libcuda), NVRTC and the CUDA runtime for CubeCL (cudarc loads them by name):
    # the driver's mount, the toolkit's and the ones PyTorch's wheels bring.
    if [ "$device" = cuda ]; then
        local libs
        libs=$("$PYTHON" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib"]
dirs += [d for r in roots for d in glob.glob(os.path.join(r, "*", "lib"))]
print(":".join(d for d in dirs if os.path.isdir(d)))
PY
        )
        export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } \
            | tee -a "$logs"
    fi
    export RUST_BACKTRACE=1
    local start

    log "== kernel tests ($device)"
    start=$(date +%s)
    timeout 120 "$bin_dir/it" kernels cholesky --test-threads 4 > "$out/tests.log" 2>&1 || status=1
    grep -E "^test result|FAILED|panicked|\[emloc kernels\]" "$out/tests.log" \
        | head -40 | tee -a "$logs"
    log "tests: $(($(date +%s) - start)) s, $([ $status = 0 ] && echo passed || echo FAILED)"

    log "== emloc sweep ($sizes)"
    start=$(date +%s)
    timeout 150 "$bin_dir/bench_kernels" "$device" --sweep "$sizes" > "$out/emloc.jsonl" \
        2> "$out/emloc.err" || { status=1; tail -20 "$out/emloc.err" | tee -a "$logs"; }
    log "emloc sweep: $(($(date +%s) - start)) s, $(wc -l < "$out/emloc.jsonl") rows"

    log "== PyTorch/PEFT peer ($sizes)"
    start=$(date +%s)
    local torch_device=cuda
    [ "$device" = cuda ] || torch_device=cpu
    PYTHONUNBUFFERED=1 timeout 100 "$PYTHON" benches/peers/gpu_peer.py --sizes "$sizes" \
        --device "$torch_device" > "$out/torch.jsonl" 2> "$out/torch.err" \
        || { status=1; tail -20 "$out/torch.err" | tee -a "$logs"; }
    log "peer: $(($(date +%s) - start)) s, $(wc -l < "$out/torch.jsonl") rows"

    "$PYTHON" benches/peers/gpu_report.py "$out/emloc.jsonl" "$out/torch.jsonl" > "$out/gpu-report.md"
    cat "$out/emloc.jsonl" "$out/torch.jsonl" > "$out/gpu-results.jsonl"
    { echo "== tests.log (tail)"; tail -30 "$out/tests.log"; } >> "$logs"
    rm -f "$out/emloc.jsonl" "$out/torch.jsonl" "$out/tests.log" "$out/emloc.err" "$out/torch.err"
    cat "$out/gpu-report.md"
    return $status
}

case "$STAGE" in
    build) shift; build "$@" ;;
    run) shift; run "$@" ;;
    *)
        echo "usage: benches/gpu.sh build [cuda|wgpu] | run [OUT_DIR]" >&2
        exit 2
        ;;
esac
