"""The compile guard, shape buckets, and the generate CLI."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from atom_jax import SamplingParams
from atom_jax.model_runner import (CompileWhileServingError, pack_host_arrays, token_buckets,
                                   unpack_arrays)
from atom_jax.scheduler import ScheduledBatch


def test_token_buckets():
    assert token_buckets(256) == [4, 8, 16, 32, 64, 128, 256]
    assert token_buckets(100) == [4, 8, 16, 32, 64, 100]
    assert token_buckets(2) == [2]
    # a full decode batch of max_num_seqs sequences gets a bucket of its own
    assert token_buckets(8192, also=(384,))[:9] == [4, 8, 16, 32, 64, 128, 256, 384, 512]
    assert token_buckets(256, also=(256,)) == token_buckets(256, also=(512,)) == token_buckets(256)


def test_a_full_decode_batch_runs_in_a_bucket_of_max_num_seqs():
    from atom_jax import LLM, EngineConfig
    llm = LLM.from_config(EngineConfig(max_num_seqs=6, max_num_batched_tokens=64,
                                       max_model_len=256, compile_at_startup=False,
                                       kv_cache_memory_gb=0.05))
    assert llm.engine.runner._bucket(6) == 6 and llm.engine.runner._bucket(7) == 8


def test_packed_host_arrays_round_trip_inside_jit():
    arrays = dict(ids=np.arange(6, dtype=np.int32).reshape(2, 3),
                  temperature=np.array([0.0, 0.7, -1.5], np.float32),
                  seed=np.array([0, 2**31 + 5], np.uint32))
    flat, layout = pack_host_arrays(arrays)
    assert flat.dtype == np.int32 and flat.size == 11
    out = jax.jit(unpack_arrays, static_argnums=1)(flat, layout)
    assert sorted(out) == sorted(arrays)
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
        np.testing.assert_array_equal(np.asarray(out[name]), a)
    with pytest.raises(TypeError, match="4-byte"):
        pack_host_arrays(dict(x=np.zeros(2, np.int64)))


def test_no_compilation_while_serving_and_the_guard_catches_one(llm):
    runner = llm.engine.runner
    assert runner.guard is not None  # armed by start-up compilation
    llm.generate(["One", "Two words", "A somewhat longer prompt " * 8],
                 SamplingParams(temperature=0.7, top_k=20, max_tokens=6, repetition_penalty=1.2))
    # A shape outside every bucket must fail loudly, naming what compiled, instead of
    # compiling silently.
    inputs = runner._padded_inputs(runner.buckets[0] + 1)
    sp, _ = runner.prepare_sampling(ScheduledBatch([], []), len(inputs["seq_lens"]))
    with pytest.raises(CompileWhileServingError,
                       match=r"XLA compilation\(s\) .*\(jit\(_forward_step\)"):
        with runner.guard:
            runner.run(inputs, sp, None)


def test_generate_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "atom_jax.generate", "--prompt", "What is the capital of France?",
         "--chat", "--json", "--max-tokens", "12", "--max-num-batched-tokens", "64",
         "--max-num-seqs", "16", "--max-model-len", "1024"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "Paris" in result["text"]
    assert result["finish_reason"] in ("stop", "length") and result["token_ids"]


def test_generate_cli_reports_bad_input():
    out = subprocess.run([sys.executable, "-m", "atom_jax.generate", "--prompt", "hi",
                          "--temperature", "-1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "temperature" in out.stderr


def test_the_kv_cache_dtype_flag_reaches_the_engine_config():
    import argparse

    from atom_jax.cli_args import add_engine_args, engine_config_from_args
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).kv_cache_dtype == "auto"
    for fp8 in ("fp8", "fp8_per_token"):
        config = engine_config_from_args(parser.parse_args(["--kv-cache-dtype", fp8]))
        assert config.kv_cache_dtype == fp8
    with pytest.raises(SystemExit):  # argparse names the choices on stderr
        parser.parse_args(["--kv-cache-dtype", "int4"])
