"""The gRPC server through a grpcio client built from serving/protos/generation.proto:
fmaas.GenerationService, the health service, reflection, the API key, bad inputs, and
cancellation freeing KV blocks."""
from __future__ import annotations

import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_harness import API_KEY, MODEL, shared_server

from serving.protos import load

pytestmark = pytest.mark.slow

pb2, pb2_grpc = load()
AUTH = (("authorization", f"Bearer {API_KEY}"),)
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def server():
    return shared_server().wait_ready()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb2_grpc.GenerationServiceStub(channel)


def greedy(max_new_tokens=8, **response):
    return pb2.Parameters(method=pb2.GREEDY,
                          stopping=pb2.StoppingCriteria(max_new_tokens=max_new_tokens),
                          response=pb2.ResponseOptions(**response))


def http_completion(server, prompt, max_tokens):
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    return r.json()


def test_generate_batch_of_three(stub, server):
    req = pb2.BatchedGenerationRequest(
        model_id=MODEL, requests=[pb2.GenerationRequest(text=p) for p in PROMPTS],
        params=greedy(8, generated_tokens=True, token_logprobs=True, token_ranks=True,
                      top_n_tokens=2))
    resp = stub.Generate(req, metadata=AUTH, timeout=120)
    assert len(resp.responses) == 3
    batch = http_completion(server, PROMPTS, 8)  # the same engine over HTTP
    for r, choice in zip(resp.responses, batch["choices"]):
        assert r.text == choice["text"]
        assert r.generated_token_count == 8 and r.stop_reason == pb2.MAX_TOKENS
        assert len(r.tokens) == 8
        for t in r.tokens:
            assert t.rank == 1 and len(t.top_tokens) == 2  # greedy: the top candidate
            assert t.logprob == pytest.approx(t.top_tokens[0].logprob)
    counts = stub.Tokenize(pb2.BatchedTokenizeRequest(
        requests=[pb2.TokenizeRequest(text=p) for p in PROMPTS]), metadata=AUTH)
    assert [r.input_token_count for r in resp.responses] == [c.token_count for c in counts.responses]


def test_generate_stream(stub):
    req = pb2.SingleGenerationRequest(request=pb2.GenerationRequest(text=PROMPTS[0]),
                                      params=greedy(6, input_text=True))
    msgs = list(stub.GenerateStream(req, metadata=AUTH, timeout=120))
    assert msgs[0].input_token_count > 0 and msgs[0].text == PROMPTS[0]
    assert all(m.stop_reason == pb2.NOT_FINISHED for m in msgs[:-1])
    assert msgs[-1].stop_reason == pb2.MAX_TOKENS and msgs[-1].generated_token_count == 6
    full = stub.Generate(pb2.BatchedGenerationRequest(
        requests=[pb2.GenerationRequest(text=PROMPTS[0])], params=greedy(6)), metadata=AUTH)
    assert "".join(m.text for m in msgs[1:]) == full.responses[0].text


def test_sampling_stop_sequence_and_seed(stub):
    params = pb2.Parameters(
        method=pb2.SAMPLE, sampling=pb2.SamplingParameters(temperature=0.7, top_k=20, top_p=0.9,
                                                           seed=42),
        stopping=pb2.StoppingCriteria(max_new_tokens=8))
    req = pb2.BatchedGenerationRequest(requests=[pb2.GenerationRequest(text=PROMPTS[1])] * 2,
                                       params=params)
    a, b = stub.Generate(req, metadata=AUTH).responses
    assert a.text == b.text and a.seed == 42  # same seed, same text
    stop = pb2.Parameters(method=pb2.GREEDY, stopping=pb2.StoppingCriteria(
        max_new_tokens=30, stop_sequences=[","], include_stop_sequence=False))
    r = stub.Generate(pb2.BatchedGenerationRequest(requests=[pb2.GenerationRequest(
        text=PROMPTS[0])], params=stop), metadata=AUTH).responses[0]
    assert r.stop_reason == pb2.STOP_SEQUENCE and r.stop_sequence == "," and "," not in r.text


def test_tokenize_and_model_info(stub):
    r = stub.Tokenize(pb2.BatchedTokenizeRequest(
        requests=[pb2.TokenizeRequest(text="Hello world")], return_tokens=True,
        return_offsets=True), metadata=AUTH)
    t = r.responses[0]
    assert t.token_count == len(t.tokens) == len(t.offsets) == 2
    assert [(o.start, o.end) for o in t.offsets] == [(0, 5), (5, 11)]
    info = stub.ModelInfo(pb2.ModelInfoRequest(model_id=MODEL), metadata=AUTH)
    assert info.model_kind == pb2.ModelInfoResponse.DECODER_ONLY
    assert info.max_sequence_length == 2048 and info.max_new_tokens > 0


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "fmaas.GenerationService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), metadata=AUTH)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="fmaas.GenerationService")]
    listed, described = reflect.ServerReflectionInfo(iter(requests), metadata=AUTH)
    names = {s.name for s in listed.list_services_response.service}
    assert {"fmaas.GenerationService", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_api_key(stub, channel):
    req = pb2.ModelInfoRequest()
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", API_KEY),)):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfo(req, metadata=metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GenerateStream(pb2.SingleGenerationRequest(
            request=pb2.GenerationRequest(text="Hi")), metadata=()))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")])))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:  # every method, health included
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ModelInfo(req, metadata=AUTH).max_sequence_length == 2048


