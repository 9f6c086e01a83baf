#!/usr/bin/env bash
# EXPERIMENTS.md's "SmolLM2-135M-Instruct (GGUF) end to end" table: every stage on the real GGUF and
# BIG-bench 2-digit addition (data/bigbench), zero-shot, LoRA on the original, EMLoC rho 0.4
# corrected (merged) and uncorrected. About 25 minutes on 2 CPU cores (debug profile).
#
# Usage: scripts/smollm2_e2e.sh OUT_DIR        (OUT_DIR must not exist; it is never overwritten)
# Needs the emloc binary (EMLOC, default target/debug/emloc: `cargo build -p emloc-cli`) and
# fetches the GGUF with scripts/fetch_smollm2.sh unless EMLOC_SMOLLM2_GGUF names it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/smollm2_e2e.sh OUT_DIR}"
if [[ -e "$OUT" ]]; then
    echo "error: $OUT exists; choose a new directory" >&2
    exit 1
fi
E="${EMLOC:-target/debug/emloc}"
G="${EMLOC_SMOLLM2_GGUF:-$(bash scripts/fetch_smollm2.sh | tail -n 1)}"
D=data/bigbench/arithmetic__2_digit_addition.train.jsonl
C=(--data "$D" --validation 50 --split-seed 0)
T=(--steps 30 --batch-size 8 --lr 2e-3 --warmup-steps 3)
mkdir -p "$OUT"
timed() { local s; s=$(date +%s); "$@"; echo "[$(( $(date +%s) - s )) s] ${*:1:2}" >&2; }
timed "$E" generate --model "$G" --prompt "The capital of France is" --max-new-tokens 16 > "$OUT/generate_raw.txt"
timed "$E" generate --model "$G" --prompt "What is the capital of France?" --chat --max-new-tokens 16 > "$OUT/generate_chat.txt"
timed "$E" eval --model "$G" "${C[@]}" --max-new-tokens 8 > "$OUT/eval_zero_shot.json"
timed "$E" emulate --model "$G" "${C[@]}" --ratio 0.4 --calibration-pairs 64 --out "$OUT/emulator"
timed "$E" finetune --model "$G" "${C[@]}" --emulator "$OUT/emulator" --out "$OUT/lora_emulator" "${T[@]}"
timed "$E" correct --model "$G" --emulator "$OUT/emulator" --adapter "$OUT/lora_emulator" --out "$OUT/corrected"
timed "$E" merge --model "$G" --adapter "$OUT/corrected" --out "$OUT/merged"
timed "$E" eval --model "$OUT/merged" "${C[@]}" --max-new-tokens 8 > "$OUT/eval_corrected_merged.json"
timed "$E" eval --model "$G" "${C[@]}" --adapter "$OUT/lora_emulator" --max-new-tokens 8 > "$OUT/eval_uncorrected.json"
timed "$E" finetune --model "$G" "${C[@]}" --out "$OUT/lora_original" "${T[@]}"
timed "$E" eval --model "$G" "${C[@]}" --adapter "$OUT/lora_original" --max-new-tokens 8 > "$OUT/eval_lora_original.json"
echo "results: $OUT/eval_*.json, per-stage report.json in each directory" >&2
