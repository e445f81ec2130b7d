"""The serving front on a scripted stand-in engine (no model, no JAX), for the paths a real
engine rarely takes: a full queue (503 / RESOURCE_EXHAUSTED), an engine fault before and after a
stream started (500 / INTERNAL / a final error event), cancellation and shutdown."""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from types import SimpleNamespace

import grpc
import httpx
import pytest
from serving_harness import free_port

from atom_jax.async_llm import AsyncLLM
from atom_jax.outputs import StepDelta
from atom_jax.sampling_params import SamplingParams
from serving.auth import key_matches
from serving.grpc_server import GrpcServer, pb2, pb2_grpc
from serving.metrics import ServingMetrics
from serving.openai_server import OpenAIServer, build_app


class CharTokenizer:
    """One token per byte; id 0 is end-of-sequence."""

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids = self.encode(text)
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(ids))]
        return out

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i).decode(errors="replace")

    def convert_ids_to_tokens(self, ids):
        return self.decode([ids]) if isinstance(ids, int) else [self.decode([i]) for i in ids]

    def apply_chat_template(self, conversation, add_generation_prompt=True,
                            continue_final_message=False, tokenize=True):
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in conversation))


class ScriptedEngine:
    """Emits "x" tokens; `paused` keeps requests waiting, `fail_at_step` makes a step raise."""

    def __init__(self):
        self.tokenizer = CharTokenizer()
        self.max_model_len = 64
        self.model_config = SimpleNamespace(vocab_size=256)
        self.eos_token_ids = (0,)
        self.block_manager = SimpleNamespace(usage=0.0, num_free_blocks=8, prefix_queries=0,
                                             prefix_hits=0)
        self.scheduler = SimpleNamespace(waiting=deque(), running=[], num_preemptions=0)
        self.requests, self.aborted = {}, []
        self.paused, self.fail_at_step, self.steps = False, None, 0

    def check_params(self, params):
        params.validate()
        return params

    def stats(self):
        running = {s.rid for s in self.scheduler.running}
        return len(running), len({s.rid for s in self.scheduler.waiting} - running)

    def add_request(self, ids, params, request_id):
        seqs = [SimpleNamespace(seq_id=f"{request_id}#{i}", rid=request_id, index=i,
                                left=params.max_tokens or 4) for i in range(params.n)]
        self.requests[request_id] = seqs
        self.scheduler.waiting.extend(seqs)

    def _drop(self, request_id):
        for seq in self.requests.pop(request_id, []):
            if seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            if seq in self.scheduler.running:
                self.scheduler.running.remove(seq)

    def abort(self, request_id):
        if request_id in self.requests:
            self.aborted.append(request_id)
        self._drop(request_id)

    def release(self, request_id):
        self._drop(request_id)

    def has_unfinished(self):
        return not self.paused and bool(self.scheduler.waiting or self.scheduler.running)

    def step(self):
        time.sleep(0.005)  # a real step takes time; requests must not all finish at once
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            self.fail_at_step = None
            raise RuntimeError("device lost")
        while self.scheduler.waiting:
            self.scheduler.running.append(self.scheduler.waiting.popleft())
        deltas = []
        for seq in list(self.scheduler.running):
            seq.left -= 1
            done = seq.left == 0
            if done:
                self.scheduler.running.remove(seq)
            deltas.append(StepDelta(seq.rid, seq.index, [ord("x")], "x", None, done,
                                    "length" if done else None))
        return deltas


