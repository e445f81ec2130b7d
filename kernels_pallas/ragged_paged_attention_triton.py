"""Ragged paged attention as a Pallas kernel lowered through Triton (NVIDIA and AMD GPUs).

Same op, layout and semantics as `ragged_paged_attention_reference` in
`kernels_pallas.ragged_paged_attention`:

  q               [T, Hq, D]                     new tokens of every sequence, packed
  k_cache/v_cache [num_pages, page_size, Hkv, D]
  kv_lens         [S]      context length of each sequence, new tokens included
  block_tables    [S, max_pages]
  query_start_loc [S+1]

How the work is laid out
------------------------
A program handles one *query tile* of one KV head: `block_m` rows, each row a
(new token, query head) pair of the query heads that share that KV head, token-major.
So the K/V pages of a KV head are read once per tile for all of its query heads (GQA).
The program walks the tile's visible context in steps of `block_n` tokens: for every
step it looks the pages up in the block table, gathers the K and V rows of its KV head
straight out of the paged cache, and runs an online (flash) softmax in float32.
Steps that no mask can touch (all keys visible to all rows) run in a loop without any
masking; the causal diagonal, the sliding-window edge and the partially filled last
page run in a masked loop.

Grids are static while the batch is ragged. Decode tiles map program i to sequence i and
read its token range from query_start_loc inside the kernel; for prefill tiles the
mapping tile -> (sequence, first token, token count, first position) is computed with
plain JAX ops before the kernel and handed in as an int32 table. Tiles past the real work
have a token count of 0 and return at once.

Sequences are served by one of two launches of the same kernel body, chosen per
sequence at run time from its number of new tokens:

* "decode" tiles: sequences with at most `decode.block_m // group` new tokens (decodes,
  short speculative chunks). One tile per sequence, small `block_m`. When the batch is
  too small to fill the GPU, the context is split into `num_kv_splits` parts
  (flash-decoding): each part writes a partial output and its log-sum-exp (rows of real
  tokens only), and a combine launch merges them into the output rows. The split count
  is static (batch shape and cache capacity), but each sequence's context is dealt out at
  run time: a short one leaves the later splits empty, their programs exit at once and
  the combine reads only the active partials. With
  `fused_combine=True` there is no second launch: each split program bumps an int32
  arrival counter of its (sequence, KV head) with an atomic add after its stores, and
  the one that arrives last does the merge (on the H200 both forms timed the same at
  batch 1, context 32k, so the two-launch form stays the default).
* "prefill" tiles: the other sequences, cut into tiles of `prefill.block_m // group`
  tokens, large `block_m` for matrix-unit efficiency.

Both write into the same output buffer (the second launch aliases the first one's
output), so a mixed batch of decodes and prefill chunks is one call.

`write_kv_and_attend_pallas` also stores the new tokens' K/V, read from a [T, Hq + 2 Hkv, D]
qkv array. When every sequence fits a decode tile, each decode program writes the new rows
that fall in its own part of the context, then (after a barrier) attends over them: no
other program reads those rows, so no launch is added. Otherwise a small launch writes
them before the attention launches.

Every Triton-specific parameter lives in `KernelConfig` and the constants right below
it.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.ragged_paged_attention import (ScaledCache, encode_rows, is_float8,
                                                   split_cache)

# --------------------------------------------------------------------------------------
# Triton parameters: the only place where block sizes, warps and stages are chosen.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile shape and Triton launch parameters of one launch of the kernel.

    block_m:    rows per program; a row is one (new token, query head) pair. Powers of 2.
    block_n:    context tokens per inner step (any multiple or divisor of the page size
                works; a power of 2, at least 16).
    num_warps:  Triton warps per program.
    num_stages: Triton software-pipelining depth of the inner loops.
    """
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Decode-like tiles: few rows, memory bound. H200, K/V write inside the launch, us, this
# config against (block_n 128, 3 stages) and (64, 3): 64 decodes at 4k 243 / 248 / 308;
# 256 at 512 135 / 142 / 145; 256 at 1,536 369 / 377 / 397; 512 at 1k 494 / 508 / 513.
DECODE_CONFIG = KernelConfig(block_m=16, block_n=64, num_warps=4, num_stages=2)
# Prefill tiles: matrix-unit bound. H200, 16k causal, GQA 4: 408 TFLOP/s; (128, 128, 8, 3)
# gave 289 and (128, 64, 8, 3) 234.
PREFILL_CONFIG = KernelConfig(block_m=256, block_n=64, num_warps=8, num_stages=2)
# Decode tiles of launches split along the context (small batches, flash-decoding).
# H200, batch 1 at 32k, kernels' own time (split launch + combine, profiler): this config
# with 2 programs per SM (32 splits) 39.1 us, 80% of copy bandwidth; block_n 64 with 5
# stages 39.3; block_n 128, 3 stages: 39.8 with 32 splits, 45.2 with 16; block_n 32, 64
# splits: 40.6-42.1.
SPLIT_DECODE_CONFIG = KernelConfig(block_m=16, block_n=64, num_warps=4, num_stages=6)
# Decode tiles over a float8 cache. H200, float16 upcast, kernels' own time, us, 256
# decodes at 1,400 tokens / 64 at 4k: this config 231.2 / 162.3 (twice, 0.74-0.77 of the
# copy bandwidth); block_n 64, 2 warps, 8 stages 235.9 / 159.7; block_n 128, 4 warps, 3
# stages (the config before) 265.8-266.5 / 186.3-187.6; 4 warps and 6 stages 252.2 /
# 196.9; 1 warp 264.1 / 178.4; block_n 32 246-249 / 170-177; block_n 128 with 2 warps
# 320-350 / 228-245. Earlier: bf16's tile (DECODE_CONFIG) over a float8 cache 298.5 /
# 272.3, over a bf16 cache 332.9 / 243.4. Why fewer warps and a deeper pipeline help was
# not measured (likely more of the 8-bit tiles' copies in flight per multiprocessor). Not
# the upcast: float8 products (q quantized per row) in the config before took 270 / 187
# us, as the upcast did, with ten times the error. Nor the matrix units: each query head
# on the CUDA cores (multiply-and-sum in float32) took 828.5 / 609.3 at best. Reading V
# otherwise did not help (same machine, 256 at 1,400 / 64 at 4k, us, 4 warps): V stored
# with its tokens contiguous 338 / 247 at best; the products turned so that the context's
# tokens are the matrix units' M side 385 / 272, only p @ V so 321 / 255. Contracting V
# over head_dim, as K is (wrong math, timing only), took 214-218 / 180-185: V's
# contraction over tokens cost about 20% at 1,400.
FP8_DECODE_CONFIG = KernelConfig(block_m=16, block_n=64, num_warps=2, num_stages=6)
# Decode tiles over a ScaledCache. H200, us, 256 decodes at 1,400 tokens / 64 at 4k, one
# machine run: this config 258.8 / 179.8 (0.68-0.72 of the copy bandwidth); block_n 128,
# 4 warps, 2 stages (the config before) 287.2 / 198.5; block_n 64, 2 warps, 4 stages
# 266.7 / 190.8, 8 stages 321.8 / 256.3; block_n 32, 2 warps, 6 stages 301.4 / 213.9;
# block_n 128 with 2 warps 376.9 / 263.4; block_n 64 with 4 warps 346.0 / 307.3.
SCALED_FP8_DECODE_CONFIG = KernelConfig(block_m=16, block_n=64, num_warps=2, num_stages=6)
# Float32 operands (or head_dim > 128) need half the shared memory per stage.
DECODE_CONFIG_WIDE = KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)
PREFILL_CONFIG_WIDE = KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
# Split-KV heuristic for decode tiles: about this many programs per multiprocessor ...
SPLIT_PROGRAMS_PER_SM = 2
# ... with at most this many splits, each covering at least this many inner steps.
MAX_KV_SPLITS = 64
MIN_STEPS_PER_SPLIT = 2
# At run time a split covers at least this many blocks of the actual context (short
# contexts then use fewer splits; the rest exit at once). On the H200, batch 1 at contexts
# 128-1024 of an 8k cache: 1 gave 7.2-8.6 us (split + combine), 2 and 4 up to 1.5 us more.
MIN_BLOCKS_PER_SPLIT = 1
# Merge the splits in the split launch itself (last program to arrive) rather than in a
# second launch.
FUSED_COMBINE = False
# The separate split-combine launch (one program per output row, all splits loaded at
# once; looping over the splits in one program per sequence and KV head took 5.5 us at
# batch 1, context 32k, 16 splits, and 11.4 us with 32 splits on the H200), and the
# standalone K/V write launch.
COMBINE_CONFIG = KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
# The dtype a float8 cache's K/V (and with them q and the softmax weights) are upcast to
# for the matrix units, where q is 16-bit. float16: Triton converts float8 to it faster
# than to bfloat16, and it keeps 3 more bits of mantissa; q is clamped to its +-65,504
# (bfloat16's range is float32's). H200, decode tiles over a float8 cache, kernels' own
# time, us, upcast to float16 against bfloat16 (each with its best tile): 256 decodes at
# 1,400 tokens 264.8 / 358.8; 64 at 4k 184.5 / 255.0.
FP8_COMPUTE_DTYPE = jnp.float16
# A ScaledCache's V scales: tiles of at least this many rows multiply V's rows by them,
# smaller ones the softmax weights. H200, kernels' own time, us, rows against weights:
# prefill tiles (256 rows) over 8 x 1,024 tokens 369 / 649; decode tiles (16 rows), 256
# at 1,400 tokens 288.5 / 289.0, 64 at 4k 198.7 / 201.6 (a float8 cache with a scale of
# 1: 328 / 265.5 / 185.4).
SCALE_V_ROWS_FROM = 64
# Multiprocessor count used when the device does not report one (interpret mode on CPU).
DEFAULT_NUM_SMS = 132


