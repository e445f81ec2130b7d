"""Can a memory stream and a GEMM share the H200's multiprocessors, so that decode attention's
K/V reads run under prefill's GEMMs (NanoFlow's overlap)?

1. A TMA-fed Mosaic GPU stream (every block streams its share of 32 KB tiles through one
   pipeline, nothing computed) from B blocks: read rate against the device copy.
2. JAX's Hopper Mosaic GPU GEMM (pallas/ops/gpu/hopper_matmul_mgpu.py's kernel, persistent)
   held to S blocks: TFLOP/s at prefill's gate/up shape, against XLA's GEMM.
3. Both in one jitted program, the stream on one XLA stream and the GEMM on another
   (compute_on("gpu_stream:N")), B + S <= 132: span against each alone and against the same
   work done one after the other at full width.
4. Both in one launch (fused.py): blocks [0, B) stream, the other 132 - B compute the GEMM.

Times come from the profiler's device timeline (span of a call: first kernel start to last
kernel end).

    python scripts/probes/overlap/probe.py [stream] [gemm] [fused] [why] [decode]
"""
import functools
import json
import os
import sys
import tempfile
import time

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from bench_common import copy_bandwidth_gbs, gpu_kernel_events  # noqa: E402
from fused import fused_matmul_stream  # noqa: E402

M, K, N = 8192, 4096, 14336            # one prefill step's gate/up-sized GEMM
STREAM_SHAPE = (4096, 4096, 64)        # 2 GiB as 4,096 column units of [K, 64]
TARGET_US = 3000.0                     # each side's work in the paired runs


def stream_kernel(w, *, blocks, tile_k=256, steps=6):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    units, k_dim, cols = w.shape
    ksteps = k_dim // tile_k
    total = units * ksteps
    per = -(-total // blocks)
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def body(w_gmem, o_gmem):
        start = lax.axis_index("b") * per

        def tile(i):
            f = jnp.minimum(start + i, total - 1)  # a short last block re-reads one tile
            return f // ksteps, f % ksteps, 0

        spec = plgpu.BlockSpec((pl.squeezed, tile_k, cols), tile, transforms=transforms)

        def step(idx, w_smem):
            return None

        plgpu.emit_pipeline(step, grid=(per,), in_specs=[spec], max_concurrent_steps=steps)(w_gmem)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((blocks, 128), jnp.float32),
                        grid=(blocks,), grid_names=("b",))(w)


