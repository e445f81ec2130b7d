"""Bounded load on the real server: clients that disconnect mid-generation leave no KV blocks
and no running request; 64 concurrent streams all finish and the metrics' counters agree with
what the clients received; SIGTERM drains and exits 0 (last: it stops the server)."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
from serving_harness import API_KEY, REPO, shared_server

from serving.protos import load

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server():
    return shared_server().wait_ready()


def _delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


async def _read_events(response) -> list:
    events = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            events.append(line[6:])
    return events


def test_disconnecting_clients_leave_no_blocks(server):
    before = server.metrics()

    async def client(c: httpx.AsyncClient, i: int, chunks_before_leaving: int):
        body = {"prompt": f"Write a long story about the number {i}.", "max_tokens": 400,
                "stream": True, "ignore_eos": True}
        async with c.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            seen = 0
            if chunks_before_leaving:  # (else leave at once: the request may still be queued)
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= chunks_before_leaving:
                        break
        # leaving the block closes the unfinished response's connection

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(*(client(c, i, 0 if i < 3 else 3) for i in range(20)))

    asyncio.run(main())
    after = server.wait_idle(timeout=20)
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert _delta(after, before, "vllm:request_success_total{finished_reason=abort}") == 20
    # and a non-streaming client that gives up is aborted too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=1.5,
                   json={"prompt": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True})
    after = server.wait_idle(timeout=20)
    assert after["vllm:kv_cache_usage_perc"] == 0 and after["vllm:num_requests_running"] == 0
    assert _delta(after, before, "vllm:request_success_total{finished_reason=abort}") == 21


def test_64_concurrent_streams_complete_and_metrics_agree(server):
    before = server.metrics()

    async def client(c: httpx.AsyncClient, i: int) -> dict:
        common = {"max_tokens": 4 + i % 5, "temperature": 0.8, "seed": i, "stream": True,
                  "stream_options": {"include_usage": True}}
        if i % 2:
            path, body = "/v1/completions", {"prompt": f"Fact number {i}:", "logprobs": 0}
        else:
            path, body = "/v1/chat/completions", {"messages": [
                {"role": "user", "content": f"Say something about {i}."}], "logprobs": True}
        async with c.stream("POST", server.url + path, json={**body, **common},
                            headers=AUTH) as r:
            assert r.status_code == 200, await r.aread()
            events = await _read_events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in ch for ch in chunks)
        tokens, finish = 0, None
        for ch in chunks:
            for choice in ch["choices"]:
                lp = choice.get("logprobs")
                if lp:
                    tokens += len(lp["content"] if "content" in lp else lp["tokens"])
                finish = choice.get("finish_reason") or finish
        return {"tokens": tokens, "finish": finish, "usage": chunks[-1]["usage"]}

    async def main():
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(*(client(c, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(r["finish"] in ("stop", "length") for r in results)
    assert all(r["tokens"] == r["usage"]["completion_tokens"] for r in results)
    after = server.wait_idle(timeout=20)
    received = sum(r["tokens"] for r in results)
    assert _delta(after, before, "vllm:request_success_total") == 64
    assert _delta(after, before, "vllm:request_success_total{finished_reason=abort}") == 0
    assert _delta(after, before, "vllm:generation_tokens_total") == received
    assert _delta(after, before, "vllm:prompt_tokens_total") == sum(
        r["usage"]["prompt_tokens"] for r in results)
    assert _delta(after, before, "vllm:e2e_request_latency_seconds_count") == 64
    assert _delta(after, before, "vllm:time_to_first_token_seconds_count") == 64
    assert _delta(after, before, "vllm:inter_token_latency_seconds_count") == received - 64
    assert after["vllm:kv_cache_usage_perc"] == 0 and after["vllm:num_requests_running"] == 0


@pytest.mark.parametrize("dataset,arrival", [("random", ["--request-rate", "20"]),
                                             ("conversation", ["--max-concurrency", "3"])])
def test_bench_serving_script(server, tmp_path, dataset, arrival):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_serving.py"), "--base-url", server.url,
         "--api-key", API_KEY, "--dataset", dataset, "--num-prompts", "6", "--input-len", "24",
         "--output-len", "4", "--ignore-eos", "--percentiles", "50", "99", "--result-file",
         str(out), *arrival], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == sum(result["output_lens"]) > 0
    if dataset == "random":  # fixed lengths (ignore_eos); conversations vary around 4
        assert result["output_lens"] == [4] * 6
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < result[f"median_{name}_ms"] <= result[f"p99_{name}_ms"]
    assert result["request_throughput"] > 0 and result["output_throughput"] > 0
    assert "Serving Benchmark Result" in proc.stdout


def test_bench_serving_summary_only_keeps_the_label_and_drops_per_request_lists(server, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_serving.py"), "--base-url", server.url,
         "--api-key", API_KEY, "--num-prompts", "3", "--input-len", "16", "--output-len", "3",
         "--ignore-eos", "--max-concurrency", "2", "--summary-only", "--label", "engine X on Y",
         "--result-file", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["label"] == "engine X on Y" and result["max_concurrency"] == 2
    assert (result["input_len"], result["output_len"], result["ignore_eos"]) == (16, 3, True)
    assert result["completed"] == 3 and result["total_output_tokens"] == 9
    assert result["first_errors"] == []
    assert not {"input_lens", "output_lens", "ttfts", "itls", "errors"} & result.keys()


def test_sigterm_finishes_or_aborts_in_flight_requests_and_exits_zero(server):
    """The server runs with --shutdown-timeout 3: a short request finishes, long ones are
    aborted with a finish reason, new requests are refused, and the process exits 0."""
    pb2, pb2_grpc = load()
    results: dict[str, object] = {}
    started = {k: threading.Event() for k in ("short", "long", "grpc")}

    def http_stream(name, max_tokens):
        body = {"prompt": "Tell me a story.", "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True}
        finish, events = None, []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH,
                          timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started[name].set()
                    events.append(line[6:])
                    if line[6:] != "[DONE]":
                        finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        results[name] = (finish, events[-1])

    def grpc_stream():
        with grpc.insecure_channel(server.grpc_target) as ch:
            stub = pb2_grpc.GenerationServiceStub(ch)
            req = pb2.SingleGenerationRequest(
                request=pb2.GenerationRequest(text="Tell me a story."),
                params=pb2.Parameters(stopping=pb2.StoppingCriteria(max_new_tokens=1000,
                                                                     min_new_tokens=1000)))
            last = None
            for msg in stub.GenerateStream(req, metadata=(("authorization", f"Bearer {API_KEY}"),)):
                started["grpc"].set()
                last = msg
            results["grpc"] = last.stop_reason

    threads = [threading.Thread(target=http_stream, args=("short", 6)),
               threading.Thread(target=http_stream, args=("long", 1000)),
               threading.Thread(target=grpc_stream)]
    for t in threads:
        t.start()
    for e in started.values():
        assert e.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=10,
                         json={"prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert httpx.get(server.url + "/health", timeout=10).status_code == 503
    for t in threads:
        t.join(60)
    assert server.proc.wait(60) == 0, server.log_tail()
    log = server.log_tail(10**7)
    assert "Traceback" not in log, log  # nothing the tests sent made the server fail
    assert results["short"] == ("length", "[DONE]")
    assert results["long"] == ("abort", "[DONE]")
    assert results["grpc"] == pb2.CANCELLED
