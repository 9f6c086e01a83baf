#!/usr/bin/env python3
"""Joins the two sides of the GPU run (emloc's `bench_kernels --sweep` lines and
gpu_peer.py's) into one Markdown report of ratios: throughput of emloc over the peer, so > 1
means emloc is faster.

    python3 benches/peers/gpu_report.py emloc.jsonl torch.jsonl > report.md
"""

import json
import sys


def load(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except FileNotFoundError:
        pass
    return rows


def index(rows, op):
    out = {}
    for r in rows:
        if r.get("op") == op and "ms" in r:
            out[(r["impl"], r.get("dtype"), r.get("d"), r.get("tokens"))] = r["ms"]
    return out


def ratio(peer, ours):
    return f"{peer / ours:.2f}x" if peer and ours else "-"


def ms(v):
    return f"{v:.2f}" if v else "-"


def table(title, times, columns, ratios):
    """One row per (dtype, d, tokens): each implementation's ms, then emloc auto's ratios."""
    print(f"\n## {title} (ms; ratio = peer time / emloc time, > 1: emloc faster)\n")
    heads = [name for name, _ in columns] + [name for name, _ in ratios]
    print("| dtype | d | tokens | " + " | ".join(heads) + " |")
    print("|---" * (3 + len(heads)) + "|")
    for dt, d, n in sorted({k[1:] for k in times}):
        get = lambda impl: times.get((impl, dt, d, n))
        cells = [ms(get(impl)) for _, impl in columns]
        cells += [ratio(get(peer), get("emloc_auto")) for _, peer in ratios]
        print(f"| {dt} | {d} | {n} | " + " | ".join(cells) + " |")


def main():
    rows = load(sys.argv[1]) + load(sys.argv[2])
    for r in rows:
        if r.get("op") == "device":
            print(f"- device: {r.get('device')} {r.get('torch', '')}".rstrip())
    print()

    table(
        "Gram XᵀX",
        index(rows, "gram"),
        [("emloc auto", "emloc_auto"), ("tiled", "emloc_tiled"), ("matmul route", "emloc_matmul"),
         ("Burn xᵀx", "burn_matmul"), ("torch x.T@x", "torch_matmul")],
        [("auto vs torch", "torch_matmul"), ("auto vs Burn", "burn_matmul")],
    )
    table(
        "Emulator layer + LoRA, forward + backward",
        index(rows, "layer_fwd_bwd"),
        [("emloc auto", "emloc_auto"), ("tiled", "emloc_tiled"), ("matmul route", "emloc_matmul"),
         ("Burn unfused", "burn_unfused"), ("torch eager", "torch_eager"),
         ("PEFT dense", "peft_dense")],
        [("vs Burn unfused", "burn_unfused"), ("vs torch eager", "torch_eager"),
         ("vs PEFT dense", "peft_dense")],
    )

    held = [r for r in rows if r.get("op") == "layer_held_bytes"]
    if held:
        print("\n## Bytes the layer's autograph holds between forward and backward\n")
        print("| impl | dtype | d | tokens | k | r | held | h_l alone | previous emloc state |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in held:
            print(f"| {r['impl']} | {r['dtype']} | {r['d']} | {r['tokens']} | {r['k']} | {r['r']} "
                  f"| {r['bytes']} | {r['h_l_bytes']} | {r['previous_emloc_bytes']} |")

    chol = index(rows, "cholesky_solve")
    ds = sorted({k[2] for k in chol})
    if ds:
        print("\n## Cholesky + triangular solve, f32 (ms)\n")
        print("| d | emloc | torch.linalg | ratio |")
        print("|---|---|---|---|")
        for d in ds:
            e, t = chol.get(("emloc", "f32", d, None)), chol.get(("torch_linalg", "f32", d, None))
            print(f"| {d} | {ms(e)} | {ms(t)} | {ratio(t, e)} |")

    for r in rows:
        if r.get("op") == "large_gram":
            print(f"\n## Gram past 2³² elements\n\n{json.dumps(r)}")
        if r.get("op") == "skip" or "skip" in r:
            print(f"\n- skipped: {json.dumps(r)}")


if __name__ == "__main__":
    main()
