#!/usr/bin/env python3
"""P2 peer: whitening (Cholesky) + truncated SVD of one d×d layer with numpy/scipy, on the same
construction as `emloc bench-svd` (weight N(0, 1/d); Gram of 2d tokens whose column j is scaled
by 1 + 8/(1+j); rank ⌊ρ d / 2⌋), so the two can be timed side by side on one machine.

    OPENBLAS_NUM_THREADS=2 python3 benches/peers/svd_peer.py 1024 2048 4096

Times: Cholesky of the Gram (scipy.linalg.cholesky), W S with S the lower factor, the full
thin SVD (numpy.linalg.svd, LAPACK gesdd), and the un-whitening triangular solve, i.e. what
emloc's exact path does. Prints the BLAS in use.
"""
import sys
import time

import numpy as np
import scipy.linalg as sla


def main():
    dims = [int(a) for a in sys.argv[1:]] or [1024, 2048]
    ratio = 0.4
    cfg = np.show_config(mode="dicts") if "mode" in np.show_config.__code__.co_varnames else None
    blas = cfg.get("Build Dependencies", {}).get("blas", {}) if cfg else {}
    print(f"numpy {np.__version__}, scipy {sla.__name__.split('.')[0]} {__import__('scipy').__version__}, BLAS {blas.get('name', '?')} {blas.get('version', '')}")
    print("| d | rank | numpy/scipy s | rel. error |")
    print("|---:|---:|---:|---:|")
    for d in dims:
        rng = np.random.default_rng(d)
        rank = max(1, int(ratio * d * d / (2 * d)))
        w = rng.normal(0.0, 1.0 / np.sqrt(d), (d, d))  # [d_out, d_in]
        x = rng.normal(0.0, 1.0, (2 * d, d)) * (1.0 + 8.0 / (1.0 + np.arange(d)))
        g = x.T @ x
        start = time.perf_counter()
        s = sla.cholesky(g, lower=True)
        ws = w @ s
        u, sigma, vt = np.linalg.svd(ws, full_matrices=False)
        x_k = np.sqrt(sigma[:rank])[:, None] * vt[:rank]  # Σ^{1/2} V_kᵀ
        w_v = sla.solve_triangular(s, x_k.T, lower=True, trans="T").T  # X S⁻¹
        elapsed = time.perf_counter() - start
        err = np.sqrt((sigma[rank:] ** 2).sum() / (sigma ** 2).sum())
        assert w_v.shape == (rank, d)
        print(f"| {d} | {rank} | {elapsed:.2f} | {err:.5f} |")


if __name__ == "__main__":
    main()
