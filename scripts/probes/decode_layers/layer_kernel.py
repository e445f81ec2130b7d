"""The 32 decoder layers of a batch-1 decode step (Llama-3.1-8B shapes) as ONE persistent,
warp-specialised Mosaic GPU kernel (Hopper): the chain probe's kernel grown into whole layers,
RMSNorms, RoPE and the new token's K/V included, to measure what such a step's layers cost.

Per layer l, x the residual stream (bf16, 8 rows; row 0 the sequence, rows 1-7 zero and staying
zero), the RMSNorm weights folded into the rows of W_qkv and W_gu (so a norm is one scale per
row, applied where the GEMM's sum is read, not where it is computed):
  phase 0: qkv[l] = x @ Wqkv                           (unscaled; 48 heads x 128 of row 0)
  norm 0:  inv0 = rsqrt(mean(x[0]^2) + eps), by block 0's fourth warpgroup during phase 0
  attn:    row 0 attends to the cache's positions < pos and to itself. Items: each of 8 KV
           heads x (NS context splits of TC tokens + 1 for the new token); q is scaled by inv0
           and rotated by `rot` (RoPE at pos as a 128 x 128 matrix: q_rot = q @ rot); the new
           token's score needs no rotation (q and k turn by the same angle). Then one block per
           query head merges the NS + 1 partial results into a[l].
  phase 1: x += a[l] @ Wo
  norm 1:  inv1 = rsqrt(mean(x[0]^2) + eps), during phase 2
  phase 2: gu[l] = x @ Wgu                             (unscaled)
  silu:    h[l] = silu(inv1 gate) * (inv1 up)
  phase 3: x += h[l] @ Wd
The new K/V rows are left in qkv[l] (and inv0 in inv[l]) for the caller to rotate, scale and
write to the cache after the call, so the kernel needs no cache write.

The norm reads x[0] as 64 x 64 (xr, zero-padded below D / 64 rows, a copy of row 0 kept by adding the o and down sums into it
too): the Gram matrix xr xr^T by wgmma, its diagonal (each 64-value chunk's sum of squares)
masked out, summed by a wgmma with ones (in two bf16 parts, high and low, to keep float32's
precision), then summed along a row.

GEMMs, barriers and warpgroups as in the chain probe: each GEMM's (64-column unit, K step) tiles
laid end to end, an equal run per block, partial sums added into the output by TMA (bf16); a
grid barrier on global semaphores between steps. wg 0 computes (wgmma, flushes, attention items,
merges, the silu step); wg 1 streams weight tiles through S slots, never waiting for a barrier;
wg 2 streams activation tiles after each step's barrier; wg 3 (block 0 only) computes the norms.
The semaphores persist from call to call: at the end every block counts in once more, then each
returns its share of the counters to zero."""
import functools

import jax
import jax.numpy as jnp
from jax import lax

R, D, F, NQKV, COLS = 8, 4096, 14336, 6144, 64
HD, QH, KVH = 128, 32, 8          # head size, query heads, KV heads
QKV_ROWS = NQKV // HD + 64        # qkv stored as heads; 64 spare rows (zero) so 64-row tiles fit
SILU_W = 128                      # columns of h per block in the silu step
Z_W = 256                         # columns per zeroing store
TC = 64                           # context tokens per attention item
EPS = 1e-5
SHAPES = [(D, NQKV), (D, D), (D, 2 * F), (F, D)]  # (K, N) of the four GEMMs


def configure(d=4096, f=14336, qh=32, kvh=8):
    """Other model sizes (for lowering checks of smaller shapes)."""
    global D, F, NQKV, QH, KVH, QKV_ROWS, SHAPES
    D, F, QH, KVH = d, f, qh, kvh
    NQKV = (qh + 2 * kvh) * HD
    QKV_ROWS = NQKV // HD + 64
    SHAPES = [(D, NQKV), (D, D), (D, 2 * F), (F, D)]


