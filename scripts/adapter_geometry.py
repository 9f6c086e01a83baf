#!/usr/bin/env python3
"""Where an `emloc run --recipe smollm2-bigbench` run's adapters put their change (EXPERIMENTS.md).

Usage: python3 scripts/adapter_geometry.py RUN_DIR [RHO]     (needs numpy and safetensors)

Reads RUN_DIR/adapter-full-lora, RUN_DIR/adapter-emloc-rho{RHO}-{corrected,uncorrected} (RHO
defaults to 0.4) and RUN_DIR/report.json, forms every layer's ΔW = (α / r) · B · A in float64,
and prints:
- the share of full LoRA's Σ‖ΔW‖²_F per projection type and per third of the depth, beside the
  ρ emulator's mean relative whitened error per type;
- the rank correlation between a layer's share and its whitened error;
- per type, the median of ‖ΔW_emloc‖ / ‖ΔW_full‖ for the corrected and uncorrected adapters, and
  the cosine between the corrected and the uncorrected ΔW over all layers.
Directions of LoRA solutions are not unique (two full-LoRA seeds have cosine ≈ 0.1), so this
prints no cosine between full LoRA and EMLoC.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def deltas(adapter_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        base = key[: -len(".lora_A.weight")]
        b = tensors[base + ".lora_B.weight"].astype(np.float64)
        name = base.removeprefix("base_model.model.")
        rank = a.shape[0]
        alpha = config.get("alpha_pattern", {}).get(name, config["lora_alpha"])
        scale = alpha / np.sqrt(rank) if config.get("use_rslora") else alpha / rank
        out[name] = scale * (b @ a.astype(np.float64))
    return out


def kind(name):
    return name.rsplit(".", 1)[-1]


def ranks(values):
    return np.argsort(np.argsort(values))


def main(run, rho="0.4"):
    run = Path(run)
    full = deltas(run / "adapter-full-lora")
    corrected = deltas(run / f"adapter-emloc-rho{rho}-corrected")
    uncorrected = deltas(run / f"adapter-emloc-rho{rho}-uncorrected")
    report = json.loads((run / "report.json").read_text())
    errors = next(
        {layer["path"]: layer["relative_whitened_error"] for layer in e["layers"]}
        for name, e in report["emulators"]
        if name == f"EMLoC ρ = {rho}"
    )
    energy = {k: float((d**2).sum()) for k, d in full.items()}
    total = sum(energy.values())
    share, error = defaultdict(float), defaultdict(list)
    depth = defaultdict(float)
    layers = 1 + max(int(k.split(".layers.")[1].split(".")[0]) for k in energy)
    for k, e in energy.items():
        share[kind(k)] += e / total
        error[kind(k)].append(errors[k])
        depth[3 * int(k.split(".layers.")[1].split(".")[0]) // layers] += e / total
    print(f"full LoRA ΔW energy share by type (ρ = {rho} mean whitened error):")
    print("  " + ", ".join(f"{t} {100 * share[t]:.0f} % ({np.mean(error[t]):.2f})" for t in sorted(share)))
    print("  by thirds of the depth: " + ", ".join(f"{100 * depth[i]:.0f} %" for i in sorted(depth)))
    keys = sorted(energy)
    rho_rank = np.corrcoef(ranks([energy[k] for k in keys]), ranks([errors[k] for k in keys]))[0, 1]
    print(f"  rank correlation of a layer's share with its whitened error: {rho_rank:.3f}")
    for label, other in (("corrected", corrected), ("uncorrected", uncorrected)):
        ratio = defaultdict(list)
        for k, d in full.items():
            ratio[kind(k)].append(np.linalg.norm(other[k]) / np.linalg.norm(d))
        print(f"‖ΔW {label}‖ / ‖ΔW full‖, median per type: "
              + ", ".join(f"{t} {np.median(v):.2f}" for t, v in sorted(ratio.items())))
    dot = sum(float((corrected[k] * uncorrected[k]).sum()) for k in full)
    norms = np.sqrt(sum(float((corrected[k] ** 2).sum()) for k in full)
                    * sum(float((uncorrected[k] ** 2).sum()) for k in full))
    print(f"cosine(corrected ΔW, uncorrected ΔW) over all layers: {dot / norms:.3f}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])
