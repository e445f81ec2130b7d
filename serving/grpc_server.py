"""The gRPC server: fmaas.GenerationService (the protocol of IBM's TGIS and vllm-tgis-adapter),
grpc.health.v1.Health and server reflection, on grpc.aio over the shared AsyncLLM."""
from __future__ import annotations

import asyncio
import functools
import logging
import random

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from atom_jax.async_llm import AsyncLLM
from atom_jax.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from serving.auth import GrpcAuthInterceptor
from serving.errors import APIError, bad_request, from_exception
from serving.protos import load as load_protos

logger = logging.getLogger(__name__)

pb2, pb2_grpc = load_protos()
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name  # fmaas.GenerationService
DEFAULT_MAX_NEW_TOKENS = 20  # TGIS's default when max_new_tokens is 0
MAX_NEW_TOKENS_LIMIT = 1024  # TGIS's default server limit
DEFAULT_INCLUDE_STOP_SEQUENCE = True  # TGIS's default


class _Malformed:
    """Stands in for a request whose bytes do not parse, so it is answered INVALID_ARGUMENT
    (a failing deserializer would make gRPC answer INTERNAL)."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as e:
            return _Malformed(e)
    return parse


def _rpc(method):
    """Maps exceptions onto gRPC status codes (for unary and server-streaming methods)."""
    async def fail(context, e: BaseException):
        error = from_exception(e)
        if error.status == 500:
            logger.exception("gRPC request failed")
        await context.abort(error.grpc_code, error.message)

    def check(request):
        if isinstance(request, _Malformed):
            raise bad_request(f"request: the message does not parse: {request.error}", param="request")

    if getattr(method, "_streaming", False):
        @functools.wraps(method)
        async def streaming(self, request, context):
            try:
                check(request)
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001
                await fail(context, e)
        return streaming

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            check(request)
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:  # noqa: BLE001
            await fail(context, e)
    return unary


def _streaming(method):
    method._streaming = True
    return method


class GenerationServicer:
    def __init__(self, llm: AsyncLLM, model_name: str):
        self.llm, self.model_name = llm, model_name
        self.max_new_tokens = min(MAX_NEW_TOKENS_LIMIT, llm.max_model_len - 1)

    # ------------------------------------------------------------ methods

    @_rpc
    async def Generate(self, request, context):
        self._check_model(request.model_id)
        jobs = [self._prepare(r.text, request.params) for r in request.requests]
        try:
            async with asyncio.TaskGroup() as group:  # one failing cancels the others
                tasks = [group.create_task(self._generate(*job)) for job in jobs]
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None
        return pb2.BatchedGenerationResponse(responses=[t.result() for t in tasks])

    @_rpc
    @_streaming
    async def GenerateStream(self, request, context):
        self._check_model(request.model_id)
        ids, params, opts = self._prepare(request.request.text, request.params)
        first = pb2.GenerationResponse(input_token_count=len(ids), seed=opts["seed"] or 0)
        if opts["input_text"]:
            first.text = request.request.text
        first.input_tokens.extend(self._input_tokens(ids, opts))
        count = 0
        async with self.llm.request(ids, params) as stream:
            yield first
            try:
                async with asyncio.timeout(opts["time_limit"]):
                    async for d in stream:
                        count += len(d.new_token_ids)
                        out = pb2.GenerationResponse(generated_token_count=count, text=d.new_text)
                        out.tokens.extend(self._tokens(d.new_token_ids, d.new_logprobs, opts))
                        if d.finished:
                            self._set_stop(out, d.finish_reason, d.stop_reason, count, params)
                        yield out
            except TimeoutError:
                yield pb2.GenerationResponse(generated_token_count=count,
                                             stop_reason=pb2.TIME_LIMIT)

    @_rpc
    async def Tokenize(self, request, context):
        self._check_model(request.model_id)
        tok = self.llm.text_tokenizer
        out = pb2.BatchedTokenizeResponse()
        for r in request.requests:
            enc = tok(r.text, add_special_tokens=True, return_offsets_mapping=request.return_offsets)
            ids = list(enc["input_ids"])
            offsets = list(enc["offset_mapping"]) if request.return_offsets else []
            if request.truncate_input_tokens and len(ids) > request.truncate_input_tokens:
                ids = ids[-request.truncate_input_tokens:]
                offsets = offsets[-request.truncate_input_tokens:] if offsets else offsets
            resp = out.responses.add(token_count=len(ids))
            if request.return_tokens:
                resp.tokens.extend(tok.convert_ids_to_tokens(ids))
            for start, end in offsets:
                resp.offsets.add(start=start, end=end)
        return out

    @_rpc
    async def ModelInfo(self, request, context):
        self._check_model(request.model_id)
        return pb2.ModelInfoResponse(model_kind=pb2.ModelInfoResponse.DECODER_ONLY,
                                     max_sequence_length=self.llm.max_model_len,
                                     max_new_tokens=self.max_new_tokens)

    # ------------------------------------------------------------ helpers

    def _check_model(self, model_id: str) -> None:
        if model_id and model_id != self.model_name:
            raise APIError(404, f"model_id: the model {model_id!r} is not served here "
                                f"(this server serves {self.model_name!r})", param="model_id")

    def _prepare(self, text: str, p) -> tuple[list[int], SamplingParams, dict]:
        """Validate a prompt and TGIS parameters -> (token ids, engine parameters, options)."""
        params, opts = self._sampling_params(p)
        opts["text"] = text
        ids = self.llm.check_prompt(text)
        if p.truncate_input_tokens and len(ids) > p.truncate_input_tokens:
            ids = ids[-p.truncate_input_tokens:]
        limit = self.llm.max_model_len
        if len(ids) + max(params.min_tokens, 1) > limit:
            raise bad_request(f"text: input tokens ({len(ids)}) plus min_new_tokens "
                              f"({params.min_tokens}) must be < {limit}, the model's maximum "
                              "sequence length", param="text")
        return ids, params, opts

    def _sampling_params(self, p) -> tuple[SamplingParams, dict]:
        s, stopping, decoding, resp = p.sampling, p.stopping, p.decoding, p.response
        greedy = p.method == pb2.GREEDY
        if s.typical_p not in (0.0, 1.0):
            raise bad_request("typical_p is not supported")
        if decoding.HasField("length_penalty"):
            raise bad_request("length_penalty is not supported")
        if decoding.WhichOneof("guided"):
            raise bad_request(f"{decoding.WhichOneof('guided')}: guided decoding is not supported")
        max_new = stopping.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if max_new > self.max_new_tokens:
            raise bad_request(f"max_new_tokens must be <= {self.max_new_tokens}, got {max_new}")
        if resp.top_n_tokens > MAX_TOP_LOGPROBS:
            raise bad_request(f"top_n_tokens must be <= {MAX_TOP_LOGPROBS}, got {resp.top_n_tokens}")
        seed = None
        if not greedy:
            seed = s.seed if s.HasField("seed") else random.getrandbits(30)
        logprobs = None
        if resp.generated_tokens and (resp.token_logprobs or resp.token_ranks or resp.top_n_tokens):
            logprobs = MAX_TOP_LOGPROBS if resp.token_ranks else resp.top_n_tokens
        include_stop = (stopping.include_stop_sequence if stopping.HasField("include_stop_sequence")
                        else DEFAULT_INCLUDE_STOP_SEQUENCE)
        params = SamplingParams(
            temperature=0.0 if greedy else (s.temperature if s.HasField("temperature") else 1.0),
            top_k=0 if greedy else s.top_k, top_p=1.0 if greedy or s.top_p == 0 else s.top_p,
            seed=seed, repetition_penalty=decoding.repetition_penalty or 1.0,
            max_tokens=max_new, min_tokens=stopping.min_new_tokens,
            stop=list(stopping.stop_sequences), include_stop_str_in_output=include_stop,
            logprobs=logprobs)
        self.llm.check_params(params)
        opts = {"seed": seed, "input_text": resp.input_text, "input_tokens": resp.input_tokens,
                "generated_tokens": resp.generated_tokens, "logprobs": resp.token_logprobs,
                "ranks": resp.token_ranks, "top_n": resp.top_n_tokens,
                "time_limit": stopping.time_limit_millis / 1000 if stopping.time_limit_millis else None}
        return params, opts

    async def _generate(self, ids, params, opts):
        out = pb2.GenerationResponse(input_token_count=len(ids), seed=opts["seed"] or 0)
        text, count = [], 0
        async with self.llm.request(ids, params) as stream:
            try:
                async with asyncio.timeout(opts["time_limit"]):
                    async for d in stream:
                        text.append(d.new_text)
                        count += len(d.new_token_ids)
                        out.tokens.extend(self._tokens(d.new_token_ids, d.new_logprobs, opts))
                        if d.finished:
                            self._set_stop(out, d.finish_reason, d.stop_reason, count, params)
            except TimeoutError:
                out.stop_reason = pb2.TIME_LIMIT
        out.text = (opts["text"] if opts["input_text"] else "") + "".join(text)
        out.generated_token_count = count
        out.input_tokens.extend(self._input_tokens(ids, opts))
        return out

    @staticmethod
    def _set_stop(out, finish_reason, stop_reason, count, params) -> None:
        if finish_reason == "length":
            out.stop_reason = pb2.MAX_TOKENS if count >= params.max_tokens else pb2.TOKEN_LIMIT
        elif finish_reason == "stop" and isinstance(stop_reason, str):
            out.stop_reason, out.stop_sequence = pb2.STOP_SEQUENCE, stop_reason
        elif finish_reason == "stop":
            out.stop_reason = pb2.EOS_TOKEN
        else:
            out.stop_reason = pb2.CANCELLED

    def _tokens(self, token_ids, logprobs, opts):
        if not opts["generated_tokens"]:
            return []
        tok = self.llm.tokenizer
        infos = []
        for i, tid in enumerate(token_ids):
            info = pb2.TokenInfo(text=tok.convert_ids_to_tokens(tid))
            lp = logprobs[i] if logprobs else None
            if lp is not None:
                ranked = sorted(lp.items(), key=lambda kv: -kv[1])
                if opts["logprobs"]:
                    info.logprob = lp[tid]
                if opts["ranks"]:
                    info.rank = next((r + 1 for r, (t, _) in enumerate(ranked) if t == tid), 0)
                for t, v in ranked[:opts["top_n"]]:
                    info.top_tokens.add(text=tok.convert_ids_to_tokens(t), logprob=v)
            infos.append(info)
        return infos

    def _input_tokens(self, ids, opts):
        if not opts["input_tokens"]:
            return []
        return [pb2.TokenInfo(text=t) for t in self.llm.tokenizer.convert_ids_to_tokens(ids)]


def _method_handlers(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
    unary, streaming = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    methods = {
        "Generate": (unary, servicer.Generate, pb2.BatchedGenerationRequest),
        "GenerateStream": (streaming, servicer.GenerateStream, pb2.SingleGenerationRequest),
        "Tokenize": (unary, servicer.Tokenize, pb2.BatchedTokenizeRequest),
        "ModelInfo": (unary, servicer.ModelInfo, pb2.ModelInfoRequest),
    }
    handlers = {name: kind(fn, request_deserializer=_lenient(req),
                           response_serializer=lambda m: m.SerializeToString())
                for name, (kind, fn, req) in methods.items()}
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class GrpcServer:
    def __init__(self, llm: AsyncLLM, model_name: str, host: str, port: int,
                 api_key: str | None = None):
        interceptors = [GrpcAuthInterceptor(api_key)] if api_key else []
        self.server = grpc.aio.server(interceptors=interceptors)
        self.server.add_generic_rpc_handlers((_method_handlers(GenerationServicer(llm, model_name)),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC server to {host}:{port}")

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        """Report NOT_SERVING (new requests are refused by the engine front meanwhile)."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
