"""Residual projections of a few rows (decode at small batch) as a Mosaic GPU kernel (Hopper).

`residual_project(x, a, w)` is `x + a @ w`. At a few rows it is a stream of w. XLA's Triton
GEMMs split K across programs to fill the GPU, then add the partial sums and the residual in
a second kernel. Here every program owns 64 output columns and the whole of K: weight tiles
arrive by TMA through a pipeline of `STEPS` shared-memory slots, a wgmma takes each tile
transposed as its 64-row side and the rows as its narrow side, and the epilogue adds the
residual and writes the rows, so one kernel replaces two.

It needs exactly `ROWS` rows (the runner's smallest token bucket is `ROWS` where the kernel
runs). Elsewhere (other GPUs, the CPU, more rows, other dtypes) it is `x + a @ w`.
ATOM_JAX_FEW_ROW_MATMUL=xla turns it off.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

ROWS = 8        # the wgmma's narrow side
COLS = 64       # output columns per program: the wgmma's 64-row side
TILE_K = 256    # K per pipeline step (32 KB of weights)
STEPS = 4       # pipeline slots in flight per program


@functools.lru_cache(maxsize=None)
def enabled() -> bool:
    """Whether this process runs the kernel: an NVIDIA Hopper GPU, and not switched off."""
    if os.environ.get("ATOM_JAX_FEW_ROW_MATMUL", "auto") == "xla":
        return False
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def smallest_token_bucket(default: int) -> int:
    """The runner's smallest token bucket: `ROWS` where the kernel runs, so decode at batch 1
    reaches it without a padding copy per projection."""
    return ROWS if enabled() else default


def supported(x, a, w) -> bool:
    """Whether `x + a @ w` runs as the kernel: bf16, `ROWS` rows, K and N in whole tiles."""
    return (a.ndim == 2 and w.ndim == 2 and a.shape[0] == ROWS
            and x.shape == (ROWS, w.shape[1])
            and x.dtype == a.dtype == w.dtype == jnp.bfloat16
            and w.shape[0] % TILE_K == 0 and w.shape[1] % COLS == 0 and enabled())


def residual_project(x, a, w):
    """x [T, N] + a [T, K] @ w [K, N] -> [T, N] in x's dtype; the kernel where supported."""
    if not supported(x, a, w):
        return x + a @ w
    return few_row_residual_matmul(x, a, w)


def few_row_residual_matmul(x, a, w, *, tile_k: int = TILE_K, steps: int = STEPS):
    """x [8, N] bf16 + a [8, K] bf16 @ w [K, N] bf16 -> [8, N] bf16, summed in float32."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    k, n = w.shape
    # 128-byte swizzled tiles, as the wgmma reads them from shared memory.
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def body(x_gmem, a_gmem, w_gmem, out_gmem, res_smem, out_smem, res_ready, acc):
        cols = pl.ds(lax.axis_index("n") * COLS, COLS)
        # The residual tile travels while the weights stream.
        plgpu.copy_gmem_to_smem(x_gmem.at[:, cols], res_smem, res_ready)

        def step(_, w_smem, a_smem):
            # acc [COLS, ROWS] += w_tile.T [COLS, TILE_K] @ a_tile.T [TILE_K, ROWS]
            plgpu.wgmma(acc, w_smem.transpose((1, 0)), a_smem.transpose((1, 0)))
            plgpu.wgmma_wait(1)

        plgpu.emit_pipeline(
            step, grid=(k // tile_k,),
            in_specs=[plgpu.BlockSpec((tile_k, COLS), lambda i: (i, 0), transforms=transforms),
                      plgpu.BlockSpec((ROWS, tile_k), lambda i: (0, i), transforms=transforms)],
            max_concurrent_steps=steps,
        )(w_gmem.at[:, cols], a_gmem)
        # The accumulator holds the output transposed; this layout makes it the rows again.
        out_t = plgpu.layout_cast(acc[...], plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.barrier_wait(res_ready)
        res_t = plgpu.load(res_smem.T, (), layout=plgpu.Layout.WGMMA_TRANSPOSED)
        out_smem.T[...] = (out_t + res_t.astype(jnp.float32)).astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[:, cols])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((ROWS, n), x.dtype),
        scratch_types=[plgpu.SMEM((ROWS, COLS), x.dtype),
                       plgpu.SMEM((ROWS, COLS), x.dtype),
                       plgpu.Barrier(num_arrivals=1),
                       plgpu.ACC((COLS, ROWS), jnp.float32)],
        grid=(n // COLS,), grid_names=("n",))(x, a, w)
