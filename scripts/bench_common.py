"""Shared by the benchmark scripts: machine facts, a copy-bandwidth ceiling, JSON output."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# bench_offline.py's --max-num-seqs default; the dashboard gives runs with another count
# headline rows of their own
DEFAULT_MAX_NUM_SEQS = 256


def source_commit() -> str:
    """The commit of the code being measured: ATOM_JAX_SOURCE_COMMIT where set (a tree copied
    to a benchmark machine, whose own .git, if any, need not match it), else git's HEAD,
    "+dirty" over uncommitted changes, else "unknown"."""
    if os.environ.get("ATOM_JAX_SOURCE_COMMIT"):
        return os.environ["ATOM_JAX_SOURCE_COMMIT"]
    if not (REPO / ".git").exists():
        return "unknown"

    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    import jax
    import jaxlib
    out = {"atom_jax_commit": source_commit(), "jax": jax.__version__,
           "jaxlib": jaxlib.__version__, "python": platform.python_version()}
    for name in ("transformers", "torch", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def device_name() -> str:
    import jax
    return jax.devices()[0].device_kind


def copy_bandwidth_gbs(gib: float = 2.0, iters: int = 20) -> float:
    """Bytes read + written per second by a device copy of a `gib` GiB array: PyTorch's
    copy where a CUDA PyTorch is installed (the higher ceiling), else a jitted JAX one."""
    try:
        import torch
        if torch.cuda.is_available():
            x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
            y = torch.empty_like(x)
            y.copy_(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(iters):
                y.copy_(x)
            torch.cuda.synchronize()
            gbs = 2 * x.numel() * iters / (time.perf_counter() - t) / 1e9
            del x, y
            torch.cuda.empty_cache()  # hand the 4 GiB back before the engine sizes its pool
            return gbs
    except ImportError:
        pass
    import jax
    import jax.numpy as jnp
    x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    copy(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(iters):
        y = copy(x)
    y.block_until_ready()
    return 2 * x.nbytes * iters / (time.perf_counter() - t) / 1e9


def build_llm(args, max_num_seqs: int):
    """-> (LLM from the benchmark's engine flags, seconds it took: load + compile)."""
    from atom_jax import LLM
    from atom_jax.config import EngineConfig
    t = time.perf_counter()
    llm = LLM.from_config(EngineConfig(model=args.model, load_format=args.load_format,
                                       max_model_len=args.max_model_len,
                                       max_num_batched_tokens=args.max_num_batched_tokens,
                                       max_num_seqs=max_num_seqs,
                                       compile_threads=getattr(args, "compile_threads", None),
                                       num_scheduler_steps=getattr(args, "num_scheduler_steps", None),
                                       decode_kernel=getattr(args, "decode_kernel", "off"),
                                       kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
                                       block_size=getattr(args, "block_size", 16)))
    return llm, time.perf_counter() - t


def multi_step_info(engine) -> dict:
    """What the engine chose for multi-step decode, for a benchmark's JSON."""
    runner = engine.runner
    return {"steps": runner.num_scheduler_steps, "buckets": runner.multi_step_buckets,
            "startup_timing": runner.multi_step_timing}


def write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


def gpu_kernel_events(trace_dir: str) -> list[tuple[str, float, float]]:
    """(kernel name, start us, duration us) of every GPU kernel in the newest profiler trace
    under trace_dir: the device's stream timelines (CUPTI timestamps), copies and memsets
    left out. Empty where the trace holds no device timeline (e.g. on CPU)."""
    import glob
    import gzip
    files = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))
    if not files:
        return []
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and "/device:GPU" in e["args"].get("name", "")}
    streams = {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M"
               and e.get("name") == "thread_name" and e["pid"] in devices
               and "stream" in e["args"].get("name", "").lower()}
    return [(e["name"], float(e["ts"]), float(e["dur"])) for e in events
            if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams
            and not e["name"].lower().startswith(("memcpy", "memset"))]


def device_time_per_call(fn, arg_sets, repeats: int = 3) -> dict | None:
    """GPU kernel time per call of fn over arg_sets, read from a profiler trace: the kernels
    alone, without launch gaps or a timing loop's own cost. None where no device timeline
    is recorded."""
    import tempfile

    import jax
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    trace_dir = tempfile.mkdtemp(prefix="atom-jax-trace-")
    with jax.profiler.trace(trace_dir):
        for _ in range(repeats):
            for args in arg_sets:
                jax.block_until_ready(fn(*args))
    events = gpu_kernel_events(trace_dir)
    if not events:
        return None
    calls = repeats * len(arg_sets)
    names = sorted({name for name, _, _ in events})
    return {"time_us": sum(d for _, _, d in events) / calls, "kernels_per_call": len(events) / calls,
            "kernels": names[:8]}
