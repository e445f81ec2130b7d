"""Ragged paged attention: one call serves a mixed batch of decodes and prefill chunks.

Layout (shared by the reference and the kernel):
  q               [T, num_q_heads, head_dim]   new tokens of every sequence, packed
  k_cache/v_cache [num_pages, page_size, num_kv_heads, head_dim]
  kv_lens         [S] int32  context length of each sequence *including* its new tokens
  block_tables    [S, max_pages] int32  page ids of each sequence, in order
  query_start_loc [S+1] int32  sequence s owns q[query_start_loc[s]:query_start_loc[s+1]]
Padded sequences have q_len 0 (and kv_len 0); padded tokens past query_start_loc[S] get
unspecified output. The new tokens of a sequence are the last q_len positions of its
context, so attention is causal over them. A float8 cache is either a plain
float8_e4m3fn array (a scale of 1) or a `ScaledCache` (a scale per token and KV head).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Queries of one sequence are processed in tiles of at most this many tokens by the reference.
_REFERENCE_Q_TILE = 8
# ...and walk the context this many tokens at a time.
_REFERENCE_KV_CHUNK = 128
# float8_e4m3fn's largest finite value; it has no infinity, so a plain cast of anything
# larger gives NaN.
FP8_MAX = 448.0
SCALE_DTYPE = jnp.float32  # a ScaledCache's scales


def is_float8(dtype) -> bool:
    """Whether a cache of `dtype` is the float8 one (EngineConfig.kv_cache_dtype "fp8")."""
    return jnp.dtype(dtype) == jnp.float8_e4m3fn


def to_cache_dtype(x, dtype):
    """x cast for a cache of `dtype`: into float8 saturated at +-FP8_MAX (a scale of 1, as
    vLLM's fp8 cache without calibrated scales), any other dtype a plain cast."""
    if is_float8(dtype):
        x = jnp.clip(x, -FP8_MAX, FP8_MAX)
    return x.astype(dtype)


class ScaledCache(NamedTuple):
    """A float8 K or V cache that keeps one float32 scale per (token, KV head).

    A row x [D] is stored as x / scale with scale = max|x| / FP8_MAX, so its largest entry
    lands on float8's largest value and small rows keep their 3 bits of mantissa instead of
    becoming subnormals. Read back as data * scale.

    data  [num_pages, page_size, Hkv, D] float8_e4m3fn
    scale [num_pages, Hkv, page_size] float32 (a KV head's scales of one page side by side,
          so a kernel reads them in runs rather than one 4-byte word per 32-byte sector)
    """
    data: jax.Array
    scale: jax.Array


def split_cache(cache):
    """(data, scale) of a ScaledCache; (cache, None) of a plain array."""
    if isinstance(cache, ScaledCache):
        return cache.data, cache.scale
    return cache, None


def row_scales(x):
    """x [..., D]: each row's scale (float32 [...]) for a ScaledCache; a zero row gets the
    smallest normal float32 rather than 0, so dividing by it stays finite."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    return jnp.maximum(amax / FP8_MAX, jnp.finfo(jnp.float32).tiny)


def quantize_rows(x, dtype=jnp.float8_e4m3fn):
    """x [..., D] as a ScaledCache stores it: (rows in float8, scales float32 [...])."""
    scale = row_scales(x)
    return to_cache_dtype(x.astype(jnp.float32) / scale[..., None], dtype), scale


def encode_rows(x, dtype, scaled: bool):
    """x [..., D] as a cache of `dtype` stores it: (rows, scales) for a ScaledCache,
    (rows, None) for a plain one. The reference and the kernel's writes both use it."""
    return quantize_rows(x, dtype) if scaled else (to_cache_dtype(x, dtype), None)


def _write_rows(cache, x, slot_mapping):
    data, scale = split_cache(cache)
    num_pages, page_size, hkv, d = data.shape
    x, s = encode_rows(x, data.dtype, scaled=scale is not None)
    if scale is not None:
        page, off = slot_mapping // page_size, slot_mapping % page_size
        heads = jnp.arange(hkv, dtype=slot_mapping.dtype)
        scale = scale.at[page[:, None], heads[None, :], off[:, None]].set(s, mode="drop")
    flat = data.reshape(num_pages * page_size, hkv, d)
    data = flat.at[slot_mapping].set(x, mode="drop").reshape(data.shape)
    return data if scale is None else ScaledCache(data, scale)


def write_kv_to_pages(k_cache, v_cache, k, v, slot_mapping):
    """Scatter the new tokens' K/V [T, Hkv, D] into their slots (page * page_size + offset).

    Slots outside the cache (padding tokens use num_pages * page_size) are dropped. Under a
    jit that donates the cache this is an in-place update of T rows, never a cache copy.
    A ScaledCache stores each row quantized with its scale (`quantize_rows`).
    """
    return _write_rows(k_cache, k, slot_mapping), _write_rows(v_cache, v, slot_mapping)


def _read_pages(cache, pages, dtype):
    """The rows of `pages` [N, P] as [N, P * page_size, Hkv, D] in `dtype` (dequantized)."""
    data, scale = split_cache(cache)
    n, p = pages.shape
    _, page_size, hkv, d = data.shape
    rows = data[pages]
    if scale is not None:
        s = scale[pages].transpose(0, 1, 3, 2)  # [N, P, page_size, Hkv]
        rows = rows.astype(jnp.float32) * s[..., None]
    return rows.reshape(n, p * page_size, hkv, d).astype(dtype)


def _query_tiles(query_start_loc, num_tokens, q_tile):
    """Split every sequence's queries into tiles of q_tile tokens (static upper bound on count)."""
    num_seqs = query_start_loc.shape[0] - 1
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    tiles_per_seq = (q_lens + q_tile - 1) // q_tile
    tile_end = jnp.cumsum(tiles_per_seq)
    num_tiles = num_tokens // q_tile + num_seqs  # sum(ceil(len/tile)) <= T/tile + S
    tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(tile_end, tile_ids, side="right"), num_seqs - 1)
    local = tile_ids - (tile_end[seq] - tiles_per_seq[seq])
    valid = tile_ids < tile_end[-1]
    tile_len = jnp.where(valid, jnp.clip(q_lens[seq] - local * q_tile, 0, q_tile), 0)
    return seq, local, tile_len, q_lens


