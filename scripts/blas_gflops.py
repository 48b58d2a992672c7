#!/usr/bin/env python3
"""The trainable linear's three products at the benchmark shape through numpy's BLAS
(OpenBLAS in numpy's wheels): what a system BLAS would give, set against
`cargo test --release -- --ignored --nocapture product_gflops` (our packed kernel).

Threads: OPENBLAS_NUM_THREADS=1 or 2 (as RAYON_NUM_THREADS for ours).
"""
import time

import numpy as np

M = 1200
for n, k in [(256, 256), (688, 256), (256, 688), (4096, 256)]:
    rng = np.random.default_rng(1)
    x = rng.random((M, k), dtype=np.float32)
    w = rng.random((n, k), dtype=np.float32)
    g = rng.random((M, n), dtype=np.float32)
    reps = max(3, int(3e9 / (2 * M * n * k)))

    def rate(f):
        f()
        t = time.time()
        for _ in range(reps):
            f()
        return 2 * M * n * k * reps / (time.time() - t) / 1e9

    fwd = rate(lambda: x @ w.T)
    dx = rate(lambda: g @ w)
    dw = rate(lambda: g.T @ x)
    print(f"{n}x{k} m={M}: fwd {fwd:.1f} dx {dx:.1f} dW {dw:.1f} GFLOP/s")
