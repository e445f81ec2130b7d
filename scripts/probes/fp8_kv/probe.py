"""Decode and prefill attention with a float8 K/V cache against bf16, on the GPU.

Shape of Llama-3.1-8B's attention (32 query heads, 8 KV heads, head_dim 128, 16-token
pages). Decode: 256 sequences at 1,400 tokens of context (the 1k x 1k workload's middle)
and 64 at 4k, one token each, decode-only hint; prefill: one 8,192-token step of eight
1,024-token prompts. Each case: the kernels' own time (profiler), bytes of K/V read over
it, and the error against the XLA reference on the same cache. Candidate decode tiles for
the float8 cache are timed beside the default one.

  python scripts/probes/fp8_kv/probe.py --out $OUT/fp8_kv.json
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
CANDIDATES = [None, rpa.KernelConfig(16, 128, 4, 2), rpa.KernelConfig(16, 128, 4, 3),
              rpa.KernelConfig(16, 64, 4, 3), rpa.KernelConfig(16, 256, 4, 2)]


def case(pool, k, v, q_lens, ctx_lens, copy, configs, max_q_len):
    inputs = bk.ragged_inputs(pool, q_lens, ctx_lens, bk.n_sets_for(bk.kv_bytes(ctx_lens)))
    (q, _, _, kvl, qsl), varying = inputs
    inputs = ((q, k, v, kvl, qsl), varying)
    nbytes = sum(ctx_lens) * bk.HKV * bk.D * 2 * jnp.dtype(k.dtype).itemsize
    rows = []
    for cfg in configs:
        step = bk.kernel_step(max_q_len=max_q_len, decode_config=cfg)
        rel, ok = bk.check(step, inputs)
        dev = bk.device_time(step, inputs)
        t = dev["time_us"]
        rows.append(dict(config=cfg and [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages],
                         kv_dtype=jnp.dtype(k.dtype).name, rel_err=rel, ok=ok, time_us=t,
                         kv_GBps=nbytes / t / 1e3, frac_copy=nbytes / t / 1e3 / copy,
                         kernels=dev["kernels_per_call"]))
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compute", default=None, choices=["bfloat16", "float16"],
                    help="rpa.FP8_COMPUTE_DTYPE for this process (default: the kernel's)")
    args = ap.parse_args()
    if args.compute:
        rpa.FP8_COMPUTE_DTYPE = jnp.dtype(args.compute)
    args.compute = jnp.dtype(rpa.FP8_COMPUTE_DTYPE).name
    copy = bk.copy_bandwidth()["copy_GBps"]
    pool = bk.Pool(2 * 256 * 1408 + 64 * bk.PAGE)
    k8, v8 = pool.k.astype(FP8), pool.v.astype(FP8)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "fp8_compute_dtype": args.compute,
              "copy_GBps": copy, "cases": {}}
    for name, q_lens, ctx_lens, max_q in (
            ("decode-256x1400", [1] * 256, [1400] * 256, 1),
            ("decode-64x4096", [1] * 64, [4096] * 64, 1),
            ("prefill-8x1024", [1024] * 8, [1024] * 8, None)):
        configs = CANDIDATES if max_q == 1 else [None]
        result["cases"][name] = {
            "bf16": case(pool, pool.k, pool.v, q_lens, ctx_lens, copy, [None], max_q),
            "fp8": case(pool, k8, v8, q_lens, ctx_lens, copy, configs, max_q)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\ncopy {copy:.0f} GB/s; a float8 cache upcast to {args.compute}")
    print("case | cache | config | us | K/V GB/s | of copy | rel err")
    for name, c in result["cases"].items():
        for rows in c.values():
            for r in rows:
                print(f"{name} | {r['kv_dtype']} | {r['config'] or 'default'} | "
                      f"{r['time_us']:.1f} | {r['kv_GBps']:.0f} | {r['frac_copy']:.2f} | "
                      f"{r['rel_err']:.4f}")


if __name__ == "__main__":
    main()
