"""Decode attention over a float8 cache on the CUDA cores (PROBE_FMA: each query head's
q . K and p . V as multiply-and-sum in float32, tiles of one token's 4 query heads)
against the matrix-unit kernel (FP8_DECODE_CONFIG) and a bf16 cache.

Llama-3.1-8B's attention shape; 256 decodes at 1,400 tokens and 64 at 4,096; the kernels'
own time (profiler) and the error against the XLA reference over the same cache.

  python scripts/probes/fp8_fma/probe.py --out $OUT/fp8_fma.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import ragged_paged_attention_triton as rpa  # noqa: E402
from scripts import bench_kernels as bk  # noqa: E402

C = rpa.KernelConfig
FP8 = jnp.float8_e4m3fn
# (cache, fma, tile)
VARIANTS = [("bf16", False, None), ("fp8", False, None)] + [
    ("fp8", True, C(4, n, w, st)) for n, w, st in (
        (32, 2, 4), (32, 2, 6), (64, 2, 4), (64, 4, 4), (64, 4, 2), (16, 1, 6), (16, 2, 8),
        (32, 4, 6), (128, 4, 3), (64, 8, 3), (32, 1, 6))] + [
    ("bf16", True, C(4, 32, 2, 4)), ("bf16", True, C(4, 64, 4, 3))]


def case(pool, caches, q_lens, ctx_lens, copy):
    (q, _, _, kvl, qsl), varying = bk.ragged_inputs(pool, q_lens, ctx_lens,
                                                    bk.n_sets_for(bk.kv_bytes(ctx_lens)))
    refs = {}
    rows = []
    for name, fma, cfg in VARIANTS:
        k, v = caches[name]
        nbytes = sum(ctx_lens) * bk.HKV * bk.D * 2 * jnp.dtype(k.dtype).itemsize
        if name not in refs:
            refs[name] = np.asarray(jax.jit(bk.reference_step)(q, k, v, kvl, qsl, *varying[0])
                                    .astype(jnp.float32))
        rpa.PROBE_FMA = fma
        jax.clear_caches()
        step = bk.kernel_step(max_q_len=1, decode_config=cfg, num_kv_splits=1)
        row = dict(cache=name, fma=fma, config=cfg and [cfg.block_m, cfg.block_n,
                                                        cfg.num_warps, cfg.num_stages])
        try:
            out = np.asarray(jax.jit(step)(q, k, v, kvl, qsl, *varying[0]).astype(jnp.float32))
            ref = refs[name]
            row["rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            t = bk.device_time(step, ((q, k, v, kvl, qsl), varying))["time_us"]
            row.update(time_us=t, frac_copy=nbytes / t / 1e3 / copy)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        rows.append(row)
    rpa.PROBE_FMA = False
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    copy = bk.copy_bandwidth()["copy_GBps"]
    pool = bk.Pool(2 * 256 * 1408 + 64 * bk.PAGE)
    caches = {"bf16": (pool.k, pool.v), "fp8": (pool.k.astype(FP8), pool.v.astype(FP8))}
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "copy_GBps": copy, "cases": {}}
    for name, q_lens, ctx_lens in (("decode-256x1400", [1] * 256, [1400] * 256),
                                   ("decode-64x4096", [1] * 64, [4096] * 64)):
        result["cases"][name] = case(pool, caches, q_lens, ctx_lens, copy)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\ncopy {copy:.0f} GB/s\ncase | cache | path | tile | us | of copy | rel err")
    for name, rows in result["cases"].items():
        for r in rows:
            tail = (r["error"][:80] if "error" in r else
                    f"{r['time_us']:.1f} | {r['frac_copy']:.2f} | {r['rel_err']:.4f}")
            print(f"{name} | {r['cache']} | {'fma' if r['fma'] else 'mma'} | "
                  f"{r['config'] or 'default'} | {tail}")


if __name__ == "__main__":
    main()
