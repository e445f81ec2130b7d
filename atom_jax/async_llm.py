"""AsyncLLM: an asyncio front over one EngineCore, shared by the HTTP and gRPC servers.

The engine is not thread-safe, so it lives in one thread of its own. That thread takes
commands (add, abort, any call on the engine) from a queue between steps, steps while work
is unfinished, and hands each step's deltas to the event loop, one asyncio queue per request.
Requests are tokenized on the event loop with a private copy of the tokenizer, so the engine
thread never waits on them.

    llm = AsyncLLM.from_config(EngineConfig())
    await llm.start()
    async with llm.request("Hello", SamplingParams(max_tokens=8)) as stream:
        async for delta in stream:      # StepDelta: one sequence's new tokens and text
            ...
    await llm.shutdown()

Leaving the `async with` block before the request finished (a client that went away, a task
cancelled) aborts it, which frees its KV blocks at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from atom_jax.outputs import StepDelta
from atom_jax.sampling_params import SamplingParams
from atom_jax.tokenizer import check_token_ids

logger = logging.getLogger(__name__)



class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class EngineUnavailableError(RuntimeError):
    """The server is shutting down and takes no new requests."""


class EngineError(RuntimeError):
    """The engine failed while running a request."""


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's state, published by the engine thread after every step."""
    num_running: int = 0  # requests with a sequence running
    num_waiting: int = 0  # requests with a sequence waiting (and none running)
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # tokens found there
    num_preemptions: int = 0


