"""Shared by the benchmark scripts: machine facts, a copy-bandwidth ceiling, JSON output."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path


def versions() -> dict:
    import jax
    import jaxlib
    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version()}
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
            return 2 * x.numel() * iters / (time.perf_counter() - t) / 1e9
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
                                       max_num_seqs=max_num_seqs))
    return llm, time.perf_counter() - t


def write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
