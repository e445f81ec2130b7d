"""x + a @ w at 8 rows as a Mosaic GPU kernel with a hand-written TMA pipeline, optionally
launched with programmatic dependent launch: the weight tiles (which no earlier kernel writes)
are requested before griddepcontrol.wait, the activations and the residual after it."""
import jax
import jax.numpy as jnp
from jax import lax

ROWS, COLS = 8, 64


def pdl_residual_matmul(x, a, w, *, tile_k=256, steps=4, pdl=True, prefetch=True):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    k, n = w.shape
    n_k = k // tile_k
    assert n_k >= steps
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def body(x_gmem, a_gmem, w_gmem, out_gmem, w_smem, a_smem, res_smem, out_smem,
             w_bar, a_bar, res_bar, acc):
        col0 = lax.axis_index("n") * COLS

        def fetch_w(i, slot):
            plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(i * tile_k, tile_k), pl.ds(col0, COLS)],
                                    w_smem.at[slot], w_bar.at[slot])

        def fetch_a(i, slot):
            plgpu.copy_gmem_to_smem(a_gmem.at[:, pl.ds(i * tile_k, tile_k)],
                                    a_smem.at[slot], a_bar.at[slot])

        if prefetch:
            for s in range(steps):
                fetch_w(s, s)
        if pdl:
            plgpu.griddepcontrol_wait()
        if not prefetch:
            for s in range(steps):
                fetch_w(s, s)
        plgpu.copy_gmem_to_smem(x_gmem.at[:, pl.ds(col0, COLS)], res_smem, res_bar)
        for s in range(steps):
            fetch_a(s, s)

        def step(i, carry):
            slot = lax.rem(i, steps)
            plgpu.barrier_wait(w_bar.at[slot])
            plgpu.barrier_wait(a_bar.at[slot])
            plgpu.wgmma(acc, w_smem.at[slot].transpose((1, 0)), a_smem.at[slot].transpose((1, 0)))
            plgpu.wgmma_wait(1)  # step i - 1 is done with its slot: refill it
            nxt = i - 1 + steps

            @pl.when((i >= 1) & (nxt < n_k))
            def _():
                prev = lax.rem(i - 1, steps)
                fetch_w(nxt, prev)
                fetch_a(nxt, prev)
            return carry

        lax.fori_loop(0, n_k, step, None)
        plgpu.wgmma_wait(0)
        if pdl:
            plgpu.griddepcontrol_launch_dependents()
        out_t = plgpu.layout_cast(acc[...], plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.barrier_wait(res_bar)
        res_t = plgpu.load(res_smem.T, (), layout=plgpu.Layout.WGMMA_TRANSPOSED)
        out_smem.T[...] = (out_t + res_t.astype(jnp.float32)).astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[:, pl.ds(col0, COLS)])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((ROWS, n), x.dtype),
        scratch_types=[plgpu.SMEM((steps, tile_k, COLS), w.dtype, transforms=transforms),
                       plgpu.SMEM((steps, ROWS, tile_k), a.dtype, transforms=transforms),
                       plgpu.SMEM((ROWS, COLS), x.dtype),
                       plgpu.SMEM((ROWS, COLS), x.dtype),
                       plgpu.Barrier(num_arrivals=1, num_barriers=steps),
                       plgpu.Barrier(num_arrivals=1, num_barriers=steps),
                       plgpu.Barrier(num_arrivals=1),
                       plgpu.ACC((COLS, ROWS), jnp.float32)],
        grid=(n // COLS,), grid_names=("n",))(x, a, w)
