"""A chain of decoder layers at 8 rows as ONE persistent, warp-specialised Mosaic GPU kernel
(Hopper), to measure whether a kernel that never ends between GEMMs keeps the weight stream
going across the dependencies between them, and what batch-1 attention costs inside it.

Per layer l, with x the residual stream (bf16, 8 x 4096):
  phase 0: qkv[l] = x @ Wqkv                      (4096 -> 6144, stored as 48 heads x 128)
  attn (when attn > 0), row 0 only, as one decode sequence with a context of `attn` tokens:
           each of 8 KV heads x NS splits is one block's item (scores, softmax, P @ V for the
           4 query heads of the group); then one block per query head merges the splits into
           a[l] (8 x 4096, rows 1-7 zero)
  phase 1: x += a[l] @ Wo   (a[l] = qkv[l][:, :4096] without attention)
  phase 2: gu[l] = x @ Wgu                         (4096 -> 2 x 14336)
  silu:    h[l] = silu(gu[l][:, :F]) * gu[l][:, F:]
  phase 3: x += h[l] @ Wd                          (14336 -> 4096)
No norms and no RoPE; the new token's K/V rows are not written (the context is given).

Each GEMM's (64-column unit, K step) tiles are laid end to end and block b takes an equal run
of them. Its accumulator is flushed at the end of a unit or of its run, by a TMA store that
ADDS into the output (bf16): split units sum there, and the o and down projections add
straight into x. Between steps a grid barrier on global semaphores: every block counts in
once its stores are done.

Three warpgroups per block:
  wg 0 computes: waits for a tile's weights and activations, wgmma, flushes, counts in; and
       runs the attention items, their merge and the silu step;
  wg 1 streams weight tiles through S slots, never waiting for a barrier (weights depend on
       nothing), so the next phase's first S tiles arrive while a barrier is pending;
  wg 2 streams activation tiles, waiting for the phase's barrier first.

mode: "full"; "stream" (weights only, no compute: the ceiling); "nobar" (barrier waits
skipped: wrong values, timing only). silu=False: the down projection waits for the gate/up
barrier only and h is never written (wrong values, timing only).

The semaphores persist from call to call: at the end every block counts in once more, and
then each returns its share of the counters to zero."""
import jax
import jax.numpy as jnp
from jax import lax

R, D, F, NQKV, COLS = 8, 4096, 14336, 6144, 64
HD, QH, KVH = 128, 32, 8          # head size, query heads, KV heads
QKV_ROWS = NQKV // HD + 64        # qkv stored as heads; 64 spare rows so a 64-head q tile fits
SILU_W = 128                      # columns of h per block in the silu step
Z_W = 256                         # columns per zeroing store
TC = 64                           # context tokens per attention item


