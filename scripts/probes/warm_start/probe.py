"""Where a warm start with the decode kernel spends its compile phase, and whether lowering
the kernel's program alone first (ModelRunner._compile's `first`) shortens it.

    python scripts/probes/warm_start/probe.py [--out DIR] [sequence ...]

Each item of the sequence (default: new old new old, after a cold new) is one fresh process
that builds the engine (Llama-3.1-8B shape, dummy weights, --decode-kernel on, 64-token
pages) with one shared compilation cache and generates one token. "new" is the engine as it
is; "old" puts the kernel's job back among the others (after the model buckets), as before.
Each process reports every job's lower and compile times and the guarded runs' times.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
MODEL = str(ROOT / "scripts/configs/llama-3.1-8b.json")


def child(order: str, model: str, kernel: str, block_size: int) -> None:
    import functools
    import jax
    from atom_jax import LLM, SamplingParams, model_runner as mr
    from atom_jax.config import EngineConfig

    record = {"jobs": [], "runs": []}
    orig_compile = mr.ModelRunner._compile

    def timed(job, kind):
        def run():
            t = time.perf_counter()
            low = job()
            t1 = time.perf_counter()
            class Wrapped:
                def compile(self_inner):
                    c = low.compile()
                    record["jobs"].append({"kind": kind, "lower_start": t - t_start,
                                           "lowered": t1 - t_start,
                                           "compiled": time.perf_counter() - t_start})
                    return c
            return Wrapped()
        return run

    def patched_compile(jobs, threads, desc, first=()):
        global t_start
        nonlocal_t = time.perf_counter()
        globals()["t_start"] = nonlocal_t
        kinds = ["model" if j.func == mr._forward_jit.lower else "other" for j in jobs]
        jobs = [timed(j, k) for j, k in zip(jobs, kinds)]
        first = [timed(j, "kernel") for j in first]
        if order == "old" and first:
            n = kinds.count("model")
            jobs, first = jobs[:n] + first + jobs[n:], []
        orig_compile(jobs, threads, desc, first)
        record.setdefault("compile_calls", []).append(time.perf_counter() - nonlocal_t)

    mr.ModelRunner._compile = staticmethod(patched_compile)
    orig_run = mr.ModelRunner.run

    def patched_run(self, *a, **kw):
        t = time.perf_counter()
        out = orig_run(self, *a, **kw)
        jax.block_until_ready(out[0])
        record["runs"].append({"kernel": bool(kw.get("kernel")), "s": time.perf_counter() - t})
        return out

    mr.ModelRunner.run = patched_run
    on_gpu = jax.default_backend() == "gpu"
    llm = LLM.from_config(EngineConfig(model=model, load_format="dummy",
                                       max_model_len=8448 if on_gpu else 512,
                                       max_num_batched_tokens=8192 if on_gpu else 256,
                                       max_num_seqs=256 if on_gpu else 32,
                                       decode_kernel=kernel, block_size=block_size))
    record["runs_during_startup"] = len(record["runs"])
    llm.generate([[11] * 16], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    record["first_token_s"] = time.time() - T0
    record["phases"] = llm.engine.startup_times
    record["kernel_steps"] = llm.engine.runner.decode_kernel_steps
    print("PROBE " + json.dumps(record), flush=True)


def summary(rec: dict) -> dict:
    jobs = rec["jobs"]
    k = [j for j in jobs if j["kind"] == "kernel"]
    runs = rec["runs"][:rec["runs_during_startup"]]
    return {"first_token_s": round(rec["first_token_s"], 2),
            "compile_s": round(rec["phases"].get("compile_s", 0), 2),
            "pool_s": round(rec["compile_calls"][0], 2),
            "kernel_lower_s": round(k[0]["lowered"] - k[0]["lower_start"], 2) if k else None,
            "kernel_lower_start_s": round(k[0]["lower_start"], 2) if k else None,
            "kernel_compiled_at_s": round(k[0]["compiled"], 2) if k else None,
            "others_done_at_s": round(max(j["compiled"] for j in jobs if j["kind"] != "kernel"), 2),
            "kernel_runs_s": [round(r["s"], 2) for r in runs if r["kernel"]],
            "other_runs_s": round(sum(r["s"] for r in runs if not r["kernel"]), 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", default=None)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--model", default=MODEL)
    p.add_argument("--kernel", default="on")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("sequence", nargs="*", default=["new", "old", "new", "old"])
    args = p.parse_args()
    if args.child:
        return child(args.child, args.model, args.kernel, args.block_size)
    cache = tempfile.mkdtemp(prefix="atom-jax-cache-")
    env = dict(os.environ, ATOM_JAX_CACHE_DIR=cache, JAX_COMPILATION_CACHE_DIR=cache)
    rows = []
    for i, order in enumerate(["new"] + args.sequence):
        label = "cold" if i == 0 else "warm"
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", order, "--model", args.model,
                               "--kernel", args.kernel, "--block-size", str(args.block_size)], env=env,
                              capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
        row = {"order": order, "start": label, "wall_s": round(time.time() - t, 1),
               "rc": proc.returncode}
        if line:
            rec = json.loads(line[0][len("PROBE "):])
            row.update(summary(rec), raw=rec)
        else:
            row["error"] = proc.stderr[-3000:]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "raw"}), flush=True)
    Path(args.out, "warm_start.json").write_text(json.dumps(rows, indent=1))
    print("\norder start first_token compile pool kernel_lower(start) kernel_compiled others_done kernel_runs")
    for r in rows:
        print(r["order"], r["start"], r.get("first_token_s"), r.get("compile_s"), r.get("pool_s"),
              f'{r.get("kernel_lower_s")}({r.get("kernel_lower_start_s")})', r.get("kernel_compiled_at_s"),
              r.get("others_done_at_s"), r.get("kernel_runs_s"))


if __name__ == "__main__":
    main()
