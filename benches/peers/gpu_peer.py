#!/usr/bin/env python3
"""The PyTorch side of the GPU run (benches/gpu.sh): what a user would run instead of emloc's
kernels, on the shapes of benches/gpu_sizes.json, one JSON object per line on stdout.

- gram: `x.T @ x` (cuBLAS; f32 without TF32, PyTorch's default; bf16 in, bf16 out, f32
  accumulation);
- layer_fwd_bwd: the emulator layer's maths in eager PyTorch,
  `(x @ W_v) @ W_u + s * (x @ A) @ B + b`, and PEFT's LoRA (`get_peft_model`) on the dense
  `d x d` linear the emulator replaces, both forward + backward with gradients
  for x, A and B only;
- cholesky_solve: `torch.linalg.cholesky(G)` then `solve_triangular(L, X, left=False)`
  (`Y L = X`), f32.

Times are medians over `repeats` runs after one warm-up, synchronising after each.

    python3 benches/peers/gpu_peer.py --sizes gpu            # on the GPU
    python3 benches/peers/gpu_peer.py --sizes quick --device cpu
"""

import argparse
import json
import pathlib
import statistics
import time

import torch

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def emit(**row):
    print(json.dumps(row), flush=True)


def timed(device, repeats, fn):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="gpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    table = json.loads((pathlib.Path(__file__).parents[1] / "gpu_sizes.json").read_text())
    sizes = table[args.sizes]
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    repeats, keep, rank = sizes["repeats"], sizes["keep"], sizes["rank"]
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    emit(op="device", device=name, torch=torch.__version__)

    for dtype_name in sizes["dtypes"]:
        dtype = DTYPES[dtype_name]
        for d, tokens in sizes["gram"]:
            x = torch.randn(tokens, d, device=device, dtype=dtype)
            t = timed(device, repeats, lambda: x.T @ x)
            emit(op="gram", impl="torch_matmul", dtype=dtype_name, d=d, tokens=tokens,
                 ms=t * 1e3, tflops=2 * tokens * d * d / t / 1e12)
            del x
        for d, tokens in sizes["layer"]:
            layer_rows(device, dtype, dtype_name, d, tokens, keep, rank, repeats)

    for d in sizes["cholesky"]:
        x = torch.randn(4 * d, d, device=device)
        g = x.T @ x / (4 * d)
        rhs = torch.randn(d // 4, d, device=device)

        def factor_solve():
            l = torch.linalg.cholesky(g)
            return torch.linalg.solve_triangular(l, rhs, upper=False, left=False)

        t = timed(device, repeats, factor_solve)
        emit(op="cholesky_solve", impl="torch_linalg", dtype="f32", d=d, ms=t * 1e3)


def layer_rows(device, dtype, dtype_name, d, tokens, keep, rank, repeats):
    k, r, scale = max(int(keep * d), 1), rank, 2.0
    n = float(tokens)
    flops = 2 * n * (2 * d * k + 2 * d * r) * 2

    def weights(rows, cols):
        return (torch.randn(rows, cols, device=device) / rows**0.5).to(dtype)

    w_v, w_u = weights(d, k), weights(k, d)
    a, b = weights(d, r).requires_grad_(), weights(r, d).requires_grad_()
    bias = torch.zeros(d, device=device, dtype=dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(tokens, d, device=device, dtype=dtype)

    def emulator_step():
        y = (x @ w_v) @ w_u + scale * ((x @ a) @ b) + bias
        y.backward(dy)

    t = timed(device, repeats, emulator_step)
    emit(op="layer_fwd_bwd", impl="torch_eager", dtype=dtype_name, d=d, tokens=tokens, k=k,
         r=r, ms=t * 1e3, tflops=flops / t / 1e12)

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        emit(op="layer_fwd_bwd", impl="peft_dense", skip=f"peft not importable: {err}")
        return

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d, d, device=device, dtype=dtype)

        def forward(self, inputs):
            return self.proj(inputs)

    config = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=0.0, target_modules=["proj"])
    lora = get_peft_model(Dense(), config).to(device=device, dtype=dtype)

    def peft_step():
        lora(x).backward(dy)

    t = timed(device, repeats, peft_step)
    dense_flops = 2 * n * (d * d + 2 * d * r) * 2
    emit(op="layer_fwd_bwd", impl="peft_dense", dtype=dtype_name, d=d, tokens=tokens, k=d,
         r=r, ms=t * 1e3, tflops=dense_flops / t / 1e12)


if __name__ == "__main__":
    main()
