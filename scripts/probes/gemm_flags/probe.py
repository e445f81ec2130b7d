"""The Llama-3.1-8B shape's linear layers (fused q/k/v and gate/up) at the 1k x 1k
workload's row counts (8,192 prefill rows, 256 and 512 decode rows), bf16, under XLA's
GEMM choices: its default, cuBLAS only (no Triton GEMMs), and cuBLASLt. Kernels' own time
(profiler), TFLOP/s; one fresh process per flag set.

  python scripts/probes/gemm_flags/probe.py --out $OUT/gemm_flags.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
FLAGS = {"default": "", "cublas": "--xla_gpu_enable_triton_gemm=false",
         "cublaslt": "--xla_gpu_enable_cublaslt=true"}
# (name, K, N): hidden 4096, intermediate 14336, 32 + 2 x 8 heads of 128, vocab 128256
LAYERS = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672),
          ("down", 14336, 4096), ("lm_head", 4096, 128256)]
ROWS = [8192, 512, 256]


def child():
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    from scripts.bench_common import device_time_per_call

    key = jax.random.key(0)
    res = {}
    for name, k, n in LAYERS:
        ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * 0.02
              for i in range(2)]
        for m in ROWS:
            if name == "lm_head" and m == 8192:
                continue
            xs = [jax.random.normal(jax.random.fold_in(key, 10 + i), (m, k), jnp.bfloat16)
                  for i in range(2)]
            f = jax.jit(lambda x, w: x @ w)
            t = device_time_per_call(f, [(x, w) for x, w in zip(xs, ws)], repeats=5)["time_us"]
            res[f"{name} {m}"] = dict(time_us=t, tflops=2 * m * k * n / t / 1e6)
        del ws
    print("RESULT " + json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child()
    result = {}
    for label, flags in FLAGS.items():
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        p = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True,
                           text=True, timeout=240)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        result[label] = json.loads(line[0][7:]) if line else {"error": p.stderr[-2000:]}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    shapes = [s for s in result["default"] if s != "error"]
    print("shape | " + " | ".join(f"{lb} us (TFLOP/s)" for lb in FLAGS))
    for s in shapes:
        cells = []
        for lb in FLAGS:
            r = result[lb].get(s)
            cells.append(f"{r['time_us']:.1f} ({r['tflops']:.0f})" if r else "-")
        print(f"{s} | " + " | ".join(cells))
    for lb in FLAGS:
        if "error" in result[lb]:
            print(lb, "error:", result[lb]["error"][-300:])


if __name__ == "__main__":
    main()
