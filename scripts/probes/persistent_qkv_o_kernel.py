"""Skeleton of a persistent attention-half kernel at 8 rows (Hopper, Mosaic GPU), with the
attention itself left out: y = x + (a @ Wqkv)[:, :Dq] @ Wo in one launch.

Phase 1: blocks take 64-column units of qkv = a @ Wqkv (96 units for Llama-3.1-8B) and
write them to global memory. Grid barrier(s) ("go" form: all count in, block 0 raises a
flag). Phase 2: o unit c (64 output columns) is done by block o_offset + c, over all of
K = Dq, plus the residual.

preload = P: the block of an o unit requests the first P weight tiles of that unit by TMA
before the barrier (blocks idle in phase 1 at kernel start, the others once their phase-1
unit is written), so the tiles stream while the barrier (and, in the full kernel, the
attention) runs."""
import jax
import jax.numpy as jnp
from jax import lax

ROWS, COLS = 8, 64


def qkv_o_persistent(x, a, w_qkv, w_o, *, blocks=132, tile_k=256, steps1=3, steps2=4,
                     preload=0, o_offset=0, barriers=1, phase1=True, phase2=True):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    d, nqkv = w_qkv.shape
    kq, n = w_o.shape
    units1 = nqkv // COLS
    per_block = -(-units1 // blocks)
    units2 = n // COLS
    assert o_offset + units2 <= blocks
    assert preload * tile_k < kq
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    P = max(preload, 1)

    def wspec(tk):
        return plgpu.BlockSpec((tk, COLS), lambda i: (i, 0), transforms=transforms)

    def aspec(tk):
        return plgpu.BlockSpec((ROWS, tk), lambda i: (0, i), transforms=transforms)

    def body(x_gmem, a_gmem, wqkv_gmem, wo_gmem, y_gmem, qkv_gmem, out_smem, res_smem, res_bar,
             pre_w, pre_a, pre_wbar, pre_abar):
        b = lax.axis_index("b")
        c = b - o_offset
        has_o = (c >= 0) & (c < units2)
        ocols = pl.ds(c * COLS, COLS)
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((barriers * (blocks + 1),)))

        def issue_preload():
            for s in range(preload):
                plgpu.copy_gmem_to_smem(wo_gmem.at[pl.ds(s * tile_k, tile_k), ocols],
                                        pre_w.at[s], pre_wbar.at[s])

        if preload:
            pl.when(has_o & (b >= units1))(issue_preload)

        for r in range(per_block):
            j = b + r * blocks

            @pl.when((j < units1) & phase1)
            def _():
                def compute(acc):
                    def step(_, w_smem, a_smem):
                        plgpu.wgmma(acc, w_smem.transpose((1, 0)), a_smem.transpose((1, 0)))
                        plgpu.wgmma_wait(0)

                    plgpu.emit_pipeline(step, grid=(d // tile_k,), in_specs=[wspec(tile_k), aspec(tile_k)],
                                        max_concurrent_steps=steps1,
                                        )(wqkv_gmem.at[:, pl.ds(j * COLS, COLS)], a_gmem)
                    plgpu.wgmma_wait(0)
                    return acc[...]

                acc = pl.run_scoped(compute, plgpu.ACC((COLS, ROWS), jnp.float32))
                out_t = plgpu.layout_cast(acc, plgpu.Layout.WGMMA_TRANSPOSED)
                plgpu.wait_smem_to_gmem(0)
                out_smem.T[...] = out_t.astype(out_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, qkv_gmem.at[:, pl.ds(j * COLS, COLS)])

        if preload:
            pl.when(has_o & (b < units1))(issue_preload)
        plgpu.wait_smem_to_gmem(0)

        for i in range(barriers):
            base = i * (blocks + 1)
            plgpu.semaphore_signal(sems.at[base + blocks], 1, memory_scope="gpu")

            @pl.when(b == 0)
            def _():
                plgpu.semaphore_wait(sems.at[base + blocks], blocks, memory_scope="gpu")
                plgpu.semaphore_signal(sems.at[base], 1, memory_scope="gpu")

            plgpu.semaphore_wait(sems.at[base], 1, decrement=False, memory_scope="gpu")

        @pl.when(has_o & phase2)
        def _():
            plgpu.copy_gmem_to_smem(x_gmem.at[:, ocols], res_smem, res_bar)
            for s in range(preload):
                plgpu.copy_gmem_to_smem(qkv_gmem.at[:, pl.ds(s * tile_k, tile_k)],
                                        pre_a.at[s], pre_abar.at[s])

            def compute(acc):
                for s in range(preload):
                    plgpu.barrier_wait(pre_wbar.at[s])
                    plgpu.barrier_wait(pre_abar.at[s])
                    plgpu.wgmma(acc, pre_w.at[s].transpose((1, 0)), pre_a.at[s].transpose((1, 0)))
                k0 = preload * tile_k

                def step(_, w_smem, h_smem):
                    plgpu.wgmma(acc, w_smem.transpose((1, 0)), h_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(0)

                plgpu.emit_pipeline(step, grid=((kq - k0) // tile_k,),
                                    in_specs=[wspec(tile_k), aspec(tile_k)],
                                    max_concurrent_steps=steps2,
                                    )(wo_gmem.at[pl.ds(k0, kq - k0), ocols],
                                      qkv_gmem.at[:, pl.ds(k0, kq - k0)])
                plgpu.wgmma_wait(0)
                return acc[...]

            acc = pl.run_scoped(compute, plgpu.ACC((COLS, ROWS), jnp.float32))
            out_t = plgpu.layout_cast(acc, plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.barrier_wait(res_bar)
            res_t = plgpu.load(res_smem.T, (), layout=plgpu.Layout.WGMMA_TRANSPOSED)
            out_smem.T[...] = (out_t + res_t.astype(jnp.float32)).astype(out_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, y_gmem.at[:, ocols])
            plgpu.wait_smem_to_gmem(0)

    y, _ = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((ROWS, n), x.dtype), jax.ShapeDtypeStruct((ROWS, nqkv), x.dtype)),
        scratch_types=[plgpu.SMEM((ROWS, COLS), x.dtype),
                       plgpu.SMEM((ROWS, COLS), x.dtype),
                       plgpu.Barrier(num_arrivals=1),
                       plgpu.SMEM((P, tile_k, COLS), w_o.dtype, transforms=transforms),
                       plgpu.SMEM((P, ROWS, tile_k), a.dtype, transforms=transforms),
                       plgpu.Barrier(num_arrivals=1, num_barriers=P),
                       plgpu.Barrier(num_arrivals=1, num_barriers=P)],
        grid=(blocks,), grid_names=("b",))(x, a, w_qkv, w_o)
    return y


def qkv_o_xla(x, a, w_qkv, w_o):
    kq = w_o.shape[0]
    qkv = a @ w_qkv
    return x + qkv[:, :kq] @ w_o