def ragged_paged_attention_reference(
    q, k_cache, v_cache, kv_lens, block_tables, query_start_loc,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
):
    """Plain XLA ragged paged attention; the correctness reference for the kernels.

    A cache in another dtype than q (float8) is read and upcast to q's dtype (a
    ScaledCache times its scales).

    Query tiles of one sequence walk its pages a chunk at a time with an online softmax, for
    only as many chunks as the longest context in the batch needs (a dynamic loop bound), so
    short contexts stay cheap whatever the block table's width.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = split_cache(k_cache)[0].shape
    group = num_q_heads // num_kv_heads
    # Tiles as tall as the average query length allows: 1 for decode batches, where taller
    # tiles would be mostly padding, up to _REFERENCE_Q_TILE for prefill chunks.
    num_seqs = query_start_loc.shape[0] - 1
    q_tile = 1
    while q_tile * 2 <= min(_REFERENCE_Q_TILE, num_tokens // max(num_seqs, 1)):
        q_tile *= 2
    seq, local, tile_len, q_lens = _query_tiles(query_start_loc, num_tokens, q_tile)
    n = seq.shape[0]

    offs = jnp.arange(q_tile, dtype=jnp.int32)
    tok = query_start_loc[seq][:, None] + local[:, None] * q_tile + offs[None, :]  # [N, Qt]
    tok_valid = offs[None, :] < tile_len[:, None]
    qt = q[jnp.clip(tok, 0, num_tokens - 1)]  # [N, Qt, Hq, D]
    qt = qt.reshape(n, q_tile, num_kv_heads, group, head_dim)

    kv_len = kv_lens[seq]
    q_pos = (kv_len - q_lens[seq])[:, None] + local[:, None] * q_tile + offs[None, :]  # [N, Qt]

    pages_per_chunk = max(1, _REFERENCE_KV_CHUNK // page_size)
    chunk = pages_per_chunk * page_size
    width = block_tables.shape[1]
    tables = jnp.pad(block_tables, ((0, 0), (0, -width % pages_per_chunk)))[seq]  # [N, P']
    num_chunks = (jnp.max(jnp.where(tile_len > 0, kv_len, 0)) + chunk - 1) // chunk

    def body(j, carry):
        m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(tables, j * pages_per_chunk, pages_per_chunk, axis=1)
        kt = _read_pages(k_cache, pages, q.dtype)
        vt = _read_pages(v_cache, pages, q.dtype)
        k_pos = j * chunk + jnp.arange(chunk, dtype=jnp.int32)
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < kv_len[:, None, None])
        if sliding_window is not None:
            mask &= q_pos[:, :, None] - k_pos[None, None, :] < sliding_window
        s = jnp.einsum("nqhgd,nchd->nhgqc", qt, kt, preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        scale = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        l = l * scale + jnp.sum(p, axis=-1)
        acc = acc * scale[..., None] + jnp.einsum(
            "nhgqc,nchd->nhgqd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
        return m_new, l, acc

    stats = (n, num_kv_heads, group, q_tile)
    init = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros(stats + (head_dim,), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    o = acc / jnp.where(l == 0, 1.0, l)[..., None]  # [N, Hkv, G, Qt, D]
    o = o.transpose(0, 3, 1, 2, 4).reshape(n * q_tile, num_q_heads, head_dim).astype(q.dtype)

    dest = jnp.where(tok_valid, tok, num_tokens).reshape(-1)  # invalid rows are dropped
    return jnp.zeros_like(q).at[dest].set(o, mode="drop")


def ragged_paged_attention(
    q, k_cache, v_cache, kv_lens, block_tables, query_start_loc,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    impl: str = "auto", interpret: bool = False,
):
    """The engine's attention entry point.

    impl: "auto" picks the Pallas kernel on GPU and the XLA reference elsewhere; "xla" and
    "pallas" force one. interpret=True runs the Pallas kernel in interpret mode (CPU tests).
    """
    if _resolve_impl(impl) == "xla":
        return ragged_paged_attention_reference(
            q, k_cache, v_cache, kv_lens, block_tables, query_start_loc,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    from kernels_pallas import ragged_paged_attention_triton as triton_impl
    return triton_impl.ragged_paged_attention_pallas(
        q, k_cache, v_cache, kv_lens, block_tables, query_start_loc,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        interpret=interpret)


def write_kv_and_attend(
    qkv, k_cache, v_cache, slot_mapping, kv_lens, block_tables, query_start_loc,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    impl: str = "auto", interpret: bool = False,
):
    """Write the new tokens' K/V into their cache slots, then attend over the pages.

    qkv [T, Hq + 2 Hkv, D]: each token's query heads, then K heads, then V heads (the
    layout of a fused q/k/v projection, so nothing is sliced apart on the way in).
    slot_mapping [T]: page * page_size + offset of each token (outside the cache for
    padding). Returns (out [T, Hq, D], k_cache, v_cache). impl/interpret as
    `ragged_paged_attention`; the Pallas path writes the rows inside the attention launch
    for decode-sized steps instead of running separate scatters.
    """
    impl = _resolve_impl(impl)
    if impl == "xla":
        hkv = split_cache(k_cache)[0].shape[2]
        hq = qkv.shape[1] - 2 * hkv
        q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
        k_cache, v_cache = write_kv_to_pages(k_cache, v_cache, k, v, slot_mapping)
        out = ragged_paged_attention_reference(
            q, k_cache, v_cache, kv_lens, block_tables, query_start_loc,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        return out, k_cache, v_cache
    from kernels_pallas import ragged_paged_attention_triton as triton_impl
    return triton_impl.write_kv_and_attend_pallas(
        qkv, k_cache, v_cache, slot_mapping, kv_lens, block_tables, query_start_loc,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        interpret=interpret)


def _resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "pallas" if (jax.default_backend() == "gpu" and _pallas_available()) else "xla"
    if impl not in ("xla", "pallas"):
        raise ValueError(f"impl must be 'auto', 'xla' or 'pallas', got {impl!r}")
    return impl


def _pallas_available() -> bool:
    try:
        from kernels_pallas import ragged_paged_attention_triton  # noqa: F401
    except ImportError:
        return False
    return True
