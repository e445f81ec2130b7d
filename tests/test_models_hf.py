"""Acceptance 1: tiny random HF checkpoints load through our loader and match transformers."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from atom_jax.loader import load_hf
from models import get_model_module
from tests.tiny_models import FAMILIES, make_tiny_model

PROMPTS = [[5, 17, 300, 9, 41, 77, 2000, 13, 8], [100, 200], [7] * 23 + [8, 9, 10], [49151]]
BLOCK = 4  # small pages, so every prompt spans several in a shuffled table


def ragged_batch(prompts, num_blocks=64):
    """All prompts in one ragged step, pages handed out in a shuffled order; logits everywhere."""
    rng = np.random.default_rng(0)
    free = list(rng.permutation(num_blocks))
    ids, pos, slots, qsl, lens, tables = [], [], [], [0], [], []
    width = max(-(-len(p) // BLOCK) for p in prompts)
    for p in prompts:
        pages = [free.pop() for _ in range(-(-len(p) // BLOCK))]
        ids += p
        pos += range(len(p))
        slots += [pages[i // BLOCK] * BLOCK + i % BLOCK for i in range(len(p))]
        qsl.append(qsl[-1] + len(p))
        lens.append(len(p))
        tables.append(pages + [0] * (width - len(pages)))
    total = len(ids)
    return dict(input_ids=jnp.array(ids), positions=jnp.array(pos), slot_mapping=jnp.array(slots),
                query_start_loc=jnp.array(qsl), seq_lens=jnp.array(lens),
                block_tables=jnp.array(tables), logits_indices=jnp.arange(total)), qsl


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_logits_match_transformers(arch, tmp_path):
    make_tiny_model(arch, tmp_path, max_shard_size="200KB" if arch == "LlamaForCausalLM" else None)
    if arch == "LlamaForCausalLM":
        assert (tmp_path / "model.safetensors.index.json").exists()  # sharded loading is covered

    cfg, params = load_hf(tmp_path, jnp.float32)
    assert cfg.architecture == arch
    if arch == "LlamaForCausalLM":
        assert dict(cfg.rope_scaling)["rope_type"] == "llama3"
    if arch == "Qwen2ForCausalLM":
        assert cfg.attention_bias
    if arch == "Qwen3ForCausalLM":
        assert cfg.qk_norm and cfg.tie_word_embeddings
    module = get_model_module(cfg)
    params = module.fuse_projections(params, cfg)
    batch, qsl = ragged_batch(PROMPTS)
    shape = (64, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    cache = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_layers)]
    _, logits = jax.jit(module.forward, static_argnums=(3,))(params, cache, batch, cfg)
    logits = np.asarray(logits)

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = ref_model(torch.tensor([prompt])).logits[0].numpy()
        ours = logits[qsl[i]:qsl[i + 1]]
        rel = np.abs(ours - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, f"{arch} prompt {i}: relative error {rel:.2e}"
        assert np.abs(ref).max() > 1.0  # the check is not vacuous


def test_dummy_weights_follow_the_config(tmp_path):
    from atom_jax import LLM, SamplingParams
    from atom_jax.loader import load_dummy, load_model

    make_tiny_model("Qwen2ForCausalLM", tmp_path)
    cfg, params = load_dummy(tmp_path / "config.json", jnp.float32)
    assert cfg.attention_bias
    shapes = jax.tree.map(lambda a: a.shape, params)
    expected = get_model_module(cfg).param_shapes(cfg)
    assert jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)) == \
        jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, tuple))
    _, fused, kind, _, _ = load_model(str(tmp_path / "config.json"), jnp.float32, "dummy")
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    assert kind == "dummy" and fused["layers"][0]["wqkv"].shape == (cfg.hidden_size, qkv)
    assert fused["layers"][0]["w_gate_up"].shape == (cfg.hidden_size, 2 * cfg.intermediate_size)
    llm = LLM(str(tmp_path), load_format="dummy", max_num_batched_tokens=16, max_model_len=64,
              compile_at_startup=False, kv_cache_memory_gb=0.05)
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3
