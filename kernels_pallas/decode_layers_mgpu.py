"""Every decoder layer of a batch-1 decode step as ONE persistent Mosaic GPU kernel (Hopper).

Batch-1 decode streams each layer's weights once per token. XLA runs a layer as about 14
kernels, and each GEMM loses 2-3 us at its start and end while the weight stream stops; this
kernel never ends between GEMMs: one warpgroup per SM streams weight tiles without waiting for
anything, so the stream runs on through the steps that need all blocks to meet (norms,
attention). See docs/performance.md (the decode-layer kernel and the decode kernel).

Per layer l, x the residual stream (bf16, 8 rows: row 0 the sequence, rows 1-7 zero and staying
zero), the RMSNorm weights folded into the rows of W_qkv and W_gate_up, so that a norm is one
scale of the GEMM's sums, applied where they are read:
  phase 0: qkv = x @ Wqkv, q/k rotated (RoPE) where their sums are flushed; the new token's
           K/V row added (unscaled) into the cache at pos
  norm 0:  inv0 = rsqrt(mean(x[0]^2) + eps), by block 0's fourth warpgroup during phase 0
  attn:    items (KV head g, context split s of TC tokens): scores of its 4 query heads over
           the split's cache rows (the new row scaled by inv0 there), partial softmax results;
           then one block per query head merges the splits into a
  phase 1: x += a @ Wo
  norm 1:  inv1, during phase 2
  phase 2: gu = x @ Wgate_up
  phase 3: x += h @ Wdown, h = silu(inv1 gate) * (inv1 up) made tile by tile as it is read
Block 0's norm warpgroup also scales the new K/V rows in the cache once the items have read
them. q/k use the "halves" order of head dimensions (models/llama.py), where each 64-column
half of a head holds whole RoPE pairs.

GEMMs: each GEMM's (64-column unit, K step) tiles laid end to end, an equal run per block, the
partial sums added into the output by TMA (bf16); a grid barrier on global semaphores between
steps. Warpgroup 0 computes (wgmma, flushes, attention items, merges); 1 streams weight
tiles through `slots` buffers; 2 streams activation tiles after each step's barrier (for the
down projection it makes each h tile from a gate tile and an up tile, so that no SiLU step
and barrier stand between gate/up and down); 3 (block 0 only) computes the norms. The
semaphores persist from call to call: at the end every block counts in once more, then each
returns its share of the counters to zero.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

R, COLS, HD = 8, 64, 128   # rows of x, columns per weight unit, head size (= K step)
TC = 64                    # context tokens per attention item
Z_W = 256                  # columns per zeroing store
GROUP = 4                  # query heads per KV head
H_AHEAD = 4                # h tiles whose gate/up copies are in flight
# Registers per thread of each warpgroup (the consumer, the weight stream, the activation
# stream, the norms): 512 in all, the register file over 4 x 128 threads. At an even 128 the
# kernel spilled 196 bytes a thread and took 1.8% longer; the weight stream only issues
# copies (docs/performance.md, The decode kernel).
REGS = (240, 24, 128, 120)
EVEN_REGS = 512 // len(REGS)   # what each warpgroup has before it sets its own
assert sum(REGS) <= 512 and all(r % 8 == 0 and 24 <= r <= 256 for r in REGS)


def load_runtime() -> None:
    """Import Mosaic GPU's Python side, which tells its compiler where its runtime library is
    (MOSAIC_GPU_RUNTIME_LIB_PATH). Tracing the kernel imports it; a process that compiles the
    kernel's step from a module kept on disk, without tracing it, would otherwise fail to
    compile it ("Failed to lookup host symbol")."""
    import jax.experimental.mosaic.gpu  # noqa: F401


def unsupported_reason(cfg, dtype, block_size: int, num_sms: int) -> str | None:
    """Why this kernel cannot run a model's decode step (None when it can)."""
    if cfg.attention_bias or cfg.qk_norm or cfg.sliding_window:
        return "q/k/v bias, q/k norms and sliding windows are not in the kernel"
    if cfg.head_dim != HD or cfg.num_heads != GROUP * cfg.num_kv_heads:
        return f"needs head_dim {HD} and {GROUP} query heads per KV head"
    d, f = cfg.hidden_size, cfg.intermediate_size
    if d % Z_W or d // 64 > 64 or f % HD:
        return "hidden size must be a multiple of 256 up to 4096, intermediate of 128"
    if jnp.dtype(dtype) != jnp.bfloat16:
        return "bfloat16 only"
    if max_splits(cfg, num_sms) < 1 or cfg.num_heads > num_sms \
            or 2 * cfg.num_layers > num_sms:
        return f"too large for {num_sms} blocks"
    if block_size & (block_size - 1):
        return "block_size must be a power of two"
    return None


