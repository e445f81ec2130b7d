"""A chain of decoder-layer projections at 8 rows as ONE persistent, warp-specialised Mosaic
GPU kernel (Hopper), to measure whether a kernel that never ends between GEMMs keeps the
weight stream going across the dependencies between them.

Per layer l, with x the residual stream (bf16, 8 x 4096):
  phase 0: qkv[l] = x @ Wqkv                      (4096 -> 6144)
  phase 1: x += qkv[l][:, :4096] @ Wo              (4096 -> 4096)
  phase 2: gu[l] = x @ Wgu                         (4096 -> 2 x 14336)
  silu:    h[l] = silu(gu[l][:, :F]) * gu[l][:, F:]
  phase 3: x += h[l] @ Wd                          (14336 -> 4096)
No norms, RoPE or attention: only the weight stream and the dependencies matter here.

Each phase's (64-column unit, K step) tiles are laid end to end and block b takes an equal
run of them. Its accumulator is flushed at the end of a unit or of its run, by a TMA store
that ADDS into the phase's output (bf16): split units sum there, and the o and down
projections add straight into x. Between phases a grid barrier on global semaphores: every
block counts in once its stores are done.

Three warpgroups per block:
  wg 0 consumes: waits for a tile's weights and activations, wgmma, flushes, counts in;
  wg 1 streams weight tiles through S slots, never waiting for a barrier (weights depend on
       nothing), so the next phase's first S tiles arrive while the barrier is pending;
  wg 2 streams activation tiles, waiting for the phase's barrier first.

pf: the weight warpgroup also asks for the tile pf tiles ahead (into the next phase where
this one ends) to be brought into L2, so that the stream runs on past the S slots while a
barrier is pending.

silu=False: the down projection waits for the gate/up barrier only and h is never written
(wrong values, timing only): what the silu step and its barrier cost.

mode: "full"; "stream" (weights only, no compute: the ceiling); "nobar" (barrier waits
skipped: wrong values, timing only).

The semaphores persist from call to call, so block 0 returns every counter to zero once all
blocks are known to be past it."""
import jax
import jax.numpy as jnp
from jax import lax

R, D, F, NQKV, COLS = 8, 4096, 14336, 6144, 64
SILU_W = 128  # columns of h per block in the silu step
Z_W = 256     # columns per zeroing store


