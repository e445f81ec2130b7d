"""Multi-step decode: small decode-only batches run several steps per launch, with the same
tokens, stops and KV accounting as one step per launch."""
import pytest

from atom_jax import LLM, SamplingParams
from atom_jax.block_manager import BlockManager
from atom_jax.scheduler import Scheduler
from atom_jax.sequence import PLACEHOLDER, Sequence
from tests.test_engine_smollm2 import assert_all_blocks_free

PROMPTS = ["Write a short story about a cat.", "Hello there", "List three colours."]
K = 4


@pytest.fixture(scope="module")
def stepped():
    """The default model with 4 decode steps per launch for batches of up to 4 sequences
    (one bucket: each program unrolls 4 model steps); every multi-step launch is counted."""
    llm = LLM(max_num_batched_tokens=16, max_num_seqs=8, max_model_len=256,
              num_scheduler_steps=K, multi_step_max_seqs=4)
    assert llm.engine.runner.multi_step_buckets == [4]
    llm.launches = count_multi_step_launches(llm.engine.runner)
    return llm


def count_multi_step_launches(runner) -> list[int]:
    """From now on, the steps of every multi-step launch of the runner, in order."""
    launches = []
    run_steps = runner.run_steps

    def counted(inputs, sp, num_steps, mode):
        launches.append(num_steps)
        return run_steps(inputs, sp, num_steps, mode)

    runner.run_steps = counted
    return launches


def one_step_at_a_time(llm, prompts, params):
    llm.engine.scheduler.num_scheduler_steps = 1
    try:
        return llm.generate(prompts, params)
    finally:
        llm.engine.scheduler.num_scheduler_steps = K


def ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_multi_step_gives_the_tokens_of_single_steps(stepped):
    # greedy, temperature-only and top-p rows (both sampler programs); 18 tokens is not a
    # multiple of 4, so the last ones come from single steps
    greedy = SamplingParams(temperature=0, max_tokens=18, ignore_eos=True)
    hot = SamplingParams(temperature=0.9, seed=7, max_tokens=18, ignore_eos=True)
    top_p = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=18, ignore_eos=True)
    params = [greedy, hot, top_p, greedy]
    prompts = PROMPTS + PROMPTS[:1]
    for subset in ([0, 1, 2, 3], [1]):  # a full bucket, then one sequence alone
        p, sp = [prompts[i] for i in subset], [params[i] for i in subset]
        stepped.launches.clear()
        multi = stepped.generate(p, sp)
        assert stepped.launches and set(stepped.launches) == {K}
        single = one_step_at_a_time(stepped, p, sp)
        assert ids(multi) == ids(single)
        assert [o.outputs[0].text for o in multi] == [o.outputs[0].text for o in single]
        assert all(len(t) == 18 for t in ids(multi))
    assert_all_blocks_free(stepped)


def test_a_stop_inside_a_launch_ends_the_output_there(stepped):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = one_step_at_a_time(stepped, PROMPTS[0], greedy)[0].outputs[0]
    # a token in the middle of a 4-step launch (the first token comes from the prefill)
    at = next(i for i in range(6, 20) if i % K != 0 and full.token_ids[i] not in full.token_ids[:i])
    tid = full.token_ids[at]
    stepped.launches.clear()
    by_id = stepped.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24,
                                                        ignore_eos=True, stop_token_ids=[tid]))
    out = by_id[0].outputs[0]
    assert stepped.launches
    assert out.finish_reason == "stop" and out.stop_reason == tid
    assert out.token_ids == full.token_ids[:at + 1]
    word = full.text.split()[4]
    cut = stepped.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop=[word],
                                                      ignore_eos=True))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(word)]
    assert_all_blocks_free(stepped)


def test_start_up_times_the_host_and_device_parts_of_a_step(stepped):
    host, device = stepped.engine.runner.time_smallest_step(repeats=3)
    assert 0 < host < 5 and 0 <= device < 5
    # steps that were asked for are kept without timing; on CPU the default is one step
    assert stepped.engine.runner.multi_step_timing is None
    assert stepped.engine.scheduler.multi_step_max_seqs == 4
    default = LLM(max_num_batched_tokens=16, max_model_len=256, compile_at_startup=False,
                  kv_cache_memory_gb=0.05)
    assert default.engine.runner.multi_step_buckets == []
    assert default.engine.scheduler.num_scheduler_steps == 1


