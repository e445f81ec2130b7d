"""Offline throughput.

    python scripts/bench_offline.py        # CPU, default SmolLM2: single-stream decode and
                                           # 32-stream throughput vs transformers' generate
    python scripts/bench_offline.py --workload nanovllm --model scripts/configs/llama-3.1-8b.json \
        --load-format dummy                # 256 requests, input/output lengths uniform 100..1024
    python scripts/bench_offline.py --workload 1k1k ...   # 1,024 requests of 1,000 in / 1,000 out

Prints a short table; writes every figure, the machine and the versions as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def engine_runs(args):
    from atom_jax import SamplingParams
    from scripts.bench_common import build_llm

    llm, startup = build_llm(args, args.streams)
    eng = llm.engine
    prompt = [eng.tokenizer.encode(args.prompt)] if args.load_format != "dummy" else [[7] * 32]
    prompt = prompt[0][:args.prompt_len] if len(prompt[0]) >= args.prompt_len else (
        prompt[0] * (args.prompt_len // len(prompt[0]) + 1))[:args.prompt_len]

    def timed(n_streams, n_tokens):
        params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))  # warm
        ids = [eng.add_request(list(prompt), params) for _ in range(n_streams)]
        t = time.perf_counter()
        first = None
        produced = 0
        while eng.has_unfinished():
            deltas = eng.step()
            produced += sum(len(d.new_token_ids) for d in deltas)
            if first is None and deltas:
                first = time.perf_counter()
        end = time.perf_counter()
        for rid in ids:
            eng.release(rid)
        decode_tokens = produced - n_streams  # tokens after each stream's first
        return {"streams": n_streams, "output_tokens": produced, "seconds": end - t,
                "ttft_s": first - t, "output_tok_per_s": produced / (end - t),
                "decode_tok_per_s": decode_tokens / (end - first)}

    single = timed(1, args.single_tokens)
    multi = timed(args.streams, args.multi_tokens)
    return {"startup_s": startup, "single": single, "multi": multi, "prompt_len": len(prompt)}, prompt


def transformers_runs(args, prompt):
    import torch
    import transformers

    from atom_jax.loader import default_model_path
    path = Path(args.model or default_model_path())
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    torch.set_num_threads(os.cpu_count() or 1)

    def timed(n_streams, n_tokens):
        ids = torch.tensor([prompt] * n_streams)
        with torch.no_grad():
            model.generate(ids[:1], max_new_tokens=2, do_sample=False)
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                                 min_new_tokens=n_tokens, do_sample=False)
            seconds = time.perf_counter() - t
        produced = (out.shape[1] - ids.shape[1]) * n_streams
        return {"streams": n_streams, "output_tokens": produced, "seconds": seconds,
                "output_tok_per_s": produced / seconds}

    return {"single": timed(1, args.single_tokens), "multi": timed(args.streams, args.multi_tokens)}


WORKLOADS = {  # name -> (requests, input length range, output length range)
    "nanovllm": (256, (100, 1024), (100, 1024)),
    "1k1k": (1024, (1000, 1000), (1000, 1000)),
}


def throughput_run(args) -> dict:
    """One of WORKLOADS with random token ids and ignore_eos, as nano-vllm's bench.py does."""
    import random

    import jax.numpy as jnp

    from atom_jax import SamplingParams
    from scripts.bench_common import (build_llm, device_name, multi_step_info, versions,
                                      write_json)

    n, (in_lo, in_hi), (out_lo, out_hi) = WORKLOADS[args.workload]
    n = args.requests or n
    llm, startup = build_llm(args, args.max_num_seqs)
    rng = random.Random(0)
    vocab = min(llm.engine.model_config.vocab_size, 10000)
    prompts = [[rng.randint(0, vocab - 1) for _ in range(rng.randint(in_lo, in_hi))] for _ in range(n)]
    params = [SamplingParams(temperature=0.6, max_tokens=rng.randint(out_lo, out_hi), ignore_eos=True)
              for _ in range(n)]
    llm.generate([[1] * 16], SamplingParams(max_tokens=4))  # warm the step path
    t = time.perf_counter()
    outs = llm.generate(prompts, params)  # the compile guard fails the run on any compilation
    seconds = time.perf_counter() - t
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    result = {
        "benchmark": f"offline-{args.workload}", "device": device_name(), "versions": versions(),
        "model": args.model, "load_format": args.load_format, "requests": n,
        "input_tokens": in_tokens, "output_tokens": out_tokens, "seconds": seconds,
        "output_tok_per_s": out_tokens / seconds, "total_tok_per_s": (in_tokens + out_tokens) / seconds,
        "engine_start_s": startup, "max_num_seqs": args.max_num_seqs,
        "kv_cache_dtype": jnp.dtype(llm.engine.kv_cache_dtype).name,
        "kv_cache_scales": "per token and KV head" if llm.engine.kv_cache_scaled else None,
        "kv_cache_tokens": llm.engine.runner.num_blocks * llm.engine.runner.block_size,
        "gpu_memory_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "preemptions": llm.engine.scheduler.num_preemptions,
        "sampling": "temperature 0.6, ignore_eos, random token ids (as nano-vllm's bench.py)",
        "compiles_after_startup": 0,  # the armed guard would have raised otherwise
        "multi_step": multi_step_info(llm.engine),
    }
    name = Path(args.model).stem if args.model else "smollm2-135m"  # None: the embedded model
    name += {"fp8": "-fp8kv", "fp8_per_token": "-fp8kv-per-token"}.get(args.kv_cache_dtype, "")
    write_json(args.out if args.out != DEFAULT_OUT else f"docs/benchmarks/offline-{args.workload}-{name}.json", result)
    print(f"\n{args.workload} on {result['device']}: {n} requests, {out_tokens} output tokens in "
          f"{seconds:.1f} s -> {result['output_tok_per_s']:.0f} output tok/s, "
          f"{result['total_tok_per_s']:.0f} total tok/s")
    return result


