"""Does a Mosaic GPU projection launched with PDL (weights requested before the wait) hide its
predecessor? A chain of 32 'layers': a norm/SiLU-like XLA fusion that depends on x, then
x = x + h @ w. Per-layer wall time of the whole chain, and correctness against XLA.

Run on the GPU: python scripts/probes/pdl/pdl_probe.py, and again with
XLA_FLAGS=--xla_gpu_enable_command_buffer= (command buffers off)."""
import functools, json, os, sys, time
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import few_row_residual_matmul as frr
from pdl_kernel import pdl_residual_matmul

L = 32
key = jax.random.key(0)
res = {}


def chain(x, gus, ws, proj):
    f = gus[0].shape[1] // 2
    for l in range(L):
        s = jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True) + 1e-6)
        g = gus[l].astype(jnp.float32)
        h = (jax.nn.silu(g[:, :f] * s) * g[:, f:]).astype(jnp.bfloat16)
        x = proj(x, h, ws[l])
    return x


def timeit(fn, *args, n=30):
    f = jax.jit(fn)
    out = jax.block_until_ready(f(*args))
    for _ in range(3):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    import tempfile
    sys.path.insert(0, "scripts")
    from bench_common import gpu_kernel_events
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(4):
            jax.block_until_ready(f(*args))
            time.sleep(0.01)
    ev = sorted((s, s + du, nm) for nm, s, du in gpu_kernel_events(d))
    groups, cur = [], [ev[0]]
    for e in ev[1:]:
        if e[0] - max(c[1] for c in cur[-3:]) > 2000:
            groups.append(cur); cur = [e]
        else:
            cur.append(e)
    groups.append(cur)
    span = float(np.median([max(e[1] for e in g) - g[0][0] for g in groups])) / L
    busy = float(np.median([sum(e[1] - e[0] for e in g) for g in groups])) / L
    nk = len(groups[-1]) / L
    return out, (float(np.median(ts)) / L * 1e6, span, busy, nk, len(groups))


variants = {
    "xla": lambda x, a, w: x + a @ w,
    "mosaic_orig": frr.few_row_residual_matmul,
    "manual_nopdl": functools.partial(pdl_residual_matmul, pdl=False, prefetch=False),
    "manual_nopdl_s6_k128": functools.partial(pdl_residual_matmul, pdl=False, prefetch=False, tile_k=128, steps=6),
    "pdl_wait_first": functools.partial(pdl_residual_matmul, pdl=True, prefetch=False),
    "pdl_prefetch": functools.partial(pdl_residual_matmul, pdl=True, prefetch=True),
    "pdl_prefetch_s6_k128": functools.partial(pdl_residual_matmul, pdl=True, prefetch=True, tile_k=128, steps=6),
}
lines = []
for name, K, N in [("down", 14336, 4096), ("o", 4096, 4096)]:
    ws = [(jax.random.normal(jax.random.fold_in(key, i), (K, N), jnp.float32) * K ** -0.5).astype(jnp.bfloat16) for i in range(L)]
    gus = [jax.random.normal(jax.random.fold_in(key, 100 + i), (8, 2 * K), jnp.bfloat16) for i in range(L)]
    x0 = jax.random.normal(jax.random.fold_in(key, 999), (8, N), jnp.bfloat16)
    ref = None
    for vname, proj in variants.items():
        try:
            out, us = timeit(functools.partial(chain, proj=proj), x0, gus, ws)
            out = np.asarray(out, np.float32)
            if ref is None:
                ref = out
            err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-9))
            res[f"{name}/{vname}"] = {"wall_span_busy_kernels_groups": us, "rel_err_vs_xla": err}
            lines.append(f"{name:5s} {vname:22s} wall {us[0]:7.2f} span {us[1]:7.2f} busy {us[2]:7.2f} us/layer, {us[3]:.2f} kernels/layer ({us[4]} calls)  err {err:.2e}")
        except Exception as e:
            res[f"{name}/{vname}"] = {"error": repr(e)[:2000]}
            lines.append(f"{name:5s} {vname:22s} ERROR {repr(e)[:300]}")
        print(lines[-1], flush=True)
    del ws
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "pdl_probe.json"), "w"), indent=1)
print("\n".join(lines))
