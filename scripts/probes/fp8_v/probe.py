"""Why decode attention over a float8 cache reads K/V at 0.65 of the copy bandwidth.

Llama-3.1-8B's attention shape; 256 decodes at 1,400 tokens and 64 at 4,096; the kernels'
own time (profiler). Variants of how the kernel reads V for p @ V (rpa.PROBE_V):
  None           as main (V rows [tokens, head_dim], contracted over tokens);
  contract_dims  timing only: the same V tile contracted over head_dim (as K is);
  sum_v          timing only: V loaded and upcast, no matrix product;
  paged_t        V stored [pages, kv_heads, head_dim, page_size] (tokens contiguous),
                 real math, checked against the reference on the usual layout;
  swap           both products with the context's tokens on the matrix units' M side
                 (s^T = K q^T, (p V)^T = V^T p^T), the accumulator kept transposed;
  swap_v         only p @ V so.

  python scripts/probes/fp8_v/probe.py --out $OUT/fp8_v.json
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


def variants(fp8: bool):
    swaps = [(m, c) for m in ("swap", "swap_v")
             for c in (None, C(16, 128, 4, 3), C(16, 64, 4, 2), C(16, 128, 4, 2),
                       C(16, 128, 8, 2), C(16, 64, 4, 3))]
    if fp8:
        return [(None, None), ("contract_dims", None)] + swaps
    return [(None, None)] + swaps


def transposed(v):
    return jnp.asarray(v.transpose(0, 2, 3, 1))  # [pages, kv_heads, head_dim, page_size]


def case(pool, k, v, q_lens, ctx_lens, copy):
    inputs = bk.ragged_inputs(pool, q_lens, ctx_lens, bk.n_sets_for(bk.kv_bytes(ctx_lens)))
    (q, _, _, kvl, qsl), varying = inputs
    vt = transposed(v)
    nbytes = sum(ctx_lens) * bk.HKV * bk.D * 2 * jnp.dtype(k.dtype).itemsize
    ref_args = (q, k, v, kvl, qsl) + varying[0]
    ref = np.asarray(jax.jit(bk.reference_step)(*ref_args).astype(jnp.float32))
    rows = []
    for mode, cfg in variants(jnp.dtype(k.dtype) == FP8):
        rpa.PROBE_V = mode
        jax.clear_caches()
        vv = vt if mode == "paged_t" else v
        step = bk.kernel_step(max_q_len=1, decode_config=cfg)
        row = dict(mode=mode, config=cfg and [cfg.block_m, cfg.block_n, cfg.num_warps,
                                              cfg.num_stages],
                   kv_dtype=jnp.dtype(k.dtype).name)
        try:
            out = np.asarray(jax.jit(step)(q, k, vv, kvl, qsl, *varying[0]).astype(jnp.float32))
            row["rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            dev = bk.device_time(step, ((q, k, vv, kvl, qsl), varying))
            t = dev["time_us"]
            row.update(time_us=t, kv_GBps=nbytes / t / 1e3, frac_copy=nbytes / t / 1e3 / copy)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(row, flush=True)
        rows.append(row)
    rpa.PROBE_V = None
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    copy = bk.copy_bandwidth()["copy_GBps"]
    pool = bk.Pool(2 * 256 * 1408 + 64 * bk.PAGE)
    k8, v8 = pool.k.astype(FP8), pool.v.astype(FP8)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "copy_GBps": copy, "cases": {}}
    for name, q_lens, ctx_lens in (("decode-256x1400", [1] * 256, [1400] * 256),
                                   ("decode-64x4096", [1] * 64, [4096] * 64)):
        result["cases"][name] = {
            "bf16": case(pool, pool.k, pool.v, q_lens, ctx_lens, copy),
            "fp8": case(pool, k8, v8, q_lens, ctx_lens, copy)}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\ncopy {copy:.0f} GB/s")
    print("case | cache | V read | config | us | of copy | rel err")
    for name, c in result["cases"].items():
        for rows in c.values():
            for r in rows:
                if "error" in r:
                    print(f"{name} | {r['kv_dtype']} | {r['mode']} | {r['config']} | {r['error'][:80]}")
                    continue
                print(f"{name} | {r['kv_dtype']} | {r['mode'] or 'main'} | {r['config'] or 'default'} | "
                      f"{r['time_us']:.1f} | {r['frac_copy']:.2f} | {r['rel_err']:.4f}")


if __name__ == "__main__":
    main()