def test_streamed_deltas_carry_every_token_of_a_launch(stepped):
    eng = stepped.engine
    stepped.launches.clear()
    eng.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=13, ignore_eos=True), "s")
    deltas = []
    while eng.has_unfinished():
        deltas += [d for d in eng.step() if d.request_id == "s"]
    final = eng.request_output("s").outputs[0]
    eng.release("s")
    assert stepped.launches
    assert any(len(d.new_token_ids) == K for d in deltas)
    assert [t for d in deltas for t in d.new_token_ids] == final.token_ids
    assert "".join(d.new_text for d in deltas) == final.text
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert_all_blocks_free(stepped)


# ---------------------------------------------------------------- scheduler rules

def seq(name, n_prompt=6, max_tokens=20, **params):
    return Sequence(name, list(range(1, n_prompt + 1)),
                    SamplingParams(max_tokens=max_tokens, **params), seed=0, max_tokens=max_tokens)


def decoding(sched, *seqs):
    """Admit the sequences and run their prefill, so the next schedule is a decode."""
    for s in seqs:
        sched.add(s)
    for row, s, index, _ in sched.advance(sched.schedule()):
        sched.resolve(s, index, 100 + row)


def scheduler(**kw):
    bm = BlockManager(num_blocks=32, block_size=4)
    return bm, Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32, num_scheduler_steps=K,
                         multi_step_max_seqs=kw.pop("max_seqs", 8))


def test_scheduler_runs_steps_for_a_decode_batch_and_reserves_their_blocks():
    bm, sched = scheduler()
    a = seq("a")
    decoding(sched, a)
    assert a.num_tokens == 7 and a.num_computed_tokens == 6
    batch = sched.schedule()
    assert batch.num_steps == K and batch.num_new_tokens == [1]
    assert len(a.block_table) * bm.block_size >= a.num_computed_tokens + K
    produced = sched.advance(batch)
    assert produced == [(0, a, 7 + j, j) for j in range(K)]
    assert a.token_ids[7:] == [PLACEHOLDER] * K and a.num_pending == K
    assert a.num_computed_tokens == a.num_tokens - 1  # the last sampled token comes next


@pytest.mark.parametrize("case", ["waiting", "logprobs", "penalties", "min_tokens",
                                  "near_max_tokens", "too_many_seqs", "prefill"])
def test_scheduler_runs_one_step_when_steps_are_not_safe(case):
    bm, sched = scheduler(max_seqs=1 if case == "too_many_seqs" else 8)
    params = {"logprobs": dict(logprobs=2), "penalties": dict(repetition_penalty=1.2),
              "min_tokens": dict(min_tokens=5)}.get(case, {})
    a = seq("a", max_tokens=K if case == "near_max_tokens" else 20, **params)
    decoding(sched, a, *([seq("b")] if case == "too_many_seqs" else []))
    if case == "waiting":
        sched.add(seq("w", n_prompt=100))  # cannot be admitted: the token budget is spent
        sched.max_num_batched_tokens = 1
    if case == "prefill":
        sched.add(seq("p"))
    batch = sched.schedule()
    assert a in batch.seqs and batch.num_steps == 1


@pytest.mark.parametrize("host_ms, device_ms, kept", [(1.25, 0.77, True), (1.62, 3.61, False)])
def test_start_up_keeps_multi_step_only_where_the_host_is_the_bottleneck(
        tmp_path, monkeypatch, host_ms, device_ms, kept):
    import json

    import jax.numpy as jnp

    from atom_jax.loader import load_model
    from atom_jax.model_runner import ModelRunner
    from models import get_model_module
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 128}))
    cfg, params, _, _, _ = load_model(str(tmp_path), jnp.float32, "dummy")
    runner = ModelRunner(get_model_module(cfg), cfg, params, dtype=jnp.float32, num_blocks=16,
                         block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=8,
                         num_scheduler_steps=K, multi_step_max_seqs=8, multi_step_auto=True)
    assert runner.multi_step_buckets == [4]
    # the two timings measured on the H200 (Qwen3-0.6B and Llama-3.1-8B shapes)
    monkeypatch.setattr(runner, "time_smallest_step", lambda: (host_ms / 1e3, device_ms / 1e3))
    ran = []
    monkeypatch.setattr(runner, "run_steps", lambda *a: ran.append(a[2]) or
                        ModelRunner.run_steps(runner, *a))
    runner.warmup()
    assert runner.multi_step_timing == pytest.approx({"host_ms": host_ms, "device_ms": device_ms})
    assert runner.multi_step_buckets == ([4] if kept else [])
    assert ran == ([K, K] if kept else [])  # both sampler variants ran under the guard
