"""Acceptance 6 (through the engine) and 7: seeded sampling, stop conditions, bad input."""
import json

import pytest

from atom_jax import LLM, SamplingParams
from atom_jax.loader import load_gguf, load_hf, resolve_model
from tests.test_engine_smollm2 import assert_all_blocks_free

PROMPT = "Write a short story about a cat."


def texts(outs):
    return [o.outputs[0].text for o in outs]


def test_seeded_sampling_reproduces_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPT, p)[0].outputs[0].token_ids
    crowd = llm.generate([PROMPT, "Hello there", PROMPT],
                         [p, SamplingParams(temperature=1.0, max_tokens=16), p])
    assert crowd[0].outputs[0].token_ids == alone == crowd[2].outputs[0].token_ids
    other = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=0.9, seed=99,
                                                max_tokens=16, ignore_eos=True))[0]
    assert other.outputs[0].token_ids != alone


def test_n_completions_differ_and_unseeded_requests_vary(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=12, ignore_eos=True))[0]
    assert len(out.outputs) == 3
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_conditions(llm):
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate(PROMPT, greedy)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    # a stop string taken from the greedy text cuts the output right before it
    word = full.text.split()[3]
    cut = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, stop=[word], ignore_eos=True))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == word
    assert cut.text == full.text[:full.text.index(word)]
    kept = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, stop=word, ignore_eos=True,
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full.text[:full.text.index(word) + len(word)]
    # a stop token id ends it at that token
    tid = full.token_ids[5]
    by_id = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                stop_token_ids=[tid]))[0].outputs[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == tid
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(tid) + 1]


def test_eos_min_tokens_and_ignore_eos(llm):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    short = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert short.finish_reason == "stop" and short.token_ids[-1] in llm.engine.eos_token_ids
    n = len(short.token_ids)
    longer = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64, min_tokens=n + 5))[0].outputs[0]
    assert len(longer.token_ids) >= n + 5
    assert not set(longer.token_ids[:n + 4]) & set(llm.engine.eos_token_ids)
    ignored = llm.chat(chat, SamplingParams(temperature=0, max_tokens=n + 8, ignore_eos=True))[0].outputs[0]
    assert len(ignored.token_ids) == n + 8 and ignored.finish_reason == "length"


def test_logprobs(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, lp in zip(out.token_ids, out.logprobs):
        assert token in lp and len(lp) == 3  # greedy token is also the top-1
        assert max(lp.values()) == lp[token] <= 0.0
    assert out.cumulative_logprob == pytest.approx(sum(d[t] for d, t in zip(out.logprobs, out.token_ids)))


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(n=0), "n"),
    (dict(logprobs=50), "logprobs"),
])
def test_bad_sampling_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_bad_prompts_are_refused_and_the_engine_keeps_working(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate("word " * 1100, SamplingParams(max_tokens=4))  # over max_model_len=1024
    with pytest.raises(ValueError, match="prompt"):
        llm.generate("", SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([[1, 2, 10**9]], SamplingParams(max_tokens=4))
    assert_all_blocks_free(llm)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.outputs[0].token_ids) == 4


def test_unknown_model_path():
    with pytest.raises(ValueError, match="model"):
        LLM("/nonexistent/model/dir")


def test_corrupt_checkpoints(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}))
    (hf / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    kind, path = resolve_model(str(hf))
    with pytest.raises(ValueError, match="checkpoint"):
        load_hf(path, "float32")
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\xff" * 200)
    kind, path = resolve_model(str(gguf))
    with pytest.raises(ValueError, match="checkpoint"):
        load_gguf(path, "float32")
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_hf(bad_json, "float32")


def test_out_of_range_values_are_refused_or_folded(llm):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate("Hi", SamplingParams(max_tokens=2, stop_token_ids=[2**40]))
    # seeds of any size and top_k past the vocabulary are valid and sample normally
    big = SamplingParams(temperature=1.0, seed=-(2**40), top_k=2**40, max_tokens=3, ignore_eos=True)
    assert len(llm.generate("Hi", big)[0].outputs[0].token_ids) == 3
    assert_all_blocks_free(llm)


def test_max_model_len_past_the_model_is_refused():
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(max_model_len=10**6)  # SmolLM2 has 8192 positions


def test_abort_while_a_step_is_in_flight_frees_everything(llm):
    """step() returns the previous step's tokens while the next is queued on the device: an
    abort in between must drop the in-flight token and free the blocks, and a request that
    stops on eos must not emit the token computed after it."""
    eng = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    rid = eng.add_request(PROMPT, greedy)
    got = []
    while len(got) < 5:
        got += [t for d in eng.step() for t in d.new_token_ids]
    assert eng._in_flight is not None  # a step is queued behind the tokens just returned
    eng.abort(rid)
    while eng.has_unfinished():
        assert not eng.step()  # nothing of the aborted request comes back
    assert_all_blocks_free(llm)
    alone = llm.generate(PROMPT, greedy)[0].outputs[0].token_ids
    assert alone[:len(got)] == got and len(alone) == 30