class Front:
    """AsyncLLM + HTTP app (in-process ASGI) + gRPC server on the scripted engine."""

    def __init__(self, max_queued_requests=256):
        self.engine = ScriptedEngine()
        self.metrics = ServingMetrics("fake")
        self.llm = AsyncLLM(self.engine, max_queued_requests=max_queued_requests,
                            observer=self.metrics)
        self.metrics.bind(lambda: self.llm.stats)

    async def __aenter__(self):
        await self.llm.start()
        app = build_app(OpenAIServer(self.llm, "fake", "/nowhere", self.metrics))
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                      base_url="http://test", timeout=30)
        self.grpc = GrpcServer(self.llm, "fake", "127.0.0.1", free_port())
        await self.grpc.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.stub = pb2_grpc.GenerationServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.grpc.stop(0)
        await self.http.aclose()
        await self.llm.shutdown(timeout=1)

    async def wake(self):
        """Unpause: the engine thread re-checks for work after any command."""
        self.engine.paused = False
        await self.llm.call(lambda engine: None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def _gen_request(text="hi", max_new_tokens=3):
    return pb2.BatchedGenerationRequest(requests=[pb2.GenerationRequest(text=text)],
                                        params=pb2.Parameters(stopping=pb2.StoppingCriteria(
                                            max_new_tokens=max_new_tokens)))


def test_queue_full_is_503_with_retry_after_and_resource_exhausted():
    async def main():
        async with Front(max_queued_requests=2) as f:
            f.engine.paused = True
            waiting = [asyncio.create_task(f.http.post("/v1/completions",
                                                       json={"prompt": "a", "max_tokens": 2}))
                       for _ in range(2)]
            while len(f.engine.scheduler.waiting) < 2:
                await asyncio.sleep(0.01)
            r = await f.http.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
            assert r.status_code == 503
            assert r.headers["Retry-After"] == "1"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await f.stub.Generate(_gen_request())
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await f.wake()
            for task in waiting:
                ok = await task
                assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "xx"
            assert f.llm.num_in_flight == 0

    run(main())


def test_engine_fault_is_500_and_internal_then_the_loop_keeps_serving():
    async def main():
        async with Front() as f:
            f.engine.fail_at_step = f.engine.steps + 1
            r = await f.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
            assert r.status_code == 500
            error = r.json()["error"]
            assert "device lost" in error["message"] and error["type"] == "server_error"
            f.engine.fail_at_step = f.engine.steps + 1
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await f.stub.Generate(_gen_request())
            assert e.value.code() == grpc.StatusCode.INTERNAL and "device lost" in e.value.details()
            assert set(f.engine.aborted) and not f.engine.requests  # nothing left behind
            r = await f.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "xxx"
            resp = await f.stub.Generate(_gen_request())
            assert resp.responses[0].text == "xxx"

    run(main())


def test_engine_fault_after_the_stream_started_is_a_final_error_event():
    async def main():
        async with Front() as f:
            f.engine.fail_at_step = f.engine.steps + 3
            r = await f.http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True})
            assert r.status_code == 200
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])
            assert "device lost" in last["error"]["message"]
            assert any(json.loads(e)["choices"][0]["delta"].get("content") == "x"
                       for e in events[1:-2])
            assert f.llm.num_in_flight == 0

    run(main())


def test_leaving_a_request_early_aborts_it():
    async def main():
        async with Front() as f:
            params = SamplingParams(max_tokens=50)
            async with f.llm.request("hello", params, request_id="r1") as stream:
                async for _ in stream:
                    break
            await f.llm.call(lambda engine: None)  # the abort ran before this
            assert f.engine.aborted == ["r1"] and f.llm.num_in_flight == 0

            async def consume():
                async with f.llm.request("hello", SamplingParams(max_tokens=50), "r2") as s:
                    async for _ in s:
                        pass
            task = asyncio.create_task(consume())
            while "r2" not in f.engine.requests:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await f.llm.call(lambda engine: None)
            assert f.engine.aborted == ["r1", "r2"] and not f.engine.requests

    run(main())


def test_shutdown_aborts_what_is_left_with_a_finish_reason():
    async def main():
        f = Front()
        await f.llm.start()
        f.engine.paused = True
        stream = await f.llm.add_request("hello", SamplingParams(max_tokens=5, n=2))
        await f.llm.shutdown(timeout=0.1)
        reasons = {d.index: d.finish_reason async for d in stream}
        assert reasons == {0: "abort", 1: "abort"}
        with pytest.raises(RuntimeError):
            await f.llm.add_request("hello", SamplingParams())

    run(main())


def test_key_comparison():
    assert key_matches("k1", "Bearer k1") and key_matches("k1", "bearer k1")
    for presented in (None, "", "k1", "Bearer k2", "Bearer k1x", "Basic k1", "Bearer"):
        assert not key_matches("k1", presented)
