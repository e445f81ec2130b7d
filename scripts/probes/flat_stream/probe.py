"""Weight-stream rate of few-row GEMMs: XLA's kernels against the flat persistent Mosaic GPU
kernel of flat_gemm.py, for the Llama-3.1-8B decode projections. Each variant runs on enough
copies of the weights that they do not stay in L2; kernel time and span per call come from
the profiler's device timeline.

    python scripts/probes/flat_stream/probe.py [shape ...]
"""
import json, os, sys, tempfile, time
import numpy as np
import jax, jax.numpy as jnp
sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..", "..")]
from flat_gemm import flat_gemm, fixup, tile_weights
from bench_common import gpu_kernel_events

SHAPES = {"gate_up": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144),
          "o": (4096, 4096), "lm_head": (4096, 128256)}
FLAT = [
    dict(mode="stream", tile_k=256, steps=4),
    dict(mode="stream", tile_k=256, steps=4, tiled=True),
    dict(mode="stream", tile_k=512, steps=3, tiled=True),
    dict(mode="stream", tile_k=128, steps=6, cols=128),
    dict(mode="full", tile_k=256, steps=4, tiled=True),
    dict(mode="full", tile_k=512, steps=3, tiled=True),
    dict(mode="full", tile_k=256, steps=3, tiled=True, cols=128),
]


def timeline(fn, args, copies, iters=5):
    jax.block_until_ready(fn(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(iters):
            jax.block_until_ready(fn(*args)); time.sleep(0.01)
    ev = sorted((s, s + du, nm) for nm, s, du in gpu_kernel_events(d))
    groups, cur = [], [ev[0]]
    for e in ev[1:]:
        if e[0] - max(c[1] for c in cur[-4:]) > 3000:
            groups.append(cur); cur = [e]
        else:
            cur.append(e)
    groups.append(cur)
    span = float(np.median([max(e[1] for e in g) - g[0][0] for g in groups])) / copies
    busy = float(np.median([sum(e[1] - e[0] for e in g) for g in groups])) / copies
    names = sorted({e[2][:48] for e in groups[-1]})
    return dict(span_us=span, busy_us=busy, kernels_per_call=len(groups[-1]) / copies, names=names)


def main():
    out_dir = os.environ.get("OUT", "/tmp")
    shapes = sys.argv[1:] or list(SHAPES)
    key = jax.random.key(0)
    results = []
    for shape in shapes:
        k_dim, n = SHAPES[shape]
        nbytes = k_dim * n * 2
        copies = max(2, -(-400_000_000 // nbytes))
        ws = [(jax.random.normal(jax.random.fold_in(key, i), (k_dim, n), jnp.float32)
               * k_dim ** -0.5).astype(jnp.bfloat16) for i in range(copies)]
        a8 = jax.random.normal(jax.random.fold_in(key, 99), (8, k_dim), jnp.bfloat16)
        a4 = a8[:4]
        ref = np.asarray(jax.jit(lambda a, w: jnp.dot(a.astype(jnp.float32), w.astype(jnp.float32),
                                                      precision="highest"))(a8, ws[0]))
        variants = [("xla4", None)] + [("flat", c) for c in FLAT]
        for name, cfg in variants:
            row = dict(shape=shape, name=name, cfg=cfg, mb=nbytes / 1e6, copies=copies)
            try:
                if name == "xla4":
                    fn = jax.jit(lambda a, ws: [a @ w for w in ws]); args = (a4, ws)
                elif name == "xla8":
                    fn = jax.jit(lambda a, ws: [a @ w for w in ws]); args = (a8, ws)
                elif name == "colsum":
                    fn = jax.jit(lambda a, ws: [jnp.sum(w, 0, dtype=jnp.float32) for w in ws]); args = (a8, ws)
                else:
                    c = dict(cfg); blocks = c.pop("blocks", 132)
                    cols = c.get("cols", 64)
                    wts = [tile_weights(w, cols) for w in ws] if c.get("tiled") else ws
                    fn = jax.jit(lambda a, ws: [flat_gemm(a, w, blocks=blocks, **c) for w in ws]); args = (a8, wts)
                    if c["mode"] == "full":
                        o, p = fn(a8, wts[:1])[0]
                        got, nsplit = fixup(o, p, k_dim, n, blocks=blocks, tile_k=c["tile_k"], cols=cols)
                        row["rel_err"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
                        row["split_units"] = nsplit
                t = time.perf_counter(); jax.block_until_ready(fn(*args)); row["first_call_s"] = time.perf_counter() - t
                row.update(timeline(fn, args, copies))
                row["tb_s_busy"] = nbytes / row["busy_us"] / 1e6
                row["tb_s_span"] = nbytes / row["span_us"] / 1e6
            except Exception as e:  # keep the other variants going
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            results.append(row)
            args = fn = None
            print(json.dumps(row), flush=True)
        del ws
    json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, results=results),
              open(os.path.join(out_dir, "flat_stream.json"), "w"), indent=1)
    print("\nshape    variant                                   busy us  span us  TB/s(span) k/call err")
    for r in results:
        if "error" in r:
            print(f"{r['shape']:8s} {r['name']:5s} {json.dumps(r['cfg'] or {}):36s} ERROR {r['error'][:80]}")
            continue
        print(f"{r['shape']:8s} {r['name']:5s} {json.dumps(r['cfg'] or {}):36s} {r['busy_us']:7.2f} {r['span_us']:8.2f} "
              f"{r['tb_s_span']:8.2f} {r['kernels_per_call']:5.1f} {r.get('rel_err', float('nan')):.1e}")


if __name__ == "__main__":
    main()
