"""Where a prefill step of the 1k x 1k workload goes: the Llama-3.1-8B shape (dummy
weights), 8 prompts of 1,000 tokens in one engine step, kernels from a profiler trace,
grouped by name, against the step's span.

  python scripts/probes/prefill_profile/probe.py --out $OUT/prefill_profile.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import jax

    from atom_jax import SamplingParams
    from scripts.bench_common import build_llm, gpu_kernel_events

    ns = argparse.Namespace(model="scripts/configs/llama-3.1-8b.json", load_format="dummy",
                            max_model_len=None, max_num_batched_tokens=None)
    llm, _ = build_llm(ns, 256)
    eng = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.6, max_tokens=1, ignore_eos=True)

    def prefill_step(tag):
        for i in range(8):
            eng.add_request(rng.integers(0, 10000, 1000).tolist(), params, f"{tag}{i}")
        t = time.perf_counter()
        out = eng.step()
        jax.effects_barrier()
        wall = time.perf_counter() - t
        while eng.has_unfinished():
            eng.step()
        return wall, out

    for r in range(3):
        prefill_step(f"warm{r}-")
    trace_dir = tempfile.mkdtemp(prefix="atom-jax-trace-")
    with jax.profiler.trace(trace_dir):
        wall, _ = prefill_step("prof-")
    events = gpu_kernel_events(trace_dir)
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, _, dur in events:
        by_name[name][0] += 1
        by_name[name][1] += dur
    span = max(ts + d for _, ts, d in events) - min(ts for _, ts, _ in events)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "wall_ms": wall * 1e3, "span_ms": span / 1e3,
              "busy_ms": sum(d for _, _, d in events) / 1e3, "kernels": len(events),
              "by_name": [{"name": n[:160], "count": c, "ms": d / 1e3} for n, (c, d) in top]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wall {result['wall_ms']:.1f} ms, span {result['span_ms']:.1f} ms, "
          f"busy {result['busy_ms']:.1f} ms, {len(events)} kernels")
    print("ms | count | kernel")
    for r in result["by_name"][:30]:
        print(f"{r['ms']:.2f} | {r['count']} | {r['name'][:110]}")


if __name__ == "__main__":
    main()
