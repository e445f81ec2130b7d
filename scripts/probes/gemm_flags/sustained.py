"""The prefill step's two largest GEMMs (gate/up, down; 8,000 and 8,192 rows) timed in a
short burst and sustained (400 calls back to back, the last 100 traced), with the kernels
XLA chose: whether the 10-13% they lose inside a prefill step against a short burst is the
GPU slowing under sustained load.

  python scripts/probes/gemm_flags/sustained.py --out $OUT/gemm_sustained.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from scripts.bench_common import gpu_kernel_events

    key = jax.random.key(0)
    f = jax.jit(lambda x, w: x @ w)
    res = {}
    for name, k, n in (("gate_up", 4096, 28672), ("down", 14336, 4096)):
        ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * 0.02
              for i in range(2)]
        for m in (8000, 8192):
            xs = [jax.random.normal(jax.random.fold_in(key, 10 + i), (m, k), jnp.bfloat16)
                  for i in range(2)]
            for label, warm, traced in (("burst", 0, 10), ("sustained", 300, 100)):
                jax.block_until_ready(f(xs[0], ws[0]))
                for i in range(warm):
                    f(xs[i % 2], ws[i % 2])
                trace_dir = tempfile.mkdtemp()
                with jax.profiler.trace(trace_dir):
                    for i in range(traced):
                        out = f(xs[i % 2], ws[i % 2])
                    jax.block_until_ready(out)
                ev = gpu_kernel_events(trace_dir)
                t = sum(d for _, _, d in ev) / traced
                res[f"{name} {m} {label}"] = dict(time_us=t, tflops=2 * m * k * n / t / 1e6,
                                                  kernels=sorted({e[0] for e in ev}))
                print(f"{name} {m} {label}: {t:.1f} us, {2 * m * k * n / t / 1e6:.0f} TFLOP/s,"
                      f" {sorted({e[0] for e in ev})}", flush=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
