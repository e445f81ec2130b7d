"""Acceptance 2-5 on the real SmolLM2-135M-Instruct GGUF: parity with transformers, batching
invariance, prefix caching, preemption."""
import math
from pathlib import Path

import jax.numpy as jnp
import pytest
import torch
import transformers

from atom_jax import LLM, SamplingParams
from atom_jax.loader import default_model_path
from kernels_pallas import ScaledCache

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "Explain gravity in one sentence.", "List three fruits and their colors."]
GREEDY = SamplingParams(temperature=0, max_tokens=64)

# Prompts of very different lengths: the long ones exceed the 64-token step budget below.
TOPICS = ["the moon", "bread", "rivers", "a small robot", "winter", "chess", "the ocean",
          "coffee", "trains", "music", "volcanoes", "bees", "libraries", "rain", "maps", "tea"]


def varied_prompts():
    out = []
    for i, topic in enumerate(TOPICS):
        filler = " ".join(f"Point {j}: {topic} matters for reason {j}." for j in range(i % 4 * 6))
        out.append(f"{filler} Tell me one short fact about {topic}.".strip())
    return out


@pytest.fixture(scope="module")
def hf_model():
    path = Path(default_model_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model


def assert_all_blocks_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def test_greedy_matches_transformers_on_gguf(llm, hf_model):
    tok = llm.tokenizer
    ours = llm.chat([[{"role": "user", "content": p}] for p in CHAT_PROMPTS], GREEDY)
    for prompt, out in zip(CHAT_PROMPTS, ours):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            ref = hf_model.generate(ids, max_new_tokens=64, do_sample=False,
                                    eos_token_id=llm.engine.eos_token_ids)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref, prompt
        assert len(ref) > 5
    assert_all_blocks_free(llm)


def test_greedy_is_batch_invariant(llm):
    prompts = varied_prompts()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    lengths = [len(llm.tokenizer.encode(p)) for p in prompts]
    assert max(lengths) > 2 * 64  # some prompts need several prefill chunks
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        alone = llm.generate(prompt, params)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids, prompt
    assert_all_blocks_free(llm)


def test_prefix_caching_reports_hits_and_frees_everything(llm):
    shared = " ".join(f"Fact {i}: the number {i} comes after {i - 1}." for i in range(1, 30))
    params = SamplingParams(temperature=0, max_tokens=16)
    first = llm.generate(shared + " Which number comes after 7?", params)[0]
    second = llm.generate(shared + " Which number comes after 7?", params)[0]
    third = llm.generate(shared + " Which number comes after 12?", params)[0]
    assert second.num_cached_tokens > 0 and third.num_cached_tokens > 0
    assert first.num_cached_tokens == 0 or first.num_cached_tokens < second.num_cached_tokens
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    fresh = llm.generate(" ".join(["unrelated words"] * 5) + shared + " After 12?", params)[0]
    assert fresh.num_cached_tokens == 0  # a different first block shares nothing
    assert_all_blocks_free(llm)


def test_preemption_completes_everything_identically(llm):
    prompts = varied_prompts()[:8]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    # 24 blocks of 16 tokens: far less than 8 sequences of up to ~330 tokens need at once.
    small = LLM(num_kv_blocks=24, max_model_len=384, max_num_batched_tokens=64, max_num_seqs=16)
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_all_blocks_free(small)


def assert_greedy_chats_alike(want_llm, got_llm, *, max_first_token_shift: float):
    """The chat prompts' 16 greedy tokens: the first 8 the same, and the first token's
    probability within max_first_token_shift."""
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=0)
    messages = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    for want, got in zip(want_llm.chat(messages, params), got_llm.chat(messages, params)):
        want, got = want.outputs[0], got.outputs[0]
        assert got.token_ids[:8] == want.token_ids[:8], (want.text, got.text)
        first_want, first_got = want.logprobs[0], got.logprobs[0]
        assert first_got.keys() == first_want.keys()
        for token, logprob in first_want.items():
            shift = abs(math.exp(first_got[token]) - math.exp(logprob))
            assert shift < max_first_token_shift, (token, logprob, first_got[token])


def test_a_float8_kv_cache_holds_four_times_the_tokens_and_generates_alike(llm):
    """kv_cache_dtype fp8: every layer's cache is float8 (a quarter of the float32 CPU
    cache's bytes, so four times the blocks in the same 1 GiB), and greedy decoding
    follows the full-precision cache's: the same first 8 tokens, and first-token
    probabilities within 0.15 (measured: up to 0.11). The rounding is coarse where values
    are small: with a scale of 1, float8 keeps values under 2^-6 as subnormals, and 40% of
    this model's layer-0 V values are that small. Further on, it may flip a near-tie."""
    fp8 = LLM(kv_cache_dtype="fp8", max_num_batched_tokens=64, max_num_seqs=16,
              max_model_len=1024, compile_at_startup=False)
    assert {a.dtype for layer in fp8.engine.runner.kv_cache for a in layer} == {
        jnp.dtype(jnp.float8_e4m3fn)}
    assert fp8.engine.block_manager.num_blocks // 4 == llm.engine.block_manager.num_blocks
    assert_greedy_chats_alike(llm, fp8, max_first_token_shift=0.15)
    assert_all_blocks_free(fp8)


def test_a_float8_kv_cache_with_scales_per_token_follows_full_precision_closer(llm):
    """kv_cache_dtype fp8_per_token: every layer's cache is a ScaledCache of float8 rows
    with a float32 scale per token and KV head (68 bytes a row of this model's 64 dims,
    against 256 in the float32 CPU cache, so 3.76 times the blocks in the same memory).
    Small values keep their mantissa, so first-token probabilities stay within 0.08 of the
    full-precision cache's (measured: up to 0.061, where a scale of 1 moved them by up to
    0.11); 48 greedy tokens of these prompts kept 8, 17, 32 and 48 tokens alike (8, 12,
    12 and 37 with a scale of 1)."""
    fp8 = LLM(kv_cache_dtype="fp8_per_token", max_num_batched_tokens=64, max_num_seqs=16,
              max_model_len=1024, compile_at_startup=False)
    caches = [c for layer in fp8.engine.runner.kv_cache for c in layer]
    assert all(isinstance(c, ScaledCache) for c in caches)
    assert {c.data.dtype for c in caches} == {jnp.dtype(jnp.float8_e4m3fn)}
    head_dim = fp8.engine.model_config.head_dim
    ratio = head_dim * 4 / (head_dim + 4)
    assert abs(fp8.engine.block_manager.num_blocks
               - llm.engine.block_manager.num_blocks * ratio) < ratio
    assert_greedy_chats_alike(llm, fp8, max_first_token_shift=0.08)
    assert_all_blocks_free(fp8)
