#!/usr/bin/env python3
"""Writes a Llama-family checkpoint with random weights as an HF directory (config.json +
safetensors), for measuring memory on a model of real size without downloading one:

    python3 benches/make_random_llama.py OUT [--dtype bfloat16|float32] [--shape llama-3.2-1b|tiny]

`llama-3.2-1b` has Llama-3.2-1B's shapes (16 layers, d 2048, SwiGLU 8192, GQA 32/8 heads, vocab
128256, tied head: 1.24 B parameters). transformers' own initialisation (normal, std 0.02), seed 0.
Memory depends on shapes, not values. Refuses to write into an existing OUT.
"""
import argparse
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    args = parser.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists; give a new directory")
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape], tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=8192)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(args.out, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {params / 1e9:.3f} B parameters, {args.dtype}")


if __name__ == "__main__":
    main()
