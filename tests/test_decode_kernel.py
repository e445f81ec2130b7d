"""The persistent decode kernel (kernels_pallas/decode_layers_mgpu.py): its layout and weight
preparation on CPU, its results against the usual step on the GPU (marked `gpu`)."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atom_jax.model_runner import DecodeKernel, allocate_kv_cache
from kernels_pallas import decode_layers_mgpu
from models import llama
from models.config import ModelConfig

# Llama-shaped and small, within the kernel's limits (head_dim 128, 4 query heads per KV head)
KERNEL_SHAPE = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=1024,
                    intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    rope_theta=500000.0, tie_word_embeddings=False)


def random_params(cfg: ModelConfig, dtype, seed=0):
    shapes = llama.param_shapes(cfg)
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    # fan-in scaled, norms around 1, so that logits are far from uniform
    out = [(1 + 0.1 * jax.random.normal(k, s)) if len(s) == 1 else
           jax.random.normal(k, s) * s[0] ** -0.5 for k, s in zip(keys, leaves)]
    params = jax.tree.unflatten(tree, [a.astype(dtype) for a in out])
    return llama.fuse_projections(params, cfg)


def step_batch(tokens, start, block_size, table):
    """One sequence's step over tokens at positions start.., its pages in `table`."""
    n = len(tokens)
    pos = np.arange(start, start + n, dtype=np.int32)
    table = np.asarray(table, np.int32)
    return dict(input_ids=jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(pos),
                slot_mapping=jnp.asarray(table[pos // block_size] * block_size + pos % block_size),
                query_start_loc=jnp.asarray([0, n], jnp.int32),
                seq_lens=jnp.asarray([start + n], jnp.int32),
                block_tables=jnp.asarray(table)[None],
                logits_indices=jnp.asarray([n - 1], jnp.int32))


def test_halves_order_leaves_the_logits_unchanged():
    cfg = ModelConfig.from_hf(dict(KERNEL_SHAPE, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1))
    params = random_params(cfg, jnp.float32)
    halves, hcfg = llama.to_qk_halves(params, cfg)
    assert hcfg.qk_halves and not cfg.qk_halves
    order = llama.halves_order(cfg.head_dim)
    assert sorted(order) == list(range(cfg.head_dim))
    assert (order[order] == np.arange(cfg.head_dim)).all()
    outs = []
    for p, c in ((params, cfg), (halves, hcfg)):
        cache = allocate_kv_cache(c.num_layers, (4, 16, c.num_kv_heads, c.head_dim), jnp.float32)
        cache, _ = llama.forward(p, cache, step_batch(list(range(1, 21)), 0, 16, range(4)), c, "xla")
        cache, logits = llama.forward(p, cache, step_batch([7], 20, 16, range(4)), c, "xla")
        outs.append((cache, logits))
    np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-4)
    # the cache holds k in the halves order, v as it was
    k0, v0 = outs[0][0][0]
    k1, v1 = outs[1][0][0]
    np.testing.assert_allclose(k1[..., order], k0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v1, v0, rtol=1e-4, atol=1e-5)


def test_a_cache_stacked_over_layers_gives_the_same_steps():
    """The decode kernel's cache layout (one (k, v) pair over all layers) through the usual
    step: the same logits and the same cache contents as a pair per layer."""
    cfg = ModelConfig.from_hf(dict(KERNEL_SHAPE, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=1))
    params = random_params(cfg, jnp.float32)
    shape = (6, 16, cfg.num_kv_heads, cfg.head_dim)
    table = [4, 1, 3, 0]   # the sequence's pages; pages 2 and 5 stay free
    runs = []
    for stacked in (False, True):
        cache = allocate_kv_cache(cfg.num_layers, shape, jnp.float32, stacked=stacked)
        out = []
        for tokens, start in ((list(range(1, 41)), 0), ([7], 40), ([9], 41)):
            b = step_batch(tokens, start, 16, table)
            if len(tokens) > 1:   # two padding tokens, whose slot is past the cache
                b = dict(b, input_ids=jnp.concatenate([b["input_ids"], jnp.zeros(2, jnp.int32)]),
                         positions=jnp.concatenate([b["positions"], jnp.zeros(2, jnp.int32)]),
                         slot_mapping=jnp.concatenate(
                             [b["slot_mapping"], jnp.full(2, 6 * 16, jnp.int32)]))
            cache, logits = llama.forward(params, cache, b, cfg, "xla")
            out.append(np.asarray(logits))
        if stacked:
            cache = [(cache[0][i], cache[1][i]) for i in range(cfg.num_layers)]
        runs.append((out, cache))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    for (k0, v0), (k1, v1) in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(k1, k0)
        np.testing.assert_array_equal(v1, v0)


def test_prepare_weights_folds_the_norms_and_tiles():
    cfg = ModelConfig.from_hf(dict(KERNEL_SHAPE, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=2))
    params = random_params(cfg, jnp.float32)
    w = decode_layers_mgpu.prepare_weights(params["layers"])
    untile = lambda t: np.moveaxis(np.asarray(t), 0, 1).reshape(t.shape[1], -1)
    for i, layer in enumerate(params["layers"]):
        np.testing.assert_allclose(untile(w["wqkv"][i]),
                                   layer["wqkv"] * layer["attn_norm"][:, None], rtol=1e-6)
        np.testing.assert_allclose(untile(w["wgu"][i]),
                                   layer["w_gate_up"] * layer["mlp_norm"][:, None], rtol=1e-6)
        np.testing.assert_array_equal(untile(w["wo"][i]), layer["wo"])
        np.testing.assert_array_equal(untile(w["wd"][i]), layer["w_down"])


def test_kernel_limits_are_named():
    big = ModelConfig.from_hf(dict(KERNEL_SHAPE, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8))
    assert decode_layers_mgpu.unsupported_reason(big, jnp.bfloat16, 16, 132) is None
    assert decode_layers_mgpu.max_context(big, 132) == 1024
    assert "bfloat16" in decode_layers_mgpu.unsupported_reason(big, jnp.float32, 16, 132)
    mha = ModelConfig.from_hf(dict(KERNEL_SHAPE, num_key_value_heads=8))
    assert "query heads per KV head" in decode_layers_mgpu.unsupported_reason(
        mha, jnp.bfloat16, 16, 132)


def test_kernel_takes_only_the_cache_stacked_over_layers():
    per_layer = allocate_kv_cache(2, (4, 16, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="stacked over layers"):
        decode_layers_mgpu.decode_layers(jnp.zeros(1024, jnp.bfloat16), {}, per_layer,
                                         jnp.zeros(4, jnp.int32), jnp.int32(0),
                                         np.ones(64, np.float32), eps=1e-5, num_sms=132)


def test_decode_kernel_on_needs_a_hopper_gpu(tmp_path):
    from atom_jax.engine import EngineCore
    if jax.default_backend() == "gpu":
        pytest.skip("this checks the refusal off Hopper GPUs")
    (tmp_path / "config.json").write_text(json.dumps(KERNEL_SHAPE))
    with pytest.raises(ValueError, match="decode_kernel: it needs an NVIDIA Hopper GPU"):
        EngineCore(model=str(tmp_path), load_format="dummy", decode_kernel="on",
                   compile_at_startup=False, num_kv_blocks=8, max_model_len=64)
    with pytest.raises(ValueError, match="decode_kernel must be auto, on or off"):
        EngineCore(model=str(tmp_path), load_format="dummy", decode_kernel="yes")


def test_the_kv_cache_dtype_is_checked_and_fp8_turns_the_kernel_away():
    """The kernel reads a cache in the model's dtype: asked for with an fp8 cache, the
    engine says so before loading anything; an unknown cache dtype is named."""
    from atom_jax.config import EngineConfig
    for fp8 in ("fp8", "fp8_per_token"):
        with pytest.raises(ValueError, match=f"in the model's dtype, not kv_cache_dtype {fp8}$"):
            EngineConfig(decode_kernel="on", kv_cache_dtype=fp8).validate()
        EngineConfig(decode_kernel="auto", kv_cache_dtype=fp8).validate()  # auto: kernel off
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, "
                                         "fp8_per_token, got 'int8'"):
        EngineConfig(kv_cache_dtype="int8").validate()


@pytest.mark.gpu
@pytest.mark.parametrize("block_size,context", [(16, 100), (16, 1023), (128, 300), (64, 300)])
def test_decode_kernel_matches_the_usual_step(block_size, context):
    cfg = ModelConfig.from_hf(KERNEL_SHAPE)
    params, cfg = llama.to_qk_halves(random_params(cfg, jnp.bfloat16), cfg)
    weights = decode_layers_mgpu.prepare_weights(params["layers"])
    num_sms = jax.devices()[0].core_count
    pages = -(-(context + 1) // block_size)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, cfg.vocab_size, context).tolist()
    cache = allocate_kv_cache(cfg.num_layers, (pages + 2, block_size, 2, 128), jnp.bfloat16)
    # the pages of the sequence, in a shuffled order, as the block manager hands them out
    table = rng.permutation(pages + 2)[:pages].astype(np.int32)

    cache, _ = jax.jit(llama.forward, static_argnums=(3,))(
        params, cache, step_batch(prompt, 0, block_size, table), cfg)
    step = step_batch([5], context, block_size, table)
    ref_cache, ref = jax.jit(llama.forward, static_argnums=(3,))(
        params, [(k.copy(), v.copy()) for k, v in cache], step, cfg)
    cache = tuple(jnp.stack([kv[i] for kv in cache]) for i in range(2))   # over layers
    got_cache, got = jax.jit(llama.forward_decode_kernel, static_argnums=(4, 5))(
        params, weights, cache, step, cfg, num_sms)
    got_cache = list(zip(*got_cache))
    ref, got = np.asarray(ref[0], np.float32), np.asarray(got[0], np.float32)
    scale = np.max(np.abs(ref))
    err = np.max(np.abs(got - ref))
    assert err < 0.05 * scale, (err, scale)
    # the reference's top token is the kernel's, or as good within rounding (the kernel's
    # bf16 partial sums are added in a different order from call to call)
    top = np.argmax(ref)
    assert got[top] >= got.max() - 0.02 * scale, (top, np.argmax(got), got[top], got.max())
    slot = table[context // block_size], context % block_size
    for (k, v), (rk, rv) in zip(got_cache, ref_cache):
        for a, r in ((k, rk), (v, rv)):
            a, r = np.asarray(a[slot], np.float32), np.asarray(r[slot], np.float32)
            assert np.max(np.abs(a - r)) < 0.03 * np.max(np.abs(r)), np.max(np.abs(a - r))
        # nothing else in the cache moved
        mask = np.ones(k.shape[:2], bool)
        mask[slot] = False
        np.testing.assert_array_equal(np.asarray(k)[mask], np.asarray(rk)[mask])


def usual_step_as_kernel(params, kernel_weights, kv_cache, batch, cfg, num_sms):
    """forward_decode_kernel's contract met by the usual step (the cache stacked over layers),
    so that the engine's handling of the kernel's step runs where the kernel cannot."""
    k, v = kv_cache
    cache, logits = llama.forward(params, [(k[i], v[i]) for i in range(cfg.num_layers)],
                                  batch, cfg, "xla")
    return (jnp.stack([a for a, _ in cache]), jnp.stack([b for _, b in cache])), logits


def test_the_kernel_step_from_disk_compiles_nothing_while_serving(tmp_path, monkeypatch):
    """The engine's decode-kernel path on the CPU, with the usual step standing in for the
    kernel: its step is exported to disk by the first engine and loaded by the second, and
    neither compiles anything once warm-up is over (the guard is armed for every step), though
    the exported step's outputs are committed to the device and feed the other programs."""
    from atom_jax import LLM, SamplingParams, engine
    if jax.default_backend() == "gpu":
        pytest.skip("the GPU runs the kernel itself (test_a_second_engine_takes_...)")
    cfg = dict(KERNEL_SHAPE, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    traced = []

    def setup(mode, module, cfg, params, dtype, block_size):   # as on a GPU that takes it
        return (*module.to_qk_halves(params, cfg), DecodeKernel({}, num_sms=132, max_context=1024))

    monkeypatch.setattr(engine, "setup_decode_kernel", setup)
    monkeypatch.setattr(llama, "forward_decode_kernel",
                        lambda *a: traced.append(1) or usual_step_as_kernel(*a))
    cache = tmp_path / "cache"
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(cache))
    try:
        tokens = []
        for _ in range(2):
            llm = LLM(model=str(tmp_path), load_format="dummy", decode_kernel="on",
                      block_size=64, max_model_len=256, max_num_seqs=4,
                      max_num_batched_tokens=64, num_scheduler_steps=1)
            assert llm.engine.runner.guard is not None
            # one sequence decoding alone takes the kernel's step; then prefills and two
            # sequences decoding together take the usual one, with the state it left
            out = llm.generate([list(range(3, 43))],
                               SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
            assert llm.engine.runner.decode_kernel_steps == 5
            both = llm.generate([list(range(5, 25)), list(range(7, 30))],
                                SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            assert [len(o.outputs[0].token_ids) for o in both] == [4, 4]
            tokens.append([out[0].outputs[0].token_ids] + [o.outputs[0].token_ids for o in both])
            del llm
        assert traced == [1]   # the second engine loaded the step from disk
        assert len(list((cache / "atom-jax-exports").glob("*.jaxexport"))) == 1
        assert tokens[0] == tokens[1]
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


@pytest.mark.gpu
def test_engine_runs_batch1_decode_in_the_kernel(tmp_path):
    from atom_jax import LLM, SamplingParams
    (tmp_path / "config.json").write_text(json.dumps(KERNEL_SHAPE))
    outs = {}
    for mode in ("on", "off"):
        llm = LLM(model=str(tmp_path), load_format="dummy", decode_kernel=mode, max_model_len=2048,
                  max_num_seqs=4, max_num_batched_tokens=256, num_scheduler_steps=1)
        prompt = list(range(3, 103))
        outs[mode] = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0,
                                                           ignore_eos=True))
        steps = llm.engine.runner.decode_kernel_steps
        assert steps == (11 if mode == "on" else 0)
    on, off = (outs[m][0].outputs[0] for m in ("on", "off"))
    assert len(on.token_ids) == 12
    # the first token comes from the prefill, the same program in both
    assert on.token_ids[0] == off.token_ids[0]


SECOND_ENGINE = """
import json, sys
import jax
from atom_jax import LLM, SamplingParams
from models import llama
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
traced = []
real = llama.forward_decode_kernel
llama.forward_decode_kernel = lambda *a, **k: traced.append(1) or real(*a, **k)
# a small share of the GPU: the test's own process holds most of it
llm = LLM(model=sys.argv[1], load_format="dummy", decode_kernel="on", max_model_len=2048,
          max_num_seqs=4, max_num_batched_tokens=256, num_scheduler_steps=1,
          gpu_memory_utilization=0.05)
out = llm.generate([list(range(3, 103))], SamplingParams(max_tokens=12, temperature=0,
                                                         ignore_eos=True, logprobs=2))
done = out[0].outputs[0]
print("RESULT " + json.dumps({"tokens": done.token_ids, "traced": len(traced),
                              "logprobs": [{str(t): lp for t, lp in d.items()}
                                           for d in done.logprobs],
                              "kernel_steps": llm.engine.runner.decode_kernel_steps}))
"""


def assert_alike_but_for_ties(first, second, tol=0.05):
    """Two greedy runs of the decode kernel agree token for token, except where the first
    run's two best tokens were within tol of each other: the kernel's bf16 partial sums are
    added in an order that varies from run to run, so a near tie may go either way, after
    which the runs continue from different tokens."""
    ta, tb = [str(t) for t in first["tokens"]], [str(t) for t in second["tokens"]]
    la, lb = first["logprobs"], second["logprobs"]
    n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
    assert n >= 1, "the prefill's token differs: the same program in both runs"
    for i in range(n):
        assert abs(la[i][ta[i]] - lb[i][ta[i]]) < tol, (i, la[i], lb[i])
    if n < len(ta):
        assert tb[n] in la[n] and la[n][ta[n]] - la[n][tb[n]] < tol, (n, la[n], lb[n])


@pytest.mark.gpu
def test_a_second_engine_takes_the_kernel_program_from_disk(tmp_path):
    """The decode kernel's traced and lowered step is kept beside the compilation cache
    (atom_jax/exported.py): an engine started after another one, each in a fresh process,
    does not trace it again, and gives the same tokens (but for near ties, which the
    kernel's varying order of summation may break either way)."""
    import subprocess
    import sys
    (tmp_path / "config.json").write_text(json.dumps(KERNEL_SHAPE))
    cache = tmp_path / "cache"
    results = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", SECOND_ENGINE, str(tmp_path), str(cache)],
                              capture_output=True, text=True, cwd=Path(__file__).parents[1])
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stderr[-3000:]
        results.append(json.loads(lines[0][len("RESULT "):]))
    assert [r["traced"] for r in results] == [1, 0]   # the second process loaded it from disk
    assert [r["kernel_steps"] for r in results] == [11, 11]
    assert [len(r["tokens"]) for r in results] == [12, 12]
    assert_alike_but_for_ties(*results)
    assert len(list((cache / "atom-jax-exports").glob("*.jaxexport"))) == 1