class StatObserver:
    """Per-request events, called from the engine thread (serving.metrics implements it)."""

    def request_added(self, num_prompt_tokens: int) -> None: ...

    def tokens_generated(self, num_tokens: int) -> None: ...

    def first_token(self, seconds_since_arrival: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def request_finished(self, e2e_seconds: float, finish_reason: str) -> None: ...


class RequestStream:
    """The deltas of one request, as they come; iterate it with `async for`."""

    _END = object()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.finished = False
        self._queue: asyncio.Queue = asyncio.Queue()
        # Engine-thread bookkeeping.
        self.arrival = time.monotonic()
        self.unfinished = set(range(params.n))
        self.last_token_time: dict[int, float] = {}

    def __aiter__(self) -> AsyncIterator[StepDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StepDelta]:
        while not self.finished:
            item = await self._queue.get()
            if item is self._END:
                self.finished = True
            elif isinstance(item, BaseException):
                self.finished = True
                raise item
            else:
                yield item

    def _put(self, item) -> None:  # on the event loop
        self._queue.put_nowait(item)


class AsyncLLM:
    def __init__(self, engine, max_queued_requests: int = 256,
                 observer: StatObserver | None = None):
        self.engine = engine
        # used on the event loop only; None for a model without one (token-id prompts only)
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.model_config.vocab_size
        self.max_queued_requests = max_queued_requests
        self.observer = observer or StatObserver()
        self.stats = EngineStats()
        self.accepting = True
        self._streams: dict[str, RequestStream] = {}  # owned by the engine thread
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stopping = False

    @classmethod
    def from_config(cls, config, **kwargs) -> "AsyncLLM":
        from atom_jax.engine import EngineCore
        return cls(EngineCore(config), **kwargs)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._publish_stats()
        self._thread.start()

    @property
    def is_running(self) -> bool:
        """Taking requests, with the engine thread alive."""
        return self.accepting and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let those in flight finish for up to `timeout` seconds, abort
        the rest (their streams end with finish reason "abort"), then stop the engine thread."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._streams:
            logger.warning("aborting %d requests still running at shutdown", len(self._streams))
            await self.call(lambda engine: [self._abort(rid) for rid in list(self._streams)])
        self._stopping = True
        self._commands.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    # ------------------------------------------------------------ requests

    @property
    def text_tokenizer(self):
        """The tokenizer; ValueError when the model has none."""
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer; send token ids")
        return self.tokenizer

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of a text prompt, exactly as the engine tokenizes one."""
        return self.text_tokenizer.encode(prompt, add_special_tokens=True)

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(map(self.token_text, token_ids))
        return self.tokenizer.decode(token_ids)

    def token_text(self, token_id: int) -> str:
        """One token's text ("token_id:N" without a tokenizer)."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def check_prompt(self, prompt: str | list[int]) -> list[int]:
        """Validate and tokenize a prompt (ValueError naming the parameter if it is bad)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenize(prompt)
        return check_token_ids(prompt, self.vocab_size, "prompt")

    def check_params(self, params: SamplingParams) -> SamplingParams:
        """Validate sampling parameters and bring them into the ranges the sampler can hold."""
        self.engine.check_params(params)
        if params.n > self.max_queued_requests:
            raise ValueError(f"n must be <= {self.max_queued_requests}, got {params.n}")
        return params

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str | None = None) -> RequestStream:
        """Queue a request. Raises ValueError for bad input, QueueFullError when too many
        requests wait, EngineUnavailableError while shutting down."""
        if not self.accepting:
            raise EngineUnavailableError("the server is shutting down")
        params = self.check_params(params)
        ids = self.check_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens do not fit: max_model_len is "
                             f"{self.max_model_len} and at least one token must be generated")
        stream = RequestStream(request_id or uuid.uuid4().hex, ids, params)

        def add(engine):
            if not self.accepting:
                raise EngineUnavailableError("the server is shutting down")
            if len(engine.scheduler.waiting) + params.n > self.max_queued_requests:
                raise QueueFullError(f"{len(engine.scheduler.waiting)} sequences are waiting "
                                     f"(the limit is {self.max_queued_requests})")
            if stream.request_id in self._streams:
                raise ValueError(f"request_id {stream.request_id!r} is already in use")
            engine.add_request(ids, params, stream.request_id)
            stream.arrival = time.monotonic()
            self._streams[stream.request_id] = stream
            self.observer.request_added(len(ids))

        try:
            await self.call(add)
        except asyncio.CancelledError:
            self.abort(stream.request_id)  # runs after the add, so nothing is left behind
            raise
        return stream

    @contextlib.asynccontextmanager
    async def request(self, prompt: str | list[int], params: SamplingParams,
                      request_id: str | None = None) -> AsyncIterator[RequestStream]:
        """`async with llm.request(...) as stream`: aborts the request on early exit."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            yield stream
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once). Its blocks are freed before the
        engine's next step; a listener gets finish reason "abort" for unfinished sequences."""
        if not self._stopping:  # after shutdown nothing runs any more
            self._submit(lambda engine: self._abort(request_id))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps and return its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def command(engine):
            try:
                result = fn(engine)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._submit(command)
        return await future

    def _submit(self, command) -> None:
        if self._stopping or not self._thread.is_alive():
            raise EngineUnavailableError("the engine is not running")
        self._commands.put(command)

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while True:
            try:
                if not self._run_once():
                    return
            except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                logger.exception("engine loop failed; failing %d requests", len(self._streams))
                self._fail_all(e)

    def _run_once(self) -> bool:
        """Run the queued commands, then one step if there is work; False once told to stop."""
        engine = self.engine
        try:
            command = self._commands.get(block=not engine.has_unfinished())
        except queue.Empty:
            command = False
        while command is not False:
            if command is None:
                return False
            try:
                command(engine)
            except Exception:  # noqa: BLE001 - a bad command must not stop the loop
                logger.exception("engine command failed")
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = False
        if engine.has_unfinished():
            self._dispatch(engine.step())
        self._publish_stats()
        return True

    def _dispatch(self, deltas: list[StepDelta]) -> None:
        now = time.monotonic()
        out = []
        for d in deltas:
            stream = self._streams.get(d.request_id)
            if stream is None:
                continue
            self.observer.tokens_generated(len(d.new_token_ids))
            last = stream.last_token_time.get(d.index)
            if last is None:
                if not stream.last_token_time:
                    self.observer.first_token(now - stream.arrival)
            else:
                self.observer.inter_token(now - last)
            stream.last_token_time[d.index] = now
            out.append((stream, d))
            if d.finished:
                stream.unfinished.discard(d.index)
                if not stream.unfinished:
                    self._close(stream, d.finish_reason or "stop", now)
                    out.append((stream, RequestStream._END))
        self._deliver(out)

    def _close(self, stream: RequestStream, finish_reason: str, now: float) -> None:
        self._streams.pop(stream.request_id, None)
        self.engine.release(stream.request_id)
        self.observer.request_finished(now - stream.arrival, finish_reason)

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self.observer.request_finished(time.monotonic() - stream.arrival, "abort")
        out = [(stream, StepDelta(request_id, i, [], "", None, True, "abort"))
               for i in sorted(stream.unfinished)]
        self._deliver(out + [(stream, RequestStream._END)])

    def _fail_all(self, error: Exception) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001
                logger.exception("abort of %s failed", rid)
            self._streams.pop(rid, None)
            self.observer.request_finished(time.monotonic() - stream.arrival, "error")
            self._deliver([(stream, EngineError(f"engine failure: {type(error).__name__}: {error}"))])

    def _deliver(self, items) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_put_all, items)

    def _publish_stats(self) -> None:
        e = self.engine
        bm, sched = e.block_manager, e.scheduler
        running, waiting = e.stats()
        self.stats = EngineStats(running, waiting, bm.usage, bm.num_free_blocks,
                                 bm.prefix_queries, bm.prefix_hits, sched.num_preemptions)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(items) -> None:
    for stream, item in items:
        stream._put(item)
