"""Decode attention over a float8 cache with a scale per token and KV head (ScaledCache)
against a scale of 1 and a bf16 cache, on the GPU: kernels' own time (profiler) and the
error against the XLA reference on the same cache. Llama-3.1-8B's attention shape.

  python scripts/probes/fp8_scaled/probe.py --out $OUT/fp8_scaled.json
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

from kernels_pallas import ragged_paged_attention_triton as rpa  # noqa: E402
from kernels_pallas.ragged_paged_attention import ScaledCache, quantize_rows  # noqa: E402
from scripts import bench_kernels as bk  # noqa: E402

FP8 = jnp.float8_e4m3fn


def scaled(c):
    data, scale = quantize_rows(c)
    return ScaledCache(data, jnp.asarray(scale.transpose(0, 2, 1)))


C = rpa.KernelConfig
DECODE_TILES = [None, C(16, 64, 4, 2), C(16, 128, 4, 2), C(16, 64, 4, 3), C(16, 256, 4, 2)]
PREFILL_TILES = [None, C(128, 64, 8, 2), C(128, 64, 4, 2), C(64, 64, 4, 2), C(128, 32, 4, 2),
                 C(256, 32, 8, 2)]


def case(pool, caches, q_lens, ctx_lens, copy, max_q):
    inputs = bk.ragged_inputs(pool, q_lens, ctx_lens, bk.n_sets_for(bk.kv_bytes(ctx_lens)))
    (q, _, _, kvl, qsl), varying = inputs
    rows = []
    for name, (k, v) in caches.items():
        per_row = 128 * jnp.dtype(jax.tree.leaves(k)[0].dtype).itemsize + (
            4 if isinstance(k, ScaledCache) else 0)
        nbytes = sum(ctx_lens) * bk.HKV * 2 * per_row
        ins = ((q, k, v, kvl, qsl), varying)
        variants = [(None, None)]
        if isinstance(k, ScaledCache):
            tiles = DECODE_TILES if max_q == 1 else PREFILL_TILES
            variants = [(vs, None) for vs in (None, "const", "v_rows")] + [
                (None, t) for t in tiles[1:]]
        for vs, tile in variants:
            rpa.PROBE_VS = vs
            jax.clear_caches()
            kw = {} if tile is None else (
                dict(decode_config=tile) if max_q == 1 else dict(prefill_config=tile))
            step = bk.kernel_step(max_q_len=max_q, **kw)
            row = dict(cache=name, vs=vs, tile=tile and [tile.block_m, tile.block_n,
                                                         tile.num_warps, tile.num_stages])
            try:
                rel, ok = bk.check(step, ins)
                t = bk.device_time(step, ins)["time_us"]
                row.update(rel_err=rel, ok=ok, time_us=t, frac_copy=nbytes / t / 1e3 / copy)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(rows[-1], flush=True)
    rpa.PROBE_VS = None
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    copy = bk.copy_bandwidth()["copy_GBps"]
    pool = bk.Pool(2 * 256 * 1408 + 64 * bk.PAGE)
    caches = {"bf16": (pool.k, pool.v),
              "fp8 scale 1": (pool.k.astype(FP8), pool.v.astype(FP8)),
              "fp8 per token and head": (scaled(pool.k), scaled(pool.v))}
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "copy_GBps": copy, "cases": {}}
    for name, q_lens, ctx_lens, max_q in (
            ("decode-256x1400", [1] * 256, [1400] * 256, 1),
            ("decode-64x4096", [1] * 64, [4096] * 64, 1),
            ("prefill-8x1024", [1024] * 8, [1024] * 8, None)):
        result["cases"][name] = case(pool, caches, q_lens, ctx_lens, copy, max_q)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\ncopy {copy:.0f} GB/s")
    print("case | cache | V scales | tile | us | of copy | rel err")
    for name, rows in result["cases"].items():
        for r in rows:
            if "error" in r:
                print(f"{name} | {r['cache']} | {r['vs']} | {r['tile']} | {r['error'][:60]}")
                continue
            print(f"{name} | {r['cache']} | {r['vs'] or 'main'} | {r['tile'] or 'default'} | "
                  f"{r['time_us']:.1f} | {r['frac_copy']:.2f} | {r['rel_err']:.4f}")


if __name__ == "__main__":
    main()