def max_splits(cfg, num_sms: int) -> int:
    """Context splits per KV head: one item per block, block 0 excepted."""
    return _splits(cfg.num_kv_heads, num_sms)


def _splits(num_kv_heads: int, num_sms: int) -> int:
    return min(16, (num_sms - 1) // num_kv_heads)


def max_context(cfg, num_sms: int) -> int:
    """The longest context (tokens, the new one included) the kernel attends over."""
    return max_splits(cfg, num_sms) * TC


def tile_weight(w):
    """[K, N] -> [N / 64, K, 64]: each 64-column unit one contiguous run."""
    k, n = w.shape
    return jnp.moveaxis(w.reshape(k, n // COLS, COLS), 1, 0)


@jax.jit
def prepare_weights(layers):
    """The kernel's weights from the model's layers (fused, "halves" q/k order): norm weights
    folded into the rows of wqkv and w_gate_up, every matrix tiled, stacked over layers.
    A second copy of the layer weights (the prefill keeps the first)."""
    def stack(fn):
        return jnp.stack([tile_weight(fn(layer)) for layer in layers])

    fold = lambda w, n: (w.astype(jnp.float32) * n.astype(jnp.float32)[:, None]).astype(w.dtype)
    return dict(wqkv=stack(lambda ly: fold(ly["wqkv"], ly["attn_norm"])),
                wo=stack(lambda ly: ly["wo"]),
                wgu=stack(lambda ly: fold(ly["w_gate_up"], ly["mlp_norm"])),
                wd=stack(lambda ly: ly["w_down"]))


def rope_rows(inv_freq, pos):
    """[2, 2, 32, 8] float32: cos and sin of pos times the frequencies of each half of a head
    (in the halves order: half 0 holds pairs 0-31, half 1 pairs 32-63), repeated over the 8
    rows of a flushed unit."""
    ang = (pos.astype(jnp.float32) * jnp.asarray(inv_freq)).reshape(2, 32)
    cs = jnp.stack([jnp.cos(ang), jnp.sin(ang)], 1)
    return jnp.broadcast_to(cs[:, :, :, None], (2, 2, 32, R))


def decode_layers(x_row, weights, kv_cache, block_table, pos, inv_freq, *, eps: float,
                  num_sms: int, slots: int = 8):
    """Runs every layer for one decode token.

    x_row [D] bf16 (the token's embedding); weights from prepare_weights; kv_cache (k, v),
    each [L, num_blocks, block_size, KVH, HD] (stacked over layers, so that the kernel reaches
    every layer's cache in one array), updated in place (the new row at pos); block_table [P]
    int32, the sequence's pages; pos int32 scalar, the token's position (its context is
    pos + 1 tokens, at most max_context). Returns (x [8, D] with row 0 the token's hidden
    state, rows 1-7 zero; kv_cache)."""
    new_ref = getattr(jax, "new_ref", None) or jax.ref.new_ref
    if len(kv_cache) != 2 or any(getattr(a, "ndim", None) != 5 for a in kv_cache):
        raise ValueError("decode_layers takes the cache as one (k, v) pair stacked over layers")
    refs = [new_ref(a) for a in kv_cache]
    x0 = jnp.zeros((R, x_row.shape[0]), jnp.bfloat16).at[0].set(x_row.astype(jnp.bfloat16))
    # pos and the pages in one new array: a kernel's inputs must be 256-byte aligned, which
    # slices of a larger buffer (as the runner's packed step arrays) need not be
    table = jnp.concatenate([jnp.reshape(pos, (1,)), block_table]).astype(jnp.int32)
    x = _call(x0, weights, refs, table, rope_rows(inv_freq, pos), eps=eps, num_sms=num_sms,
              slots=slots)
    return x, tuple(r[...] for r in refs)


def _call(x0, weights, cache_refs, table, rope_cs, *, eps, num_sms, slots):
    """table: [1 + P] int32, pos then the sequence's pages."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    wqkv, wo, wgu, wd = weights["wqkv"], weights["wo"], weights["wgu"], weights["wd"]
    L, D = wqkv.shape[0], wqkv.shape[2]
    NQKV, F = wqkv.shape[1] * COLS, wgu.shape[1] * COLS // 2
    KVH = NQKV // HD // (GROUP + 2)
    QH = GROUP * KVH
    # qkv stored as heads, with spare rows (zero) so that 64-row tiles fit; a multiple of 8
    QKV_ROWS = -(-(NQKV // HD + 64) // 8) * 8
    bs = cache_refs[0].shape[-3]
    B, S = num_sms, slots
    NS = _splits(KVH, B)           # context splits per KV head
    NI = KVH * NS                  # attention items, on blocks 1 .. NI
    ROWS = min(bs, TC)             # cache rows per TMA copy of an item
    PPI = TC // ROWS               # copies per item (pages, or one page's part)
    assert D // 64 <= 64 and QH <= B and D // Z_W < B and 2 * L <= B
    shapes = [(D, NQKV), (D, D), (D, 2 * F), (F, D)]
    ks = [k // HD for k, _ in shapes]
    tot = [(n // COLS) * kk for (_, n), kk in zip(shapes, ks)]
    per = [-(-t // B) for t in tot]
    # semaphores: 0 start; then per layer one per step in `kinds` and two for the norms
    # (counted by one block); then DONE and GO for the reset at the end
    Q_, ATT, CMB, O_, G_, DN = range(6)
    kinds = [Q_, ATT, CMB, O_, G_, DN]
    stride = len(kinds) + 2
    n_bar = 1 + stride * L
    DONE, GO = n_bar, n_bar + 1

    def sem(l, what):
        return 1 + stride * l + kinds.index(what)

    def nrm(l, which):  # which: 0 before q/k/v, 1 before gate/up
        return 1 + stride * l + len(kinds) + which

    def final_count(idx):  # what each counter holds once a call is done
        rel = lax.rem(jnp.maximum(idx - 1, 0), stride)
        return jnp.where((idx == 0) | (rel < len(kinds)), B, 1)

    done_count = 3 * B   # warpgroups 0, 2 and 3 of every block
    tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    zq, zg, za = QKV_ROWS, 2 * F // Z_W, D // Z_W   # zeroing stores per layer
    n_zero = L * (zq + zg + za)
    f32, bf16 = jnp.float32, jnp.bfloat16

    def body(*refs):
        x0_g, x0r_g, wqkv_g, wo_g, wgu_g, wd_g = refs[:6]
        k_cache, v_cache, tab_g, cs_g = refs[6:10]
        x_g, xr_g, qkv_g, gu_g, a_g, part_g, inv_g = refs[10:]
        b = lax.axis_index("b")
        wg = lax.axis_index("wg")
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((n_bar + 2,)))
        start = [b * pp for pp in per]
        n = [jnp.clip(t - s, 0, pp) for t, s, pp in zip(tot, start, per)]
        per_layer = n[0] + n[1] + n[2] + n[3]
        off = [0, n[0], n[0] + n[1], n[0] + n[1] + n[2]]
        w_src = [wqkv_g, wo_g, wgu_g, wd_g]
        pos = tab_g[0]
        page_of = lambda i: tab_g[1 + i]
        new_page, new_row = page_of(lax.div(pos, bs)), lax.rem(pos, bs)   # the new token's slot

        def layer_cache(l):
            """(k, v) of layer l, [num_blocks, block_size, KVH, HD]."""
            return k_cache.at[l], v_cache.at[l]

        def arrive(idx):
            plgpu.semaphore_signal(sems.at[idx], 1, memory_scope="gpu")

        def wait_all(idx, count=B):
            plgpu.semaphore_wait(sems.at[idx], count, decrement=False, memory_scope="gpu")

        def w_tile(p, l, i):
            f = start[p] + i
            unit, k = lax.div(f, ks[p]), lax.rem(f, ks[p])
            return w_src[p].at[l, unit, pl.ds(k * HD, HD), :]

        def inner(w_smem, a_smem, u_smem, out_smem, z_smem, zq_smem, xr0_smem,
                  att, nrm_bufs, c_smem, rs_smem, cs_smem, fx_smem, bars):
            (w_full, a_full, w_free, a_free, gu_full, xbar, kv_bars, q_bar, c_bars, nbar,
             fx_bar) = bars
            (k_smem, v_smem), q_smem, o_smem, ma_smem = att

            def claim(j, free):
                """The slot of this block's tile j (the S slots in turn), once the tile S
                before it has left it."""
                slot = lax.rem(j, S)

                @pl.when(j >= S)
                def _():
                    plgpu.barrier_wait(free.at[slot])

                return slot

            def stream(l, p, tile, bufs, full, free):
                # GEMM p's tiles of this block, in order, through the S slots of bufs
                base = l * per_layer + off[p]

                @pl.loop(0, n[p])
                def _(i):
                    slot = claim(base + i, free)
                    plgpu.copy_gmem_to_smem(tile(i), bufs.at[slot], full.at[slot])

            def set_registers(w):
                if REGS[w] != EVEN_REGS:
                    plgpu.set_max_registers(
                        REGS[w], action="increase" if REGS[w] > EVEN_REGS else "decrease")

            def _weights():
                set_registers(1)

                @pl.loop(0, L)
                def _(l):
                    for p in range(4):
                        stream(l, p, functools.partial(w_tile, p, l), w_smem, w_full, w_free)

            def _activations():
                set_registers(2)

                @pl.loop(0, L)
                def _(l):
                    for p in range(4):
                        dep = [jnp.where(l == 0, 0, sem(l - 1, DN)), sem(l, CMB), sem(l, O_),
                               sem(l, G_)][p]
                        wait_all(dep)
                        src = [x_g, a_g.at[l], x_g, gu_g.at[l]][p]

                        def a_tile(i, p=p, src=src, at=0):
                            k = lax.rem(start[p] + i, ks[p])
                            return src.at[:, pl.ds(at + k * HD, HD)]

                        if p < 3:
                            stream(l, p, a_tile, a_smem, a_full, a_free)
                        else:
                            h_stream(l, a_tile)

                arrive(DONE)

            def h_stream(l, gu_tile):
                """The down GEMM's activation tiles: h = silu(inv1 gate) * (inv1 up), made here
                tile by tile (tile k of h from gate's tile k and up's, copied H_AHEAD tiles
                ahead) and written over the gate tile in its slot."""
                p = 3
                base = l * per_layer + off[p]
                wait_all(nrm(l, 1), 1)
                inv1 = inv_g[l, 1, 0, 0]
                ld = lambda ref: plgpu.load(ref.T, (), layout=plgpu.Layout.WGMMA_TRANSPOSED)

                @pl.loop(0, n[p] + H_AHEAD)
                def _(i):
                    @pl.when(i >= H_AHEAD)
                    def _():
                        slot = lax.rem(base + i - H_AHEAD, S)
                        plgpu.barrier_wait(gu_full.at[slot])
                        # read and written as the transposes ([K, 8], the wgmma's operand)
                        g = ld(a_smem.at[slot]).astype(f32) * inv1
                        u = ld(u_smem.at[slot]).astype(f32) * inv1
                        a_smem.at[slot].T[...] = (g / (1.0 + jnp.exp(-g)) * u).astype(bf16)
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(a_full.at[slot])

                    @pl.when(i < n[p])
                    def _():
                        slot = claim(base + i, a_free)
                        plgpu.copy_gmem_to_smem(gu_tile(i), a_smem.at[slot], gu_full.at[slot])
                        plgpu.copy_gmem_to_smem(gu_tile(i, at=F), u_smem.at[slot],
                                                gu_full.at[slot])

            def _norms():
                set_registers(3)
                xr_smem, hi_smem, lo_smem, inv_smem = nrm_bufs

                @pl.when(b == 0)
                def _():
                    @pl.loop(0, L)
                    def _(l):
                        for which in (0, 1):
                            wait_all([jnp.where(l == 0, 0, sem(l - 1, DN)), sem(l, O_)][which])
                            compute_norm(l, which, xr_smem, hi_smem, lo_smem, inv_smem)
                            arrive(nrm(l, which))
                            if which == 0:
                                scale_new_rows(l)

                arrive(DONE)

            def compute_norm(l, which, xr_smem, hi_smem, lo_smem, inv_smem):
                # x[0] as 64 x 64 (xr): its Gram matrix's diagonal holds each 64-value chunk's
                # sum of squares; a wgmma with ones sums it (in two bf16 parts, high and low,
                # to keep float32's precision)
                plgpu.copy_gmem_to_smem(xr_g, xr_smem, nbar)
                plgpu.barrier_wait(nbar)

                def gram(acc):
                    plgpu.wgmma(acc, xr_smem, xr_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc[...]

                gm = pl.run_scoped(gram, plgpu.ACC((64, 64), f32))
                r = plgpu.broadcasted_iota(jnp.int32, (64, 64), 0, layout=plgpu.Layout.WGMMA)
                c = plgpu.broadcasted_iota(jnp.int32, (64, 64), 1, layout=plgpu.Layout.WGMMA)
                dg = jnp.where(r == c, gm, 0.0)
                hi = dg.astype(bf16)
                lo = (dg - hi.astype(f32)).astype(bf16)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                hi_smem[...] = hi
                lo_smem[...] = lo
                plgpu.commit_smem()
                ones = (r * 0 + 1).astype(bf16)

                def col_sums(acc):   # acc[m, n] = dg[n, n]
                    plgpu.wgmma(acc, ones, hi_smem)
                    plgpu.wgmma(acc, ones, lo_smem)
                    plgpu.wgmma_wait(0)
                    return acc[...]

                cs = pl.run_scoped(col_sums, plgpu.ACC((64, 64), f32))
                ssq = jnp.sum(cs, axis=1)
                inv = lax.rsqrt(lax.broadcast_in_dim(ssq, (64, 64), [0]) / D + eps)
                inv_smem[...] = inv
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(inv_smem.at[pl.ds(0, 8)], inv_g.at[l, which])
                plgpu.wait_smem_to_gmem(0)

            def scale_new_rows(l):
                # the new K/V rows were added unscaled; once the items have read them, scale
                # them in the cache by inv0
                wait_all(sem(l, ATT))

                for w, ref in enumerate(layer_cache(l)):
                    plgpu.copy_gmem_to_smem(ref.at[new_page, new_row], fx_smem.at[w],
                                            fx_bar.at[w])
                scale = inv_g[l, 0, 0, 0]
                for w in range(2):
                    plgpu.barrier_wait(fx_bar.at[w])
                    rows = plgpu.load(fx_smem.at[w], (), layout=plgpu.Layout.WG_STRIDED(
                        (KVH, HD), vec_size=2))
                    fx_smem.at[w][...] = (rows.astype(f32) * scale).astype(bf16)
                plgpu.commit_smem()

                for w, ref in enumerate(layer_cache(l)):
                    plgpu.copy_smem_to_gmem(fx_smem.at[w], ref.at[new_page, new_row])
                plgpu.wait_smem_to_gmem(0)

            def write_partial(o_smem, l, s, g, vals):
                for i, val in enumerate(vals):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    o_smem[...] = val
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, 8)], part_g.at[l, s, g, i])
                plgpu.wait_smem_to_gmem(0)

            # An item's cache pages are the same in every layer: looked up once.
            item = b - 1
            item_g, item_s = lax.div(item, NS), lax.rem(item, NS)
            n_pages = tab_g.shape[0] - 1
            item_copies = []
            for j in range(PPI):
                t0 = item_s * TC + j * ROWS
                page = page_of(jnp.clip(lax.div(t0, bs), 0, n_pages - 1))
                item_copies.append((page, lax.rem(t0, bs)))

            def attention_item(l):
                """Block 1 + i, i < NI: KV head g, split s, for the 4 query heads of g (rows
                4 (g % 2) .. + 3 of the 64-head q tile)."""
                g, s = item_g, item_s
                col = plgpu.broadcasted_iota(jnp.int32, (64, TC), 1, layout=plgpu.Layout.WGMMA)
                plgpu.copy_gmem_to_smem(qkv_g.at[l, 0, pl.ds(lax.div(g, 2) * 8, 64)], q_smem,
                                        q_bar)

                k_ref, v_ref = layer_cache(l)
                for j, (page, row) in enumerate(item_copies):
                    rows = pl.ds(j * ROWS, ROWS)
                    plgpu.copy_gmem_to_smem(k_ref.at[page, pl.ds(row, ROWS), g],
                                            k_smem.at[rows], kv_bars.at[j])
                    plgpu.copy_gmem_to_smem(v_ref.at[page, pl.ds(row, ROWS), g],
                                            v_smem.at[rows], kv_bars.at[PPI + j])
                wait_all(nrm(l, 0), 1)
                inv = inv_g[l, 0, 0, 0]
                plgpu.barrier_wait(q_bar)
                for j in range(PPI):
                    plgpu.barrier_wait(kv_bars.at[j])

                def scores(acc):
                    plgpu.wgmma(acc, q_smem, k_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc[...]

                # q and the new row unscaled: the new row's score takes inv once more
                sc = pl.run_scoped(scores, plgpu.ACC((64, TC), f32)) * (inv * HD ** -0.5)
                tok = col + s * TC
                sc = jnp.where(tok == pos, sc * inv, sc)
                sc = jnp.where(tok <= pos, sc, -1e30)
                for j in range(PPI):
                    plgpu.barrier_wait(kv_bars.at[PPI + j])
                m = jnp.max(sc, axis=1)
                pr = jnp.exp(sc - lax.broadcast_in_dim(m, sc.shape, [0]))
                lsum = jnp.sum(pr, axis=1)

                def pv(acc):   # and so does its v row
                    plgpu.wgmma(acc, jnp.where(tok == pos, pr * inv, pr).astype(bf16), v_smem)
                    plgpu.wgmma_wait(0)
                    return acc[...]

                o = pl.run_scoped(pv, plgpu.ACC((64, HD), f32))
                write_partial(o_smem, l, s, g, [o, lax.broadcast_in_dim(m, o.shape, [0]),
                                                lax.broadcast_in_dim(lsum, o.shape, [0])])

            def merge(l):
                """Block b < QH: query head b, its splits (those holding context) merged into
                a[l][0, head]."""
                g = lax.div(b, GROUP)
                j = lax.rem(g, 2) * GROUP + lax.rem(b, GROUP)   # its row in the item's output
                last = lax.div(pos, TC)
                # Every split's copy is asked for, those past the context from split 0, so
                # that all values are finite and the sums run in registers without branches
                # (a masked weight of zero leaves them out; split 0 is in the maximum anyway).
                for s in range(NS):
                    src = jnp.where(s <= last, s, 0)
                    plgpu.copy_gmem_to_smem(part_g.at[l, src, g, :, j], c_smem.at[s],
                                            c_bars.at[s])
                for s in range(NS):
                    plgpu.barrier_wait(c_bars.at[s])
                ms = [c_smem.at[s, 1][...] for s in range(NS)]
                top = functools.reduce(jnp.maximum, ms)
                num = den = None
                for s in range(NS):
                    w = jnp.exp(ms[s] - top) * jnp.where(s <= last, 1.0, 0.0)
                    o_s, l_s = w * c_smem.at[s, 0][...], w * c_smem.at[s, 2][...]
                    num = o_s if num is None else num + o_s
                    den = l_s if den is None else den + l_s
                ma_smem[...] = (num / den).astype(bf16)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(ma_smem, a_g.at[l, 0, pl.ds(b * HD, HD)])
                plgpu.wait_smem_to_gmem(0)

            def _consumer():
                set_registers(0)
                # Zero the add-into buffers (and a, and qkv's spare rows), copy x0 into x and
                # x0's row 0 into xr, then count in.
                z_smem[...] = jnp.zeros(z_smem.shape, z_smem.dtype)
                zq_smem[...] = jnp.zeros(zq_smem.shape, zq_smem.dtype)
                plgpu.commit_smem()

                @pl.loop(0, -(-n_zero // B))
                def _(t):
                    c = b + t * B

                    @pl.when(c < L * zq)
                    def _():
                        plgpu.copy_smem_to_gmem(zq_smem, qkv_g.at[lax.div(c, zq), :, lax.rem(c, zq)])

                    c2 = c - L * zq

                    @pl.when((c2 >= 0) & (c2 < L * zg))
                    def _():
                        plgpu.copy_smem_to_gmem(
                            z_smem, gu_g.at[lax.div(c2, zg), :, pl.ds(lax.rem(c2, zg) * Z_W, Z_W)])

                    c3 = c2 - L * zg

                    @pl.when((c3 >= 0) & (c3 < L * za))
                    def _():
                        plgpu.copy_smem_to_gmem(
                            z_smem, a_g.at[lax.div(c3, za), :, pl.ds(lax.rem(c3, za) * Z_W, Z_W)])

                # the new token's cache rows, which the q/k/v flushes add into: block 2i + w
                # zeroes layer i's K (w = 0) or V row
                for i in range(L):
                    for w in range(2):
                        @pl.when(b == 2 * i + w)
                        def _():
                            plgpu.copy_smem_to_gmem(zq_smem.at[pl.ds(0, KVH)],
                                                    layer_cache(i)[w].at[new_page, new_row])

                plgpu.wait_smem_to_gmem(0)

                @pl.when(b < D // Z_W)
                def _():
                    cols = pl.ds(b * Z_W, Z_W)
                    plgpu.copy_gmem_to_smem(x0_g.at[:, cols], z_smem, xbar)
                    plgpu.barrier_wait(xbar)
                    plgpu.copy_smem_to_gmem(z_smem, x_g.at[:, cols])
                    plgpu.wait_smem_to_gmem(0)

                @pl.when(b == D // Z_W)
                def _():
                    plgpu.copy_gmem_to_smem(x0r_g, xr0_smem, xbar)
                    plgpu.barrier_wait(xbar)
                    plgpu.copy_smem_to_gmem(xr0_smem, xr_g)
                    plgpu.wait_smem_to_gmem(0)

                plgpu.copy_gmem_to_smem(cs_g, cs_smem, xbar)
                plgpu.barrier_wait(xbar)
                arrive(0)

                def consume(acc):
                    @pl.loop(0, L)
                    def _(l):
                        for p in range(4):
                            consume_gemm(acc, l, p)
                            after_gemm(l, p)

                pl.run_scoped(consume, plgpu.ACC((COLS, R), f32))
                # Every block is past every barrier once all have counted in here (the other
                # warpgroups too): then each returns its share to zero.
                arrive(DONE)

                @pl.when(b == 0)
                def _():
                    plgpu.semaphore_wait(sems.at[DONE], done_count, memory_scope="gpu")
                    plgpu.semaphore_signal(sems.at[GO], B, memory_scope="gpu")

                plgpu.semaphore_wait(sems.at[GO], 1, memory_scope="gpu")

                @pl.loop(0, -(-n_bar // B))
                def _(t):
                    idx = b + t * B

                    @pl.when(idx < n_bar)
                    def _():
                        plgpu.semaphore_wait(sems.at[idx], final_count(idx), memory_scope="gpu")

            def consume_gemm(acc, l, p):
                base = l * per_layer + off[p]

                @pl.loop(0, n[p])
                def _(i):
                    j = base + i
                    slot = lax.rem(j, S)
                    plgpu.barrier_wait(w_full.at[slot])
                    plgpu.barrier_wait(a_full.at[slot])
                    plgpu.wgmma(acc, w_smem.at[slot].transpose((1, 0)),
                                a_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(a_free.at[slot])
                    plgpu.barrier_arrive(w_free.at[slot])
                    f = start[p] + i
                    unit, k = lax.div(f, ks[p]), lax.rem(f, ks[p])

                    @pl.when((k == ks[p] - 1) | (i == n[p] - 1))
                    def _():
                        v = acc[...]
                        acc[...] = plgpu.layout_cast(jnp.zeros_like(v), plgpu.Layout.WGMMA)
                        plgpu.wait_smem_to_gmem(0)  # out_smem free again
                        flush(l, p, unit, v)

            def flush(l, p, unit, v):
                """A unit's partial sums (v, [64 columns, 8 rows]) added into the output."""
                def plain_store(vt):
                    out_smem.T[...] = vt.astype(out_smem.dtype)
                    plgpu.commit_smem()
                    if p == 0:   # q/k/v stored as heads of 128
                        dst = qkv_g.at[l, :, lax.div(unit, 2), pl.ds(lax.rem(unit, 2) * COLS, COLS)]
                    else:
                        dst = [None, x_g, gu_g.at[l], x_g][p].at[:, pl.ds(unit * COLS, COLS)]
                    plgpu.copy_smem_to_gmem(out_smem, dst, reduction_op="add")
                    if p in (1, 3):   # row 0 into xr too
                        plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, 1)], xr_g.at[pl.ds(unit, 1)],
                                                reduction_op="add")
                    if p == 0:   # the new token's K/V row (unscaled) into the cache
                        for w in range(2):
                            lo = 2 * (QH + w * KVH)
                            hd = lax.div(unit, 2) - QH - w * KVH

                            def add_row(w=w, hd=hd):
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[pl.ds(0, 1)],
                                    layer_cache(l)[w].at[new_page, pl.ds(new_row, 1), hd,
                                                         pl.ds(lax.rem(unit, 2) * COLS, COLS)],
                                    reduction_op="add")

                            pl.when((unit >= lo) & (unit < lo + 2 * KVH))(add_row)

                def rotated_store(half):
                    # rows j and 32 + j of the unit are a RoPE pair; half static (a dynamic
                    # index left layout inference without a solution)
                    rs_smem[...] = v
                    plgpu.commit_smem()
                    strided = plgpu.Layout.WG_STRIDED((32, R), vec_size=2)

                    def ld(ref):
                        return plgpu.load(ref, (), layout=strided)

                    c = ld(cs_smem.at[half, 0])
                    sn = ld(cs_smem.at[half, 1])
                    x1 = ld(rs_smem.at[pl.ds(0, 32)])
                    x2 = ld(rs_smem.at[pl.ds(32, 32)])
                    rs_smem.at[pl.ds(0, 32)][...] = x1 * c - x2 * sn
                    rs_smem.at[pl.ds(32, 32)][...] = x2 * c + x1 * sn
                    plgpu.commit_smem()
                    vr = plgpu.load(rs_smem, (), layout=plgpu.Layout.WGMMA, optimized=False)
                    plain_store(plgpu.layout_cast(vr, plgpu.Layout.WGMMA_TRANSPOSED))

                vt = plgpu.layout_cast(v, plgpu.Layout.WGMMA_TRANSPOSED)
                if p == 0:
                    rotated = unit < 2 * (QH + KVH)   # q and k units
                    for half in (0, 1):
                        pl.when(rotated & (lax.rem(unit, 2) == half))(
                            functools.partial(rotated_store, half))
                    pl.when(jnp.logical_not(rotated))(lambda: plain_store(vt))
                else:
                    plain_store(vt)

            def after_gemm(l, p):
                plgpu.wait_smem_to_gmem(0)
                arrive(sem(l, [Q_, O_, G_, DN][p]))
                if p == 0:
                    wait_all(sem(l, Q_))

                    @pl.when((b >= 1) & (b <= NI) & (item_s * TC <= pos))
                    def _():
                        attention_item(l)

                    arrive(sem(l, ATT))
                    wait_all(sem(l, ATT))

                    @pl.when(b < QH)
                    def _():
                        merge(l)

                    arrive(sem(l, CMB))

            # the warpgroups' jobs (defined above, since pl.when traces its body at once)
            pl.when(wg == 1)(_weights)
            pl.when(wg == 2)(_activations)
            pl.when(wg == 3)(_norms)
            pl.when(wg == 0)(_consumer)

        # The attention items' buffers, the merge's, the norm's and those used only at the start
        # share memory: the norms run in block 0 only, which runs no attention item, once every
        # block is past the start, and never during a merge (the merges wait for all items,
        # which wait for the norm). An item writes o only once k, v and q are read. Block 0's
        # norm warpgroup scales the new K/V rows (fx) while block 0 merges: fx sits beside the
        # merge's buffers, past them.
        att_bufs = (plgpu.SMEM((TC, HD), bf16, transforms=tf),
                    plgpu.SMEM((TC, HD), bf16, transforms=tf),
                    plgpu.SMEM((64, HD), bf16, transforms=tf))
        norm_bufs = (plgpu.SMEM((64, 64), bf16, transforms=tf),
                     plgpu.SMEM((64, 64), bf16, transforms=tf),
                     plgpu.SMEM((64, 64), bf16, transforms=tf),
                     plgpu.SMEM((64, 64), f32))
        start_bufs = (plgpu.SMEM((R, Z_W), bf16), plgpu.SMEM((R, HD), bf16),
                      plgpu.SMEM((64, 64), bf16))
        merge_bufs = (plgpu.SMEM((NS, 3, HD), f32), plgpu.SMEM((HD,), bf16),
                      plgpu.SMEM((2, KVH, HD), bf16))
        shared = plgpu.RefUnion(att_bufs, plgpu.SMEM((64, HD), f32), norm_bufs, start_bufs,
                                merge_bufs)

        def with_scratch(w_smem, a_smem, u_smem, out_smem, shared_ref, rs_smem, cs_smem, *bars):
            ((k_ref, v_ref, q_ref), o_ref, nrm_refs, (z_smem, zq_smem, xr0_smem),
             (c_smem, ma_smem, fx_smem)) = shared_ref
            inner(w_smem, a_smem, u_smem, out_smem, z_smem, zq_smem, xr0_smem,
                  ((k_ref, v_ref), q_ref, o_ref, ma_smem), nrm_refs, c_smem, rs_smem,
                  cs_smem, fx_smem, bars)

        pl.run_scoped(
            with_scratch,
            plgpu.SMEM((S, HD, COLS), bf16, transforms=tf),
            plgpu.SMEM((S, R, HD), bf16, transforms=tf),
            plgpu.SMEM((S, R, HD), bf16, transforms=tf),   # the up tiles of the down GEMM
            plgpu.SMEM((R, COLS), bf16),
            shared,
            plgpu.SMEM((64, R), f32),
            plgpu.SMEM((2, 2, 32, R), f32),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_arrivals=2, num_barriers=S),   # a gate tile and an up tile
            plgpu.Barrier(),
            plgpu.Barrier(num_barriers=2 * PPI),
            plgpu.Barrier(),
            plgpu.Barrier(num_barriers=NS),
            plgpu.Barrier(),
            plgpu.Barrier(num_barriers=2),
            collective_axes="wg",
        )

    out_type = (jax.ShapeDtypeStruct((R, D), bf16),                 # x
                jax.ShapeDtypeStruct((64, 64), bf16),               # xr: x[0] as D/64 x 64
                jax.ShapeDtypeStruct((L, R, QKV_ROWS, HD), bf16),   # qkv
                jax.ShapeDtypeStruct((L, R, 2 * F), bf16),          # gu
                jax.ShapeDtypeStruct((L, R, D), bf16),              # a
                jax.ShapeDtypeStruct((L, NS, KVH, 3, 8, HD), f32),  # the items' partial results
                jax.ShapeDtypeStruct((L, 2, 8, 64), f32))           # inverse RMS, broadcast
    x0r = jnp.zeros((64, 64), bf16).at[:D // 64].set(x0[0].reshape(D // 64, 64))
    mesh = plgpu.Mesh(grid=(B,), grid_names=("b",), num_threads=len(REGS),
                      thread_name="wg")
    out = pl.kernel(body, out_type=out_type, mesh=mesh, name="decode_layers")(
        x0, x0r, wqkv, wo, wgu, wd, *cache_refs, table, rope_cs)
    return out[0]
