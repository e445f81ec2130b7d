"""A few-row GEMM (a @ w, a of 8 rows) as one persistent Mosaic GPU kernel (Hopper) whose
every block streams an equal share of the weight tiles through one pipeline that never
drains: the (column unit, K step) iterations are laid end to end and block b takes
iterations [b * per, (b + 1) * per). A unit whose iterations fall to two or more blocks is
"split": each block stores its part to a workspace of partials, which the caller sums
(`fixup`). Full units are stored straight to the output.

tiled: w is given as [N / cols, K, cols], each column unit contiguous in memory, so that a
tile is one contiguous run of bytes instead of tile_k runs of 2 * cols bytes.

mode: "full" (as above), "acc" (wgmma on every tile, nothing stored: timing only),
"stream" (the tiles arrive and nothing reads them: timing only)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def layout(k_dim, n, *, blocks, tile_k, cols):
    ksteps = k_dim // tile_k
    total = (n // cols) * ksteps
    return ksteps, total, -(-total // blocks)


def tile_weights(w, cols=64):
    k_dim, n = w.shape
    return w.reshape(k_dim, n // cols, cols).transpose(1, 0, 2)


def flat_gemm(a, w, *, blocks=132, tile_k=256, cols=64, steps=4, mode="full", tiled=False,
              interpret=False):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows, k_dim = a.shape
    n = w.shape[0] * w.shape[2] if tiled else w.shape[1]
    ksteps, total, per = layout(k_dim, n, blocks=blocks, tile_k=tile_k, cols=cols)
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def body(a_gmem, w_gmem, o_gmem, p_gmem, out_smem):
        b = lax.axis_index("b")
        start = b * per
        end = jnp.minimum(start + per, total)

        def flat(i):
            return jnp.minimum(start + i, total - 1)

        if tiled:
            w_spec = plgpu.BlockSpec((pl.squeezed, tile_k, cols),
                                     lambda i: (flat(i) // ksteps, flat(i) % ksteps, 0),
                                     transforms=transforms)
        else:
            w_spec = plgpu.BlockSpec((tile_k, cols), lambda i: (flat(i) % ksteps, flat(i) // ksteps),
                                     transforms=transforms)
        a_spec = plgpu.BlockSpec((rows, tile_k), lambda i: (0, flat(i) % ksteps),
                                 transforms=transforms)

        def compute(acc):
            def step(idx, w_smem, a_smem):
                if mode == "stream":
                    return
                f = start + idx[0]
                valid = f < end

                @pl.when(valid)
                def _():
                    plgpu.wgmma(acc, w_smem.transpose((1, 0)), a_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(0)

                if mode == "acc":
                    return
                k = f % ksteps
                unit = f // ksteps

                @pl.when(valid & ((k == ksteps - 1) | (f == end - 1)))
                def _():
                    v = acc[...]
                    acc[...] = jnp.zeros_like(v)
                    head = unit * ksteps < start
                    tail = k != ksteps - 1
                    plgpu.wait_smem_to_gmem(0)  # out_smem is free again
                    out_smem.T[...] = plgpu.layout_cast(v, plgpu.Layout.WGMMA_TRANSPOSED)
                    plgpu.commit_smem()

                    @pl.when(~head & ~tail)
                    def _():
                        plgpu.copy_smem_to_gmem(out_smem, o_gmem.at[:, pl.ds(unit * cols, cols)])

                    @pl.when(head | tail)
                    def _():
                        slot = jnp.where(head, 0, 1)
                        plgpu.copy_smem_to_gmem(out_smem, p_gmem.at[b * 2 + slot])

            plgpu.emit_pipeline(step, grid=(per,), in_specs=[w_spec, a_spec],
                                max_concurrent_steps=steps)(w_gmem, a_gmem)
            plgpu.wgmma_wait(0)

        pl.run_scoped(compute, plgpu.ACC((cols, rows), jnp.float32))
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((rows, n), jnp.float32),
                  jax.ShapeDtypeStruct((blocks * 2, rows, cols), jnp.float32)),
        scratch_types=[plgpu.SMEM((rows, cols), jnp.float32)],
        grid=(blocks,), grid_names=("b",), interpret=interpret or None)(a, w)


def fixup(out, partials, k_dim, n, *, blocks, tile_k, cols):
    """Host-side sum of the split units' partials into out (numpy): the kernel's flush rule
    replayed block by block."""
    out = np.array(out, np.float32)
    partials = np.asarray(partials, np.float32)
    ksteps, total, per = layout(k_dim, n, blocks=blocks, tile_k=tile_k, cols=cols)
    split = {}
    for b in range(blocks):
        s, e = b * per, min(b * per + per, total)
        for f in range(s, e):
            k, unit = f % ksteps, f // ksteps
            if k == ksteps - 1 or f == e - 1:
                head, tail = unit * ksteps < s, k != ksteps - 1
                if head or tail:
                    split.setdefault(unit, []).append(partials[b * 2 + (0 if head else 1)])
    for unit, parts in split.items():
        out[:, unit * cols:(unit + 1) * cols] = np.sum(parts, axis=0)
    return out, len(split)
