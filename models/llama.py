"""Llama-style decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3), written end to end.

Parameters are a plain pytree of arrays; `param_axes` gives the logical axis names of every
dimension (DESIGN.md), which parallel/ and quant/ map onto meshes and formats. Weights are
stored [in, out] so every projection is `x @ w`. Layers are unrolled in Python (each a call of
one jitted block that XLA inlines): on GPU that streams weights about 3x faster than a
lax.scan over stacked layers.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import decode_layers_mgpu, write_kv_and_attend
from models.config import ModelConfig


# ---------------------------------------------------------------- parameters

def param_axes(cfg: ModelConfig) -> dict:
    """Logical axis names for every parameter, in the same tree structure as the params."""
    layer = {
        "attn_norm": ("norm",),
        "wq": ("embed", "heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"),
        "wo": ("heads", "embed"),
        "mlp_norm": ("norm",),
        "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed"),
    }
    if cfg.attention_bias:
        layer.update(bq=("heads",), bk=("kv_heads",), bv=("kv_heads",))
    if cfg.qk_norm:
        layer.update(q_norm=("head_dim",), k_norm=("head_dim",))
    tree = {"embed": ("vocab", "embed"), "final_norm": ("norm",),
            "layers": [dict(layer) for _ in range(cfg.num_layers)]}
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = ("embed", "vocab")
    return tree


def param_shapes(cfg: ModelConfig) -> dict:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    dims = {"vocab": cfg.vocab_size, "embed": d, "heads": q, "kv_heads": kv, "mlp": f,
            "norm": d, "head_dim": hd}
    return jax.tree.map(lambda axes: tuple(dims[a] for a in axes), param_axes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def hf_weight_names(cfg: ModelConfig) -> dict:
    """Our parameter path -> (Hugging Face tensor name, transpose?)."""
    names = {"embed": ("model.embed_tokens.weight", False),
             "final_norm": ("model.norm.weight", False)}
    if not cfg.tie_word_embeddings:
        names["lm_head"] = ("lm_head.weight", True)
    hf_layer = {
        "attn_norm": ("input_layernorm.weight", False),
        "wq": ("self_attn.q_proj.weight", True), "wk": ("self_attn.k_proj.weight", True),
        "wv": ("self_attn.v_proj.weight", True), "wo": ("self_attn.o_proj.weight", True),
        "bq": ("self_attn.q_proj.bias", False), "bk": ("self_attn.k_proj.bias", False),
        "bv": ("self_attn.v_proj.bias", False),
        "q_norm": ("self_attn.q_norm.weight", False), "k_norm": ("self_attn.k_norm.weight", False),
        "mlp_norm": ("post_attention_layernorm.weight", False),
        "w_gate": ("mlp.gate_proj.weight", True), "w_up": ("mlp.up_proj.weight", True),
        "w_down": ("mlp.down_proj.weight", True),
    }
    for i, layer in enumerate(param_axes(cfg)["layers"]):
        for k in layer:
            name, transpose = hf_layer[k]
            names[f"layers.{i}.{k}"] = (f"model.layers.{i}.{name}", transpose)
    return names


def gguf_weight_names(cfg: ModelConfig) -> dict:
    """Our parameter path -> (GGUF tensor name, transpose?). GGUF stores Linear as [out, in]."""
    names = {"embed": ("token_embd.weight", False), "final_norm": ("output_norm.weight", False)}
    if not cfg.tie_word_embeddings:
        names["lm_head"] = ("output.weight", True)
    g_layer = {
        "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
        "wv": "attn_v.weight", "wo": "attn_output.weight", "bq": "attn_q.bias",
        "bk": "attn_k.bias", "bv": "attn_v.bias", "q_norm": "attn_q_norm.weight",
        "k_norm": "attn_k_norm.weight", "mlp_norm": "ffn_norm.weight",
        "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    }
    for i, layer in enumerate(param_axes(cfg)["layers"]):
        for k in layer:
            names[f"layers.{i}.{k}"] = (f"blk.{i}.{g_layer[k]}", k.startswith("w"))
    return names


def fuse_projections(params: dict, cfg: ModelConfig) -> dict:
    """The inference layout: q/k/v and gate/up concatenated along their outputs, so a decode
    step reads each layer's weights in 4 matmuls instead of 7 (fewer, larger kernels keep
    the weight stream near memory speed). Checkpoints load in the layout above first."""
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = []
    for layer in params["layers"]:
        fused = {k: v for k, v in layer.items()
                 if k not in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")}
        fused["wqkv"] = jnp.concatenate([layer["wq"], layer["wk"], layer["wv"]], axis=1)
        if cfg.attention_bias:
            fused["bqkv"] = jnp.concatenate([layer["bq"], layer["bk"], layer["bv"]])
        fused["w_gate_up"] = jnp.concatenate([layer["w_gate"], layer["w_up"]], axis=1)
        out["layers"].append(fused)
        layer.clear()  # let the unfused copies go as we go (the caller's tree is consumed)
    return out


def halves_order(head_dim: int) -> np.ndarray:
    """The "halves" order of a head's dimensions: 0..d/4, d/2..3d/4, d/4..d/2, 3d/4..d, so
    that each half of the head holds whole RoPE pairs (i, i + d/2). Its own inverse."""
    q = head_dim // 4
    return np.concatenate([np.arange(q), np.arange(2 * q, 3 * q), np.arange(q, 2 * q),
                           np.arange(3 * q, 4 * q)])


def to_qk_halves(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """The fused layout with q and k head dimensions in the halves order (which the decode
    kernel needs to rotate them where their sums are flushed). Scores do not change: q and k
    are reordered alike, and the cache holds k in that order."""
    if cfg.attention_bias or cfg.qk_norm:
        raise ValueError("the halves order is not implemented for q/k biases or q/k norms")
    hd, heads = cfg.head_dim, cfg.num_heads + cfg.num_kv_heads
    cols = np.concatenate([(np.arange(heads)[:, None] * hd + halves_order(hd)).reshape(-1),
                           np.arange(heads * hd, (heads + cfg.num_kv_heads) * hd)])
    layers = [dict(layer, wqkv=layer["wqkv"][:, cols]) for layer in params["layers"]]
    return dict(params, layers=layers), dataclasses.replace(cfg, qk_halves=True)


# ---------------------------------------------------------------- building blocks

def rms_norm(x, weight, eps):
    # Statistics in float32, as Hugging Face does, whatever the compute dtype.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        return inv.astype(np.float32)
    if kind == "linear":
        return (inv / scaling["factor"]).astype(np.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")


def apply_rope(x, cos, sin, halves: bool = False):
    """x [T, H, D]; cos/sin [T, D/2]. Rotate-half layout, as Hugging Face Llama; with
    halves, x's head dimensions are in the halves order (each half rotated on its own, with
    its own half of the frequencies)."""
    t, h, d = x.shape
    if halves:
        parts = x.reshape(t, h, 2, 2, d // 4).astype(jnp.float32)   # [half, pair member, i]
        x1, x2 = parts[..., 0, :], parts[..., 1, :]
        c, s = cos.reshape(t, 1, 2, d // 4), sin.reshape(t, 1, 2, d // 4)
        out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-2)
        return out.reshape(t, h, d).astype(x.dtype)
    half = d // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# ---------------------------------------------------------------- forward

def decoder_layer(layer, k_cache, v_cache, x, batch, cos, sin, cfg: ModelConfig,
                  attn_impl: str = "auto"):
    """One pre-norm block: attention over the paged cache (the new tokens' K/V written
    first), then the SwiGLU MLP. Returns (x, k_cache, v_cache)."""
    t = x.shape[0]
    hd, nq, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    f = cfg.intermediate_size

    h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
    qkv = h @ layer["wqkv"]
    if cfg.attention_bias:
        qkv = qkv + layer["bqkv"]
    # Heads [0, nq) are queries, then nkv keys, then nkv values; they stay in one array
    # (one fusion normalises and rotates q and k, the attention op reads all three).
    qkv = qkv.reshape(t, nq + 2 * nkv, hd)
    head = jnp.arange(nq + 2 * nkv)[None, :, None]
    if cfg.qk_norm:
        qkv = jnp.where(head < nq, rms_norm(qkv, layer["q_norm"], cfg.rms_norm_eps),
                        jnp.where(head < nq + nkv,
                                  rms_norm(qkv, layer["k_norm"], cfg.rms_norm_eps), qkv))
    qkv = jnp.where(head < nq + nkv, apply_rope(qkv, cos, sin, cfg.qk_halves), qkv)

    o, k_cache, v_cache = write_kv_and_attend(
        qkv, k_cache, v_cache, batch["slot_mapping"], batch["seq_lens"],
        batch["block_tables"], batch["query_start_loc"], sm_scale=hd ** -0.5,
        sliding_window=cfg.sliding_window, impl=attn_impl)
    x = x + o.reshape(t, nq * hd) @ layer["wo"]

    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
    gate_up = h @ layer["w_gate_up"]
    x = x + (jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:]) @ layer["w_down"]
    return x, k_cache, v_cache


# Traced and lowered once per shape, then called per layer: XLA inlines the calls, so the
# compiled step is the same as unrolled layers, but start-up (and the warm start that only
# traces) does not trace the block once per layer.
_decoder_layer = jax.jit(decoder_layer, static_argnums=(7, 8))


def forward(params, kv_cache, batch, cfg: ModelConfig, attn_impl: str = "auto"):
    """One ragged step over all scheduled tokens (params in the fuse_projections layout).

    batch: input_ids/positions/slot_mapping [T], query_start_loc [S+1], seq_lens [S],
    block_tables [S, P], logits_indices [S]. kv_cache: a list of (k, v) per layer, or one
    (k, v) pair stacked over the layers, [L, num_pages, ...] (the decode kernel's cache).
    Returns (new kv_cache, logits [S, vocab] in float32).
    """
    x = params["embed"][batch["input_ids"]]
    freqs = batch["positions"].astype(jnp.float32)[:, None] * rope_inv_freq(cfg)[None, :]
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    layer_batch = {k: batch[k] for k in ("slot_mapping", "seq_lens", "block_tables",
                                         "query_start_loc")}
    if isinstance(kv_cache, list):
        new_cache = []
        for layer, (k_cache, v_cache) in zip(params["layers"], kv_cache):
            x, k_cache, v_cache = _decoder_layer(layer, k_cache, v_cache, x, layer_batch, cos,
                                                 sin, cfg, attn_impl)
            new_cache.append((k_cache, v_cache))
    else:
        # Stacked over layers, the cache is one paged cache of L x num_pages pages, in which
        # layer i's page p is page i * num_pages + p; padding slots stay past its end.
        num_layers, num_pages, page = kv_cache[0].shape[:3]
        k_cache, v_cache = (a.reshape(num_layers * num_pages, *a.shape[2:]) for a in kv_cache)
        slots = layer_batch["slot_mapping"]
        for i, layer in enumerate(params["layers"]):
            paged = dict(layer_batch, block_tables=layer_batch["block_tables"] + i * num_pages,
                         slot_mapping=jnp.where(slots < num_pages * page,
                                                slots + i * num_pages * page,
                                                num_layers * num_pages * page))
            x, k_cache, v_cache = _decoder_layer(layer, k_cache, v_cache, x, paged, cos, sin,
                                                 cfg, attn_impl)
        new_cache = tuple(a.reshape(kv_cache[0].shape) for a in (k_cache, v_cache))

    return new_cache, logits(params, x[batch["logits_indices"]], cfg)


def logits(params, x, cfg: ModelConfig):
    """Final norm and lm_head of hidden states x [S, D]: logits [S, vocab] in float32."""
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.dot(x, lm_head, preferred_element_type=jnp.float32)


def forward_decode_kernel(params, kernel_weights, kv_cache, batch, cfg: ModelConfig,
                          num_sms: int):
    """A batch-1 decode step (sequence 0, one token) with every layer in the persistent decode
    kernel (kernels_pallas/decode_layers_mgpu.py; params in the halves layout, kernel_weights
    from its prepare_weights). Same contract as forward, with kv_cache as one (k, v) pair
    stacked over layers; logits rows past the first are those of zero hidden states."""
    x, kv_cache = decode_layers_mgpu.decode_layers(
        params["embed"][batch["input_ids"][0]], kernel_weights, kv_cache,
        batch["block_tables"][0], batch["positions"][0], rope_inv_freq(cfg),
        eps=cfg.rms_norm_eps, num_sms=num_sms)
    rows = batch["logits_indices"].shape[0]
    return kv_cache, logits(params, jnp.zeros((rows, x.shape[1]), x.dtype).at[0].set(x[0]), cfg)
