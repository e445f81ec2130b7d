"""A decoder layer's MLP at 8 rows as one persistent Mosaic GPU kernel (Hopper):
y = x + (silu(a @ Wg) * (a @ Wu)) @ Wd, with w_gu = [Wg | Wu] as the engine stores it.

Phase 1: every block takes 64-column units of h (gate and up tiles stream by TMA, two wgmma
accumulators, SiLU-multiply in the epilogue) and writes them to h in global memory.

A grid-wide barrier on global semaphores follows. Its forms:
- "all": every block signals every block.
- "tree": every block signals one semaphore, and block 0 then signals each block
  ("tree_gpu": the same at GPU scope, one signal at a time).
- "go": every block signals one semaphore; block 0, once all have, raises one flag that
  every block reads.
- "count": only the first half of "go" (no barrier: timing only).
- False: none (phase 2 races: timing only).

Phase 2: the first N/64 blocks each stream 64 columns of Wd over the whole of h and add the
residual. One launch instead of XLA's gate/up GEMM, SiLU-multiply, down GEMM and split-K
reduction + residual add.

`delay` is emit_pipeline's delay_release: 1 lets a step's wgmma run on while the next step
starts; 0 waits for each and keeps one more tile in flight."""
import jax
import jax.numpy as jnp
from jax import lax

ROWS, COLS = 8, 64