def _compiler_params(cfg: KernelConfig):
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _wide(dtype, head_dim: int) -> bool:
    return jnp.dtype(dtype).itemsize * _pow2(head_dim) > 256


def default_configs(dtype, head_dim: int, cache_dtype=None,
                    scaled: bool = False) -> tuple[KernelConfig, KernelConfig]:
    """(decode, prefill) configs for operands of `dtype` and `head_dim` (and a cache of
    `cache_dtype`, where it is float8; `scaled`: a ScaledCache)."""
    if _wide(dtype, head_dim):
        return DECODE_CONFIG_WIDE, PREFILL_CONFIG_WIDE
    if cache_dtype is not None and is_float8(cache_dtype):
        return (SCALED_FP8_DECODE_CONFIG if scaled else FP8_DECODE_CONFIG), PREFILL_CONFIG
    return DECODE_CONFIG, PREFILL_CONFIG


def default_split_config(dtype, head_dim: int) -> KernelConfig:
    """Config of decode launches split along the context."""
    return DECODE_CONFIG_WIDE if _wide(dtype, head_dim) else SPLIT_DECODE_CONFIG


def _num_sms() -> int:
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return DEFAULT_NUM_SMS
    if dev.platform != "gpu":
        return DEFAULT_NUM_SMS
    return int(getattr(dev, "core_count", 0) or DEFAULT_NUM_SMS)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def auto_num_kv_splits(num_seqs: int, num_kv_heads: int, max_context: int,
                       block_n: int, num_sms: int | None = None,
                       programs_per_sm: int | None = None) -> int:
    """Splits of the context for decode tiles so that small batches still fill the GPU.

    About `programs_per_sm` programs per multiprocessor, then as few splits as give the
    same number of inner steps per split (so no split is left nearly empty).
    """
    num_sms = _num_sms() if num_sms is None else num_sms
    pps = SPLIT_PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
    programs = num_seqs * num_kv_heads
    want = pps * num_sms // programs
    steps = -(-max_context // block_n)
    useful = max(1, steps // MIN_STEPS_PER_SPLIT)
    n = max(1, min(want, useful, MAX_KV_SPLITS))
    per = -(-steps // n)
    return int(-(-steps // per))


# --------------------------------------------------------------------------------------
# The kernel body.
# --------------------------------------------------------------------------------------

_LOG2E = math.log2(math.e)


def _row_ref(ref, idx0, idx1, dp: int):
    """ref[idx0, idx1, :dp] as a [rows, dp] view; idx0 a vector, idx1 a vector or scalar.

    Every index is an integer array (no slices), which both the Triton lowering and
    interpret mode accept for gathers; contiguity along the last axis is still visible to
    Triton, so the loads stay vectorized.
    """
    col = jnp.arange(dp, dtype=jnp.int32)[None, :]
    idx1 = idx1[:, None] if getattr(idx1, "ndim", 0) else idx1
    return ref.at[idx0[:, None], idx1, col]


def _decode_tile(qsl_ref, kvl_ref, seq, max_q):
    """(first token, token count, first position) of sequence `seq` as a decode tile."""
    tok0 = qsl_ref[seq]
    q_len = qsl_ref[seq + 1] - tok0
    ntok = jnp.where(q_len <= max_q, q_len, 0)
    return tok0, ntok, kvl_ref[seq] - q_len


def _split_blocks(pos0, ntok, split, *, num_splits: int, block_n: int,
                  sliding_window: int | None):
    """(first block b_lo the tile attends to, this split's blocks [s_lo, s_hi), active
    splits).

    The tile's blocks are dealt out in runs of `per` (at least MIN_BLOCKS_PER_SPLIT), so a
    short context leaves the later splits empty: those programs exit at once and the
    combine reads only the first `active` partials.
    """
    kv_end = pos0 + ntok  # exclusive; the last row sees keys [.., kv_end)
    if sliding_window is not None:
        kv_start = jnp.maximum(pos0 - sliding_window + 1, 0)
    else:
        kv_start = jnp.int32(0)
    b_lo = kv_start // block_n
    b_hi = (kv_end + block_n - 1) // block_n
    if num_splits == 1:
        return b_lo, b_lo, b_hi, jnp.int32(1)
    per = jnp.maximum((b_hi - b_lo + num_splits - 1) // num_splits, MIN_BLOCKS_PER_SPLIT)
    s_lo = jnp.minimum(b_lo + split * per, b_hi)
    s_hi = jnp.minimum(s_lo + per, b_hi)
    return b_lo, s_lo, s_hi, (b_hi - b_lo + per - 1) // per


def _store_rows(o_ref, o, tok, head, row_ok, dp: int, head_dim: int):
    """Output rows (token tok[i], query head head[i]) of the rows with row_ok."""
    mask = row_ok[:, None]
    if dp != head_dim:
        mask = mask & (jnp.arange(dp, dtype=jnp.int32) < head_dim)[None, :]
    plgpu.store(_row_ref(o_ref, tok, head, dp), o.astype(o_ref.dtype),
                mask=jnp.broadcast_to(mask, o.shape))


def _merge_splits(o_part_ref, lse_ref, tile, kv_head, num_splits: int, rows, row_ok,
                  dp: int):
    """The flash-decoding partials of one (tile, KV head) merged: [block_m, dp] float32.

    o_part_ref [tiles, kv_heads, splits, block_m, dp] holds each split's normalised output,
    lse_ref [tiles, kv_heads, splits, block_m] its base-2 log-sum-exp (-inf: saw nothing).
    Only rows with row_ok are read. The maximum comes from one load of all the splits'
    log-sum-exps, so the loop over the splits carries no dependence through its loads
    and is software-pipelined.
    """
    block_m = rows.shape[0]
    sp = jnp.arange(_pow2(num_splits), dtype=jnp.int32)
    lse_all = plgpu.load(lse_ref.at[tile, kv_head, sp[:, None], rows[None, :]],
                         mask=(sp[:, None] < num_splits) & row_ok[None, :], other=-jnp.inf)
    m = jnp.max(lse_all, axis=0)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    l = jnp.sum(jnp.exp2(lse_all - m[None, :]), axis=0)
    cols = jnp.arange(dp, dtype=jnp.int32)[None, :]
    mask = jnp.broadcast_to(row_ok[:, None], (block_m, dp))

    def body(s, acc):
        lse = plgpu.load(lse_ref.at[tile, kv_head, s, rows], mask=row_ok, other=-jnp.inf)
        o = plgpu.load(o_part_ref.at[tile, kv_head, s, rows[:, None], cols], mask=mask,
                       other=0.0)
        return acc + o * jnp.exp2(lse - m)[:, None]

    acc = lax.fori_loop(0, num_splits, body, jnp.zeros((block_m, dp), jnp.float32))
    return acc / jnp.where(l == 0.0, 1.0, l)[:, None]


def _write_new_rows(q_ref, slot_ref, k_ref, v_ref, new_kv_heads, kv_head, tok0, ntok,
                    pos0, lo, hi, max_q: int, dp: int, head_dim: int, ks_ref=None,
                    vs_ref=None, page_size: int = 1):
    """Copy the tile's new K/V rows whose positions lie in [lo, hi) into their cache slots.

    The new rows are heads new_kv_heads[0] + kv_head (K) and new_kv_heads[1] + kv_head (V)
    of q_ref; a slot outside the cache (padding) is skipped. With scale refs (a
    ScaledCache) each row is stored divided by its scale, and the scale beside it.
    """
    w = jnp.arange(_pow2(max_q), dtype=jnp.int32)
    num_slots = k_ref.shape[0]
    ok = (w < ntok) & (pos0 + w >= lo) & (pos0 + w < hi)
    slot = plgpu.load(slot_ref.at[tok0 + w], mask=ok, other=num_slots)
    ok = ok & (slot < num_slots)
    mask = ok[:, None]
    if dp != head_dim:
        mask = mask & (jnp.arange(dp, dtype=jnp.int32) < head_dim)[None, :]
    mask = jnp.broadcast_to(mask, (w.shape[0], dp))
    for head0, ref, scale_ref in zip(new_kv_heads, (k_ref, v_ref), (ks_ref, vs_ref)):
        rows = plgpu.load(_row_ref(q_ref, tok0 + w, head0 + kv_head, dp), mask=mask, other=0.0)
        rows, scale = encode_rows(rows, ref.dtype, scaled=scale_ref is not None)
        if scale_ref is not None:
            plgpu.store(scale_ref.at[slot // page_size, kv_head, slot % page_size], scale,
                        mask=ok)
        plgpu.store(_row_ref(ref, slot, kv_head, dp), rows, mask=mask)


def _attention_kernel(*refs, group: int, head_dim: int, page_size: int, cfg: KernelConfig,
                      sm_scale: float, soft_cap: float | None, sliding_window: int | None,
                      num_splits: int, out_mode: str, num_aliased: int,
                      decode_max_q: int | None, new_kv_heads: tuple[int, int] | None,
                      scaled: bool, interpret: bool):
    """One (query tile, KV head, context split) program.

    Decode launches (decode_max_q set) take (query_start_loc, kv_lens) and map program i to
    sequence i; prefill launches take the tile table built by `_prefill_tiles`.

    new_kv_heads (decode launches only): q_ref also holds the new tokens' K and V at these
    head offsets, and a slot_mapping input follows the block table. Each program first
    writes the new rows that fall in its own part of the context into the cache (the
    cache outputs alias the cache inputs), then attends, so no other launch writes them.

    out_mode "out": write the output rows; "split": write this split's partial output and
    log-sum-exp; "fused": as "split", then the last split program of the (tile, KV head)
    to arrive (atomic counter) merges all partials into the output rows.

    scaled: the cache is a ScaledCache; its scale arrays ([num_pages, Hkv, page_size])
    follow the K and V refs (and, where the launch writes, the K and V outputs).
    """
    block_m, block_n = cfg.block_m, cfg.block_n
    dp = _pow2(head_dim)
    tile, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if decode_max_q is not None:
        qsl_ref, kvl_ref, q_ref, k_ref, v_ref, *refs = refs
        seq = tile
        tok0, ntok, pos0 = _decode_tile(qsl_ref, kvl_ref, seq, decode_max_q)
    else:
        meta_ref, q_ref, k_ref, v_ref, *refs = refs
        seq = meta_ref[tile, 0]
        tok0 = meta_ref[tile, 1]
        ntok = meta_ref[tile, 2]
        pos0 = meta_ref[tile, 3]
    ks_ref = vs_ref = None
    if scaled:
        ks_ref, vs_ref, *refs = refs
    bt_ref, *refs = refs
    if new_kv_heads is not None:
        slot_ref, *refs = refs
    refs = refs[num_aliased:]  # aliased inputs: the kernel writes through the output refs
    if new_kv_heads is not None:
        # Read the cache through the outputs too, so this program sees its own writes
        # (interpret mode keeps aliased inputs and outputs apart).
        if scaled:
            *refs, k_ref, v_ref, ks_ref, vs_ref = refs
        else:
            *refs, k_ref, v_ref = refs

    rows = jnp.arange(block_m, dtype=jnp.int32)
    row_tok = rows // group
    row_head = kv_head * group + rows % group
    row_ok = row_tok < ntok
    q_pos = pos0 + row_tok
    dmask = None if dp == head_dim else (jnp.arange(dp, dtype=jnp.int32) < head_dim)[None, :]

    def masked_load(ref, mask, n):
        if dmask is not None:
            mask = mask & dmask
        return plgpu.load(ref, mask=jnp.broadcast_to(mask, (n, dp)), other=0.0)

    kv_end = pos0 + ntok  # exclusive; the last row sees keys [.., kv_end)
    b_lo, s_lo, s_hi, _ = _split_blocks(pos0, ntok, split, num_splits=num_splits,
                                        block_n=block_n, sliding_window=sliding_window)
    # An empty split writes nothing: the combine reads only the active splits' partials.
    # (The fused merge reads every split, and every program must count itself in.)
    run = (ntok > 0) & ((s_lo < s_hi) if out_mode == "split" else True)

    @pl.when(run)
    def _():
        q = masked_load(_row_ref(q_ref, tok0 + row_tok, row_head, dp), row_ok[:, None],
                        block_m)
        if is_float8(k_ref.dtype) and jnp.dtype(q.dtype).itemsize == 2:
            # Clamped first (in float32: float16's largest value rounds up in bfloat16): a
            # bf16 q entry past float16's range would become inf, and inf - inf a NaN.
            f16_max = float(jnp.finfo(FP8_COMPUTE_DTYPE).max)
            q = jnp.clip(q.astype(jnp.float32), -f16_max, f16_max).astype(FP8_COMPUTE_DTYPE)
        if new_kv_heads is not None:
            _write_new_rows(q_ref, slot_ref, k_ref, v_ref, new_kv_heads, kv_head, tok0, ntok,
                            pos0, s_lo * block_n, s_hi * block_n, decode_max_q, dp, head_dim,
                            ks_ref, vs_ref, page_size)
            if not interpret:  # every thread's stores land before any thread reads them
                plgpu.debug_barrier()
        # Steps [full_lo, full_hi) are visible to every row of the tile: no masking.
        full_hi = (pos0 + 1) // block_n
        if sliding_window is not None:
            last = kv_end - 1
            full_lo = (jnp.maximum(last - sliding_window + 1, 0) + block_n - 1) // block_n
        else:
            full_lo = b_lo

        if soft_cap is not None:
            pre, post = sm_scale / soft_cap, soft_cap * _LOG2E
        else:
            pre, post = sm_scale * _LOG2E, None
        kv_cols = jnp.arange(block_n, dtype=jnp.int32)

        def step(b, carry, masked: bool):
            acc, m_i, l_i = carry
            kpos = b * block_n + kv_cols
            if masked:
                kv_ok = kpos < kv_end
                page = plgpu.load(bt_ref.at[seq, kpos // page_size], mask=kv_ok, other=0)
            else:
                page = bt_ref[seq, kpos // page_size]
            slot = page * page_size + kpos % page_size

            def load_rows(ref):  # this step's block_n cache rows of the KV head
                view = _row_ref(ref, slot, kv_head, dp)
                if masked:
                    return masked_load(view, kv_ok[:, None], block_n)
                if dmask is not None:
                    return masked_load(view, jnp.ones((block_n, 1), jnp.bool_), block_n)
                return view[...]

            def load_scales(ref):  # this step's block_n scales of the KV head (ScaledCache)
                view = ref.at[page, kv_head, kpos % page_size]
                return plgpu.load(view, mask=kv_ok, other=0.0) if masked else view[...]

            k = load_rows(k_ref)
            s = lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
            if ks_ref is not None:
                s = s * load_scales(ks_ref)[None, :]
            if post is None:
                s = s * pre
            else:
                s = jnp.tanh(s * pre) * post
            if masked:
                vis = kpos[None, :] <= q_pos[:, None]
                if sliding_window is not None:
                    vis = vis & (q_pos[:, None] - kpos[None, :] < sliding_window)
                s = jnp.where(vis, s, -jnp.inf)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
            if masked:  # a row may have seen nothing yet: keep exp2 away from inf - inf
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            else:
                m_use = m_new
            alpha = jnp.exp2(m_i - m_use)
            p = jnp.exp2(s - m_use[:, None])
            l_i = l_i * alpha + jnp.sum(p, axis=1)
            v = load_rows(v_ref).astype(q.dtype)  # a float8 cache is upcast, p stays 16-bit
            if vs_ref is None:
                pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
            else:
                vs = load_scales(vs_ref)
                if block_m >= SCALE_V_ROWS_FROM:
                    # Many rows share the tile: scale V's rows once (clamped, so a value
                    # past float16's range stays finite).
                    f16_max = float(jnp.finfo(v.dtype).max)
                    v = jnp.clip(v.astype(jnp.float32) * vs[:, None], -f16_max,
                                 f16_max).astype(v.dtype)
                    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)
                else:
                    # Few rows: scale the softmax weights instead, relative to the step's
                    # largest scale so they stay in [0, 1] (absolute scales would push the
                    # 16-bit weights into subnormals).
                    v_max = jnp.maximum(jnp.max(vs), jnp.finfo(jnp.float32).tiny)
                    pv = lax.dot_general((p * (vs / v_max)[None, :]).astype(v.dtype), v,
                                         (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32) * v_max
            acc = acc * alpha[:, None] + pv
            return acc, m_new, l_i

        carry = (jnp.zeros((block_m, dp), jnp.float32),
                 jnp.full((block_m,), -jnp.inf, jnp.float32),
                 jnp.zeros((block_m,), jnp.float32))
        if sliding_window is not None:
            carry = lax.fori_loop(s_lo, jnp.minimum(s_hi, full_lo),
                                  functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(jnp.maximum(s_lo, full_lo), jnp.minimum(s_hi, full_hi),
                              functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(jnp.maximum(jnp.maximum(s_lo, full_lo), full_hi), s_hi,
                              functools.partial(step, masked=True), carry)
        acc, m_i, l_i = carry

        if out_mode == "out":
            (o_ref,) = refs
            _store_rows(o_ref, acc / l_i[:, None], tok0 + row_tok, row_head, row_ok, dp,
                        head_dim)
        else:
            if out_mode == "split":
                o_part_ref, lse_ref = refs
            else:
                o_ref, o_part_ref, lse_ref, cnt_ref = refs
            empty = l_i == 0.0
            l_safe = jnp.where(empty, 1.0, l_i)
            o = acc / l_safe[:, None]
            lse = jnp.where(empty, -jnp.inf, m_i + jnp.log2(l_safe))
            cols = jnp.arange(dp, dtype=jnp.int32)[None, :]
            plgpu.store(o_part_ref.at[tile, kv_head, split, rows[:, None], cols], o,
                        mask=jnp.broadcast_to(row_ok[:, None], (block_m, dp)))
            plgpu.store(lse_ref.at[tile, kv_head, split, rows], lse, mask=row_ok)
            if out_mode == "fused":
                # Every thread's partial stores before the (single-thread) release below.
                if not interpret:
                    plgpu.debug_barrier()
                arrived = plgpu.atomic_add(cnt_ref, (tile, kv_head), jnp.int32(1))

                @pl.when(arrived == num_splits - 1)
                def _():
                    merged = _merge_splits(o_part_ref, lse_ref, tile, kv_head, num_splits,
                                           rows, row_ok, dp)
                    _store_rows(o_ref, merged, tok0 + row_tok, row_head, row_ok, dp,
                                head_dim)


def _launch(tile_args, q, kv, block_tables, out, *, group, head_dim, page_size, cfg,
            sm_scale, soft_cap, sliding_window, num_splits, out_mode, interpret, name,
            decode_max_q=None, slot_mapping=None):
    """One pallas_call over grid (tiles, kv_heads, splits); returns its outputs, a tuple.

    tile_args: (query_start_loc, kv_lens) for a decode launch (one tile per sequence), or
    (tile_table,) for a prefill launch. out_mode "out" -> (out,); "split" -> (o_part, lse);
    "fused" -> (out, o_part, lse, counters). `out`, if given, is the buffer the output rows
    are written into. kv: the flat caches (k_flat, v_flat), then a ScaledCache's
    (k_scale, v_scale). q holds the query heads first ([T, Hq, D]); with slot_mapping
    (decode launches) it is [T, Hq + 2 Hkv, D] with the new K and V heads after them, the
    launch writes those into the cache, and the arrays of kv are appended to its outputs.
    """
    num_tokens = q.shape[0]
    num_kv_heads = kv[0].shape[1]
    num_q_heads = num_kv_heads * group
    new_kv_heads = None
    if slot_mapping is not None:
        new_kv_heads = (num_q_heads, num_q_heads + num_kv_heads)
    num_tiles = (tile_args[1].shape[0] if decode_max_q is not None else tile_args[0].shape[0])
    dp = _pow2(head_dim)
    o_shape = jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), q.dtype)
    part_shapes = (
        jax.ShapeDtypeStruct((num_tiles, num_kv_heads, num_splits, cfg.block_m, dp),
                             jnp.float32),
        jax.ShapeDtypeStruct((num_tiles, num_kv_heads, num_splits, cfg.block_m), jnp.float32),
    )
    args = [*tile_args, q, *kv, block_tables]
    if slot_mapping is not None:
        args.append(slot_mapping)
    aliases = {}
    if out_mode == "split":
        out_shape = part_shapes
    else:
        if out is not None:
            aliases[len(args)] = 0
            args.append(out)
        out_shape = (o_shape,)
        if out_mode == "fused":
            cnt = jnp.zeros((num_tiles, num_kv_heads), jnp.int32)
            out_shape = (o_shape, *part_shapes, jax.ShapeDtypeStruct(cnt.shape, cnt.dtype))
            aliases[len(args)] = 3
            args.append(cnt)
    num_aliased = len(aliases)
    if slot_mapping is not None:
        first_cache_arg = len(tile_args) + 1
        for i, a in enumerate(kv):
            aliases[first_cache_arg + i] = len(out_shape) + i
        out_shape = (*out_shape, *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in kv))
    kernel = functools.partial(
        _attention_kernel, group=group, head_dim=head_dim, page_size=page_size, cfg=cfg,
        sm_scale=float(sm_scale), soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window),
        num_splits=num_splits, out_mode=out_mode, num_aliased=num_aliased,
        decode_max_q=decode_max_q, new_kv_heads=new_kv_heads, scaled=len(kv) == 4,
        interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads, num_splits),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name=name,
    )(*args)


def _combine_kernel(qsl_ref, kvl_ref, o_part_ref, lse_ref, *refs, group: int,
                    head_dim: int, num_splits: int, max_q: int, block_n: int,
                    sliding_window: int | None):
    """Merge the flash-decoding partials of one output row (one new token and query head
    of a sequence's KV head): every active split's partial is loaded at once, so the
    merge costs one round trip to memory however many splits there are."""
    out_ref = refs[-1]
    seq, kv_head, row = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tok0, ntok, pos0 = _decode_tile(qsl_ref, kvl_ref, seq, max_q)
    dp = o_part_ref.shape[-1]
    *_, active = _split_blocks(pos0, ntok, 0, num_splits=num_splits, block_n=block_n,
                               sliding_window=sliding_window)

    @pl.when(row // group < ntok)
    def _():
        sp = jnp.arange(_pow2(num_splits), dtype=jnp.int32)
        ok = sp < active
        lse = plgpu.load(lse_ref.at[seq, kv_head, sp, row], mask=ok, other=-jnp.inf)
        m = jnp.max(lse)
        w = jnp.exp2(lse - jnp.where(m == -jnp.inf, 0.0, m))  # splits that saw nothing: 0
        l = jnp.sum(w)
        cols = jnp.arange(dp, dtype=jnp.int32)
        o = plgpu.load(o_part_ref.at[seq, kv_head, sp[:, None], row, cols[None, :]],
                       mask=jnp.broadcast_to(ok[:, None], (sp.shape[0], dp)), other=0.0)
        o = jnp.sum(o * w[:, None], axis=0) / jnp.where(l == 0.0, 1.0, l)
        plgpu.store(out_ref.at[tok0 + row // group, kv_head * group + row % group, cols],
                    o.astype(out_ref.dtype), mask=cols < head_dim)


def _combine(query_start_loc, kv_lens, o_part, lse, q, out, *, group, head_dim, max_q,
             block_n, sliding_window, interpret):
    """q: [T, >= Hq, D], for the output's token count and dtype; block_n and sliding_window
    as the split launch's, which decide how many splits hold a partial."""
    num_seqs, num_kv_heads, num_splits, block_m = o_part.shape[:4]
    kernel = functools.partial(_combine_kernel, group=group, head_dim=head_dim,
                               num_splits=num_splits, max_q=max_q, block_n=block_n,
                               sliding_window=sliding_window)
    args = [query_start_loc, kv_lens, o_part, lse]
    aliases = {}
    if out is not None:
        aliases = {len(args): 0}
        args.append(out)
    return pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, block_m),
        out_shape=jax.ShapeDtypeStruct((q.shape[0], num_kv_heads * group, head_dim), q.dtype),
        input_output_aliases=aliases,
        compiler_params=_compiler_params(COMBINE_CONFIG),
        interpret=interpret,
        name="ragged_paged_attention_combine",
    )(*args)


def _write_kv_kernel(slot_ref, qkv_ref, *refs, rows: int, new_kv_heads: tuple[int, int],
                     head_dim: int, page_size: int):
    """Rows [i * rows, (i + 1) * rows) of KV head j: the new K/V rows into their slots.

    refs: the cache inputs (K, V, and a ScaledCache's scales), then the outputs they are
    aliased to, in the same order."""
    outs = refs[len(refs) // 2:]  # the inputs are aliased to these
    k_ref, v_ref, *scale_refs = outs
    block, kv_head = pl.program_id(0), pl.program_id(1)
    num_tokens = qkv_ref.shape[0]
    first = block * rows
    _write_new_rows(qkv_ref, slot_ref, k_ref, v_ref, new_kv_heads, kv_head, first,
                    jnp.minimum(num_tokens - first, rows), jnp.int32(0), 0, rows, rows,
                    _pow2(head_dim), head_dim, *scale_refs, page_size=page_size)


def _write_kv(qkv, kv, slot_mapping, *, num_q_heads, head_dim, page_size, interpret):
    """One launch that writes the new tokens' K/V (heads after the queries in qkv) into the
    flat caches, in place. kv: as `_launch` takes it; returned updated, a tuple of the same
    arrays."""
    num_tokens = qkv.shape[0]
    num_kv_heads = kv[0].shape[1]
    rows = 16
    kernel = functools.partial(_write_kv_kernel, rows=rows, head_dim=head_dim,
                               new_kv_heads=(num_q_heads, num_q_heads + num_kv_heads),
                               page_size=page_size)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, rows), num_kv_heads),
        out_shape=tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in kv),
        input_output_aliases={2 + i: i for i in range(len(kv))},
        compiler_params=_compiler_params(COMBINE_CONFIG),
        interpret=interpret,
        name="ragged_paged_attention_write_kv",
    )(slot_mapping, qkv, *kv)


# --------------------------------------------------------------------------------------
# Tile tables (plain JAX, before the kernel).
# --------------------------------------------------------------------------------------

def _prefill_tiles(query_start_loc, kv_lens, min_q, q_tile, num_tiles):
    """Tiles of q_tile tokens of the sequences with more than min_q new tokens.

    The heaviest tiles (latest in each sequence, longest context) come first.
    """
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    num_seqs = q_lens.shape[0]
    big_lens = jnp.where(q_lens > min_q, q_lens, 0)
    per_seq = (big_lens + q_tile - 1) // q_tile
    tile_end = jnp.cumsum(per_seq)
    ids = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(tile_end, ids, side="right", method="compare_all"), num_seqs - 1)
    local = ids - (tile_end[seq] - per_seq[seq])
    valid = ids < tile_end[-1]
    ntok = jnp.where(valid, jnp.clip(big_lens[seq] - local * q_tile, 0, q_tile), 0)
    tok0 = query_start_loc[seq] + local * q_tile
    pos0 = kv_lens[seq] - q_lens[seq] + local * q_tile
    meta = jnp.stack([seq, tok0, ntok, pos0], axis=1).astype(jnp.int32)
    return meta[::-1]


# --------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------

def ragged_paged_attention_pallas(
    q, k_cache, v_cache, kv_lens, block_tables, query_start_loc,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    interpret: bool = False, num_kv_splits: int | None = None,
    decode_config: KernelConfig | None = None, prefill_config: KernelConfig | None = None,
    max_q_len: int | None = None, out_init=None, fused_combine: bool | None = None,
):
    """Ragged paged attention for a mixed batch of decodes and prefill chunks.

    num_kv_splits: context splits of decode tiles (flash-decoding); None picks from the
      batch size and the device's multiprocessor count.
    decode_config / prefill_config: override the Triton parameters (benchmarks, tuning);
      decode_config applies to split and unsplit decode launches alike.
    max_q_len: optional static promise that no sequence has more new tokens than this;
      when it fits a decode tile (e.g. 1 for a decode-only step) the prefill launch and
      its tile table are skipped. Without it a batch may mix anything.
    out_init: optional [T, Hq, D] buffer the output is written into; rows the kernel
      does not write (padding tokens) keep its values. Tests pass a NaN-filled buffer to
      catch rows the kernel failed to write.
    fused_combine: merge context splits inside the split launch (default FUSED_COMBINE)
      or in a second launch.
    """
    return _ragged_paged_attention(
        q, k_cache, v_cache, kv_lens, block_tables, query_start_loc, out_init, None,
        **_static_options(sm_scale, sliding_window, soft_cap, interpret, num_kv_splits,
                          decode_config, prefill_config, max_q_len, fused_combine))


def write_kv_and_attend_pallas(
    qkv, k_cache, v_cache, slot_mapping, kv_lens, block_tables, query_start_loc,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    interpret: bool = False, num_kv_splits: int | None = None,
    decode_config: KernelConfig | None = None, prefill_config: KernelConfig | None = None,
    max_q_len: int | None = None, out_init=None, fused_combine: bool | None = None,
):
    """Write the new tokens' K/V into their slots, then attend: (out, k_cache, v_cache).

    qkv [T, Hq + 2 Hkv, D]: every new token's query heads, then its K heads, then its V
    heads (the fused projection's layout). slot_mapping [T]: each token's cache slot
    (page * page_size + offset; num_pages * page_size for padding). When every sequence
    fits a decode tile (T or max_q_len small enough) the decode launch writes the rows
    itself; otherwise one small launch writes them first. The caches are updated in place
    when the caller donates them. Other options as `ragged_paged_attention_pallas`.
    """
    return _ragged_paged_attention(
        qkv, k_cache, v_cache, kv_lens, block_tables, query_start_loc, out_init,
        slot_mapping,
        **_static_options(sm_scale, sliding_window, soft_cap, interpret, num_kv_splits,
                          decode_config, prefill_config, max_q_len, fused_combine))


def _static_options(sm_scale, sliding_window, soft_cap, interpret, num_kv_splits,
                    decode_config, prefill_config, max_q_len, fused_combine) -> dict:
    return dict(
        sm_scale=float(sm_scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        soft_cap=None if soft_cap is None else float(soft_cap),
        interpret=bool(interpret), num_kv_splits=num_kv_splits,
        decode_config=decode_config, prefill_config=prefill_config,
        max_q_len=None if max_q_len is None else int(max_q_len),
        fused_combine=FUSED_COMBINE if fused_combine is None else bool(fused_combine))


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "interpret", "num_kv_splits",
    "decode_config", "prefill_config", "max_q_len", "fused_combine"))
def _ragged_paged_attention(q, k_cache, v_cache, kv_lens, block_tables, query_start_loc,
                            out_init, slot_mapping, *, sm_scale, sliding_window, soft_cap,
                            interpret, num_kv_splits, decode_config, prefill_config,
                            max_q_len, fused_combine):
    """Attention, or with slot_mapping the K/V write then attention (q is then qkv)."""
    num_tokens, num_heads, head_dim = q.shape
    (k_cache, k_scale), (v_cache, v_scale) = split_cache(k_cache), split_cache(v_cache)
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    write = slot_mapping is not None
    num_q_heads = num_heads - 2 * num_kv_heads if write else num_heads
    if num_q_heads <= 0:
        raise ValueError(f"qkv has {num_heads} heads: fewer than 2 x {num_kv_heads} KV heads "
                         "plus the query heads")
    num_seqs, max_pages = block_tables.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads=} is not a multiple of {num_kv_heads=}")
    group = num_q_heads // num_kv_heads
    op_dtype = k_cache.dtype if k_cache.dtype.itemsize > q.dtype.itemsize else q.dtype
    dec_cfg, pre_cfg = default_configs(op_dtype, head_dim, k_cache.dtype, k_scale is not None)
    split_cfg = decode_config or default_split_config(op_dtype, head_dim)
    dec_cfg = decode_config or dec_cfg
    pre_cfg = prefill_config or pre_cfg
    if num_kv_splits is None:
        # Interpret mode runs the programs one after the other: one per multiprocessor is
        # enough to exercise the splits there.
        num_kv_splits = auto_num_kv_splits(num_seqs, num_kv_heads, max_pages * page_size,
                                           split_cfg.block_n,
                                           programs_per_sm=1 if interpret else None)
    if num_kv_splits > 1:
        dec_cfg = split_cfg
    # A tile must hold all query heads of its KV head for at least one token.
    dec_cfg = dataclasses.replace(dec_cfg, block_m=max(dec_cfg.block_m, _pow2(group)))
    pre_cfg = dataclasses.replace(pre_cfg, block_m=max(pre_cfg.block_m, _pow2(group)))
    max_q_decode = dec_cfg.block_m // group
    q_tile = pre_cfg.block_m // group

    kv_lens = kv_lens.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)
    query_start_loc = query_start_loc.astype(jnp.int32)
    flat = (num_pages * page_size, num_kv_heads, head_dim)
    # The flat caches, then a ScaledCache's scales: what the launches read and write.
    kv = (k_cache.reshape(flat), v_cache.reshape(flat))
    if k_scale is not None:
        kv += (k_scale, v_scale)
    common = dict(group=group, head_dim=head_dim, page_size=page_size, sm_scale=sm_scale,
                  soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret)
    longest = num_tokens if max_q_len is None else min(num_tokens, max_q_len)
    has_prefill = longest > max_q_decode

    # The new K/V: written by the decode launch when it serves every sequence, else by
    # one small launch before any attention reads them.
    fused_write = None
    if write and has_prefill:
        kv = _write_kv(q, kv, slot_mapping.astype(jnp.int32), num_q_heads=num_q_heads,
                       head_dim=head_dim, page_size=page_size, interpret=interpret)
    elif write:
        fused_write = slot_mapping.astype(jnp.int32)

    # Decode tiles: one per sequence, at most max_q_decode new tokens.
    seq_args = (query_start_loc, kv_lens)
    decode = dict(decode_max_q=max_q_decode, slot_mapping=fused_write, cfg=dec_cfg, **common)
    if num_kv_splits > 1 and fused_combine:
        out, *cache = _launch(seq_args, q, kv, block_tables, out_init,
                              num_splits=num_kv_splits, out_mode="fused",
                              name="ragged_paged_attention_decode_split", **decode)
    elif num_kv_splits > 1:
        o_part, lse, *cache = _launch(seq_args, q, kv, block_tables, None,
                                      num_splits=num_kv_splits, out_mode="split",
                                      name="ragged_paged_attention_decode_split", **decode)
        out = _combine(query_start_loc, kv_lens, o_part, lse, q, out_init, group=group,
                       head_dim=head_dim, max_q=max_q_decode, block_n=dec_cfg.block_n,
                       sliding_window=sliding_window, interpret=interpret)
    else:
        out, *cache = _launch(seq_args, q, kv, block_tables, out_init,
                              num_splits=1, out_mode="out",
                              name="ragged_paged_attention_decode", **decode)
    if fused_write is not None:  # the launch's last outputs: the caches it wrote
        kv = tuple(cache[-len(kv):])

    # Prefill tiles: only if some sequence can have more new tokens than a decode tile.
    if has_prefill:
        max_big_seqs = min(num_seqs, num_tokens // (max_q_decode + 1))
        num_tiles = max(num_tokens // q_tile + max_big_seqs, 1)
        pre_meta = _prefill_tiles(query_start_loc, kv_lens, max_q_decode, q_tile, num_tiles)
        out = _launch((pre_meta,), q, kv, block_tables, out, cfg=pre_cfg,
                      num_splits=1, out_mode="out", name="ragged_paged_attention_prefill",
                      **common)[0]
    if write:
        k_cache, v_cache = (a.reshape(k_cache.shape) for a in kv[:2])
        if k_scale is not None:
            k_cache, v_cache = ScaledCache(k_cache, kv[2]), ScaledCache(v_cache, kv[3])
        return out, k_cache, v_cache
    return out
