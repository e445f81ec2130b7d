"""Command-line flags shared by `atom_jax.generate` and `atom_jax.serve`, mapped onto EngineConfig."""
from __future__ import annotations

import argparse
import dataclasses

from atom_jax.config import KV_CACHE_DTYPES, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights in the shapes of --model's config.json")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of the GPU's memory the engine may take (default: "
                        "$XLA_PYTHON_CLIENT_MEM_FRACTION if set, else 0.9)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="K/V cache size (default: 1 GiB on CPU; on GPU 90%% of the memory "
                        "the weights leave)")
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="fp8: K/V kept as float8_e4m3fn (scale 1), half the memory of bf16; "
                        "fp8_per_token: float8 with a scale per token and KV head")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--attn-impl", default="auto", choices=["auto", "xla", "pallas"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compile-threads", type=int, default=None,
                   help="programs compiled at once at start-up (default: 1 on CPU, 8 on GPU)")
    g.add_argument("--num-scheduler-steps", type=int, default=None,
                   help="decode steps per launch for small decode-only batches (default: "
                        "on GPU 4 where start-up finds the host the bottleneck, else 1; "
                        "1 on CPU)")
    g.add_argument("--multi-step-max-seqs", type=int, default=8,
                   help="largest batch that runs several decode steps per launch")
    g.add_argument("--decode-kernel", default="off", choices=["auto", "on", "off"],
                   help="batch-1 decode with every layer in one persistent kernel (NVIDIA "
                        "Hopper, Llama-shaped models; auto: where supported)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return EngineConfig(**values, enable_prefix_caching=not args.no_prefix_caching)