def tile_weight(w, cols=COLS):
    """[..., K, N] -> [..., N / cols, K, cols]: each column unit one contiguous run."""
    *lead, k, n = w.shape
    return jnp.moveaxis(w.reshape(*lead, k, n // cols, cols), -2, -3)


SHAPES = [(D, NQKV), (D, D), (D, 2 * F), (F, D)]  # (K, N) of the four GEMMs


def chain_kernel(x0, wqkv, wo, wgu, wd, kc=None, vc=None, *, blocks=132, tk=128, slots=6,
                 mode="full", silu=True, fine=False, alias=False, norm=False):
    """x0 [8, D] bf16; weights tiled ([L, N / 64, K, 64]); kc, vc [L, KVH, T, HD] bf16 or None
    (no attention). Returns x after L layers."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    assert tk == HD, "activation tiles of q/k/v are read one head at a time"
    L = wqkv.shape[0]
    B, S = blocks, slots
    attn = kc is not None
    T = kc.shape[2] if attn else 0
    NS = T // TC
    assert not attn or (T % TC == 0 and KVH * NS <= B and QH <= B)
    ks = [k // tk for k, _ in SHAPES]
    tot = [(n // COLS) * kk for (_, n), kk in zip(SHAPES, ks)]
    per = [-(-t // B) for t in tot]
    # semaphores: 0 start; then per layer one per step in `kinds`; then DONE and GO for the
    # reset at the end
    Q_, ATT, CMB, O_, G_, H_, DN = range(7)
    # fine: instead of the two grid barriers after the attention items and the merge, each
    # item counts in for its KV group (the merge of a head waits for its group's NS items),
    # and each merge raises a flag for its head (an o tile waits for the flag of its head).
    kinds = [Q_, O_, G_, H_, DN] if not attn or fine else [Q_, ATT, CMB, O_, G_, H_, DN]
    n_fine = KVH + QH if attn and fine else 0
    # norm: RMSNorm before q/k/v and gate/up, its weight taken as folded into the GEMM's
    # rows: a fourth warpgroup in blocks 0-7 computes one row's inverse RMS once x is final
    # and counts in (NRM); every block scales its partial sums by it when it flushes them.
    n_norm = 2 if norm else 0
    stride = len(kinds) + n_fine + n_norm
    n_bar = 1 + stride * L
    DONE, GO = n_bar, n_bar + 1

    def sem(l, what):
        return 1 + stride * l + kinds.index(what)

    def grp(l, g):
        return 1 + stride * l + len(kinds) + g

    def head(l, h):
        return 1 + stride * l + len(kinds) + KVH + h

    def nrm(l, which):  # which: 0 before q/k/v, 1 before gate/up
        return 1 + stride * l + len(kinds) + n_fine + which

    def final_count(idx):  # what each counter holds once a call is done
        rel = lax.rem(jnp.maximum(idx - 1, 0), stride)
        fine_count = jnp.where(rel < len(kinds) + KVH, NS, 1)
        return jnp.where((idx == 0) | (rel < len(kinds)), B,
                         jnp.where(rel < len(kinds) + n_fine, fine_count, R))

    n_wg = 4 if norm else 3
    done_count = (n_wg - 1) * B

    tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    zq, zg, za = QKV_ROWS - 64, 2 * F // Z_W, D // Z_W   # zeroing stores per layer
    n_zero = L * (zq + zg + (za if attn else 0))

    def body(*refs):
        if attn:
            (x0_g, wqkv_g, wo_g, wgu_g, wd_g, kc_g, vc_g,
             x_g, qkv_g, gu_g, h_g, nb_g, a_g, part_g) = refs
        else:
            x0_g, wqkv_g, wo_g, wgu_g, wd_g, x_g, qkv_g, gu_g, h_g, nb_g = refs
            a_g = part_g = kc_g = vc_g = None
        b = lax.axis_index("b")
        wg = lax.axis_index("wg")
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((n_bar + 2,)))
        start = [b * pp for pp in per]
        n = [jnp.clip(t - s, 0, pp) for t, s, pp in zip(tot, start, per)]
        per_layer = n[0] + n[1] + n[2] + n[3]
        off = [0, n[0], n[0] + n[1], n[0] + n[1] + n[2]]
        w_src = [wqkv_g, wo_g, wgu_g, wd_g]

        def arrive(idx):
            if mode != "stream":
                plgpu.semaphore_signal(sems.at[idx], 1, memory_scope="gpu")

        def wait_all(idx, count=B):
            if mode == "full":
                plgpu.semaphore_wait(sems.at[idx], count, decrement=False, memory_scope="gpu")

        def w_tile(p, l, i):
            f = start[p] + i
            unit, k = lax.div(f, ks[p]), lax.rem(f, ks[p])
            return w_src[p].at[l, unit, pl.ds(k * tk, tk), :]

        def inner(w_smem, a_smem, out_smem, z_smem, zq_smem, g_smem, u_smem, h_smem, att,
                  xn_smem, bs_smem, os_smem, nb_smem, xn_bars, nb_bar,
                  w_full, a_full, w_free, a_free, xbar, gbar, ubar, att_bars):

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

            if mode != "stream":
                @pl.when(wg == 2)
                def _activations():
                    @pl.loop(0, L)
                    def _(l):
                        for p in range(4):
                            base = l * per_layer + off[p]
                            dep = [jnp.where(l == 0, 0, sem(l - 1, DN)),
                                   sem(l, Q_ if fine or not attn else CMB), sem(l, O_),
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
                                if p == 1 and attn and fine and mode == "full":
                                    plgpu.semaphore_wait(sems.at[head(l, k)], 1, decrement=False,
                                                         memory_scope="gpu")
                                if p == 1 and not attn:
                                    src = qkv_g.at[l, :, k, :]   # one head of q
                                else:
                                    src = [x_g, a_g.at[l] if attn else None, x_g, h_g.at[l]][p]
                                    src = src.at[:, pl.ds(k * tk, tk)]
                                plgpu.copy_gmem_to_smem(src, a_smem.at[slot], a_full.at[slot])

                    arrive(DONE)

            def attention_item(l):
                """Block b < KVH * NS: KV head g, context split s, for the 4 query heads of g."""
                k_smem, v_smem, q_smem, o_smem, c_smem, m_smem = att
                g, s = lax.div(b, NS), lax.rem(b, NS)
                kb, vb, qb = att_bars.at[0], att_bars.at[1], att_bars.at[2]
                plgpu.copy_gmem_to_smem(kc_g.at[l, g, pl.ds(s * TC, TC)], k_smem, kb)
                plgpu.copy_gmem_to_smem(vc_g.at[l, g, pl.ds(s * TC, TC)], v_smem, vb)
                # q rows: heads 8 (g // 2) .. + 63 of row 0 (the tile's rows start at a multiple
                # of 8); the group's 4 heads are rows 4 (g % 2) .. + 3
                plgpu.copy_gmem_to_smem(qkv_g.at[l, 0, pl.ds(lax.div(g, 2) * 8, 64)], q_smem, qb)
                plgpu.barrier_wait(kb)
                plgpu.barrier_wait(qb)

                def scores(acc):
                    plgpu.wgmma(acc, q_smem, k_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc[...]

                sc = pl.run_scoped(scores, plgpu.ACC((64, TC), jnp.float32)) * HD ** -0.5
                m = jnp.max(sc, axis=1)
                pr = jnp.exp(sc - lax.broadcast_in_dim(m, sc.shape, [0]))
                lsum = jnp.sum(pr, axis=1)
                plgpu.barrier_wait(vb)

                def pv(acc):
                    plgpu.wgmma(acc, pr.astype(jnp.bfloat16), v_smem)
                    plgpu.wgmma_wait(0)
                    return acc[...]

                o = pl.run_scoped(pv, plgpu.ACC((64, HD), jnp.float32))
                vals = [o, lax.broadcast_in_dim(m, o.shape, [0]),
                        lax.broadcast_in_dim(lsum, o.shape, [0])]
                for i, val in enumerate(vals):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    o_smem[...] = val
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, 8)], part_g.at[l, s, g, i])
                plgpu.wait_smem_to_gmem(0)

            def merge(l):
                """Block b < QH: query head b, its NS splits merged into a[l][0, head]."""
                k_smem, v_smem, q_smem, o_smem, c_smem, m_smem = att
                g = lax.div(b, QH // KVH)
                j = lax.rem(g, 2) * 4 + lax.rem(b, QH // KVH)   # its row in the item's output
                if fine and mode == "full":
                    plgpu.semaphore_wait(sems.at[grp(l, g)], NS, decrement=False,
                                         memory_scope="gpu")
                for s in range(NS):
                    for i in range(3):
                        plgpu.copy_gmem_to_smem(part_g.at[l, s, g, i, j], c_smem.at[s, i],
                                                att_bars.at[3 + 3 * s + i])
                for s in range(NS):
                    for i in range(3):
                        plgpu.barrier_wait(att_bars.at[3 + 3 * s + i])
                ms = [c_smem.at[s, 1][...] for s in range(NS)]
                top = ms[0]
                for v in ms[1:]:
                    top = jnp.maximum(top, v)
                num = den = None
                for s in range(NS):
                    w = jnp.exp(ms[s] - top)
                    o_s, l_s = c_smem.at[s, 0][...], c_smem.at[s, 2][...]
                    num = w * o_s if num is None else num + w * o_s
                    den = w * l_s if den is None else den + w * l_s
                m_smem[...] = (num / den).astype(m_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(m_smem, a_g.at[l, 0, pl.ds(b * HD, HD)])
                plgpu.wait_smem_to_gmem(0)
                if fine:
                    arrive(head(l, b))

            if norm and mode != "stream":
                @pl.when(wg == 3)
                def _norms():
                    @pl.when(b < R)
                    def _():
                        @pl.loop(0, L)
                        def _(l):
                            for which in (0, 1):
                                wait_all([jnp.where(l == 0, 0, sem(l - 1, DN)), sem(l, O_)][which])
                                for c in range(D // 256):
                                    plgpu.copy_gmem_to_smem(x_g.at[b, pl.ds(c * 256, 256)],
                                                            xn_smem.at[c], xn_bars.at[c])
                                for c in range(D // 256):
                                    plgpu.barrier_wait(xn_bars.at[c])
                                # the row as 64 x 64: sums of squares of its 64 rows, then
                                # their total by a wgmma with ones, already broadcast
                                v = plgpu.load(xn_smem.reshape(64, 64), (),
                                               layout=plgpu.Layout.WGMMA,
                                               optimized=False).astype(jnp.float32)
                                rs = jnp.sum(v * v, axis=1)
                                bs_smem[...] = lax.broadcast_in_dim(rs, bs_smem.shape,
                                                                    [0]).astype(bs_smem.dtype)
                                plgpu.commit_smem()
                                ones = plgpu.layout_cast(jnp.ones((64, 64), jnp.bfloat16),
                                                         plgpu.Layout.WGMMA)

                                def total(acc):
                                    plgpu.wgmma(acc, ones, bs_smem)
                                    plgpu.wgmma_wait(0)
                                    return acc[...]

                                tot = pl.run_scoped(total, plgpu.ACC((64, 16), jnp.float32))
                                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                                os_smem.T[...] = plgpu.layout_cast(
                                    lax.rsqrt(tot / D + 1e-6), plgpu.Layout.WGMMA_TRANSPOSED)
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(os_smem.at[0], nb_g.at[l, which, b])
                                plgpu.wait_smem_to_gmem(0)
                                arrive(nrm(l, which))

                    arrive(DONE)

            @pl.when(wg == 0)
            def _consumer():
                if mode != "stream":
                    # Zero the add-into buffers (and a), copy x0 into x, then count in.
                    z_smem[...] = jnp.zeros(z_smem.shape, z_smem.dtype)
                    zq_smem[...] = jnp.zeros(zq_smem.shape, zq_smem.dtype)
                    plgpu.commit_smem()

                    @pl.loop(0, -(-n_zero // B))
                    def _(t):
                        c = b + t * B

                        @pl.when(c < L * zq)
                        def _():
                            plgpu.copy_smem_to_gmem(
                                zq_smem, qkv_g.at[lax.div(c, zq), :, lax.rem(c, zq)])

                        c2 = c - L * zq

                        @pl.when((c2 >= 0) & (c2 < L * zg))
                        def _():
                            plgpu.copy_smem_to_gmem(
                                z_smem, gu_g.at[lax.div(c2, zg), :,
                                                pl.ds(lax.rem(c2, zg) * Z_W, Z_W)])

                        if attn:
                            c3 = c2 - L * zg

                            @pl.when((c3 >= 0) & (c3 < L * za))
                            def _():
                                plgpu.copy_smem_to_gmem(
                                    z_smem, a_g.at[lax.div(c3, za), :,
                                                   pl.ds(lax.rem(c3, za) * Z_W, Z_W)])

                    plgpu.wait_smem_to_gmem(0)

                    @pl.when(b < D // Z_W)
                    def _():
                        cols = pl.ds(b * Z_W, Z_W)
                        plgpu.copy_gmem_to_smem(x0_g.at[:, cols], z_smem, xbar)
                        plgpu.barrier_wait(xbar)
                        plgpu.copy_smem_to_gmem(z_smem, x_g.at[:, cols])
                        plgpu.wait_smem_to_gmem(0)

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
                                if mode != "stream":
                                    plgpu.barrier_wait(a_full.at[slot])
                                    plgpu.wgmma(acc, w_smem.at[slot].transpose((1, 0)),
                                                a_smem.at[slot].transpose((1, 0)))
                                    plgpu.wgmma_wait(0)
                                    plgpu.barrier_arrive(a_free.at[slot])
                                plgpu.barrier_arrive(w_free.at[slot])
                                if mode == "stream":
                                    return
                                f = start[p] + i
                                unit, k = lax.div(f, ks[p]), lax.rem(f, ks[p])

                                @pl.when((k == ks[p] - 1) | (i == n[p] - 1))
                                def _():
                                    v = acc[...]
                                    if norm and p in (0, 2):
                                        first = jnp.minimum(ks[p] - 1 - lax.rem(start[p], ks[p]),
                                                            n[p] - 1)

                                        @pl.when(i == first)  # the row scales, once a phase
                                        def _():
                                            wait_all(nrm(l, p // 2), R)
                                            plgpu.copy_gmem_to_smem(nb_g.at[l, p // 2], nb_smem,
                                                                    nb_bar)
                                            plgpu.barrier_wait(nb_bar)

                                        scale = plgpu.load(nb_smem.T, (),
                                                           layout=plgpu.Layout.WGMMA_TRANSPOSED,
                                                           optimized=False)
                                    acc[...] = plgpu.layout_cast(jnp.zeros_like(v),
                                                                 plgpu.Layout.WGMMA)
                                    plgpu.wait_smem_to_gmem(0)  # out_smem free again
                                    vt = plgpu.layout_cast(v, plgpu.Layout.WGMMA_TRANSPOSED)
                                    if norm and p in (0, 2):
                                        vt = vt * scale
                                    out_smem.T[...] = vt.astype(out_smem.dtype)
                                    plgpu.commit_smem()
                                    if p == 0:   # q/k/v stored as heads of 128
                                        dst = qkv_g.at[l, :, lax.div(unit, 2),
                                                       pl.ds(lax.rem(unit, 2) * COLS, COLS)]
                                    else:
                                        dst = [None, x_g, gu_g.at[l], x_g][p].at[
                                            :, pl.ds(unit * COLS, COLS)]
                                    plgpu.copy_smem_to_gmem(out_smem, dst, reduction_op="add")

                            if mode == "stream":
                                continue
                            plgpu.wait_smem_to_gmem(0)
                            arrive(sem(l, [Q_, O_, G_, DN][p]))
                            if p == 0 and attn:
                                wait_all(sem(l, Q_))

                                @pl.when(b < KVH * NS)
                                def _():
                                    attention_item(l)

                                if fine:
                                    @pl.when(b < KVH * NS)
                                    def _():
                                        arrive(grp(l, lax.div(b, NS)))
                                else:
                                    arrive(sem(l, ATT))
                                    wait_all(sem(l, ATT))

                                @pl.when(b < QH)
                                def _():
                                    merge(l)

                                if not fine:
                                    arrive(sem(l, CMB))
                            if p == 2 and not silu:
                                arrive(sem(l, H_))
                            elif p == 2:
                                # h[l] = silu(gate) * up, SILU_W columns per block
                                wait_all(sem(l, G_))

                                @pl.when(b < F // SILU_W)
                                def _():
                                    cols = pl.ds(b * SILU_W, SILU_W)
                                    plgpu.copy_gmem_to_smem(gu_g.at[l, :, cols], g_smem, gbar)
                                    plgpu.copy_gmem_to_smem(
                                        gu_g.at[l, :, pl.ds(F + b * SILU_W, SILU_W)], u_smem, ubar)
                                    plgpu.barrier_wait(gbar)
                                    plgpu.barrier_wait(ubar)
                                    g = g_smem[...].astype(jnp.float32)
                                    u = u_smem[...].astype(jnp.float32)
                                    h_smem[...] = (g / (1.0 + jnp.exp(-g)) * u).astype(h_smem.dtype)
                                    plgpu.commit_smem()
                                    plgpu.copy_smem_to_gmem(h_smem, h_g.at[l, :, cols])
                                    plgpu.wait_smem_to_gmem(0)

                                arrive(sem(l, H_))

                pl.run_scoped(consume, plgpu.ACC((COLS, R), jnp.float32))
                if mode == "full":
                    # Every block is past every barrier once all have counted in here (the
                    # activation warpgroups too): then each returns its share to zero.
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
                            plgpu.semaphore_wait(sems.at[idx], final_count(idx),
                                                 memory_scope="gpu")

        k_spec = plgpu.SMEM((TC, HD), jnp.bfloat16, transforms=tf)
        v_spec = plgpu.SMEM((TC, HD), jnp.bfloat16, transforms=tf)
        o_spec = plgpu.SMEM((64, HD), jnp.float32)                # o, m, l out
        rest = [plgpu.SMEM((64, HD), jnp.bfloat16, transforms=tf),  # q (64 heads)
                plgpu.SMEM((max(NS, 1), 3, HD), jnp.float32),      # merge in
                plgpu.SMEM((HD,), jnp.bfloat16)]                   # merge out
        if not attn:
            att_scratch = [plgpu.SMEM((8,), jnp.float32)] * 6
        elif alias:  # o is written only once k and v are read: they share memory
            att_scratch = [plgpu.RefUnion((k_spec, v_spec), o_spec), *rest]
        else:
            att_scratch = [k_spec, v_spec, o_spec, *rest]

        # z and zq (zeroing, at the start) share memory with xn (the norms, after the start
        # barrier)
        zero_union = plgpu.RefUnion((plgpu.SMEM((R, Z_W), jnp.bfloat16),
                                     plgpu.SMEM((R, HD), jnp.bfloat16)),
                                    plgpu.SMEM((D // 256 if norm else 1, 256), jnp.bfloat16))
        norm_scratch = [
            plgpu.SMEM((64, 16), jnp.bfloat16,
                       transforms=(plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))),
            plgpu.SMEM((16, 64), jnp.float32),                # inverse RMS out
            plgpu.SMEM((R, 64), jnp.float32),                 # the rows' scales in
        ] if norm else [plgpu.SMEM((8,), jnp.float32)] * 3

        def with_att(*a):
            (z, zq), xn = a[3]
            n_att = 4 if attn and alias else 6
            att = a[7:7 + n_att]
            if attn and alias:
                (k, v), o = att[0]
                att = (k, v, o, *att[1:])
            k, v, o, q, c, m = att
            i = 7 + n_att
            return inner(*a[:3], z, zq, *a[4:7], (k, v, q, o, c, m), xn, *a[i:i + 3],
                         *a[-2:], *a[i + 3:-2])

        pl.run_scoped(
            with_att,
            plgpu.SMEM((S, tk, COLS), jnp.bfloat16, transforms=tf),
            plgpu.SMEM((S, R, tk), jnp.bfloat16, transforms=tf),
            plgpu.SMEM((R, COLS), jnp.bfloat16),
            zero_union,
            plgpu.SMEM((R, SILU_W), jnp.bfloat16),
            plgpu.SMEM((R, SILU_W), jnp.bfloat16),
            plgpu.SMEM((R, SILU_W), jnp.bfloat16),
            *att_scratch,
            *norm_scratch,
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(),
            plgpu.Barrier(),
            plgpu.Barrier(),
            plgpu.Barrier(num_barriers=3 + 3 * max(NS, 1)),
            plgpu.Barrier(num_barriers=D // 256),
            plgpu.Barrier(),
            collective_axes="wg",
        )

    out_type = [jax.ShapeDtypeStruct((R, D), jnp.bfloat16),
                jax.ShapeDtypeStruct((L, R, QKV_ROWS, HD), jnp.bfloat16),
                jax.ShapeDtypeStruct((L, R, 2 * F), jnp.bfloat16),
                jax.ShapeDtypeStruct((L, R, F), jnp.bfloat16),
                jax.ShapeDtypeStruct((L, 2, R, 64), jnp.float32)]   # inverse RMS, broadcast
    args = [x0, wqkv, wo, wgu, wd]
    if attn:
        out_type += [jax.ShapeDtypeStruct((L, R, D), jnp.bfloat16),
                     jax.ShapeDtypeStruct((L, NS, KVH, 3, 8, HD), jnp.float32)]
        args += [kc, vc]
    return plgpu.kernel(body, out_type=tuple(out_type), grid=(B,), grid_names=("b",),
                        num_threads=n_wg, thread_name="wg")(*args)


def chain_xla(x, wqkv, wo, wgu, wd, kc=None, vc=None, norm=False):
    """The same chain as XLA's kernels; weights as stored ([K, N] per layer)."""
    f32 = jnp.float32

    def rms(x):  # the inverse RMS of each row (the norm weight is in the GEMM's rows)
        if not norm:
            return 1.0
        return lax.rsqrt(jnp.mean(jnp.square(x.astype(f32)), -1, keepdims=True) + 1e-6)

    for l in range(len(wqkv)):
        qkv = (jnp.dot(x, wqkv[l], preferred_element_type=f32) * rms(x)).astype(x.dtype)
        if kc is None:
            a = qkv[:, :D]
        else:
            q = qkv[0, :D].reshape(KVH, QH // KVH, HD).astype(f32)
            s = jnp.einsum("gqd,gtd->gqt", q, kc[l].astype(f32)) * HD ** -0.5
            p = jax.nn.softmax(s, axis=-1)
            o = jnp.einsum("gqt,gtd->gqd", p, vc[l].astype(f32)).reshape(1, D)
            a = jnp.concatenate([o, jnp.zeros((R - 1, D), f32)]).astype(x.dtype)
        x = (x.astype(f32) + jnp.dot(a, wo[l], preferred_element_type=f32)).astype(x.dtype)
        gu = (jnp.dot(x, wgu[l], preferred_element_type=f32) * rms(x)).astype(x.dtype)
        h = (jax.nn.silu(gu[:, :F].astype(f32)) * gu[:, F:].astype(f32)).astype(x.dtype)
        x = (x.astype(f32) + jnp.dot(h, wd[l], preferred_element_type=f32)).astype(x.dtype)
    return x
