"""The fused decode projections (kernels_pallas/decode_matmul.py) against XLA, on the GPU.

    python scripts/bench_decode_matmul.py [--tune] [--out docs/benchmarks/decode-matmul-h200.json]

Shapes of Llama-3.1-8B (hidden 4096, MLP 14336, q/k/v 6144). For each op (RMSNorm + q/k/v,
RMSNorm + gate/up + SiLU-multiply, matmul + residual for the o and down projections) and
row count: the largest error against the plain-JAX reference and the time per call, XLA's
kernels against the Pallas kernel; each call streams a different weight copy, so L2 holds
none of them. --tune times a grid of block sizes and Triton settings at 4 rows. Last, a
layer's chain of the four (attention left out) over 32 layers of distinct weights.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import decode_matmul as dm  # noqa: E402
from scripts.bench_common import copy_bandwidth_gbs, device_name, versions, write_json  # noqa: E402

HIDDEN, MLP, QKV, EPS = 4096, 14336, 6144, 1e-5
COPIES = 8


def op_table():
    """name -> (K, N of w, call(x, w, extra, impl, config), makes extra?)"""
    return {
        "qkv": (HIDDEN, QKV, lambda x, w, e, impl, cfg: dm.rms_norm_matmul(
            x, e, w, eps=EPS, impl=impl, config=cfg)),
        "gate_up": (HIDDEN, 2 * MLP, lambda x, w, e, impl, cfg: dm.rms_norm_gate_up(
            x, e, w, eps=EPS, impl=impl, config=cfg)),
        "o": (HIDDEN, HIDDEN, lambda x, w, e, impl, cfg: dm.matmul_add(
            x, w, e, impl=impl, config=cfg)),
        "down": (MLP, HIDDEN, lambda x, w, e, impl, cfg: dm.matmul_add(
            x, w, e, impl=impl, config=cfg)),
    }


def make_inputs(name, rows, key):
    k, n, _ = op_table()[name]
    kx, kw, ke = jax.random.split(key, 3)
    x = jax.random.normal(kx, (rows, k), jnp.bfloat16)
    ws = [(jax.random.normal(jax.random.fold_in(kw, i), (k, n), jnp.float32) * 0.02)
          .astype(jnp.bfloat16) for i in range(COPIES)]
    if name in ("qkv", "gate_up"):
        extra = (1 + 0.1 * jax.random.normal(ke, (k,))).astype(jnp.bfloat16)
    else:
        extra = jax.random.normal(ke, (rows, n), jnp.bfloat16)
    return x, ws, extra


def time_calls(fn, *args, reps=30) -> float:
    """Seconds per call of a jitted fn (reps queued back to back, then one wait)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def time_op(name, rows, impl, cfg, inputs):
    call = op_table()[name][2]
    x, ws, extra = inputs
    fn = jax.jit(lambda x, ws, e: [call(x, w, e, impl, cfg) for w in ws])
    return time_calls(fn, x, ws, extra) / COPIES


