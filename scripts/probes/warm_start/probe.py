"""Where a start with the decode kernel spends its compile phase.

    python scripts/probes/warm_start/probe.py [--out DIR] [--warm N]

One cold and N warm fresh processes, each building the engine (Llama-3.1-8B shape, dummy
weights, --decode-kernel on, 64-token pages) with one shared compilation cache and
generating one token. Each reports every compile job's lower and compile times (from the
start of its compile pool) and the guarded runs' times.
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


def child(model: str, kernel: str, block_size: int) -> None:
    import jax
    from atom_jax import LLM, SamplingParams, model_runner as mr
    from atom_jax.config import EngineConfig

    record = {"jobs": [], "runs": [], "pools": []}
    orig_compile, orig_run = mr.ModelRunner._compile, mr.ModelRunner.run

    def timed(job, kind, t_pool):
        def lower():
            t = time.perf_counter()
            low = job()
            t1 = time.perf_counter()

            class Timed:
                def compile(self):
                    out = low.compile()
                    record["jobs"].append({"kind": kind, "lower_start": t - t_pool,
                                           "lowered": t1 - t_pool,
                                           "compiled": time.perf_counter() - t_pool})
                    return out
            return Timed()
        return lower

    def kind_of(job):
        if job.func == mr._forward_jit.lower:
            return "model"
        return "kernel" if getattr(job.func, "__name__", "") == "_lower_decode_kernel" else "other"

    def patched_compile(jobs, threads, desc):
        t = time.perf_counter()
        orig_compile([timed(j, kind_of(j), t) for j in jobs], threads, desc)
        record["pools"].append(time.perf_counter() - t)

    def patched_run(self, *a, **kw):
        t = time.perf_counter()
        out = orig_run(self, *a, **kw)
        jax.block_until_ready(out[0])
        record["runs"].append({"kernel": bool(kw.get("kernel")), "s": time.perf_counter() - t})
        return out

    mr.ModelRunner._compile = staticmethod(patched_compile)
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
    print("PROBE " + json.dumps(record), flush=True)


def summary(rec: dict) -> dict:
    jobs = rec["jobs"]
    k = [j for j in jobs if j["kind"] == "kernel"]
    runs = rec["runs"][:rec["runs_during_startup"]]
    return {"first_token_s": round(rec["first_token_s"], 2),
            "compile_s": round(rec["phases"].get("compile_s", 0), 2),
            "pools_s": [round(p, 2) for p in rec["pools"]],
            "kernel_lower_s": round(k[0]["lowered"] - k[0]["lower_start"], 2) if k else None,
            "kernel_compiled_at_s": round(k[0]["compiled"], 2) if k else None,
            "others_done_at_s": round(max(j["compiled"] for j in jobs if j["kind"] != "kernel"), 2),
            "kernel_runs_s": [round(r["s"], 2) for r in runs if r["kernel"]],
            "other_runs_s": round(sum(r["s"] for r in runs if not r["kernel"]), 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--model", default=MODEL)
    p.add_argument("--kernel", default="on")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--warm", type=int, default=2)
    args = p.parse_args()
    if args.child:
        return child(args.model, args.kernel, args.block_size)
    cache = tempfile.mkdtemp(prefix="atom-jax-cache-")
    env = dict(os.environ, ATOM_JAX_CACHE_DIR=cache, JAX_COMPILATION_CACHE_DIR=cache)
    rows = []
    for i in range(1 + args.warm):
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", "--model", args.model,
                               "--kernel", args.kernel, "--block-size", str(args.block_size)],
                              env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
        row = {"start": "warm" if i else "cold", "wall_s": round(time.time() - t, 1),
               "rc": proc.returncode}
        if line:
            rec = json.loads(line[0][len("PROBE "):])
            row.update(summary(rec), raw=rec)
        else:
            row["error"] = proc.stderr[-3000:]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "raw"}), flush=True)
    Path(args.out, "warm_start.json").write_text(json.dumps(rows, indent=1))
    print("\nstart first_token compile pools kernel_lower kernel_compiled others_done kernel_runs")
    for r in rows:
        print(r["start"], r.get("first_token_s"), r.get("compile_s"), r.get("pools_s"),
              r.get("kernel_lower_s"), r.get("kernel_compiled_at_s"), r.get("others_done_at_s"),
              r.get("kernel_runs_s"))


if __name__ == "__main__":
    main()