def tile_weight(w, cols=COLS):
    """[..., K, N] -> [..., N / cols, K, cols]: each column unit one contiguous run."""
    *lead, k, n = w.shape
    return jnp.moveaxis(w.reshape(*lead, k, n // cols, cols), -2, -3)


def phases(tk):
    # (K, N) of the four GEMMs
    return [(D, NQKV), (D, D), (D, 2 * F), (F, D)]


def chain_kernel(x0, wqkv, wo, wgu, wd, *, blocks=132, tk=256, slots=5, mode="full", pf=0,
                 silu=True):
    """x0 [8, D] bf16; weights tiled ([L, N / 64, K, 64]). Returns x after L layers, and the
    per-layer buffers (qkv, gu, h)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    L = wqkv.shape[0]
    B, S = blocks, slots
    shapes = phases(tk)
    ks = [k // tk for k, _ in shapes]
    tot = [(n // COLS) * kk for (_, n), kk in zip(shapes, ks)]
    per = [-(-t // B) for t in tot]
    # semaphores: 0 init, 1 + 5 l + p (p = 0..3) the phases, 1 + 5 l + 4 the silu step, last: done
    n_sem = 2 + 5 * L
    DONE = n_sem - 1

    def cnt(l, p):
        return 1 + 5 * l + p

    tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    n_zero = L * (NQKV // Z_W + 2 * F // Z_W)

    def body(x0_g, wqkv_g, wo_g, wgu_g, wd_g, x_g, qkv_g, gu_g, h_g):
        b = lax.axis_index("b")
        wg = lax.axis_index("wg")
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((n_sem,)))
        start = [b * pp for pp in per]
        n = [jnp.clip(t - s, 0, pp) for t, s, pp in zip(tot, start, per)]
        per_layer = n[0] + n[1] + n[2] + n[3]
        off = [0, n[0], n[0] + n[1], n[0] + n[1] + n[2]]
        w_src = [wqkv_g, wo_g, wgu_g, wd_g]

        def arrive(idx):
            plgpu.semaphore_signal(sems.at[idx], 1, memory_scope="gpu")

        def wait_all(idx, count):
            if mode != "nobar":
                plgpu.semaphore_wait(sems.at[idx], count, decrement=False, memory_scope="gpu")

        def reset(idx, count):  # block 0, once every block is past the barrier idx
            if mode != "nobar":
                @pl.when(b == 0)
                def _():
                    plgpu.semaphore_wait(sems.at[idx], count, memory_scope="gpu")

        def w_tile(p, l, i):
            f = start[p] + i
            unit, k = lax.div(f, ks[p]), lax.rem(f, ks[p])
            return w_src[p].at[l, unit, pl.ds(k * tk, tk), :]

        def inner(w_smem, a_smem, out_smem, z_smem, g_smem, u_smem, h_smem,
                  w_full, a_full, w_free, a_free, xbar, gbar, ubar):

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
                            if pf:
                                i2 = i + pf

                                @pl.when(i2 < n[p])
                                def _():
                                    plgpu.async_prefetch(w_tile(p, l, i2))

                                q, lq, i3 = (p + 1) % 4, l + (p == 3), i2 - n[p]

                                @pl.when((i3 >= 0) & (i3 < n[q]) & (lq < L))
                                def _():
                                    plgpu.async_prefetch(w_tile(q, lq, i3))

            if mode != "stream":
                @pl.when(wg == 2)
                def _activations():
                    # The barriers this warpgroup waits for count 2 B: every consumer once its
                    # stores are done, and every activation warpgroup once it is past the
                    # barrier before. So when one completes, every block is past the one
                    # before it, and block 0 returns that one to zero.
                    arrive(0)

                    @pl.loop(0, L)
                    def _(l):
                        for p in range(4):
                            base = l * per_layer + off[p]
                            prev = [cnt(l - 1, 4), jnp.where(l == 0, 0, cnt(l - 1, 3)),
                                    cnt(l, 0), cnt(l, 1)][p]
                            dep = [jnp.where(l == 0, 0, cnt(l - 1, 3)), cnt(l, 0), cnt(l, 1),
                                   cnt(l, 4)][p]
                            wait_all(dep, 2 * B)
                            if p == 0:
                                @pl.when(l > 0)
                                def _():
                                    reset(prev, 2 * B)
                            else:
                                reset(prev, 2 * B)
                            if p == 3:
                                reset(cnt(l, 2), B)

                                @pl.when(l < L - 1)
                                def _():
                                    arrive(cnt(l, 3))
                            else:
                                arrive([cnt(l, 0), cnt(l, 1), cnt(l, 4)][p])
                            src = [x_g, qkv_g.at[l], x_g, h_g.at[l]][p]

                            @pl.loop(0, n[p])
                            def _(i):
                                j = base + i
                                slot = lax.rem(j, S)

                                @pl.when(j >= S)
                                def _():
                                    plgpu.barrier_wait(a_free.at[slot])

                                k = lax.rem(start[p] + i, ks[p])
                                plgpu.copy_gmem_to_smem(src.at[:, pl.ds(k * tk, tk)],
                                                        a_smem.at[slot], a_full.at[slot])

                    # The last barrier is returned to zero once every block is past it.
                    arrive(DONE)
                    if mode != "nobar":
                        @pl.when(b == 0)
                        def _():
                            plgpu.semaphore_wait(sems.at[DONE], B, memory_scope="gpu")
                            plgpu.semaphore_wait(sems.at[cnt(L - 1, 4)], 2 * B, memory_scope="gpu")

            @pl.when(wg == 0)
            def _consumer():
                if mode != "stream":
                    # Zero the add-into buffers and copy x0 into x, then count in.
                    z_smem[...] = jnp.zeros(z_smem.shape, z_smem.dtype)
                    plgpu.commit_smem()
                    q_chunks = NQKV // Z_W

                    @pl.loop(0, -(-n_zero // B))
                    def _(t):
                        c = b + t * B

                        @pl.when(c < L * q_chunks)
                        def _():
                            plgpu.copy_smem_to_gmem(
                                z_smem, qkv_g.at[lax.div(c, q_chunks), :,
                                                 pl.ds(lax.rem(c, q_chunks) * Z_W, Z_W)])

                        c2 = c - L * q_chunks
                        g_chunks = 2 * F // Z_W

                        @pl.when((c2 >= 0) & (c2 < L * g_chunks))
                        def _():
                            plgpu.copy_smem_to_gmem(
                                z_smem, gu_g.at[lax.div(c2, g_chunks), :,
                                                pl.ds(lax.rem(c2, g_chunks) * Z_W, Z_W)])

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
                            dst = [qkv_g.at[l], x_g, gu_g.at[l], x_g][p]

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
                                    acc[...] = plgpu.layout_cast(jnp.zeros_like(v), plgpu.Layout.WGMMA)
                                    plgpu.wait_smem_to_gmem(0)  # out_smem free again
                                    out_smem.T[...] = plgpu.layout_cast(
                                        v, plgpu.Layout.WGMMA_TRANSPOSED).astype(out_smem.dtype)
                                    plgpu.commit_smem()
                                    plgpu.copy_smem_to_gmem(
                                        out_smem, dst.at[:, pl.ds(unit * COLS, COLS)],
                                        reduction_op="add")

                            if mode == "stream":
                                continue
                            plgpu.wait_smem_to_gmem(0)
                            if p < 3:
                                arrive(cnt(l, p))
                            else:
                                @pl.when(l < L - 1)  # nothing waits for the last one
                                def _():
                                    arrive(cnt(l, p))
                            if p == 2 and not silu:
                                arrive(cnt(l, 4))
                            elif p == 2:
                                # h[l] = silu(gate) * up, SILU_W columns per block
                                wait_all(cnt(l, 2), B)

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

                                arrive(cnt(l, 4))

                pl.run_scoped(consume, plgpu.ACC((COLS, R), jnp.float32))

        pl.run_scoped(
            inner,
            plgpu.SMEM((S, tk, COLS), jnp.bfloat16, transforms=tf),
            plgpu.SMEM((S, R, tk), jnp.bfloat16, transforms=tf),
            plgpu.SMEM((R, COLS), jnp.bfloat16),
            plgpu.SMEM((R, Z_W), jnp.bfloat16),
            plgpu.SMEM((R, SILU_W), jnp.bfloat16),
            plgpu.SMEM((R, SILU_W), jnp.bfloat16),
            plgpu.SMEM((R, SILU_W), jnp.bfloat16),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(num_barriers=S),
            plgpu.Barrier(),
            plgpu.Barrier(),
            plgpu.Barrier(),
            collective_axes="wg",
        )

    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((R, D), jnp.bfloat16),
                  jax.ShapeDtypeStruct((L, R, NQKV), jnp.bfloat16),
                  jax.ShapeDtypeStruct((L, R, 2 * F), jnp.bfloat16),
                  jax.ShapeDtypeStruct((L, R, F), jnp.bfloat16)),
        grid=(B,), grid_names=("b",), num_threads=3, thread_name="wg",
    )(x0, wqkv, wo, wgu, wd)


def chain_xla(x, wqkv, wo, wgu, wd):
    """The same chain as XLA's kernels; weights as stored ([L, K, N])."""
    f32 = jnp.float32
    for l in range(len(wqkv)):
        qkv = jnp.dot(x, wqkv[l], preferred_element_type=f32).astype(x.dtype)
        x = (x.astype(f32) + jnp.dot(qkv[:, :D], wo[l], preferred_element_type=f32)).astype(x.dtype)
        gu = jnp.dot(x, wgu[l], preferred_element_type=f32).astype(x.dtype)
        h = (jax.nn.silu(gu[:, :F].astype(f32)) * gu[:, F:].astype(f32)).astype(x.dtype)
        x = (x.astype(f32) + jnp.dot(h, wd[l], preferred_element_type=f32)).astype(x.dtype)
    return x