def mosaic_gemm(a, b, *, sms, config):
    """hopper_matmul_mgpu.matmul with the grid given instead of the device's core count."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    f = plgpu.kernel(
        functools.partial(hm.kernel, config=config),
        out_type=jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), a.dtype),
        grid=(sms,), grid_names=("cluster_grid",), cluster=(1,), cluster_names=("cluster",),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return f(a, b, None)


def gemm_configs():
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    D = hm.MatmulDimension
    return {
        "128x128 wgN w8": hm.TuningConfig(128, 128, 64, 4, 64, 64, D.N, 8, D.N),
        "128x128 wgM w8": hm.TuningConfig(128, 128, 64, 4, 64, 64, D.N, 8, D.M),
        "128x128 wgN w16 minorM": hm.TuningConfig(128, 128, 64, 4, 64, 64, D.M, 16, D.N),
    }


def on_stream(n, f):
    from jax._src import compute_on as co
    try:
        return co.compute_on(f, compute_type=f"gpu_stream:{n}",
                             out_memory_spaces=jax._src.core.MemorySpace.Device)
    except TypeError:  # older signature: compute_on(compute_type) as a context manager
        def g(*a):
            with co.compute_on(f"gpu_stream:{n}"):
                return f(*a)
        return g


def spans(fn, args, iters=5):
    """Median span and per-kernel durations of one call, from the device timeline."""
    jax.block_until_ready(fn(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(iters):
            jax.block_until_ready(fn(*args))
            time.sleep(0.01)
    ev = sorted((s, s + du, nm) for nm, s, du in gpu_kernel_events(d))
    groups, cur = [], [ev[0]]
    for e in ev[1:]:
        if e[0] - max(c[1] for c in cur) > 3000:
            groups.append(cur)
            cur = [e]
        else:
            cur.append(e)
    groups.append(cur)
    span = float(np.median([max(e[1] for e in g) - g[0][0] for g in groups]))
    busy = float(np.median([sum(e[1] - e[0] for e in g) for g in groups]))
    last = groups[-1]
    t0 = last[0][0]
    kernels = [(round(s - t0, 1), round(e - t0, 1), nm[:40]) for s, e, nm in last]
    return dict(span_us=span, busy_us=busy, calls=len(groups), kernels=kernels[:12])


def separate_launches(record, copy, key):
    """Parts 1-3."""
    # 1. the stream from B blocks
    nstreams = 6
    ws = [jax.random.normal(jax.random.fold_in(key, i), STREAM_SHAPE, jnp.bfloat16)
          for i in range(nstreams)]
    wbytes = ws[0].nbytes
    try:
        t = spans(jax.jit(lambda w: jnp.sum(w, dtype=jnp.float32)), (ws[0],))
        record(dict(part="stream", name="xla_sum", blocks=None, us=t["span_us"],
                    gbs=wbytes / t["span_us"] / 1e3, of_copy=wbytes / t["span_us"] / 1e3 / copy))
    except Exception as e:
        record(dict(part="stream", name="xla_sum", error=f"{type(e).__name__}: {str(e)[:300]}"))
    stream_us = {}
    for blocks in (8, 16, 24, 33, 44, 66, 99, 132):
        for tile_k, steps in ((256, 6), (512, 3)):
            row = dict(part="stream", name=f"tile_k{tile_k} steps{steps}", blocks=blocks)
            try:
                fn = jax.jit(functools.partial(stream_kernel, blocks=blocks, tile_k=tile_k, steps=steps))
                t = spans(fn, (ws[0],))
                gbs = wbytes / t["span_us"] / 1e3
                row.update(us=t["span_us"], gbs=gbs, of_copy=gbs / copy)
                best = stream_us.get(blocks)
                if best is None or t["span_us"] < best[0]:
                    stream_us[blocks] = (t["span_us"], tile_k, steps)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            record(row)

    # 2. the GEMM held to S blocks
    flops = 2 * M * K * N
    a = jax.random.normal(jax.random.fold_in(key, 100), (M, K), jnp.bfloat16)
    bs = [(jax.random.normal(jax.random.fold_in(key, 101 + i), (K, N), jnp.float32)
           * K ** -0.5).astype(jnp.bfloat16) for i in range(4)]
    xla = jax.jit(lambda a, b: a @ b)
    t = spans(xla, (a, bs[0]))
    xla_us = t["span_us"]
    record(dict(part="gemm", name="xla", sms=132, us=xla_us, tflops=flops / xla_us / 1e6))
    ref = np.asarray(xla(a, bs[0]), np.float32)
    configs = gemm_configs()
    best_cfg, best_us = None, None
    for name, cfg in configs.items():
        row = dict(part="gemm", name=name, sms=132)
        try:
            fn = jax.jit(functools.partial(mosaic_gemm, sms=132, config=cfg))
            got = np.asarray(fn(a, bs[0]), np.float32)
            row["rel_err"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
            t = spans(fn, (a, bs[0]))
            row.update(us=t["span_us"], tflops=flops / t["span_us"] / 1e6)
            if best_us is None or t["span_us"] < best_us:
                best_cfg, best_us = name, t["span_us"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        record(row)
    if best_cfg is None:
        raise SystemExit("no Mosaic GEMM config ran")
    gemm_us = {132: best_us}
    for sms in (116, 108, 99, 88, 66):
        fn = jax.jit(functools.partial(mosaic_gemm, sms=sms, config=configs[best_cfg]))
        row = dict(part="gemm", name=best_cfg, sms=sms)
        if sms == 66:
            got = np.asarray(fn(a, bs[0]), np.float32)
            row["rel_err"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        t = spans(fn, (a, bs[0]))
        gemm_us[sms] = t["span_us"]
        row.update(us=t["span_us"], tflops=flops / t["span_us"] / 1e6,
                   of_full=best_us / t["span_us"])
        record(row)

    # 3. both at once on two XLA streams, B + S <= 132
    full_stream_us = min(v[0] for v in stream_us.values())
    full_gemm_us = min(best_us, xla_us)
    for blocks, sms in ((16, 116), (24, 108), (33, 99), (44, 88), (66, 66)):
        if blocks not in stream_us or sms not in gemm_us:
            continue
        s_us, tile_k, steps = stream_us[blocks]
        ns = max(1, min(nstreams, round(TARGET_US / s_us)))
        ng = max(1, min(len(bs), round(TARGET_US / gemm_us[sms])))
        stream_f = functools.partial(stream_kernel, blocks=blocks, tile_k=tile_k, steps=steps)
        gemm_f = functools.partial(mosaic_gemm, sms=sms, config=configs[best_cfg])

        def streams(ws_):
            return [stream_f(w) for w in ws_]

        def gemms(a_, bs_):
            return [gemm_f(a_, b) for b in bs_]

        def serial(ws_, a_, bs_):
            return streams(ws_), gemms(a_, bs_)

        def paired(ws_, a_, bs_):
            return on_stream(1, streams)(ws_), on_stream(2, gemms)(a_, bs_)

        args = (ws[:ns], a, bs[:ng])
        alone = ns * s_us + ng * gemm_us[sms]
        full = ns * full_stream_us + ng * full_gemm_us  # the same work one after the other, all SMs
        for mode, f in (("serial", serial), ("two_streams", paired)):
            row = dict(part="paired", mode=mode, blocks=blocks, sms=sms, stream_calls=ns,
                       gemm_calls=ng, stream_alone_us=ns * s_us, gemm_alone_us=ng * gemm_us[sms],
                       full_width_serial_us=full)
            try:
                t = spans(jax.jit(f), args)
                row.update(us=t["span_us"], busy_us=t["busy_us"],
                           vs_sum_alone=t["span_us"] / alone, vs_full_width=t["span_us"] / full,
                           kernels=t["kernels"])
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            record(row)


def one_launch(record, copy, key):
    """Part 4: the GEMM and the stream in one launch of fused.py, blocks divided."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    D = hm.MatmulDimension
    cfg = hm.TuningConfig(128, 128, 64, 4, 64, 64, D.M, 16, D.N)  # best of part 2
    flops = 2 * M * K * N
    chunks, passes = 680, 3  # 2.14 GB of stand-in K/V, read 3 times
    a = jax.random.normal(jax.random.fold_in(key, 200), (M, K), jnp.bfloat16)
    b = (jax.random.normal(jax.random.fold_in(key, 201), (K, N), jnp.float32) * K ** -0.5).astype(jnp.bfloat16)
    sa = jax.random.normal(jax.random.fold_in(key, 202), (chunks * 128, K), jnp.bfloat16)
    sb = jax.random.normal(jax.random.fold_in(key, 203), (K, chunks * 256), jnp.bfloat16)
    sbytes = (sa.nbytes + sb.nbytes) * passes
    xla = jax.jit(lambda a, b: a @ b)
    ref = np.asarray(xla(a, b), np.float32)
    xla_us = spans(xla, (a, b))["span_us"]
    record(dict(part="fused", name="xla_gemm", us=xla_us, tflops=flops / xla_us / 1e6))

    def run(name, grid, stream_blocks, check=False):
        row = dict(part="fused", name=name, grid=grid, stream_blocks=stream_blocks)
        try:
            fn = jax.jit(functools.partial(fused_matmul_stream, config=cfg, grid=grid,
                                           stream_blocks=stream_blocks, passes=passes))
            if check:
                got = np.asarray(fn(a, b, sa, sb), np.float32)
                row["rel_err"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
            row["us"] = spans(fn, (a, b, sa, sb))["span_us"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        record(row)
        return row.get("us")

    gemm_full = run("gemm only", 132, 0, check=True)
    stream_full = run("stream only", 132, 132)
    if gemm_full is None or stream_full is None:
        return
    record(dict(part="fused", name="full-width rates", gemm_tflops=flops / gemm_full / 1e6,
                stream_gbs=sbytes / stream_full / 1e3, stream_of_copy=sbytes / stream_full / 1e3 / copy))
    serial = min(gemm_full, xla_us) + stream_full
    for blocks in (22, 33, 44, 55, 66):
        s_alone = run(f"stream only, {blocks} blocks", blocks, blocks)
        g_alone = run(f"gemm only, {132 - blocks} blocks", 132 - blocks, 0)
        both = run(f"both, {blocks} + {132 - blocks}", 132, blocks, check=(blocks == 44))
        if None in (s_alone, g_alone, both):
            continue
        record(dict(part="fused", name=f"summary {blocks}", stream_blocks=blocks,
                    stream_alone_us=s_alone, gemm_alone_us=g_alone, both_us=both,
                    max_alone_us=max(s_alone, g_alone), full_width_serial_us=serial,
                    speedup_vs_serial=serial / both))


def one_launch_why(record, copy, key):
    """Part 5: where the one launch loses. The same split with the stream held in L2 (8
    chunks, 25 MB, re-read to the same byte count: no DRAM traffic from the stream), and with
    a GEMM tile of 256 x 256 (two-thirds the operand reads per output of 128 x 256)."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    D = hm.MatmulDimension
    cfgs = {"128x256": hm.TuningConfig(128, 128, 64, 4, 64, 64, D.M, 16, D.N),
            "256x256": hm.TuningConfig(128, 256, 64, 3, 64, 64, D.M, 16, D.M)}
    a = jax.random.normal(jax.random.fold_in(key, 200), (M, K), jnp.bfloat16)
    b = (jax.random.normal(jax.random.fold_in(key, 201), (K, N), jnp.float32) * K ** -0.5).astype(jnp.bfloat16)
    ref = np.asarray(jax.jit(lambda a, b: a @ b)(a, b), np.float32)
    flops = 2 * M * K * N
    for cfg_name, cfg in cfgs.items():
        cta_m = cfg.tile_m * (1 + (cfg.wg_dimension == D.M))
        cta_n = cfg.tile_n * (1 + (cfg.wg_dimension == D.N))
        for where, chunks, passes in (("dram", 680 * 384 // (cta_m + cta_n), 3),
                                      ("l2", 8 * 384 // (cta_m + cta_n), 255)):
            sa = jax.random.normal(jax.random.fold_in(key, 202), (chunks * cta_m, K), jnp.bfloat16)
            sb = jax.random.normal(jax.random.fold_in(key, 203), (K, chunks * cta_n), jnp.bfloat16)
            sbytes = (sa.nbytes + sb.nbytes) * passes
            for grid, stream_blocks in ((132, 0), (88, 0), (44, 44), (132, 44), (99, 0), (33, 33), (132, 33)):
                if where == "l2" and stream_blocks == 0:
                    continue
                row = dict(part="why", cfg=cfg_name, stream_in=where, grid=grid, stream_blocks=stream_blocks)
                try:
                    fn = jax.jit(functools.partial(fused_matmul_stream, config=cfg, grid=grid,
                                                   stream_blocks=stream_blocks, passes=passes))
                    if grid == 132:
                        got = np.asarray(fn(a, b, sa, sb), np.float32)
                        row["rel_err"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
                    us = spans(fn, (a, b, sa, sb))["span_us"]
                    row["us"] = us
                    if stream_blocks == 0:
                        row["tflops"] = flops / us / 1e6
                    elif grid == stream_blocks:
                        row["stream_gbs"] = sbytes / us / 1e3
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                record(row)
            del sa, sb


def decode_pair(record, copy, key):
    """Part 6: the decode side. A decode step's GEMMs (256 rows) read every weight once and
    are compute-bound only by about 1.4x, so beside decode attention they need the same
    DRAM. Stand-in: 256 x 4,096 x 114,688 (940 MB of weights, 8 gate-sized GEMMs' worth)
    with 2.1 GB of stand-in K/V, alone and in one launch on divided multiprocessors."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    D = hm.MatmulDimension
    cfg = hm.TuningConfig(128, 128, 64, 4, 64, 64, D.M, 16, D.N)
    m, n = 256, 8 * N
    flops = 2 * m * K * n
    a = jax.random.normal(jax.random.fold_in(key, 300), (m, K), jnp.bfloat16)
    b = (jax.random.normal(jax.random.fold_in(key, 301), (K, n), jnp.float32) * K ** -0.5).astype(jnp.bfloat16)
    chunks = 680
    sa = jax.random.normal(jax.random.fold_in(key, 302), (chunks * 128, K), jnp.bfloat16)
    sb = jax.random.normal(jax.random.fold_in(key, 303), (K, chunks * 256), jnp.bfloat16)
    sbytes = sa.nbytes + sb.nbytes
    xla = jax.jit(lambda a, b: a @ b)
    ref = np.asarray(xla(a, b), np.float32)
    xla_us = spans(xla, (a, b))["span_us"]
    record(dict(part="decode", name="xla_gemm", us=xla_us, tflops=flops / xla_us / 1e6,
                weights_gbs=b.nbytes / xla_us / 1e3))

    def run(name, grid, stream_blocks):
        row = dict(part="decode", name=name, grid=grid, stream_blocks=stream_blocks)
        try:
            fn = jax.jit(functools.partial(fused_matmul_stream, config=cfg, grid=grid,
                                           stream_blocks=stream_blocks, passes=1))
            if grid > stream_blocks:
                got = np.asarray(fn(a, b, sa, sb), np.float32)
                row["rel_err"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
            row["us"] = spans(fn, (a, b, sa, sb))["span_us"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        record(row)
        return row.get("us")

    gemm_full = run("gemm only", 132, 0)
    stream_full = run("stream only", 132, 132)
    if gemm_full is None or stream_full is None:
        return
    record(dict(part="decode", name="full-width rates", gemm_tflops=flops / gemm_full / 1e6,
                stream_of_copy=sbytes / stream_full / 1e3 / copy))
    serial = min(gemm_full, xla_us) + stream_full
    for blocks in (33, 44, 66, 88):
        s_alone = run(f"stream only, {blocks} blocks", blocks, blocks)
        g_alone = run(f"gemm only, {132 - blocks} blocks", 132 - blocks, 0)
        both = run(f"both, {blocks} + {132 - blocks}", 132, blocks)
        if None in (s_alone, g_alone, both):
            continue
        record(dict(part="decode", name=f"summary {blocks}", stream_alone_us=s_alone,
                    gemm_alone_us=g_alone, both_us=both, full_width_serial_us=serial,
                    speedup_vs_serial=serial / both))


def main():
    out_dir = os.environ.get("OUT", "/tmp")
    key = jax.random.key(0)
    result = dict(device=str(jax.devices()[0]), jax=jax.__version__,
                  xla_flags=os.environ.get("XLA_FLAGS", ""), rows=[])
    rows = result["rows"]

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    copy = copy_bandwidth_gbs()
    result["copy_gbs"] = copy
    print(f"copy {copy:.0f} GB/s", flush=True)

    parts = set(sys.argv[1:]) or {"separate", "fused"}
    if "separate" in parts:
        separate_launches(record, copy, key)
    if "fused" in parts:
        one_launch(record, copy, key)
    if "why" in parts:
        one_launch_why(record, copy, key)
    if "decode" in parts:
        decode_pair(record, copy, key)

    with open(os.path.join(out_dir, "overlap.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print("\npart    name/mode               B/S    us      rate      of copy/full  vs full-width serial")
    for r in rows:
        if "error" in r:
            print(f"{r['part']:7s} {r.get('name', r.get('mode')):22s} ERROR {r['error'][:90]}")
        elif r["part"] == "stream":
            print(f"{r['part']:7s} {r['name']:22s} {str(r['blocks']):5s} {r['us']:8.1f} "
                  f"{r['gbs']:7.0f} GB/s {r['of_copy']:.3f}")
        elif r["part"] == "gemm":
            print(f"{r['part']:7s} {r['name']:22s} {r['sms']:<5d} {r['us']:8.1f} "
                  f"{r['tflops']:6.0f} TF/s  {r.get('of_full', 1):.3f}")
        elif r["part"] in ("fused", "why", "decode"):
            print(f"{r['part']:7s} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in r.items() if k != "part"))
        else:
            print(f"{r['part']:7s} {r['mode']:22s} {r['blocks']}/{r['sms']} {r['us']:8.1f} "
                  f"sum alone {r['stream_alone_us'] + r['gemm_alone_us']:7.1f}  "
                  f"full-width serial {r['full_width_serial_us']:7.1f}  ratio {r['vs_full_width']:.3f}")


if __name__ == "__main__":
    main()
