"""One persistent Mosaic GPU launch whose blocks are divided: blocks [0, B) only stream
bytes (a stand-in for decode attention's K/V reads), blocks [B, grid) compute a GEMM
(JAX's pallas/ops/gpu/hopper_matmul_mgpu.py kernel, its tile loop strided over the GEMM
blocks alone).

The streaming blocks run the same warp-specialized pipeline as the GEMM, with the same
shared-memory buffers, over "tiles" of two stand-in arrays, and skip the wgmma and the
epilogue: stream chunk c reads rows [c * cta_m, +cta_m) of sa ([C * cta_m, K]) and columns
[c * cta_n, +cta_n) of sb ([K, C * cta_n]), K / tile_k pipeline steps of
(cta_m + cta_n) * tile_k elements each. `passes` re-reads the C chunks that many times."""
import functools

import jax
import jax.numpy as jnp
from jax import lax


def fused_matmul_stream(a, b, sa, sb, *, config, stream_blocks, grid=132, passes=1):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu import MatmulDimension

    m, k = a.shape
    _, n = b.shape
    tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
    assert config.cluster_dimension is None
    cta_m = tile_m * (1 + (config.wg_dimension == MatmulDimension.M))
    cta_n = tile_n * (1 + (config.wg_dimension == MatmulDimension.N))
    m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // tile_k
    gemm_tiles = m_iters * n_iters
    chunks = sa.shape[0] // cta_m
    assert sa.shape[1] == k and sb.shape == (k, chunks * cta_n)
    stream_items = chunks * passes
    gemm_blocks = grid - stream_blocks
    epi_m, epi_n = config.epi_tile_m or tile_m, config.epi_tile_n or tile_n
    num_out_slots = min(2, (tile_m * tile_n) // (epi_m * epi_n))
    swizzle = plgpu.find_swizzle(tile_k * 2 * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(epi_n * 2 * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // 2)), plgpu.SwizzleTransform(out_swizzle))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40,
            in_specs=[plgpu.BlockSpec((cta_m, tile_k), lambda kk: (0, kk), transforms=transforms,
                                      memory_space=plgpu.SMEM),
                      plgpu.BlockSpec((tile_k, cta_n), lambda kk: (kk, 0), transforms=transforms,
                                      memory_space=plgpu.SMEM)],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=config.max_concurrent_steps,
            compute_context=context)

    def kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem):
        ignore = lambda *_, **__: None

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
            out_smem=plgpu.SMEM((2, num_out_slots, epi_m, epi_n), out_gmem.dtype,
                                transforms=out_transforms),
            collective_axes="wg")
        def scope(allocs, out_smem):
            wg = lax.axis_index("wg")
            blk = lax.axis_index("cluster_grid")

            def trips(first, total, stride):
                # items first, first + stride, ... below total; none where first >= total
                return jnp.maximum(0, (total - first + stride - 1) // stride)

            if stream_blocks:
                def stream_item(i, _):
                    c = (blk + i * stream_blocks) % chunks

                    def context(eval_pipeline):
                        @functools.partial(pl.run_scoped, acc=plgpu.ACC((tile_m, tile_n), jnp.float32))
                        def _(acc):
                            eval_pipeline(acc)

                    pipeline(lambda idx, a_s, b_s, acc: acc, context)(
                        sa_gmem.at[pl.ds(c * cta_m, cta_m), :], sb_gmem.at[:, pl.ds(c * cta_n, cta_n)],
                        allocations=allocs)

                lax.fori_loop(0, jnp.where(blk < stream_blocks, trips(blk, stream_items, stream_blocks), 0),
                              stream_item, None)

            if gemm_blocks:
                def gemm_item(i, _):
                    lin = blk - stream_blocks + i * gemm_blocks
                    m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), config.grid_minor_dim,
                                                      config.grid_tile_width)
                    m_slice, n_slice = pl.ds(m_idx * cta_m, cta_m), pl.ds(n_idx * cta_n, cta_n)
                    if config.wg_dimension == MatmulDimension.M:
                        wg_m, wg_n = pl.ds(wg * tile_m, tile_m), slice(None)
                    else:
                        wg_m, wg_n = slice(None), pl.ds(wg * tile_n, tile_n)

                    def context(eval_pipeline):
                        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                        def _(acc_ref):
                            eval_pipeline(acc_ref)
                            acc = acc_ref[...].astype(out_gmem.dtype)
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                            for mi in range(tile_m // epi_m):
                                for ni in range(tile_n // epi_n):
                                    slot = (mi * (tile_n // epi_n) + ni) % 2
                                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                                    out_smem[wg, slot] = acc[mi * epi_m:(mi + 1) * epi_m,
                                                             ni * epi_n:(ni + 1) * epi_n]
                                    plgpu.commit_smem()
                                    plgpu.copy_smem_to_gmem(
                                        out_smem.at[wg, slot],
                                        out_gmem.at[m_slice, n_slice].at[wg_m, wg_n]
                                        .at[pl.ds(mi * epi_m, epi_m), pl.ds(ni * epi_n, epi_n)])

                    def mma(idx, a_smem, b_smem, acc_ref):
                        plgpu.wgmma(acc_ref, a_smem.at[wg_m], b_smem.at[:, wg_n])
                        plgpu.wgmma_wait(0)
                        return acc_ref

                    pipeline(mma, context)(a_gmem.at[m_slice, :], b_gmem.at[:, n_slice],
                                           allocations=allocs)

                lax.fori_loop(0, jnp.where(blk >= stream_blocks,
                                           trips(blk - stream_blocks, gemm_tiles, gemm_blocks), 0),
                              gemm_item, None)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((m, n), a.dtype),
        grid=(grid,), grid_names=("cluster_grid",), cluster=(1,), cluster_names=("cluster",),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(a, b, sa, sb)
