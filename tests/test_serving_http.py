"""The OpenAI-compatible HTTP server, through the official `openai` client and raw HTTP:
greedy results equal the offline engine's, streaming, n > 1, logprobs, echo, stop, the
utility routes, the API key, and a table of bad inputs."""
from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
from serving_harness import API_KEY as KEY
from serving_harness import MODEL, shared_server

from atom_jax import LLM, EngineConfig, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def env():
    server = shared_server()  # (loads while the offline engine below loads)
    llm = LLM.from_config(EngineConfig())
    return server.wait_ready(), llm


@pytest.fixture(scope="module")
def server(env):
    return env[0]


@pytest.fixture(scope="module")
def offline(env):
    return env[1]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body=None, *, content=None, key=KEY, headers=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if content is not None:
        h.setdefault("Content-Type", "application/json")
        return httpx.post(server.url + path, content=content, headers=h, timeout=60)
    return httpx.post(server.url + path, json=body, headers=h, timeout=60)


# ------------------------------------------------------------------ openai client


def test_completions_greedy_equal_offline(client, offline):
    params = SamplingParams(max_tokens=12, temperature=0)
    expected = offline.generate(PROMPTS, params)
    for prompt, exp in zip(PROMPTS, expected):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == exp.outputs[0].text
        assert r.choices[0].finish_reason == exp.outputs[0].finish_reason
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert r.usage.completion_tokens == len(exp.outputs[0].token_ids)
    batch = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [e.outputs[0].text for e in expected]


def test_chat_greedy_equal_offline(client, offline):
    exp = offline.chat(CHAT, SamplingParams(max_tokens=16, temperature=0))[0]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == exp.outputs[0].text
    assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
    assert r.usage.completion_tokens == len(exp.outputs[0].token_ids)


def test_streaming_with_and_without_usage(client, offline):
    exp = offline.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(exp.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == exp.text
    assert chunks[-2].choices[0].finish_reason == exp.finish_reason

    plain = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                           temperature=0, stream=True))
    assert all(c.usage is None and c.choices for c in plain)
    assert "".join(c.choices[0].text for c in plain) == exp.text

    chat_exp = offline.chat(CHAT, SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    chat = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10,
                                               temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == chat_exp.text
    assert chat[-1].usage.completion_tokens == len(chat_exp.token_ids)


def test_continuous_usage_counts_every_chunk_and_launches_carry_several_tokens(client, offline):
    # The shared server runs 4 decode steps per launch (--num-scheduler-steps 4), so a
    # lone greedy request streams chunks of up to 4 tokens; the text is the same.
    exp = offline.generate(PROMPTS[1], SamplingParams(max_tokens=14, temperature=0))[0].outputs[0]
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=14, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == len(exp.token_ids)
    assert max(b - a for a, b in zip([0] + counts, counts)) > 1
    assert len([c for c in chunks if c.choices]) <= 7  # one step per chunk would give 14
    assert "".join(c.choices[0].text for c in chunks if c.choices) == exp.text
    chat = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True}))
    assert chat[0].usage.completion_tokens == 0 and chat[-1].usage.completion_tokens == 5
    assert all(c.usage.prompt_tokens == chat[0].usage.prompt_tokens for c in chat)


def test_sse_wire_format_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_n2_seeded_sampling_equals_offline(client, offline):
    params = SamplingParams(n=2, temperature=1.0, seed=1234, max_tokens=10)
    exp = offline.generate(PROMPTS[1], params)[0]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], n=2, temperature=1.0,
                                  seed=1234, max_tokens=10)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [o.text for o in exp.outputs]
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in exp.outputs)

    stream = list(client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=6,
                                                 temperature=1.0, seed=7, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    chat_exp = offline.chat(CHAT, SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=6))[0]
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == [o.text for o in chat_exp.outputs]


def test_logprobs_equal_offline(client, offline):
    exp = offline.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0]
    out = exp.outputs[0]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(out.token_ids) == len(lp.token_logprobs) == len(lp.top_logprobs)
    for tid, got, want, top in zip(out.token_ids, lp.token_logprobs, out.logprobs, lp.top_logprobs):
        assert math.isclose(got, want[tid], abs_tol=1e-4)
        assert 3 <= len(top) <= 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0

    c = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-6)  # greedy
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo_stop_and_max_tokens(client, offline):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                  echo=True)
    exp = offline.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0))[0].outputs[0]
    assert r.choices[0].text == PROMPTS[0] + exp.text

    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                  stop=[","])
    exp = offline.generate(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0,
                                                      stop=[","]))[0].outputs[0]
    assert r.choices[0].text == exp.text and "," not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"

    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_every_engine_sampling_parameter_and_unknown_fields(client, offline):
    extra = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
             "stop_token_ids": [2], "ignore_eos": False, "include_stop_str_in_output": True,
             "skip_special_tokens": True, "some_future_field": {"x": 1}, "another": [1, 2]}
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0.8,
                                  top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3, seed=5,
                                  stop=["\n\n"], user="someone", extra_body=extra)
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, presence_penalty=0.5,
                            frequency_penalty=0.3, seed=5, stop=["\n\n"], top_k=20, min_p=0.05,
                            repetition_penalty=1.1, min_tokens=2, stop_token_ids=[2],
                            include_stop_str_in_output=True)
    exp = offline.generate(PROMPTS[2], params)[0].outputs[0]
    assert r.choices[0].text == exp.text
    c = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=4,
                                       temperature=0, extra_body=extra)
    assert c.usage.completion_tokens >= 2