def tile_weight(w, cols=COLS):
    """[..., K, N] -> [..., N / cols, K, cols]: each column unit one contiguous run."""
    *lead, k, n = w.shape
    return jnp.moveaxis(w.reshape(*lead, k, n // cols, cols), -2, -3)


def rope_rotation(pos, theta=500000.0):
    """RoPE (rotate-half form) at position pos as a matrix: rope(q) = q @ rot."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, HD, 2, dtype=jnp.float32) / HD)
    ang = pos.astype(jnp.float32) * inv_freq
    c, s = jnp.cos(ang), jnp.sin(ang)
    h = HD // 2
    i = jnp.arange(h)
    rot = jnp.zeros((HD, HD), jnp.float32)
    rot = rot.at[i, i].set(c).at[i + h, i].set(-s).at[i + h, i + h].set(c).at[i, i + h].set(s)
    return rot


def rope(v, pos, theta=500000.0):
    """v [..., HD] float32 rotated to position pos."""
    return v @ rope_rotation(pos, theta)


def rope_halves(pos, theta=500000.0):
    """[2, 2, 8, 32] float32: cos and sin of pos times the frequencies of each half of a head's
    first 64 dimensions, repeated over 8 rows (for RoPE where q/k/v's sums are flushed)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, HD, 2, dtype=jnp.float32) / HD)
    ang = (pos.astype(jnp.float32) * inv_freq).reshape(2, 32)
    cs = jnp.stack([jnp.cos(ang), jnp.sin(ang)], 1)
    return jnp.broadcast_to(cs[:, :, None], (2, 2, 8, 32))


def rope_rows(pos, theta=500000.0):
    """[2, 2, 32, 8] float32: rope_halves laid out as rows (rope=3)."""
    return jnp.swapaxes(rope_halves(pos, theta), -1, -2)


HEAD_PERM = jnp.concatenate([jnp.arange(32), jnp.arange(64, 96), jnp.arange(32, 64),
                             jnp.arange(96, 128)])   # its own inverse


def permute_qk_columns(w):
    """[..., K, NQKV] -> the same with each q and k head's columns in the order 0-31, 64-95,
    32-63, 96-127, so that each 64-column unit holds 32 RoPE pairs (flush-time RoPE)."""
    h = jnp.concatenate([jnp.arange(32), jnp.arange(64, 96), jnp.arange(32, 64),
                         jnp.arange(96, 128)])
    idx = jnp.concatenate([(jnp.arange(QH + KVH)[:, None] * HD + h).reshape(-1),
                           jnp.arange((QH + KVH) * HD, NQKV)])
    return w[..., idx]


def layer_kernel(x0, wqkv, wo, wgu, wd, kc, vc, rot, rope_cs, pos, *, context, blocks=132,
                 tk=128, slots=7, rope=1, norm=1, newtok=1, xr=1):
    """x0 [8, D] bf16; weights tiled ([L, N / 64, K, 64]); kc, vc [L, KVH, Tmax, HD] bf16, of
    which the first `context` positions (a multiple of TC) are read and those < pos attended;
    rot [HD, HD] bf16; rope_cs from rope_halves; pos [1] int32.
    rope=1: each attention item rotates q by rot (wqkv as stored; the caller rotates the new
    k); rope=3: as rope=2, but q and k stay in the permuted order of head dimensions (dot
    products do not change; the cache holds k in that order), the rotation done on the
    accumulator's rows in shared memory (rope_cs from rope_rows); rope=2: q and k rotated where their sums are flushed (wqkv's columns permuted by
    permute_qk_columns; qkv's k rows come out rotated): lowers with jax 0.10.2, but jax
    0.11.2's layout inference found no layouts for it. 7 slots is the most that fits beside
    rope=1's buffers (8 exceeds the 232,448 bytes of shared memory). Options that give wrong values, to see
    what a part costs: rope=0 (q not rotated), norm=0 (no norms: scale 1), newtok=0 (the new
    token not attended), xr=0 (xr not kept). newtok=2: the new token attended inside the last
    context split's item, as one more masked step, instead of in an item of its own.
    newtok=3 (with rope=3, pos < context): the q/k/v flushes add the new K/V rows, scaled by
    the norm (and k rotated), into the cache at pos, and the items attend to them as cache
    rows; the cache is aliased in and out, and nothing is left for the caller to write.
    newtok=4: as 3, but the flushes add the rows unscaled (no wait for the norm there), the
    items scale the new row's score and weight by the norm, and block 0's norm warpgroup
    scales the rows in the cache once the items are done.
    Returns (x, qkv, inv): x after L layers; qkv [L, 8, QKV_ROWS, HD] unscaled; inv
    [L, 2, 8, 64] float32 (inv[l, 0, 0, 0] scales row 0's q, k and v of layer l)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    assert tk == HD, "activation tiles of the attention output are read one head at a time"
    L = wqkv.shape[0]
    B, S = blocks, slots
    assert newtok < 3 or rope == 3, "newtok=3, 4 write k as rotated at the flush (rope=3)"
    in_cache = newtok in (3, 4)   # the new K/V rows written into the cache by the kernel
    T = context
    NS = T // TC
    NS1 = NS + 1 if newtok == 1 else NS    # parts per query head
    NI = KVH * NS1   # attention items, on blocks 1 .. NI (block 0 computes the norms)
    assert T % TC == 0 and NI + 1 <= B and QH <= B and F // SILU_W <= B and D // Z_W < B
    assert D % 64 == 0 and D // 64 <= 64 and QH % 4 == 0
    ks = [k // tk for k, _ in SHAPES]
    tot = [(n // COLS) * kk for (_, n), kk in zip(SHAPES, ks)]
    per = [-(-t // B) for t in tot]
    # semaphores: 0 start; then per layer one per step in `kinds` and two for the norms
    # (counted by one block); then DONE and GO for the reset at the end
    Q_, ATT, CMB, O_, G_, H_, DN = range(7)
    kinds = [Q_, ATT, CMB, O_, G_, H_, DN]
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
    zc = 2 * KVH if in_cache else 0                  # the new K/V rows of the cache
    n_zero = L * (zq + zg + za + zc)
    f32, bf16 = jnp.float32, jnp.bfloat16

    def body(x0_g, x0r_g, wqkv_g, wo_g, wgu_g, wd_g, kc_g, vc_g, rot_g, cs_g, pos_g,
             x_g, xr_g, qkv_g, gu_g, h_g, a_g, part_g, inv_g):
        b = lax.axis_index("b")
        wg = lax.axis_index("wg")
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((n_bar + 2,)))
        start = [b * pp for pp in per]
        n = [jnp.clip(t - s, 0, pp) for t, s, pp in zip(tot, start, per)]
        per_layer = n[0] + n[1] + n[2] + n[3]
        off = [0, n[0], n[0] + n[1], n[0] + n[1] + n[2]]
        w_src = [wqkv_g, wo_g, wgu_g, wd_g]

        def arrive(idx):
            plgpu.semaphore_signal(sems.at[idx], 1, memory_scope="gpu")

        def wait_all(idx, count=B):
            plgpu.semaphore_wait(sems.at[idx], count, decrement=False, memory_scope="gpu")

        def w_tile(p, l, i):
            f = start[p] + i
            unit, k = lax.div(f, ks[p]), lax.rem(f, ks[p])
            return w_src[p].at[l, unit, pl.ds(k * tk, tk), :]

        def inner(w_smem, a_smem, out_smem, z_smem, zq_smem, xr0_smem, g_smem, u_smem, h_smem,
                  att, nrm_bufs, c_smem, m_smem, rope_bufs, bars):
            rs_smem, oa_smem, ob_smem, cs_smem, kvs_smem = rope_bufs
            w_full, a_full, w_free, a_free, xbar, gbar, ubar, att_bars, nbar, fx_bars = bars
            fx_smem = kvs_smem

            @pl.when(wg == 1)
            def _weights():
                @pl.loop(0, L)
                def _(l):
                    for p in range(4):
                        base = l * per_layer + off[p]

                        @pl.loop(0, n[p])
                        def _(i):
                            j = base + i
                            slot = lax.rem(j, S)

                            @pl.when(j >= S)
                            def _():
                                plgpu.barrier_wait(w_free.at[slot])

                            plgpu.copy_gmem_to_smem(w_tile(p, l, i), w_smem.at[slot],
                                                    w_full.at[slot])

            @pl.when(wg == 2)
            def _activations():
                @pl.loop(0, L)
                def _(l):
                    for p in range(4):
                        base = l * per_layer + off[p]
                        dep = [jnp.where(l == 0, 0, sem(l - 1, DN)), sem(l, CMB), sem(l, O_),
                               sem(l, H_)][p]
                        wait_all(dep)

                        @pl.loop(0, n[p])
                        def _(i):
                            j = base + i
                            slot = lax.rem(j, S)

                            @pl.when(j >= S)
                            def _():
                                plgpu.barrier_wait(a_free.at[slot])

                            k = lax.rem(start[p] + i, ks[p])
                            src = [x_g, a_g.at[l], x_g, h_g.at[l]][p]
                            plgpu.copy_gmem_to_smem(src.at[:, pl.ds(k * tk, tk)],
                                                    a_smem.at[slot], a_full.at[slot])

                arrive(DONE)

            @pl.when(wg == 3)
            def _norms():
                xr_smem, hi_smem, lo_smem, inv_smem = nrm_bufs

                @pl.when(b == 0)
                def _():
                    @pl.loop(0, L)
                    def _(l):
                        for which in (0, 1):
                            wait_all([jnp.where(l == 0, 0, sem(l - 1, DN)), sem(l, O_)][which])
                            if norm:   # (norm=0: counted in without computing it)
                                plgpu.copy_gmem_to_smem(xr_g, xr_smem, nbar)
                                plgpu.barrier_wait(nbar)

                                def gram(acc):
                                    plgpu.wgmma(acc, xr_smem, xr_smem.transpose((1, 0)))
                                    plgpu.wgmma_wait(0)
                                    return acc[...]

                                gm = pl.run_scoped(gram, plgpu.ACC((64, 64), f32))
                                r = plgpu.broadcasted_iota(jnp.int32, (64, 64), 0,
                                                           layout=plgpu.Layout.WGMMA)
                                c = plgpu.broadcasted_iota(jnp.int32, (64, 64), 1,
                                                           layout=plgpu.Layout.WGMMA)
                                dg = jnp.where(r == c, gm, 0.0)   # each chunk's sum of squares
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
                                inv = lax.rsqrt(lax.broadcast_in_dim(ssq, (64, 64), [0]) / D + EPS)
                                inv_smem[...] = inv
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(inv_smem.at[pl.ds(0, 8)],
                                                        inv_g.at[l, which])
                                plgpu.wait_smem_to_gmem(0)
                            arrive(nrm(l, which))
                            if newtok == 4 and which == 0:
                                # scale the new K/V rows in the cache once the items have
                                # read them unscaled
                                wait_all(sem(l, ATT))
                                pos = pos_g[0]
                                for r in range(2 * KVH):
                                    plgpu.copy_gmem_to_smem(
                                        (kc_g, vc_g)[r // KVH].at[l, r % KVH, pl.ds(pos, 1)],
                                        fx_smem.at[pl.ds(r, 1)], fx_bars.at[r])
                                for r in range(2 * KVH):
                                    plgpu.barrier_wait(fx_bars.at[r])
                                rows = plgpu.load(fx_smem, (), layout=plgpu.Layout.WG_STRIDED(
                                    (2 * KVH, HD), vec_size=2))
                                fx_smem[...] = (rows.astype(f32) * inv_g[l, 0, 0, 0]).astype(bf16)
                                plgpu.commit_smem()
                                for r in range(2 * KVH):
                                    plgpu.copy_smem_to_gmem(
                                        fx_smem.at[pl.ds(r, 1)],
                                        (kc_g, vc_g)[r // KVH].at[l, r % KVH, pl.ds(pos, 1)])
                                plgpu.wait_smem_to_gmem(0)

                arrive(DONE)

            def write_partial(o_smem, l, s, g, vals):
                for i, val in enumerate(vals):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    o_smem[...] = val
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, 8)], part_g.at[l, s, g, i])
                plgpu.wait_smem_to_gmem(0)

            def attention_item(l):
                """Block 1 + i, i < NI: KV head g, split s (s == NS: the new token), for the 4
                query heads of g (rows 4 (g % 2) .. + 3 of the 64-head q tile). Every copy is
                asked for before the wait for the norm."""
                (k_smem, v_smem), (q_smem, rot_smem, nt_smem), o_smem = att
                ntb = att_bars.at[4 + 3 * NS1]
                i = b - 1
                g, s = lax.div(i, NS1), lax.rem(i, NS1)
                kb, vb, qb, rb = (att_bars.at[j] for j in range(4))
                col = plgpu.broadcasted_iota(jnp.int32, (64, TC), 1, layout=plgpu.Layout.WGMMA)

                def norm_scale():
                    if not norm:
                        return 1.0
                    wait_all(nrm(l, 0), 1)
                    return inv_g[l, 0, 0, 0]

                def softmax_pv(sc, pv_operand, v_ref, o_scale):
                    m = jnp.max(sc, axis=1)
                    pr = jnp.exp(sc - lax.broadcast_in_dim(m, sc.shape, [0]))
                    lsum = jnp.sum(pr, axis=1)

                    def pv(acc):
                        plgpu.wgmma(acc, pv_operand(pr).astype(bf16), v_ref)
                        plgpu.wgmma_wait(0)
                        return acc[...]

                    o = pl.run_scoped(pv, plgpu.ACC((64, HD), f32)) * o_scale
                    return [o, lax.broadcast_in_dim(m, o.shape, [0]),
                            lax.broadcast_in_dim(lsum, o.shape, [0])]

                def q_tile():
                    return qkv_g.at[l, 0, pl.ds(lax.div(g, 2) * 8, 64)]

                def cache_item(with_new):
                    plgpu.copy_gmem_to_smem(q_tile(), q_smem, qb)
                    if rope == 1:
                        plgpu.copy_gmem_to_smem(rot_g, rot_smem, rb)
                    plgpu.copy_gmem_to_smem(kc_g.at[l, g, pl.ds(s * TC, TC)], k_smem, kb)
                    plgpu.copy_gmem_to_smem(vc_g.at[l, g, pl.ds(s * TC, TC)], v_smem, vb)
                    if with_new:   # rows 0-7 the new k heads, 8-15 the new v heads, then zeros
                        plgpu.copy_gmem_to_smem(qkv_g.at[l, 0, pl.ds(QH, 64)], nt_smem, ntb)
                    pos = pos_g[0]
                    inv = norm_scale()
                    plgpu.barrier_wait(qb)
                    if rope == 1:
                        plgpu.barrier_wait(rb)

                        def rotate(acc):
                            plgpu.wgmma(acc, q_smem, rot_smem)
                            plgpu.wgmma_wait(0)
                            return acc[...]

                        qr = pl.run_scoped(rotate, plgpu.ACC((64, HD), f32)) * (inv * HD ** -0.5)
                        q_op, sc_scale = qr.astype(bf16), 1.0
                    else:
                        q_op, sc_scale = q_smem, inv * HD ** -0.5
                    plgpu.barrier_wait(kb)

                    def scores(acc):
                        plgpu.wgmma(acc, q_op, k_smem.transpose((1, 0)))
                        plgpu.wgmma_wait(0)
                        return acc[...]

                    sc = pl.run_scoped(scores, plgpu.ACC((64, TC), f32)) * sc_scale
                    # newtok=3: the new token's row (at pos) is already in the cache
                    if newtok == 4:   # the new row unscaled: its score takes inv once more
                        sc = jnp.where(col + s * TC == pos, sc * inv, sc)
                    sc = jnp.where((col + s * TC <= pos) if in_cache else (col + s * TC < pos),
                                   sc, -1e30)
                    plgpu.barrier_wait(vb)
                    if newtok == 4:   # and its v row too
                        vals = softmax_pv(
                            sc, lambda pr: jnp.where(col + s * TC == pos, pr * inv, pr),
                            v_smem, 1.0)
                    else:
                        vals = softmax_pv(sc, lambda pr: pr, v_smem, 1.0)
                    if with_new:
                        # the new token as one more masked step: its score (q and k as stored,
                        # which turn by the same angle) and its v row (a one-hot P @ V)
                        plgpu.barrier_wait(ntb)

                        def new_score(acc):
                            plgpu.wgmma(acc, q_smem, nt_smem.transpose((1, 0)))
                            plgpu.wgmma_wait(0)
                            return acc[...]

                        sn = pl.run_scoped(new_score, plgpu.ACC((64, TC), f32)) * (
                            inv * inv * HD ** -0.5)
                        mn = jnp.max(jnp.where(col == g, sn, -1e30), axis=1)

                        def new_v(acc):
                            plgpu.wgmma(acc, jnp.where(col == KVH + g, 1.0, 0.0).astype(bf16),
                                        nt_smem)
                            plgpu.wgmma_wait(0)
                            return acc[...]

                        vn = pl.run_scoped(new_v, plgpu.ACC((64, HD), f32)) * inv
                        o1, m1b, l1b = vals
                        m1 = jnp.max(sc, axis=1)
                        m = jnp.maximum(m1, mn)
                        a1 = lax.broadcast_in_dim(jnp.exp(m1 - m), o1.shape, [0])
                        an = lax.broadcast_in_dim(jnp.exp(mn - m), o1.shape, [0])
                        vals = [o1 * a1 + vn * an, lax.broadcast_in_dim(m, o1.shape, [0]),
                                l1b * a1 + an]
                    write_partial(o_smem, l, s, g, vals)

                if newtok == 2:   # the new token inside the last split's item
                    pl.when(s < NS - 1)(lambda: cache_item(False))
                    pl.when(s == NS - 1)(lambda: cache_item(True))
                else:
                    pl.when(s < NS)(lambda: cache_item(False))

                if newtok == 1:
                    @pl.when(s == NS)
                    def _new_token():
                        # rows 0-7 the new k heads, 8-15 the new v heads, then zeros
                        plgpu.copy_gmem_to_smem(q_tile(), q_smem, qb)
                        plgpu.copy_gmem_to_smem(qkv_g.at[l, 0, pl.ds(QH, 64)], k_smem, kb)
                        inv = norm_scale()
                        plgpu.barrier_wait(qb)
                        plgpu.barrier_wait(kb)

                        def scores(acc):
                            plgpu.wgmma(acc, q_smem, k_smem.transpose((1, 0)))
                            plgpu.wgmma_wait(0)
                            return acc[...]

                        sc = pl.run_scoped(scores, plgpu.ACC((64, TC), f32)) * (inv * inv * HD ** -0.5)
                        sc = jnp.where(col == g, sc, -1e30)
                        # P @ V with P one-hot on v head g's row
                        vals = softmax_pv(sc, lambda pr: jnp.where(col == KVH + g, 1.0, 0.0),
                                          k_smem, inv)
                        write_partial(o_smem, l, NS, g, vals)

            def merge(l):
                """Block b < QH: query head b, its NS1 parts merged into a[l][0, head]."""
                g = lax.div(b, QH // KVH)
                j = lax.rem(g, 2) * 4 + lax.rem(b, QH // KVH)   # its row in the item's output
                for s in range(NS1):
                    for i in range(3):
                        plgpu.copy_gmem_to_smem(part_g.at[l, s, g, i, j], c_smem.at[s, i],
                                                att_bars.at[4 + 3 * s + i])
                for s in range(NS1):
                    for i in range(3):
                        plgpu.barrier_wait(att_bars.at[4 + 3 * s + i])
                ms = [c_smem.at[s, 1][...] for s in range(NS1)]
                top = ms[0]
                for v in ms[1:]:
                    top = jnp.maximum(top, v)
                num = den = None
                for s in range(NS1):
                    w = jnp.exp(ms[s] - top)
                    o_s, l_s = c_smem.at[s, 0][...], c_smem.at[s, 2][...]
                    num = w * o_s if num is None else num + w * o_s
                    den = w * l_s if den is None else den + w * l_s
                m_smem[...] = (num / den).astype(m_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(m_smem, a_g.at[l, 0, pl.ds(b * HD, HD)])
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 0)
            def _consumer():
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

                    if in_cache:   # the cache rows at pos, which the q/k/v flushes add into
                        c4 = c3 - L * za
                        lz, rz = lax.div(c4, zc), lax.rem(c4, zc)
                        for which, cache_g in enumerate((kc_g, vc_g)):
                            @pl.when((c4 >= 0) & (c4 < L * zc) & (lax.div(rz, KVH) == which))
                            def _():
                                plgpu.copy_smem_to_gmem(
                                    zq_smem.at[pl.ds(0, 1)],
                                    cache_g.at[lz, lax.rem(rz, KVH), pl.ds(pos_g[0], 1)])

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

                if rope in (2, 3):
                    plgpu.copy_gmem_to_smem(cs_g, cs_smem, xbar)
                    plgpu.barrier_wait(xbar)

                arrive(0)

                def consume(acc):
                    @pl.loop(0, L)
                    def _(l):
                        for p in range(4):
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
                                    acc[...] = plgpu.layout_cast(jnp.zeros_like(v),
                                                                 plgpu.Layout.WGMMA)
                                    plgpu.wait_smem_to_gmem(0)  # out_smem free again
                                    vt = plgpu.layout_cast(v, plgpu.Layout.WGMMA_TRANSPOSED)
                                    flush_rope = p == 0 and rope in (2, 3)
                                    rotated = (unit < 2 * (QH + KVH)) if flush_rope else None

                                    def rotated_store():
                                        # the unit's 32 RoPE pairs: columns j and 32 + j
                                        rs_smem.T[...] = vt
                                        plgpu.commit_smem()
                                        half = lax.rem(unit, 2)
                                        c = cs_smem.at[half, 0][...]
                                        sn = cs_smem.at[half, 1][...]
                                        x1 = rs_smem.at[:, pl.ds(0, 32)][...]
                                        x2 = rs_smem.at[:, pl.ds(32, 32)][...]
                                        oa_smem[...] = (x1 * c - x2 * sn).astype(bf16)
                                        ob_smem[...] = (x2 * c + x1 * sn).astype(bf16)
                                        plgpu.commit_smem()
                                        head = qkv_g.at[l, :, lax.div(unit, 2)]
                                        plgpu.copy_smem_to_gmem(
                                            oa_smem, head.at[:, pl.ds(half * 32, 32)],
                                            reduction_op="add")
                                        plgpu.copy_smem_to_gmem(
                                            ob_smem, head.at[:, pl.ds(64 + half * 32, 32)],
                                            reduction_op="add")

                                    def cache_store(vt, which):
                                        # newtok=3: row 0 of a k or v unit, scaled by the
                                        # norm, added into the cache row at pos
                                        wait_all(nrm(l, 0), 1)
                                        kvs_smem.T[...] = (vt * inv_g[l, 0, 0, 0]).astype(bf16)
                                        plgpu.commit_smem()
                                        hd = lax.div(unit, 2) - QH - which * KVH
                                        plgpu.copy_smem_to_gmem(
                                            kvs_smem.at[pl.ds(0, 1)],
                                            (kc_g, vc_g)[which].at[
                                                l, hd, pl.ds(pos_g[0], 1),
                                                pl.ds(lax.rem(unit, 2) * COLS, COLS)],
                                            reduction_op="add")

                                    def plain_store(vt=vt):
                                        if p == 0 and newtok == 3:
                                            for which in (0, 1):
                                                lo = 2 * (QH + which * KVH)
                                                pl.when((unit >= lo) & (unit < lo + 2 * KVH))(
                                                    functools.partial(cache_store, vt, which))
                                        out_smem.T[...] = vt.astype(out_smem.dtype)
                                        plgpu.commit_smem()
                                        if p == 0 and newtok == 4:   # row 0, unscaled
                                            for which in (0, 1):
                                                lo = 2 * (QH + which * KVH)
                                                hd = lax.div(unit, 2) - QH - which * KVH

                                                @pl.when((unit >= lo) & (unit < lo + 2 * KVH))
                                                def _(which=which, hd=hd):
                                                    plgpu.copy_smem_to_gmem(
                                                        out_smem.at[pl.ds(0, 1)],
                                                        (kc_g, vc_g)[which].at[
                                                            l, hd, pl.ds(pos_g[0], 1),
                                                            pl.ds(lax.rem(unit, 2) * COLS, COLS)],
                                                        reduction_op="add")
                                        if p == 0:   # q/k/v stored as heads of 128
                                            dst = qkv_g.at[l, :, lax.div(unit, 2),
                                                           pl.ds(lax.rem(unit, 2) * COLS, COLS)]
                                        else:
                                            dst = [None, x_g, gu_g.at[l], x_g][p].at[
                                                :, pl.ds(unit * COLS, COLS)]
                                        plgpu.copy_smem_to_gmem(out_smem, dst,
                                                                reduction_op="add")
                                        if xr and p in (1, 3):   # row 0 into xr too
                                            plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, 1)],
                                                                    xr_g.at[pl.ds(unit, 1)],
                                                                    reduction_op="add")

                                    def rotated_rows_store(half):
                                        # rows j and 32 + j of the unit are a RoPE pair; half
                                        # static (a dynamic index left layout inference
                                        # without a solution)
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
                                        vr = plgpu.load(rs_smem, (), layout=plgpu.Layout.WGMMA,
                                                        optimized=False)
                                        plain_store(plgpu.layout_cast(
                                            vr, plgpu.Layout.WGMMA_TRANSPOSED))

                                    if flush_rope and rope == 3:
                                        for half in (0, 1):
                                            pl.when(rotated & (lax.rem(unit, 2) == half))(
                                                functools.partial(rotated_rows_store, half))
                                        pl.when(jnp.logical_not(rotated))(plain_store)
                                    elif flush_rope:
                                        pl.when(rotated)(rotated_store)
                                        pl.when(jnp.logical_not(rotated))(plain_store)
                                    else:
                                        plain_store()

                            plgpu.wait_smem_to_gmem(0)
                            arrive(sem(l, [Q_, O_, G_, DN][p]))
                            if p == 0:
                                wait_all(sem(l, Q_))

                                @pl.when((b >= 1) & (b <= NI))
                                def _():
                                    attention_item(l)

                                arrive(sem(l, ATT))
                                wait_all(sem(l, ATT))

                                @pl.when(b < QH)
                                def _():
                                    merge(l)

                                arrive(sem(l, CMB))
                            if p == 2:
                                # h[l] = silu(inv1 gate) * (inv1 up), SILU_W columns per block
                                wait_all(sem(l, G_))

                                @pl.when(b < F // SILU_W)
                                def _():
                                    cols = pl.ds(b * SILU_W, SILU_W)
                                    plgpu.copy_gmem_to_smem(gu_g.at[l, :, cols], g_smem, gbar)
                                    plgpu.copy_gmem_to_smem(
                                        gu_g.at[l, :, pl.ds(F + b * SILU_W, SILU_W)], u_smem, ubar)
                                    inv1 = 1.0
                                    if norm:
                                        wait_all(nrm(l, 1), 1)
                                        inv1 = inv_g[l, 1, 0, 0]
                                    plgpu.barrier_wait(gbar)
                                    plgpu.barrier_wait(ubar)
                                    g = g_smem[...].astype(f32) * inv1
                                    u = u_smem[...].astype(f32) * inv1
                                    h_smem[...] = (g / (1.0 + jnp.exp(-g)) * u).astype(h_smem.dtype)
                                    plgpu.commit_smem()
                                    plgpu.copy_smem_to_gmem(h_smem, h_g.at[l, :, cols])
                                    plgpu.wait_smem_to_gmem(0)

                                arrive(sem(l, H_))

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

        # The attention items' buffers, the merge's, the norm's and those used only at the start
        # share memory: the norms run in block 0 only, which runs no attention item, once every
        # block is past the start, and never during a merge (the merges wait for all items,
        # which wait for the norm). An item writes o only once k, v, q and rot are read.
        att_bufs = (plgpu.SMEM((TC, HD), bf16, transforms=tf),
                    plgpu.SMEM((TC, HD), bf16, transforms=tf),
                    plgpu.SMEM((64, HD), bf16, transforms=tf),
                    plgpu.SMEM((HD, HD) if rope == 1 else (8, 64), bf16, transforms=tf),
                    plgpu.SMEM((64, HD) if newtok == 2 else (8, 64), bf16, transforms=tf))
        norm_bufs = (plgpu.SMEM((64, 64), bf16, transforms=tf),
                     plgpu.SMEM((64, 64), bf16, transforms=tf),
                     plgpu.SMEM((64, 64), bf16, transforms=tf),
                     plgpu.SMEM((64, 64), f32))
        start_bufs = (plgpu.SMEM((R, Z_W), bf16), plgpu.SMEM((R, HD), bf16),
                      plgpu.SMEM((64, 64), bf16))
        merge_bufs = (plgpu.SMEM((NS1, 3, HD), f32), plgpu.SMEM((HD,), bf16))
        shared = plgpu.RefUnion(att_bufs, plgpu.SMEM((64, HD), f32), norm_bufs, start_bufs,
                                merge_bufs)

        def with_scratch(w_smem, a_smem, out_smem, g_smem, u_smem, h_smem, shared_ref,
                         rs_smem, oa_smem, ob_smem, cs_smem, kvs_smem, *bars):
            ((k_ref, v_ref, q_ref, rot_ref, nt_ref), o_ref, nrm_refs, (z_smem, zq_smem, xr0_smem),
             (c_smem, m_smem)) = shared_ref
            inner(w_smem, a_smem, out_smem, z_smem, zq_smem, xr0_smem, g_smem, u_smem, h_smem,
                  ((k_ref, v_ref), (q_ref, rot_ref, nt_ref), o_ref), nrm_refs, c_smem, m_smem,
                  (rs_smem, oa_smem, ob_smem, cs_smem, kvs_smem), bars)

        pl.run_scoped(
            with_scratch,
            plgpu.SMEM((S, tk, COLS), bf16, transforms=tf),
            plgpu.SMEM((S, R, tk), bf16, transforms=tf),
            plgpu.SMEM((R, COLS), bf16),
            plgpu.SMEM((R, SILU_W), bf16),
            plgpu.SMEM((R, SILU_W), bf16),
            plgpu.SMEM((R, SILU_W), bf16),
            shared,
            *([plgpu.SMEM((R, 64), f32), plgpu.SMEM((R, 32), bf16), plgpu.SMEM((R, 32), bf16),
               plgpu.SMEM((2, 2, R, 32), f32)] if rope == 2 else
              [plgpu.SMEM((64, R), f32), plgpu.SMEM((8,), bf16), plgpu.SMEM((8,), bf16),
               plgpu.SMEM((2, 2, 32, R), f32)] if rope == 3 else [plgpu.SMEM((8,), f32)] * 4),
            plgpu.SMEM({3: (R, COLS), 4: (2 * KVH, HD)}.get(newtok, (8,)), bf16),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(),
            plgpu.Barrier(),
            plgpu.Barrier(),
            plgpu.Barrier(num_barriers=5 + 3 * NS1),
            plgpu.Barrier(),
            plgpu.Barrier(num_barriers=2 * KVH),
            collective_axes="wg",
        )

    out_type = (jax.ShapeDtypeStruct((R, D), bf16),                 # x
                jax.ShapeDtypeStruct((64, 64), bf16),               # xr: x[0] as D/64 x 64
                jax.ShapeDtypeStruct((L, R, QKV_ROWS, HD), bf16),   # qkv
                jax.ShapeDtypeStruct((L, R, 2 * F), bf16),          # gu
                jax.ShapeDtypeStruct((L, R, F), bf16),              # h
                jax.ShapeDtypeStruct((L, R, D), bf16),              # a
                jax.ShapeDtypeStruct((L, NS1, KVH, 3, 8, HD), f32),
                jax.ShapeDtypeStruct((L, 2, 8, 64), f32))           # inverse RMS, broadcast
    x0r = jnp.zeros((64, 64), bf16).at[:D // 64].set(x0[0].reshape(D // 64, 64))
    if in_cache:
        # the kernel writes the new K/V rows into the cache itself: the cache goes in as
        # mutable refs, which the call aliases in and out
        new_ref = getattr(jax, "new_ref", None) or jax.ref.new_ref
        kc_ref, vc_ref = new_ref(kc), new_ref(vc)
        mesh = plgpu.Mesh(grid=(B,), grid_names=("b",), num_threads=4, thread_name="wg")
        out = pl.kernel(body, out_type=out_type, mesh=mesh)(
            x0, x0r, wqkv, wo, wgu, wd, kc_ref, vc_ref, rot, rope_cs, pos)
        return out[0], out[2], out[7], kc_ref[...], vc_ref[...]
    out = plgpu.kernel(body, out_type=out_type, grid=(B,), grid_names=("b",), num_threads=4,
                       thread_name="wg")(
        x0, x0r, wqkv, wo, wgu, wd, kc, vc, rot, rope_cs, pos)
    return out[0], out[2], out[7]


def decode_layers_kernel(x0, wqkv, wo, wgu, wd, kc, vc, pos, **kw):
    """The layers by the kernel (keyword `context` and the rest passed on), then the new K/V
    rows rotated, scaled and written to the cache at pos (kc, vc [L, KVH, Tmax, HD]).
    Returns (x, kc, vc)."""
    rot = rope_rotation(pos[0]).astype(jnp.bfloat16)
    cs = rope_rows(pos[0]) if kw.get("rope") == 3 else rope_halves(pos[0])
    if kw.get("newtok") in (3, 4):   # the kernel writes the new rows itself
        x, _, _, kc, vc = layer_kernel(x0, wqkv, wo, wgu, wd, kc, vc, rot, cs, pos, **kw)
        return x, kc, vc
    x, qkv, inv = layer_kernel(x0, wqkv, wo, wgu, wd, kc, vc, rot, cs, pos, **kw)
    s = inv[:, 0, 0, 0][:, None, None]
    k_new = qkv[:, 0, QH:QH + KVH].astype(jnp.float32) * s
    if kw.get("rope", 1) not in (2, 3):
        k_new = rope(k_new, pos[0])
    v_new = qkv[:, 0, QH + KVH:QH + 2 * KVH].astype(jnp.float32) * s
    kc = lax.dynamic_update_slice_in_dim(kc, k_new[:, :, None].astype(kc.dtype), pos[0], 2)
    vc = lax.dynamic_update_slice_in_dim(vc, v_new[:, :, None].astype(vc.dtype), pos[0], 2)
    return x, kc, vc


def decode_layers_xla(x, wqkv, wo, wgu, wd, kc, vc, pos, context):
    """The same layers as XLA's kernels; weights as stored ([K, N] per layer, norm weights
    folded in); attention over the cache's first `context` positions (masked below pos) and
    the new token. Returns (x, kc, vc) with the new K/V rows written at pos."""
    f32 = jnp.float32
    p = pos[0]
    k_rows, v_rows = [], []

    def inv_rms(x):
        return lax.rsqrt(jnp.mean(jnp.square(x.astype(f32)), -1, keepdims=True) + EPS)

    for l in range(len(wqkv)):
        qkv = jnp.dot(x, wqkv[l], preferred_element_type=f32) * inv_rms(x)
        q = rope(qkv[0, :D].reshape(QH, HD), p)
        k = rope(qkv[0, D:D + KVH * HD].reshape(KVH, HD), p)
        v = qkv[0, D + KVH * HD:].reshape(KVH, HD)
        k_rows.append(k)
        v_rows.append(v)
        kk = jnp.concatenate([kc[l, :, :context].astype(f32), k[:, None]], 1)
        vv = jnp.concatenate([vc[l, :, :context].astype(f32), v[:, None]], 1)
        valid = jnp.concatenate([jnp.arange(context) < p, jnp.ones(1, bool)])
        s = jnp.einsum("gqd,gtd->gqt", q.reshape(KVH, QH // KVH, HD), kk) * HD ** -0.5
        s = jnp.where(valid, s, -jnp.inf)
        o = jnp.einsum("gqt,gtd->gqd", jax.nn.softmax(s, axis=-1), vv).reshape(1, D)
        a = jnp.concatenate([o, jnp.zeros((R - 1, D), f32)]).astype(x.dtype)
        x = (x.astype(f32) + jnp.dot(a, wo[l], preferred_element_type=f32)).astype(x.dtype)
        gu = jnp.dot(x, wgu[l], preferred_element_type=f32) * inv_rms(x)
        h = (jax.nn.silu(gu[:, :F]) * gu[:, F:]).astype(x.dtype)
        x = (x.astype(f32) + jnp.dot(h, wd[l], preferred_element_type=f32)).astype(x.dtype)
    k_new = jnp.stack(k_rows)[:, :, None].astype(kc.dtype)
    v_new = jnp.stack(v_rows)[:, :, None].astype(vc.dtype)
    kc = lax.dynamic_update_slice_in_dim(kc, k_new, p, 2)
    vc = lax.dynamic_update_slice_in_dim(vc, v_new, p, 2)
    return x, kc, vc
