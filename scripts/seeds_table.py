#!/usr/bin/env python3
"""Mean ± spread over seeds of the rows that `emloc run` reports in each RUN/report.json.

Usage: python3 scripts/seeds_table.py RUN_DIR [RUN_DIR ...]
Rows are matched by method name; a row missing from some runs is averaged over the others (the
n column says over how many). Spread = half the range (max − min) / 2. Works for the LLM recipe
(mean score over the eight tasks) and the classification recipe (accuracy).
"""
import json
import statistics
import sys
from pathlib import Path


def score(row):
    if "scores" in row:
        return row["scores"]["mean_score"], row["scores"]["mean_loss"]
    return row["metrics"]["accuracy"], row["metrics"]["loss"]


def main(dirs):
    if not dirs:
        sys.exit(__doc__)
    runs = [json.loads((Path(d) / "report.json").read_text()) for d in dirs]
    order, by_method = [], {}
    for run in runs:
        zero = next(score(r)[0] for r in run["rows"] if r["method"].startswith("zero-shot"))
        full = next(score(r)[0] for r in run["rows"] if r["method"] == "LoRA on the full model")
        for row in run["rows"]:
            if row["method"] not in by_method:
                order.append(row["method"])
                by_method[row["method"]] = []
            s, loss = score(row)
            gain = (s - zero) / (full - zero) if full - zero > 1e-12 else float("nan")
            by_method[row["method"]].append((s, loss, gain))

    def fmt(values, pct=False):
        mean = statistics.fmean(values)
        spread = (max(values) - min(values)) / 2
        return f"{100 * mean:.0f} ± {100 * spread:.0f} %" if pct else f"{mean:.3f} ± {spread:.3f}"

    print("| method | n | score | val. loss | gain recovered |")
    print("|---|---:|---:|---:|---:|")
    for method in order:
        vals = by_method[method]
        print(
            f"| {method} | {len(vals)} | {fmt([v[0] for v in vals])} | {fmt([v[1] for v in vals])} "
            f"| {fmt([v[2] for v in vals], pct=True)} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