def mlp_persistent(x, a, w_gu, w_d, *, blocks=132, tile_k=256, steps=3, tile_k2=256, steps2=4,
                   interpret=False, phase1=True, phase2=True, barrier="all", delay=1):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    d, f2 = w_gu.shape
    f = f2 // 2
    n = w_d.shape[1]
    h_units = f // COLS
    per_block = -(-h_units // blocks)
    d_units = n // COLS
    assert d_units <= blocks or not phase2
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def wspec(tk):
        return plgpu.BlockSpec((tk, COLS), lambda i: (i, 0), transforms=transforms,
                               delay_release=delay)

    def aspec(tk):
        return plgpu.BlockSpec((ROWS, tk), lambda i: (0, i), transforms=transforms,
                               delay_release=delay)

    def body(x_gmem, a_gmem, wgu_gmem, wd_gmem, y_gmem, h_gmem, out_smem, res_smem, res_bar):
        b = lax.axis_index("b")
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((blocks + 1,)))

        # Phase 1: h[:, 64j:64j+64] = silu(a @ Wg[:, cols]) * (a @ Wu[:, cols]).
        for r in range(per_block):
            j = b + r * blocks

            @pl.when((j < h_units) & phase1)
            def _():
                def compute(acc_g, acc_u):
                    def step(_, wg_smem, wu_smem, a_smem):
                        plgpu.wgmma(acc_g, wg_smem.transpose((1, 0)), a_smem.transpose((1, 0)))
                        plgpu.wgmma(acc_u, wu_smem.transpose((1, 0)), a_smem.transpose((1, 0)))
                        plgpu.wgmma_wait(2 if delay else 0)

                    plgpu.emit_pipeline(
                        step, grid=(d // tile_k,), in_specs=[wspec(tile_k), wspec(tile_k), aspec(tile_k)],
                        max_concurrent_steps=steps,
                    )(wgu_gmem.at[:, pl.ds(j * COLS, COLS)],
                      wgu_gmem.at[:, pl.ds(f + j * COLS, COLS)], a_gmem)
                    plgpu.wgmma_wait(0)
                    return acc_g[...], acc_u[...]

                g, u = pl.run_scoped(compute, plgpu.ACC((COLS, ROWS), jnp.float32),
                                     plgpu.ACC((COLS, ROWS), jnp.float32))
                # XLA rounds the GEMM's output to bf16 before the SiLU-multiply; so does this.
                g = g.astype(jnp.bfloat16).astype(jnp.float32)
                u = u.astype(jnp.bfloat16).astype(jnp.float32)
                hv = (g / (1.0 + jnp.exp(-g))) * u
                hv_t = plgpu.layout_cast(hv, plgpu.Layout.WGMMA_TRANSPOSED)
                plgpu.wait_smem_to_gmem(0)  # out_smem is free again
                out_smem.T[...] = hv_t.astype(out_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, h_gmem.at[:, pl.ds(j * COLS, COLS)])

        plgpu.wait_smem_to_gmem(0)
        # Grid barrier (see the module docstring).
        if barrier == "tree_gpu":  # as "tree", every signal at GPU scope, one at a time
            plgpu.semaphore_signal(sems.at[blocks], 1, memory_scope="gpu")

            @pl.when(b == 0)
            def _():
                plgpu.semaphore_wait(sems.at[blocks], blocks, memory_scope="gpu")
                for i in range(blocks):
                    plgpu.semaphore_signal(sems.at[i], 1, memory_scope="gpu")

            plgpu.semaphore_wait(sems.at[b], 1, memory_scope="gpu")
        elif barrier == "go":  # all count in; block 0 waits for all, then raises one flag
            plgpu.semaphore_signal(sems.at[blocks], 1, memory_scope="gpu")

            @pl.when(b == 0)
            def _():
                plgpu.semaphore_wait(sems.at[blocks], blocks, memory_scope="gpu")
                plgpu.semaphore_signal(sems.at[0], 1, memory_scope="gpu")

            # Every block reads the flag without taking it (the semaphores start at zero
            # on every call).
            plgpu.semaphore_wait(sems.at[0], 1, decrement=False, memory_scope="gpu")
        elif barrier == "count":  # every block counts in at one semaphore; only block 0 waits
            plgpu.semaphore_signal(sems.at[blocks], 1, memory_scope="gpu")

            @pl.when(b == 0)
            def _():
                plgpu.semaphore_wait(sems.at[blocks], blocks, memory_scope="gpu")
        elif barrier == "tree":  # all count in at one semaphore; block 0 releases each block
            plgpu.semaphore_signal(sems.at[blocks], 1, memory_scope="gpu")

            @pl.when(b == 0)
            def _():
                plgpu.semaphore_wait(sems.at[blocks], blocks, memory_scope="gpu")
                plgpu.semaphore_signal_parallel(
                    *[plgpu.SemaphoreSignal(sems.at[i], device_id=None) for i in range(blocks)])

            plgpu.semaphore_wait(sems.at[b], 1, memory_scope="gpu")
        elif barrier:
            plgpu.semaphore_signal_parallel(
                *[plgpu.SemaphoreSignal(sems.at[i], device_id=None) for i in range(blocks)])
            plgpu.semaphore_wait(sems.at[b], blocks)

        # Phase 2: y[:, 64c:64c+64] = x[:, cols] + h @ Wd[:, cols].
        @pl.when((b < d_units) & phase2)
        def _():
            cols = pl.ds(b * COLS, COLS)
            plgpu.copy_gmem_to_smem(x_gmem.at[:, cols], res_smem, res_bar)

            def compute(acc):
                def step(_, w_smem, h_smem):
                    plgpu.wgmma(acc, w_smem.transpose((1, 0)), h_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(1 if delay else 0)

                plgpu.emit_pipeline(
                    step, grid=(f // tile_k2,), in_specs=[wspec(tile_k2), aspec(tile_k2)],
                    max_concurrent_steps=steps2,
                )(wd_gmem.at[:, cols], h_gmem)
                plgpu.wgmma_wait(0)
                return acc[...]

            acc = pl.run_scoped(compute, plgpu.ACC((COLS, ROWS), jnp.float32))
            out_t = plgpu.layout_cast(acc, plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.barrier_wait(res_bar)
            res_t = plgpu.load(res_smem.T, (), layout=plgpu.Layout.WGMMA_TRANSPOSED)
            out_smem.T[...] = (out_t + res_t.astype(jnp.float32)).astype(out_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, y_gmem.at[:, cols])
            plgpu.wait_smem_to_gmem(0)

    y, _ = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((ROWS, n), x.dtype), jax.ShapeDtypeStruct((ROWS, f), x.dtype)),
        scratch_types=[plgpu.SMEM((ROWS, COLS), x.dtype),
                       plgpu.SMEM((ROWS, COLS), x.dtype),
                       plgpu.Barrier(num_arrivals=1)],
        grid=(blocks,), grid_names=("b",), interpret=interpret or None)(x, a, w_gu, w_d)
    return y


def mlp_xla(x, a, w_gu, w_d):
    f = w_gu.shape[1] // 2
    gu = a @ w_gu
    h = (jax.nn.silu(gu[:, :f].astype(jnp.float32)) * gu[:, f:].astype(jnp.float32)).astype(a.dtype)
    return x + h @ w_d
