"""The OpenAI-compatible HTTP server (FastAPI): /v1/completions, /v1/chat/completions,
/v1/models, plus /health, /version, /tokenize, /detokenize and /metrics (Prometheus)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from atom_jax.async_llm import AsyncLLM, RequestStream
from atom_jax.outputs import StepDelta
from atom_jax.sampling_params import SamplingParams
from serving.errors import APIError, bad_request, check_context_length, from_exception
from serving.http_middleware import ApiKeyMiddleware, BodyLimitMiddleware
from serving.metrics import CONTENT_TYPE_LATEST, ServingMetrics
from serving.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                              TokenizeRequest)

logger = logging.getLogger(__name__)


def atom_jax_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("atom-jax")
    except PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass
class _Choice:
    """One completion's output as it accumulates."""
    text: str = ""
    num_tokens: int = 0
    logprobs: list[tuple[int, dict[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class OpenAIServer:
    def __init__(self, llm: AsyncLLM, model_name: str, model_root: str, metrics: ServingMetrics):
        self.llm, self.model_name, self.model_root = llm, model_name, model_root
        self.metrics = metrics
        self.created = int(time.time())

    # ------------------------------------------------------------ helpers

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model",
                           code="model_not_found")

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one server per process
    def token_str(self, token_id: int) -> str:
        return self.llm.token_text(token_id)

    def chat_prompt(self, conversation, add_generation_prompt=True, continue_final_message=False,
                    kwargs=None) -> list[int]:
        try:
            out = self.llm.text_tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, tokenize=True, **(kwargs or {}))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - template errors are the caller's input
            raise ValueError(f"messages: the chat template failed: {e}") from e
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    async def start_requests(self, prompts: list[list[int]], params: SamplingParams,
                             max_tokens: int | None, base_id: str) -> list[RequestStream]:
        for ids in prompts:
            check_context_length(self.llm.max_model_len, len(ids), max_tokens)
        streams: list[RequestStream] = []
        try:
            for i, ids in enumerate(prompts):
                streams.append(await self.llm.add_request(ids, dataclasses.replace(params),
                                                          f"{base_id}-{i}"))
        except BaseException:
            for s in streams:
                self.llm.abort(s.request_id)
            raise
        return streams

    def close_requests(self, streams: list[RequestStream]) -> None:
        for s in streams:
            if not s.finished:
                self.llm.abort(s.request_id)

    # ------------------------------------------------------------ logprobs

    def completion_logprobs(self, entries, offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, lp in entries:
            s = self.token_str(tid)
            tokens.append(s)
            token_lps.append(lp[tid])
            tops.append({self.token_str(t): v for t, v in lp.items()})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    def chat_logprobs(self, entries, top_n: int) -> dict:
        content = []
        for tid, lp in entries:
            s = self.token_str(tid)
            top = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
            content.append({"token": s, "logprob": lp[tid], "bytes": list(s.encode()),
                            "top_logprobs": [{"token": self.token_str(t), "logprob": v,
                                              "bytes": list(self.token_str(t).encode())}
                                             for t, v in top]})
        return {"content": content}

    # ------------------------------------------------------------ completions

    async def completions(self, body: CompletionRequest, raw: Request):
        self.check_model(body.model)
        if body.suffix:
            raise bad_request("suffix is not supported")
        if body.echo and body.logprobs is not None:
            raise bad_request("echo: echo with logprobs is not supported (prompt logprobs are "
                              "not computed)")
        params = self.llm.check_params(body.sampling_params(body.max_tokens, body.logprobs))
        prompts = body.prompts()
        ids = [self.llm.check_prompt(p) for p in prompts]
        echoes = [(p if isinstance(p, str) else self.llm.decode(i)) if body.echo else ""
                  for p, i in zip(prompts, ids)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.start_requests(ids, params, body.max_tokens, rid)
        base = {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        n = params.n

        def choice_json(index, c: _Choice, text, entries, offset):
            return {"index": index, "text": text,
                    "logprobs": (self.completion_logprobs(entries, offset)
                                 if body.logprobs is not None else None),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

        if not body.stream:
            choices = await _until_disconnect(raw, self.collect(streams, n))
            out = [choice_json(i, c, echoes[i // n] + c.text, c.logprobs, 0)
                   for i, c in sorted(choices.items())]
            return {**base, "choices": out, "usage": _usage(streams, choices)}

        async def events():
            choices: dict[int, _Choice] = {}
            async for index, d in _merge(streams, n):
                c = choices.setdefault(index, _Choice())
                prefix = echoes[index // n] if c.num_tokens == 0 and not c.finish_reason else ""
                offset = len(c.text)
                entries = _accumulate(c, d)
                if not (prefix or d.new_text or d.finished or entries):
                    continue
                yield _sse({**base, "choices": [choice_json(index, c, prefix + d.new_text,
                                                             entries, offset)],
                            **_chunk_usage(body, streams, choices)})
            if body.include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(streams, choices)})

        return self.sse_response(events(), streams)

    # ------------------------------------------------------------ chat

    async def chat(self, body: ChatCompletionRequest, raw: Request):
        self.check_model(body.model)
        max_tokens = body.max_new_tokens()
        top_n = body.num_logprobs()
        params = self.llm.check_params(body.sampling_params(max_tokens, top_n))
        ids = self.chat_prompt(body.conversation(), body.add_generation_prompt,
                               body.continue_final_message, body.chat_template_kwargs)
        ids = self.llm.check_prompt(ids)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.start_requests([ids], params, max_tokens, rid)
        created = int(time.time())

        if not body.stream:
            choices = await _until_disconnect(raw, self.collect(streams, params.n))
            out = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.chat_logprobs(c.logprobs, top_n) if top_n is not None else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for i, c in sorted(choices.items())]
            return {"id": rid, "object": "chat.completion", "created": created,
                    "model": self.model_name, "choices": out, "usage": _usage(streams, choices)}

        base = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": self.model_name}

        async def events():
            choices: dict[int, _Choice] = {}
            async for index, d in _merge(streams, params.n):
                if index not in choices:  # the role first, when the choice's first output is in
                    yield _sse({**base, "choices": [{"index": index, "delta": {
                        "role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}], **_chunk_usage(body, streams, choices)})
                c = choices.setdefault(index, _Choice())
                entries = _accumulate(c, d)
                if not (d.new_text or d.finished or entries):
                    continue
                yield _sse({**base, "choices": [{
                    "index": index, "delta": {"content": d.new_text} if d.new_text else {},
                    "logprobs": self.chat_logprobs(entries, top_n) if top_n is not None else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}],
                    **_chunk_usage(body, streams, choices)})
            if body.include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(streams, choices)})

        return self.sse_response(events(), streams)

    # ------------------------------------------------------------ shared

    async def collect(self, streams: list[RequestStream], n: int) -> dict[int, _Choice]:
        choices: dict[int, _Choice] = {}
        try:
            async for index, d in _merge(streams, n):
                _accumulate(choices.setdefault(index, _Choice()), d)
        finally:
            self.close_requests(streams)
        return choices

    def sse_response(self, events: AsyncIterator[str], streams) -> Response:
        async def guarded():
            try:
                async for event in events:
                    yield event
            except Exception as e:  # noqa: BLE001 - the status line is gone: report in-band
                error = from_exception(e)
                if error.status == 500:
                    logger.exception("request failed mid-stream")
                yield _sse(error.body())
            yield "data: [DONE]\n\n"

        return _SSEResponse(guarded(), on_close=lambda: self.close_requests(streams))

    # ------------------------------------------------------------ utility routes

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "atom-jax", "root": self.model_root, "parent": None,
            "max_model_len": self.llm.max_model_len, "permission": []}]}

    def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("prompt: give exactly one of prompt and messages")
        if body.prompt is not None:
            ids = self.llm.text_tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            ids = self.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages],
                                   body.add_generation_prompt)
        strs = self.llm.text_tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.llm.max_model_len, "tokens": ids,
                "token_strs": strs}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        self.llm.check_prompt(body.tokens or [0])  # range check
        return {"prompt": self.llm.text_tokenizer.decode(body.tokens)}


# ------------------------------------------------------------------ module helpers

def _accumulate(c: _Choice, d: StepDelta) -> list[tuple[int, dict[int, float]]]:
    c.text += d.new_text
    c.num_tokens += len(d.new_token_ids)
    entries = list(zip(d.new_token_ids, d.new_logprobs or []))
    c.logprobs.extend(entries)
    if d.finished:
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    return entries


def _usage(streams: list[RequestStream], choices: dict[int, _Choice]) -> dict:
    prompt = sum(len(s.prompt_token_ids) for s in streams)
    completion = sum(c.num_tokens for c in choices.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _chunk_usage(body, streams: list[RequestStream], choices: dict[int, _Choice]) -> dict:
    """The usage so far, for a streamed chunk: only with stream_options.continuous_usage_stats."""
    return {"usage": _usage(streams, choices)} if body.continuous_usage else {}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _merge(streams: list[RequestStream], n: int) -> AsyncIterator[tuple[int, StepDelta]]:
    """Deltas of several requests as they come, tagged with their choice index (prompt * n + i)."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield d.index, d
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: RequestStream):
        try:
            async for d in stream:
                q.put_nowait((k * n + d.index, d))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            q.put_nowait((k, e))
        q.put_nowait((k, None))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()


async def _until_disconnect(request: Request, coro):
    """Run coro, cancelling it if the client goes away first."""
    task = asyncio.ensure_future(coro)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()  # the client is gone: its requests are aborted as the task unwinds
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise APIError(499, "The client closed the connection.", code="client_closed")


class _SSEResponse(StreamingResponse):
    """An event stream whose requests are aborted however the response ends (finished,
    client gone, or failed before the first byte)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
            self.on_close()


# ------------------------------------------------------------------ the app

def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def build_app(server: OpenAIServer, api_key: str | None = None,
              max_body_bytes: int = 8 * 2**20) -> FastAPI:
    app = FastAPI(title="atom-jax OpenAI-compatible server", version=atom_jax_version())
    app.state.server = server
    v1 = APIRouter(prefix="/v1")

    async def guarded(fn, *args):
        try:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            error = from_exception(e)
            if error.status == 500:
                logger.exception("request failed")
            raise error from e

    @v1.post("/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await guarded(server.completions, body, raw)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await guarded(server.chat, body, raw)

    @v1.get("/models")
    async def models():
        return server.models()

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if server.llm.is_running else 503)

    @app.get("/version")
    async def version():
        return {"version": atom_jax_version()}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await guarded(server.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return await guarded(server.detokenize, body)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return _error_response(_validation_to_api_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        logger.exception("unhandled error")
        return _error_response(from_exception(e))

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)  # outermost: before any parsing
    return app


def _validation_to_api_error(e: RequestValidationError) -> APIError:
    errors = e.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") in ("json_invalid", "json_type"):
        return APIError(400, f"The body is not a valid JSON object: {first.get('msg')}")
    # Errors of one field (one per member of a union type) share a location prefix: name that.
    locs = [tuple(p for p in err.get("loc", ()) if p != "body") for err in errors] or [()]
    loc = locs[0]
    for other in locs[1:]:
        n = 0
        while n < min(len(loc), len(other)) and loc[n] == other[n]:
            n += 1
        loc = loc[:n]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    messages = list(dict.fromkeys(err.get("msg", "") for err in errors))
    return APIError(400, f"{param or 'body'}: {'; '.join(messages[:4])}", param=param)