# ------------------------------------------------------------------ bad inputs

def _gen(text="Hello", **params):
    return pb2.BatchedGenerationRequest(requests=[pb2.GenerationRequest(text=text)],
                                        params=pb2.Parameters(**params))


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_INPUTS = [
    ("empty-text", _gen(""), INVALID),
    ("too-long-text", _gen("hello " * 3000), INVALID),
    ("huge-max-new-tokens", _gen(stopping=pb2.StoppingCriteria(max_new_tokens=10**6)), INVALID),
    ("min-over-max", _gen(stopping=pb2.StoppingCriteria(max_new_tokens=2, min_new_tokens=5)),
     INVALID),
    ("negative-temperature", _gen(method=pb2.SAMPLE,
                                  sampling=pb2.SamplingParameters(temperature=-1)), INVALID),
    ("top-p-over-one", _gen(method=pb2.SAMPLE, sampling=pb2.SamplingParameters(top_p=1.5)),
     INVALID),
    ("typical-p", _gen(method=pb2.SAMPLE, sampling=pb2.SamplingParameters(typical_p=0.5)), INVALID),
    ("top-n-tokens-50", _gen(response=pb2.ResponseOptions(generated_tokens=True, top_n_tokens=50)),
     INVALID),
    ("length-penalty", _gen(decoding=pb2.DecodingParameters(
        length_penalty=pb2.DecodingParameters.LengthPenalty(start_index=1, decay_factor=1.1))),
     INVALID),
    ("guided-regex", _gen(decoding=pb2.DecodingParameters(regex="a+")), INVALID),
    ("unknown-model", pb2.BatchedGenerationRequest(model_id="gpt-9", requests=[
        pb2.GenerationRequest(text="Hi")]), grpc.StatusCode.NOT_FOUND),
    ("one-bad-in-batch", pb2.BatchedGenerationRequest(requests=[
        pb2.GenerationRequest(text="Hi"), pb2.GenerationRequest(text="")]), INVALID),
    ("invalid-utf8", b"\x1a\x05\x12\x03\xff\xfe\xfd", INVALID),  # requests[0].text = bad UTF-8
    ("not-protobuf", b"\xff\xff\xff\xff", INVALID),
    ("oversized-message", _gen("a" * (6 * 2**20)), grpc.StatusCode.RESOURCE_EXHAUSTED),
]


@pytest.mark.parametrize("request_,code", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_status(channel, stub, request_, code):
    if isinstance(request_, bytes):
        call = channel.unary_unary("/fmaas.GenerationService/Generate",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            call(request_, metadata=AUTH, timeout=60)
    else:
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request_, metadata=AUTH, timeout=60)
    assert e.value.code() == code, e.value.details()
    assert e.value.details()


def test_bad_stream_and_tokenize_inputs(stub):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GenerateStream(pb2.SingleGenerationRequest(request=pb2.GenerationRequest(
            text="")), metadata=AUTH))
    assert e.value.code() == INVALID
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(pb2.BatchedTokenizeRequest(model_id="nope"), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancel_frees_kv_blocks(stub, server):
    call = stub.GenerateStream(pb2.SingleGenerationRequest(
        request=pb2.GenerationRequest(text=PROMPTS[2]),
        params=greedy(500)), metadata=AUTH)
    for i, _ in enumerate(call):
        if i == 3:
            break
    assert server.metrics()["vllm:num_requests_running"] == 1
    call.cancel()
    m = server.wait_idle()
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0

    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:  # a deadline cancels too
        stub.Generate(_gen(PROMPTS[2], method=pb2.GREEDY,
                           stopping=pb2.StoppingCriteria(max_new_tokens=500)),
                      metadata=AUTH, timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    m = server.wait_idle()
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    assert time.monotonic() - t0 < 15


def test_still_serving_after_bad_inputs(stub, server):
    r = stub.Generate(pb2.BatchedGenerationRequest(requests=[pb2.GenerationRequest(
        text=PROMPTS[1])], params=greedy(6)), metadata=AUTH).responses[0]
    assert r.text == http_completion(server, PROMPTS[1], 6)["choices"][0]["text"]
    assert r.stop_reason == pb2.MAX_TOKENS