# ------------------------------------------------------------------ utility routes


def test_models_health_version_tokenize_detokenize(client, server, offline):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    raw = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    entry = raw["data"][0]
    assert entry["max_model_len"] == offline.engine.max_model_len and entry["root"].endswith(".gguf")

    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    assert httpx.get(server.url + "/version").json()["version"]

    tok = post(server, "/tokenize", {"prompt": PROMPTS[0]}).json()
    ids = offline.tokenizer.encode(PROMPTS[0], add_special_tokens=True)
    assert tok["tokens"] == ids and tok["count"] == len(ids)
    assert tok["max_model_len"] == offline.engine.max_model_len
    chat_tok = post(server, "/tokenize", {"messages": CHAT}).json()
    assert chat_tok["tokens"] == offline.apply_chat_template(CHAT)
    assert post(server, "/detokenize", {"tokens": ids}).json()["prompt"] == PROMPTS[0]


def test_metrics_have_vllm_names(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:num_preemptions_total", "vllm:request_success_total"):
        assert name in text, name
    assert f'model_name="{MODEL}"' in text


# ------------------------------------------------------------------ API key


def test_api_key_required_on_v1(server):
    body = {"prompt": "Hi", "max_tokens": 2}
    for key in (None, "wrong-key", KEY + "x", ""):
        r = post(server, "/v1/completions", body, key=key)
        assert r.status_code == 401, key
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = post(server, "/v1/completions", body, headers={"Authorization": f"Basic {KEY}"}, key=None)
    assert r.status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert post(server, "/v1/completions", body).status_code == 200
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="Hi", max_tokens=2)


# ------------------------------------------------------------------ bad inputs

LONG = "hello " * 3000
BAD_INPUTS = [
    # (id, path, json body or raw bytes, status, param)
    ("malformed-json", "/v1/completions", b'{"prompt": "x", ', 400, None),
    ("invalid-utf8", "/v1/completions", b'{"prompt": "\xff\xfe abc"}', 400, None),
    ("not-an-object", "/v1/completions", [1, 2, 3], 400, None),
    ("missing-prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("prompt-wrong-type", "/v1/completions", {"prompt": 123}, 400, "prompt"),
    ("max-tokens-wrong-type", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400,
     "max_tokens"),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty-token-prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("token-out-of-vocab", "/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("too-long-prompt", "/v1/completions", {"prompt": LONG, "max_tokens": 4}, 400, None),
    ("too-long-chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]},
     400, None),
    ("huge-max-tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**7}, 400, "max_tokens"),
    ("negative-max-tokens", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("negative-temperature", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400,
     "temperature"),
    ("nan-temperature", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400,
     "temperature"),
    ("top-p-zero", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("n-zero", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("n-huge", "/v1/completions", {"prompt": "x", "n": 100000}, 400, "n"),
    ("logprobs-21", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("presence-penalty-5", "/v1/completions", {"prompt": "x", "presence_penalty": 5}, 400,
     "presence_penalty"),
    ("min-over-max-tokens", "/v1/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 5},
     400, "min_tokens"),
    ("stop-token-out-of-vocab", "/v1/completions", {"prompt": "x", "stop_token_ids": [10**10]},
     400, "stop_token_ids"),
    ("seed-wrong-type", "/v1/completions", {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("unknown-model", "/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ("unknown-model-chat", "/v1/chat/completions",
     {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("image-part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("oversized-body", "/v1/completions", b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}', 413, None),
    ("unknown-route", "/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_answered_in_openai_shape(server, path, body, status, param):
    if isinstance(body, bytes):
        r = post(server, path, content=body)
    else:
        r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_context_length_message(server):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 10**7})
    msg = r.json()["error"]["message"]
    assert msg.startswith("This model's maximum context length is 2048 tokens. However, you "
                          "requested ")
    r = post(server, "/v1/completions", {"prompt": LONG})
    assert "maximum context length is 2048 tokens" in r.json()["error"]["message"]


def test_still_serving_after_bad_inputs(client, server, offline):
    exp = offline.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert r.choices[0].text == exp.text
    m = server.wait_idle()
    assert m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0
