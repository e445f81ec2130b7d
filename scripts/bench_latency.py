"""Latency on one GPU: batch-1 decode, long-prompt TTFT, and start-up to first token.

    python scripts/bench_latency.py --model scripts/configs/llama-3.1-8b.json --load-format dummy

Batch-1 decode: a 128-token prompt, 256 output tokens; tokens/s and the fraction of the
device copy bandwidth (measured in the same run) that the weight and KV reads reach.
Prefill: TTFT of one 8k-token prompt and its effective TFLOP/s (2 * params * tokens plus
causal attention). Start-up: `--startup` runs fresh processes, cold (empty compilation cache)
and warm, and times process start to first token.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
T_PROCESS_START = time.time()

from scripts.bench_common import (build_llm, copy_bandwidth_gbs, device_name,  # noqa: E402
                                  gpu_kernel_events, multi_step_info, versions,
                                  write_json)


def param_bytes(params) -> tuple[int, int]:
    import jax
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    return total, params["embed"].nbytes


def decode_profile(eng, prompt_len: int, steps: int = 32) -> dict | None:
    """Where a batch-1 decode step's time goes: the GPU's kernel time per step, read from a
    profiler trace, against the wall time per step (the difference is the device idling:
    launch gaps and host work not hidden behind the device)."""
    import collections
    import tempfile

    import jax

    from atom_jax import SamplingParams
    eng.add_request([5] * prompt_len, SamplingParams(temperature=0, max_tokens=4 * steps + 64,
                                                     ignore_eos=True), "profile")
    for _ in range(4):
        eng.step()
    trace_dir = tempfile.mkdtemp(prefix="atom-jax-trace-")
    with jax.profiler.trace(trace_dir):
        t = time.perf_counter()
        tokens = 0  # a launch may run several decode steps: figures are per token
        while tokens < steps:
            tokens += sum(len(d.new_token_ids) for d in eng.step())
        wall = (time.perf_counter() - t) / tokens
    eng.abort("profile")
    while eng.has_unfinished():
        eng.step()
    events = gpu_kernel_events(trace_dir)
    if not events:
        return None
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, _, dur in events:
        by_name[name][0] += 1
        by_name[name][1] += dur
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]
    span = (max(ts + d for _, ts, d in events) - min(ts for _, ts, _ in events)) / tokens
    return {"steps": tokens, "wall_us_per_step_traced": wall * 1e6,
            "gpu_busy_us_per_step": sum(d for _, _, d in events) / tokens,
            "gpu_span_us_per_step": span, "kernels_per_step": len(events) / tokens,
            "top_kernels": [{"name": n[:120], "per_step": c / tokens, "us_per_step": d / tokens}
                            for n, (c, d) in top]}


def first_token(args) -> None:
    """Child process of --startup: build the engine, generate one token, print the time."""
    from atom_jax import SamplingParams
    llm, _ = build_llm(args, args.max_num_seqs)
    llm.generate([[11] * 16], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    print(f"FIRST_TOKEN_S {time.time() - T_PROCESS_START:.2f}", flush=True)
    print(f"PHASES {json.dumps(llm.engine.startup_times)}", flush=True)


def hf_peer_child(args) -> None:
    """Child process of --hf-peer: Hugging Face transformers `generate` (torch, eager, bf16)
    on randomly initialised weights of the same config, batch 1, greedy, the same prompt and
    output lengths. Prints one PEER line of JSON."""
    import torch
    import transformers
    raw = json.loads(Path(args.model).read_text())
    cls = getattr(transformers, raw["architectures"][0])
    config = cls.config_class.from_dict(raw)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: dry runs only
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = time.perf_counter()
    with torch.device(device):
        model = cls._from_config(config, dtype=torch.bfloat16).eval()
    init_s = time.perf_counter() - t
    prompt = torch.full((1, args.prompt_len), 7, dtype=torch.long, device=device)

    def run(n):
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        sync()
        assert out.shape[1] == args.prompt_len + n
        return time.perf_counter() - t

    run(8)
    elapsed = run(args.output_len)
    print("PEER " + json.dumps({
        "name": "transformers generate (torch eager)", "torch": torch.__version__,
        "transformers": transformers.__version__, "init_s": init_s,
        "tokens_per_s": args.output_len / elapsed, "generate_s": elapsed}), flush=True)


PEER_NOTE = ("The transformers peer is `generate` in eager PyTorch as installed (randomly "
             "initialised weights, default attention, dynamic cache); why it is this slow on "
             "the H200 was not profiled, so it is a floor, not a tuned peer. gpt-fast "
             "(torch.compile) reached 198 tokens/s on the H200 for the Llama-3.1-8B shape.")


def hf_peer(args) -> dict:
    """Run hf_peer_child in a fresh process (its GPU memory is freed before the engine
    starts); the peer's figures, or its error."""
    cmd = [sys.executable, __file__, "--hf-peer-child", "--model", args.model,
           "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEER ")]
    if proc.returncode or not line:
        return {"error": proc.stderr[-2000:]}
    return json.loads(line[0][len("PEER "):])


