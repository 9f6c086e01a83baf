"""Writes data/multiemo/train.jsonl: a fixed-seed sample of the MultiEmo train split.

Usage: python3 scripts/sample_multiemo.py SHARED/multiemo/train.jsonl data/multiemo/train.jsonl
Draws 4,000 lines with random.Random(13).sample (no replacement) and keeps them in the order
drawn; lines are copied byte for byte. Only the train split is read: the test split stays apart.
"""
import random
import sys

SIZE, SEED = 4000, 13

source, target = sys.argv[1], sys.argv[2]
with open(source, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
sample = random.Random(SEED).sample(lines, SIZE)
with open(target, "w", encoding="utf-8") as f:
    f.writelines(sample)
print(f"{target}: {len(sample)} of {len(lines)} lines")