DEFAULT_OUT = "docs/benchmarks/offline-cpu.json"


def main():
    from atom_jax.config import KV_CACHE_DTYPES
    from scripts.bench_common import DEFAULT_MAX_NUM_SEQS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--prompt", default="Write a long story about a lighthouse keeper and the sea.")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--single-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--multi-tokens", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="default: 256 for streams, 8192 for the throughput workloads")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: 512 for streams, 2048 for the throughput workloads")
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers runs")
    parser.add_argument("--workload", default="streams", choices=["streams", *WORKLOADS])
    parser.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS)
    parser.add_argument("--requests", type=int, default=None, help="override the workload's count")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                        help="EngineConfig.kv_cache_dtype (throughput workloads)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    streams = args.workload == "streams"
    args.max_num_batched_tokens = args.max_num_batched_tokens or (256 if streams else 8192)
    args.max_model_len = args.max_model_len or (512 if streams else 2048)
    if not streams:
        return throughput_run(args)

    import jax
    import transformers
    ours, prompt = engine_runs(args)
    peer = None if args.no_peer or args.load_format == "dummy" else transformers_runs(args, prompt)
    import torch
    result = {
        "benchmark": "offline", "device": jax.devices()[0].device_kind,
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "versions": {"jax": jax.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
        "model": args.model or "SmolLM2-135M-Instruct Q4_1 GGUF (dequantized, float32)",
        "prompt_len": ours["prompt_len"], "single_tokens": args.single_tokens,
        "streams": args.streams, "multi_tokens": args.multi_tokens,
        "atom_jax": ours, "transformers": peer,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    # Output tokens over the whole run (prefill included) for both engines, so they compare.
    rows = [("atom-jax", ours["single"]["output_tok_per_s"], ours["multi"]["output_tok_per_s"])]
    if peer:
        rows.append(("transformers", peer["single"]["output_tok_per_s"], peer["multi"]["output_tok_per_s"]))
    print(f"\n{'engine':<14}{'1-stream output tok/s':>24}{f'{args.streams}-stream output tok/s':>26}")
    for name, single, multi in rows:
        print(f"{name:<14}{single:>24.1f}{multi:>26.1f}")
    if peer:
        print(f"{'ratio':<14}{rows[0][1] / rows[1][1]:>24.2f}{rows[0][2] / rows[1][2]:>26.2f}")
    print(f"(device {result['device']}, {os.cpu_count()} CPUs; JSON: {args.out})")


if __name__ == "__main__":
    main()