def max_error(name, rows, cfg, inputs) -> float:
    call = op_table()[name][2]
    x, ws, extra = inputs
    got = np.asarray(jax.jit(lambda: call(x, ws[0], extra, "pallas", cfg))(), np.float32)
    want = np.asarray(jax.jit(lambda: call(x, ws[0], extra, "xla", cfg))(), np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def layer_chain(rows, impl, configs, layers=32):
    key = jax.random.PRNGKey(1)

    def w(i, j, shape):
        return (jax.random.normal(jax.random.fold_in(key, 10 * i + j), shape, jnp.float32)
                * 0.02).astype(jnp.bfloat16)
    params = [dict(wqkv=w(i, 0, (HIDDEN, QKV)), wo=w(i, 1, (HIDDEN, HIDDEN)),
                   wgu=w(i, 2, (HIDDEN, 2 * MLP)), wd=w(i, 3, (MLP, HIDDEN)),
                   n1=jnp.ones((HIDDEN,), jnp.bfloat16), n2=jnp.ones((HIDDEN,), jnp.bfloat16))
              for i in range(layers)]

    def chain(params, x):
        for p in params:
            qkv = dm.rms_norm_matmul(x, p["n1"], p["wqkv"], eps=EPS, impl=impl,
                                     config=configs["qkv"])
            x = dm.matmul_add(qkv[:, :HIDDEN], p["wo"], x, impl=impl, config=configs["o"])
            g = dm.rms_norm_gate_up(x, p["n2"], p["wgu"], eps=EPS, impl=impl,
                                    config=configs["gate_up"])
            x = dm.matmul_add(g, p["wd"], x, impl=impl, config=configs["down"])
        return x
    x = jax.random.normal(key, (rows, HIDDEN), jnp.bfloat16)
    fn = jax.jit(chain)
    out = np.asarray(fn(params, x), np.float32)
    seconds = time_calls(fn, params, x, reps=10)
    del params
    return seconds / layers, out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tune", action="store_true")
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--tune-budget-s", type=float, default=320)
    p.add_argument("--out", default="docs/benchmarks/decode-matmul-h200.json")
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    key = jax.random.PRNGKey(0)
    defaults = {"qkv": dm.NORM_MATMUL_CONFIG, "gate_up": dm.GATE_UP_CONFIG,
                "o": dm.MATMUL_ADD_CONFIG, "down": dm.MATMUL_ADD_CONFIG}
    result = {"benchmark": "decode_matmul", "device": device_name(), "versions": versions(),
              "copy_gbs": copy_bandwidth_gbs(), "tuning": [], "ops": [], "chain": []}
    best = dict(defaults)

    if args.tune:
        # Likelier configs first: each op gets an equal share of the budget.
        grid = list(itertools.product((32, 16, 64), (128, 256, 64), (4, 8), (4, 3, 6)))
        for name in op_table():
            deadline = time.time() + args.tune_budget_s / len(op_table())
            inputs = make_inputs(name, 4, key)
            xla_s = time_op(name, 4, "xla", None, inputs)
            scores = []
            for bn, bk, nw, ns in grid:
                if time.time() > deadline:
                    break
                cfg = dm.MatmulConfig(bn, bk, nw, ns)
                try:
                    s = time_op(name, 4, "pallas", cfg, inputs)
                except Exception as e:  # a config Triton cannot build: record it, go on
                    result["tuning"].append({"op": name, "config": cfg.__dict__,
                                             "error": str(e)[:300]})
                    continue
                scores.append((s, cfg))
                result["tuning"].append({"op": name, "config": cfg.__dict__, "us": s * 1e6,
                                         "xla_us": xla_s * 1e6})
            if scores:
                best[name] = min(scores, key=lambda t: t[0])[1]
            del inputs

    for name, rows in itertools.product(op_table(), rows_list):
        inputs = make_inputs(name, rows, key)
        k, n, _ = op_table()[name]
        xla_s = time_op(name, rows, "xla", None, inputs)
        pal_s = time_op(name, rows, "pallas", best[name], inputs)
        result["ops"].append({
            "op": name, "rows": rows, "config": best[name].__dict__,
            "max_rel_error": max_error(name, rows, best[name], inputs),
            "xla_us": xla_s * 1e6, "pallas_us": pal_s * 1e6,
            "pallas_weight_gbs": k * n * 2 / pal_s / 1e9})
        del inputs

    for rows in rows_list:
        xla_s, want = layer_chain(rows, "xla", best)
        pal_s, got = layer_chain(rows, "pallas", best)
        result["chain"].append({"rows": rows, "xla_us_per_layer": xla_s * 1e6,
                                "pallas_us_per_layer": pal_s * 1e6,
                                "max_abs_diff": float(np.abs(got - want).max()),
                                "max_abs": float(np.abs(want).max())})
    write_json(args.out, result)

    print(f"{result['device']}, copy {result['copy_gbs']:.0f} GB/s")
    errors = [t for t in result["tuning"] if "error" in t]
    if errors:
        print(f"{len(errors)} configs failed to build, e.g. {errors[0]}")
    for name in op_table():
        rows = sorted((t for t in result["tuning"] if t["op"] == name and "us" in t),
                      key=lambda t: t["us"])[:3]
        for t in rows:
            print(f"tune {name:8s} {t['config']} {t['us']:7.2f} us (xla {t['xla_us']:.2f})")
    print(f"{'op':8s} {'rows':>4s} {'xla us':>8s} {'pallas us':>9s} {'GB/s':>6s} {'rel err':>8s}")
    for r in result["ops"]:
        print(f"{r['op']:8s} {r['rows']:4d} {r['xla_us']:8.2f} {r['pallas_us']:9.2f} "
              f"{r['pallas_weight_gbs']:6.0f} {r['max_rel_error']:8.1e}")
    for r in result["chain"]:
        print(f"chain rows {r['rows']}: xla {r['xla_us_per_layer']:.1f} us/layer, "
              f"pallas {r['pallas_us_per_layer']:.1f} (max diff {r['max_abs_diff']:.3g} "
              f"of {r['max_abs']:.3g})")


if __name__ == "__main__":
    main()
