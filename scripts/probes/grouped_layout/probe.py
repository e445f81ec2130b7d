"""Does XLA's few-row GEMM stream faster when the weight is stored as G contiguous column
groups, [G, K, N / G], and multiplied as a batched GEMM (the rows broadcast over G)? Span per
call from the device timeline, weights L2-cold (enough copies), with and without an
elementwise consumer that has to read the grouped output back as [rows, N].

    python scripts/probes/grouped_layout/probe.py
"""
import json, os, sys, tempfile, time
import numpy as np
import jax, jax.numpy as jnp
sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "..")]
from bench_common import gpu_kernel_events

SHAPES = {"gate_up": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144),
          "o": (4096, 4096), "lm_head": (4096, 128256)}
WIDTHS = [None, 64, 128, 256, 512]


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
    names = sorted({e[2][:40] for e in groups[-1]})
    return dict(span_us=span, busy_us=busy, kernels_per_call=len(groups[-1]) / copies, names=names)


def grouped_matmul(a, wg):
    g, k, n = wg.shape
    out = jnp.einsum("grk,gkn->grn", jnp.broadcast_to(a, (g,) + a.shape), wg)
    return out.transpose(1, 0, 2).reshape(a.shape[0], g * n)


def main():
    out_dir = os.environ.get("OUT", "/tmp")
    key = jax.random.key(0)
    results = []
    for shape, (k_dim, n) in SHAPES.items():
        nbytes = k_dim * n * 2
        copies = max(2, -(-400_000_000 // nbytes))
        ws = [(jax.random.normal(jax.random.fold_in(key, i), (k_dim, n), jnp.float32)
               * k_dim ** -0.5).astype(jnp.bfloat16) for i in range(copies)]
        a = jax.random.normal(jax.random.fold_in(key, 99), (4, k_dim), jnp.bfloat16)
        ref = np.asarray(a @ ws[0], np.float32)
        for width in [w for w in WIDTHS if w is None or n % w == 0]:
            if width is None:
                wts = ws
                mm = lambda a, w: a @ w
            else:
                wts = [w.reshape(k_dim, n // width, width).transpose(1, 0, 2) for w in ws]
                wts = [jax.block_until_ready(jnp.asarray(w)) for w in wts]
                mm = grouped_matmul
            for consumer in (False, True):
                row = dict(shape=shape, width=width, consumer=consumer, copies=copies)
                try:
                    if consumer:
                        fn = jax.jit(lambda a, ws: [jax.nn.silu(mm(a, w).astype(jnp.float32)).astype(jnp.bfloat16) for w in ws])
                    else:
                        fn = jax.jit(lambda a, ws: [mm(a, w) for w in ws])
                    if not consumer:
                        got = np.asarray(fn(a, wts[:1])[0], np.float32)
                        row["rel_err"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
                    row.update(timeline(fn, (a, wts), copies))
                    row["tb_s_span"] = nbytes / row["span_us"] / 1e6
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                results.append(row)
                print(json.dumps(row), flush=True)
            wts = None
        ws = None
    json.dump(dict(jax=jax.__version__, results=results), open(os.path.join(out_dir, "grouped_layout.json"), "w"), indent=1)
    print("\nshape    width consumer  span us  busy us  TB/s  k/call  err   kernels")
    for r in results:
        if "error" in r:
            print(f"{r['shape']:8s} {str(r['width']):5s} {r['consumer']!s:5s} ERROR {r['error'][:90]}"); continue
        print(f"{r['shape']:8s} {str(r['width']):5s} {r['consumer']!s:5s} {r['span_us']:9.2f} {r['busy_us']:8.2f} {r['tb_s_span']:5.2f} "
              f"{r['kernels_per_call']:5.1f} {r.get('rel_err', float('nan')):.0e} {','.join(r['names'])[:70]}")


if __name__ == "__main__":
    main()