def startup(args) -> dict:
    cache = tempfile.mkdtemp(prefix="atom-jax-cache-")
    env = dict(os.environ, ATOM_JAX_CACHE_DIR=cache, JAX_COMPILATION_CACHE_DIR=cache)
    cmd = [sys.executable, __file__, "--first-token", "--model", args.model,
           "--load-format", args.load_format, "--max-model-len", str(args.max_model_len),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--max-num-seqs", str(args.max_num_seqs)]
    if args.num_scheduler_steps is not None:
        cmd += ["--num-scheduler-steps", str(args.num_scheduler_steps)]
    cmd += ["--decode-kernel", args.decode_kernel, "--block-size", str(args.block_size)]
    out = {}
    for label in ("cold", "warm"):
        t = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("FIRST_TOKEN_S")]
        out[label + "_s"] = float(line[0].split()[1]) if line else None
        phases = [ln for ln in proc.stdout.splitlines() if ln.startswith("PHASES")]
        out[label + "_phases_s"] = json.loads(phases[0][len("PHASES"):]) if phases else None
        out[label + "_wall_s"] = time.time() - t
        if proc.returncode:
            out[label + "_error"] = proc.stderr[-2000:]
    shutil.rmtree(cache, ignore_errors=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--max-model-len", type=int, default=8448)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--prefill-len", type=int, default=8192)
    p.add_argument("--startup", action="store_true", help="also time cold and warm start-up")
    p.add_argument("--profile", action="store_true",
                   help="also trace decode steps: GPU kernel time per step and the top kernels")
    p.add_argument("--compile-threads", type=int, default=None)
    p.add_argument("--num-scheduler-steps", type=int, default=None,
                   help="decode steps per launch for small batches (default: the engine's)")
    p.add_argument("--decode-kernel", default="off", choices=["auto", "on", "off"],
                   help="batch-1 decode in the persistent decode kernel (EngineConfig.decode_kernel)")
    p.add_argument("--block-size", type=int, default=16,
                   help="tokens per KV cache page (EngineConfig.block_size); the decode kernel "
                        "reads 64-token pages faster than 16-token ones")
    p.add_argument("--only-startup", action="store_true", help="time only the cold and warm start-up")
    p.add_argument("--hf-peer", action="store_true",
                   help="also time transformers generate on the same shapes (GPU, torch)")
    p.add_argument("--first-token", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hf-peer-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.first_token:
        return first_token(args)
    if args.hf_peer_child:
        return hf_peer_child(args)
    if args.only_startup:
        result = {"benchmark": "startup", "device": device_name(), "versions": versions(),
                  "model": args.model, "load_format": args.load_format,
                  "startup": startup(args)}
        write_json(args.out or f"docs/benchmarks/startup-{Path(args.model).stem}.json", result)
        s = result["startup"]
        print(f"start-up to first token: cold {s['cold_s']} s {s['cold_phases_s']}, "
              f"warm {s['warm_s']} s {s['warm_phases_s']}")
        return

    import jax

    from atom_jax import SamplingParams
    # Start-up first, while this process holds no GPU memory (with the children started
    # after it had taken its memory pool, a Qwen3-0.6B run on the H200 did not finish
    # within 400 s; the cause was not looked into).
    startup_result = startup(args) if args.startup else None
    ceiling = copy_bandwidth_gbs()
    peer = hf_peer(args) if args.hf_peer else None
    llm, engine_start = build_llm(args, args.max_num_seqs)
    print(f"engine start (load + compile {len(llm.engine.runner.buckets)} buckets): "
          f"{engine_start:.1f} s", flush=True)
    eng = llm.engine
    cfg = eng.model_config
    total_bytes, embed_bytes = param_bytes(eng.runner.params)

    # batch-1 decode
    greedy = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([[7] * args.prompt_len], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    eng.add_request([7] * args.prompt_len, greedy, "decode")
    times, counts = [], []  # when each step returned, and how many tokens it delivered
    while eng.has_unfinished():
        counts.append(sum(len(d.new_token_ids) for d in eng.step()))
        times.append(time.perf_counter())
    eng.release("decode")
    decode_s = times[-1] - times[0]  # from the first step's launch (the prefill) on
    tok_s = sum(counts[1:]) / decode_s
    kv_bytes_per_token = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
                          * eng.runner.kv_cache[0][0].dtype.itemsize)
    mean_ctx = args.prompt_len + args.output_len / 2
    # Untied embeddings are gathered (one row), not streamed; tied ones are read as lm_head.
    streamed = total_bytes - (0 if cfg.tie_word_embeddings else embed_bytes)
    bytes_per_step = streamed + kv_bytes_per_token * mean_ctx
    achieved = bytes_per_step * tok_s / 1e9
    print(f"batch-1 decode: {tok_s:.1f} tok/s, {achieved:.0f} GB/s", flush=True)

    profile = decode_profile(eng, args.prompt_len) if args.profile else None

    # prefill TTFT
    prompt = [9] * args.prefill_len
    # warm the path with other tokens: a shared prefix would be served from the prefix cache
    llm.generate([[3] * min(1024, args.prefill_len)], SamplingParams(temperature=0, max_tokens=1))
    t = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    ttft = time.perf_counter() - t
    n_params = streamed / jax.numpy.dtype(eng.dtype).itemsize
    attn_flops = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.prefill_len ** 2 / 2
    tflops = (2 * n_params * args.prefill_len + attn_flops) / ttft / 1e12

    result = {
        "benchmark": "latency", "device": device_name(), "versions": versions(),
        "model": args.model, "load_format": args.load_format, "dtype": jax.numpy.dtype(eng.dtype).name,
        "copy_bandwidth_gbs": ceiling, "engine_start_s": engine_start,
        "decode": {"prompt_len": args.prompt_len, "output_len": args.output_len,
                   "tokens_per_s": tok_s, "ms_per_token": 1000 / tok_s,
                   "bytes_per_step": bytes_per_step, "achieved_gbs": achieved,
                   "fraction_of_copy_bandwidth": achieved / ceiling},
        "prefill": {"tokens": args.prefill_len, "ttft_s": ttft, "effective_tflops": tflops},
        "block_size": args.block_size,
        "buckets": eng.runner.buckets, "startup_phases_s": eng.startup_times,
        "multi_step": multi_step_info(eng),
        "decode_kernel": {"mode": args.decode_kernel,
                          "steps": eng.runner.decode_kernel_steps,
                          "max_context": eng.runner.decode_kernel and eng.runner.decode_kernel.max_context},
        "decode_profile": profile, "hf_peer": peer,
        "notes": [PEER_NOTE] if peer else [],
    }
    if startup_result:
        result["startup"] = startup_result
    name = Path(args.model).stem
    write_json(args.out or f"docs/benchmarks/latency-{name}.json", result)
    print(f"\n{name} on {result['device']} (copy bandwidth {ceiling:.0f} GB/s)")
    print(f"  batch-1 decode : {tok_s:8.1f} tok/s  ({achieved:.0f} GB/s, "
          f"{100 * achieved / ceiling:.0f}% of copy)")
    print(f"  prefill {args.prefill_len:5d}  : TTFT {ttft * 1000:8.1f} ms  ({tflops:.0f} TFLOP/s)")
    if peer:
        print(f"  transformers   : {peer.get('tokens_per_s', float('nan')):8.1f} tok/s batch-1 "
              f"generate {peer.get('error', '')[-300:]}")
    ms = result["multi_step"]
    choice = (f"{ms['steps']} steps per launch up to {max(ms['buckets'])} sequences"
              if ms["buckets"] else "off")
    print(f"  multi-step     : {choice} (start-up timing {ms['startup_timing']})")
    print(f"  engine start   : {engine_start:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in eng.startup_times.items())})")
    if profile:
        print(f"  decode profile : GPU busy {profile['gpu_busy_us_per_step']:.0f} us/step, "
              f"span {profile['gpu_span_us_per_step']:.0f} us, "
              f"{profile['kernels_per_step']:.0f} kernels/step")
    if args.startup:
        s = result["startup"]
        print(f"  start-up       : cold {s['cold_s']} s, warm {s['warm_s']} s to first token")


if __name__ == "__main__":
    main()
