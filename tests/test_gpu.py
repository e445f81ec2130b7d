"""GPU runs of the engine-core acceptance points (marked `gpu`; CI has no GPU and skips them).

The CPU suite already runs the same tests; here they run on the GPU through the same code,
with the Pallas attention kernel that the dispatcher picks there.
"""
import os
import subprocess
import sys

import jax
import pytest

from atom_jax import LLM, SamplingParams
from tests.test_engine_smollm2 import varied_prompts
from tests.test_multi_step import count_multi_step_launches
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu


def test_backend_is_gpu_and_attention_uses_the_kernel():
    from kernels_pallas.ragged_paged_attention import _pallas_available
    assert jax.default_backend() == "gpu" and _pallas_available()


def test_greedy_is_batch_invariant_on_gpu(tmp_path):
    # float32, as on the CPU. In bfloat16 the GEMMs XLA picks per token bucket round
    # differently, so greedy tokens can differ between batch compositions (seen on the H200).
    dtype = "float32"
    # head_dim 64, as real models have; 4 layers
    make_tiny_model("LlamaForCausalLM", tmp_path, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    llm = LLM(str(tmp_path), dtype=dtype, max_num_batched_tokens=64, max_num_seqs=16,
              max_model_len=512, attn_impl="pallas", kv_cache_memory_gb=1.0)
    prompts = varied_prompts()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = llm.generate(prompts, params)
    # alone, a sequence runs several decode steps per launch: start-up picks that on GPU
    # for a model this small (queueing a step takes the host longer than running it)
    launches = count_multi_step_launches(llm.engine.runner)
    for prompt, out in zip(prompts, together):
        assert llm.generate(prompt, params)[0].outputs[0].token_ids == out.outputs[0].token_ids
    assert launches and set(launches) == {4}
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_multi_step_programs_are_compiled_without_rematerialization(tmp_path):
    # With the K/V cache taking most of the GPU, XLA's rematerialization pass counts the
    # cache of every unrolled step as a buffer of its own and recomputes kernels to save
    # memory the program does not need; the engine's multi-step program turns the pass off.
    from atom_jax import model_runner as mr
    make_tiny_model("LlamaForCausalLM", tmp_path, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    llm = LLM(str(tmp_path), dtype="bfloat16", max_num_batched_tokens=64, max_num_seqs=16,
              max_model_len=512, num_scheduler_steps=4)  # K/V cache: 90% of free memory
    runner = llm.engine.runner
    args = runner.multi_step_args(runner.multi_step_buckets[0], "sample")
    stats = jax.devices()[0].memory_stats() or {}
    memory = (f"K/V cache {runner.num_blocks} blocks; allocator limit "
              f"{stats.get('bytes_limit', 0) / 2**30:.1f} GiB, in use "
              f"{stats.get('bytes_in_use', 0) / 2**30:.1f} GiB")
    default = jax.jit(mr._decode_steps, **mr.DECODE_STEPS_JIT_ARGS)  # the same jit, pass on
    assert ".remat" in default.lower(*args).compile().as_text(), (
        f"the premise does not hold: XLA's pass recomputed nothing ({memory})")
    assert ".remat" not in mr._decode_steps_jit.lower(*args).compile().as_text(), (
        f"the engine's multi-step program was rematerialized ({memory})")


def run_engine_with_on_demand_allocator(model_dir, reserve: bool):
    """Start an engine and generate in a process of its own: XLA_PYTHON_CLIENT_PREALLOCATE
    must be set before JAX starts. Its allocator may take 5% of the GPU (this process holds
    most of the rest), which still splits the K/V cache into 8 arrays of 0.8 GB."""
    code = f"""
import jax, jax.numpy as jnp
from atom_jax import LLM, SamplingParams
from atom_jax import model_runner
if not {reserve}:  # each layer's arrays allocated as they come, as before the reservation
    model_runner.allocate_kv_cache = lambda n, shape, dtype, **_: [
        (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(n)]
llm = LLM({str(model_dir)!r}, dtype="bfloat16", max_num_batched_tokens=64, max_num_seqs=4,
          max_model_len=512)
out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
stats = jax.devices()[0].memory_stats()
print(len(out[0].outputs[0].token_ids), stats["bytes_in_use"] / stats["bytes_limit"])
"""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_PYTHON_CLIENT_MEM_FRACTION="0.05")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)


def test_kv_cache_takes_its_share_when_the_allocator_grows_on_demand(tmp_path):
    # Growing on demand, JAX's allocator takes a region per allocation, each a power of two;
    # the cache's per-layer arrays ran it out of memory with most of it free between them.
    make_tiny_model("LlamaForCausalLM", tmp_path, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    run = run_engine_with_on_demand_allocator(tmp_path, reserve=True)
    assert run.returncode == 0, run.stderr[-4000:]
    generated, share_in_use = run.stdout.split()[-2:]
    assert int(generated) == 4
    assert float(share_in_use) > 0.8  # the cache sized at 90% of what was free
    # the premise: without the reservation the same start-up runs out of memory
    run = run_engine_with_on_demand_allocator(tmp_path, reserve=False)
    assert run.returncode != 0 and "RESOURCE_EXHAUSTED" in run.stderr, (
        f"the premise does not hold: {run.stdout[-500:]} {run.stderr[-2000:]}")
