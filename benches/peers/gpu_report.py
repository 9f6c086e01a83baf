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


def main():
    rows = load(sys.argv[1]) + load(sys.argv[2])
    for r in rows:
        if r.get("op") == "device":
            print(f"- device: {r.get('device')} {r.get('torch', '')}".rstrip())
    print()

    gram = index(rows, "gram")
    keys = sorted({k[1:] for k in gram})
    print("## Gram XᵀX (ms; ratio = peer time / emloc time, > 1: emloc faster)\n")
    print("| dtype | d | tokens | emloc auto | tiled | matmul route | Burn xᵀx | torch x.T@x "
          "| auto vs torch | auto vs Burn |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dt, d, n in keys:
        g = lambda i: gram.get((i, dt, d, n))
        print(f"| {dt} | {d} | {n} | {ms(g('emloc_auto'))} | {ms(g('emloc_tiled'))} "
              f"| {ms(g('emloc_matmul'))} | {ms(g('burn_matmul'))} | {ms(g('torch_matmul'))} "
              f"| {ratio(g('torch_matmul'), g('emloc_auto'))} "
              f"| {ratio(g('burn_matmul'), g('emloc_auto'))} |")

    layer = index(rows, "layer_fwd_bwd")
    keys = sorted({k[1:] for k in layer})
    print("\n## Emulator layer + LoRA, forward + backward (ms; ratios as above)\n")
    print("| dtype | d | tokens | emloc auto | tiled | matmul route | Burn unfused "
          "| torch eager | PEFT dense | vs Burn unfused | vs torch eager | vs PEFT dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dt, d, n in keys:
        g = lambda i: layer.get((i, dt, d, n))
        print(f"| {dt} | {d} | {n} | {ms(g('emloc_auto'))} | {ms(g('emloc_tiled'))} "
              f"| {ms(g('emloc_matmul'))} | {ms(g('burn_unfused'))} | {ms(g('torch_eager'))} "
              f"| {ms(g('peft_dense'))} | {ratio(g('burn_unfused'), g('emloc_auto'))} "
              f"| {ratio(g('torch_eager'), g('emloc_auto'))} "
              f"| {ratio(g('peft_dense'), g('emloc_auto'))} |")

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
