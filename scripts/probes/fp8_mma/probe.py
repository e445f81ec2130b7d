"""Decode attention over a float8 cache with float8 matrix products instead of the upcast.

Llama-3.1-8B's attention shape; 256 decodes at 1,400 tokens and 64 at 4,096; the kernels'
own time (profiler) and the output's error against the reference over the same float8
cache. Variants (rpa.PROBE_FP8_MMA):
  None    as main (K and V upcast to float16, q clamped to float16);
  qk      q quantized per row to float8 (scale max|q| / 448), q K^T in float8;
  qk_pv   and p @ V in float8 (the softmax weights times 448).

  python scripts/probes/fp8_mma/probe.py --out $OUT/fp8_mma.json [--interpret]
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

FP8 = jnp.float8_e4m3fn
C = rpa.KernelConfig
VARIANTS = [(None, None), ("qk", None), ("qk", C(16, 128, 4, 2)), ("qk", C(16, 64, 4, 2)),
            ("qk", C(16, 256, 4, 2)), ("qk_pv", None), ("qk_pv", C(16, 128, 4, 2)),
            ("qk_pv", C(16, 64, 4, 3)), ("qk_pv", C(16, 256, 4, 2)),
            ("qk_pv", C(16, 128, 8, 3)), ("qk_pv", C(16, 256, 8, 3))]


def case(pool, k, v, q_lens, ctx_lens, copy, interpret, variants):
    inputs = bk.ragged_inputs(pool, q_lens, ctx_lens, bk.n_sets_for(bk.kv_bytes(ctx_lens)))
    (q, _, _, kvl, qsl), varying = inputs
    nbytes = sum(ctx_lens) * bk.HKV * bk.D * 2 * jnp.dtype(k.dtype).itemsize
    ref = np.asarray(jax.jit(bk.reference_step)(q, k, v, kvl, qsl, *varying[0])
                     .astype(jnp.float32))
    rows = []
    for mode, cfg in variants:
        rpa.PROBE_FP8_MMA = mode
        jax.clear_caches()
        step = bk.kernel_step(interpret=interpret, max_q_len=1, decode_config=cfg)
        row = dict(mode=mode, config=cfg and [cfg.block_m, cfg.block_n, cfg.num_warps,
                                              cfg.num_stages],
                   kv_dtype=jnp.dtype(k.dtype).name)
        try:
            out = np.asarray(jax.jit(step)(q, k, v, kvl, qsl, *varying[0])
                             .astype(jnp.float32))
            row["rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            row["max_err"] = float(np.max(np.abs(out - ref)))
            if not interpret:
                t = bk.device_time(step, ((q, k, v, kvl, qsl), varying))["time_us"]
                row.update(time_us=t, kv_GBps=nbytes / t / 1e3,
                           frac_copy=nbytes / t / 1e3 / copy)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        print(row, flush=True)
        rows.append(row)
    rpa.PROBE_FP8_MMA = None
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--interpret", action="store_true", help="small CPU check of the math")
    args = ap.parse_args()
    if args.interpret:
        shapes = (("decode-4x300", [1] * 4, [300] * 4),)
        pool, copy = bk.Pool(4 * 320 + 8 * bk.PAGE), 1.0
    else:
        shapes = (("decode-256x1400", [1] * 256, [1400] * 256),
                  ("decode-64x4096", [1] * 64, [4096] * 64))
        copy = bk.copy_bandwidth()["copy_GBps"]
        pool = bk.Pool(2 * 256 * 1408 + 64 * bk.PAGE)
    k8, v8 = pool.k.astype(FP8), pool.v.astype(FP8)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "copy_GBps": copy, "cases": {}}
    for name, q_lens, ctx_lens in shapes:
        result["cases"][name] = {
            "bf16": case(pool, pool.k, pool.v, q_lens, ctx_lens, copy, args.interpret,
                         [(None, None)]),
            "fp8": case(pool, k8, v8, q_lens, ctx_lens, copy, args.interpret,
                        VARIANTS[:1] + [VARIANTS[1], VARIANTS[5]] if args.interpret
                        else VARIANTS)}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\ncopy {copy:.0f} GB/s")
    print("case | cache | products | config | us | of copy | rel err | max err")
    for name, c in result["cases"].items():
        for rows in c.values():
            for r in rows:
                if "error" in r:
                    print(f"{name} | {r['kv_dtype']} | {r['mode']} | {r['config']} | "
                          f"{r['error'][:100]}")
                    continue
                print(f"{name} | {r['kv_dtype']} | {r['mode'] or 'upcast'} | "
                      f"{r['config'] or 'default'} | {r.get('time_us', 0):.1f} | "
                      f"{r.get('frac_copy', 0):.2f} | {r['rel_err']:.4f} | {r['max_err']:.4f}")


if __name__ == "__main__":
    main()
