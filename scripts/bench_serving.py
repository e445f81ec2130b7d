"""Load generator for any OpenAI-compatible server, with `vllm bench serve`'s metric definitions.

    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --dataset random \
        --num-prompts 200 --input-len 256 --output-len 64 --request-rate 4 --result-file out.json

Datasets (both generated from --seed, nothing is downloaded):
  random        prompts of about --input-len words drawn at random, sent to /v1/completions
  conversation  synthetic multi-turn chats (a system prompt, 0-4 earlier turns, a question),
                sent to /v1/chat/completions; output lengths vary around --output-len
Arrivals: Poisson at --request-rate requests/s (gamma intervals when --burstiness != 1, as vLLM),
or all at once (rate inf); --max-concurrency caps requests in flight (fixed concurrency).

Metrics, as vLLM defines them, per request from its send time:
  TTFT  time to the first streamed chunk with choices
  ITL   time between successive such chunks (every gap of every request)
  TPOT  (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token
  E2EL  time to the end of the response
Token counts come from the server's usage (stream_options.include_usage). Throughputs divide by
the benchmark's wall time. Each latency gets mean, median, std and the --percentiles (ms).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

WORDS = ("time person year way day thing man world life hand part child eye woman place work "
         "week case point government company number group problem fact water room mother area "
         "money story month lot right study book job word business issue side kind head house "
         "service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office "
         "door health art war history party result change morning reason research girl guy "
         "moment air teacher force education").split()
TOPICS = ["gardening", "the ocean", "trains", "baking bread", "chess", "volcanoes", "music",
          "bicycles", "the moon", "libraries", "bees", "winter", "maps", "robots", "tea"]


@dataclass
class Request:
    kind: str  # "completions" | "chat"
    payload: dict  # prompt or messages
    output_len: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""


def random_dataset(n: int, input_len: int, output_len: int, range_ratio: float,
                   rng: random.Random) -> list[Request]:
    out = []
    for _ in range(n):
        lo, hi = int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio))
        words = [rng.choice(WORDS) for _ in range(max(1, rng.randint(lo, max(lo, hi))))]
        olo, ohi = int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio))
        out.append(Request("completions", {"prompt": " ".join(words)},
                           max(1, rng.randint(olo, max(olo, ohi)))))
    return out


def conversation_dataset(n: int, output_len: int, rng: random.Random) -> list[Request]:
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        messages = [{"role": "system", "content": f"You are a friendly expert on {topic}."}]
        for _ in range(rng.randint(0, 4)):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
            messages += [{"role": "user", "content": f"What about {q}?"},
                         {"role": "assistant", "content": a.capitalize() + "."}]
        messages.append({"role": "user", "content": f"Tell me something surprising about {topic}."})
        out.append(Request("chat", {"messages": messages},
                           max(1, int(rng.uniform(0.5, 1.5) * output_len))))
    return out


async def send(client: httpx.AsyncClient, args, req: Request) -> Result:
    path = "/v1/completions" if req.kind == "completions" else "/v1/chat/completions"
    body = {**req.payload, "model": args.model, "max_tokens": req.output_len, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": args.temperature}
    if args.ignore_eos:
        body["ignore_eos"] = True
    res = Result()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", args.base_url + path, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices")
                if not choices:
                    continue
                now = time.perf_counter()  # as vLLM: every chunk with choices is an arrival
                if res.ttft == 0.0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                c = choices[0]
                res.text += c.get("text") or (c.get("delta") or {}).get("content") or ""
        res.latency = time.perf_counter() - start
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def arrivals(requests: list[Request], rate: float, burstiness: float, rng: np.random.Generator):
    for i, req in enumerate(requests):
        yield req
        if rate != float("inf") and i < len(requests) - 1:
            theta = 1.0 / (rate * burstiness)
            await asyncio.sleep(rng.gamma(shape=burstiness, scale=theta))


async def run(args, requests: list[Request]) -> tuple[list[Result], float]:
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        async def one(req):
            if limit is None:
                return await send(client, args, req)
            async with limit:
                return await send(client, args, req)

        start = time.perf_counter()
        tasks = []
        async for req in arrivals(requests, args.request_rate, args.burstiness,
                                  np.random.default_rng(args.seed)):
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def summarize(args, results: list[Result], duration: float) -> dict:
    done = [r for r in results if r.ok]
    ttfts = [r.ttft for r in done]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itls = [x for r in done for x in r.itl]
    e2els = [r.latency for r in done]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    out = {
        "backend": "openai", "base_url": args.base_url, "label": args.label,
        "model": args.model, "dataset": args.dataset, "input_len": args.input_len,
        "output_len": args.output_len, "ignore_eos": args.ignore_eos,
        "num_prompts": len(results), "request_rate": args.request_rate,
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "duration": duration, "completed": len(done), "failed": len(results) - len(done),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        ms = np.asarray(values or [0.0]) * 1000
        out[f"mean_{name}_ms"] = float(ms.mean())
        out[f"median_{name}_ms"] = float(np.median(ms))
        out[f"std_{name}_ms"] = float(ms.std())
        for p in args.percentiles:
            out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    if args.summary_only:
        out["first_errors"] = sorted({r.error for r in results if r.error})[:5]
    else:
        out.update(input_lens=[r.prompt_tokens for r in results],
                   output_lens=[r.output_tokens for r in results],
                   ttfts=[r.ttft for r in results], itls=[r.itl for r in results],
                   errors=[r.error for r in results])
    if args.save_texts:
        out["generated_texts"] = [r.text for r in results]
    return out


def print_summary(s: dict, percentiles) -> None:
    print(f"{' Serving Benchmark Result ':=^60}")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration']:.2f}"),
            ("Total input tokens", s["total_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        rows.append((f"--- {title} ---", ""))
        rows += [(f"Mean {name.upper()} (ms)", f"{s[f'mean_{name}_ms']:.2f}"),
                 (f"Median {name.upper()} (ms)", f"{s[f'median_{name}_ms']:.2f}")]
        rows += [(f"P{p:g} {name.upper()} (ms)", f"{s[f'p{p:g}_{name}_ms']:.2f}") for p in percentiles]
    for k, v in rows:
        print(f"{k:<44}{v:>16}")
    print("=" * 60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "conversation"], default="random")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="random: prompt length in words")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="random: lengths drawn uniformly within ±this fraction")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (Poisson); inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the intervals: 1 is Poisson, lower is burstier")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens (vLLM extension)")
    p.add_argument("--percentiles", type=float, nargs="+", default=[99.0])
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-texts", action="store_true", help="keep generated texts in the JSON")
    p.add_argument("--result-file", default=None, help="write the results as JSON here")
    p.add_argument("--label", default=None,
                   help="what was served (engine, model, device), kept in the JSON for the dashboard")
    p.add_argument("--summary-only", action="store_true",
                   help="leave the per-request lists (lengths, TTFTs, ITLs, errors) out of the JSON")
    args = p.parse_args(argv)
    args.base_url = args.base_url.rstrip("/")
    if args.model is None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = httpx.get(args.base_url + "/v1/models", headers=headers, timeout=30)
        models.raise_for_status()
        args.model = models.json()["data"][0]["id"]

    rng = random.Random(args.seed)
    if args.dataset == "random":
        requests = random_dataset(args.num_prompts, args.input_len, args.output_len,
                                  args.range_ratio, rng)
    else:
        requests = conversation_dataset(args.num_prompts, args.output_len, rng)
    results, duration = asyncio.run(run(args, requests))
    summary = summarize(args, results, duration)
    print_summary(summary, args.percentiles)
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
