"""A chain of 32 'layers' at 8 rows (Llama-3.1-8B shapes): an XLA RMSNorm of x, then
x = x + (norm(x) @ Wqkv)[:, :4096] @ Wo (the attention half of a layer with the attention
left out), as XLA's kernels or as one persistent Mosaic GPU kernel. Per-layer span of the
device timeline, kernels per layer, and error against XLA. One variant per process:

    python scripts/probes/persistent_qkv_o.py xla
    python scripts/probes/persistent_qkv_o.py p2 '{"preload": 2}'
    python scripts/probes/persistent_qkv_o.py p2_2bar '{"preload": 2, "barriers": 2}'
"""
import functools, json, os, sys, time
import numpy as np
import jax, jax.numpy as jnp
sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..")]
from persistent_qkv_o_kernel import qkv_o_persistent, qkv_o_xla
from bench_common import gpu_kernel_events

L, D, F = 32, 4096, 3072  # 2F: the q/k/v width (4096 + 2 x 1024)
name = sys.argv[1]
cfg = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
key = jax.random.key(0)
half = qkv_o_xla if name.startswith("xla") else functools.partial(qkv_o_persistent, **cfg)


def chain(x, nws, wqkvs, wos):
    for l in range(L):
        s = jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6)
        a = (x.astype(jnp.float32) * s * nws[l]).astype(jnp.bfloat16)
        x = half(x, a, wqkvs[l], wos[l])
    return x


wqkvs = [(jax.random.normal(jax.random.fold_in(key, i), (D, 2 * F), jnp.float32) * D ** -0.5).astype(jnp.bfloat16) for i in range(L)]
wos = [(jax.random.normal(jax.random.fold_in(key, 100 + i), (D, D), jnp.float32) * D ** -0.5).astype(jnp.bfloat16) for i in range(L)]
nws = [1 + 0.1 * jax.random.normal(jax.random.fold_in(key, 200 + i), (D,), jnp.float32) for i in range(L)]
x0 = jax.random.normal(jax.random.fold_in(key, 999), (8, D), jnp.bfloat16)

# One layer against XLA.
a0 = (jax.random.normal(jax.random.fold_in(key, 998), (8, D), jnp.bfloat16))
ref1 = np.asarray(jax.jit(qkv_o_xla)(x0, a0, wqkvs[0], wos[0]), np.float32)
out1 = np.asarray(jax.jit(half)(x0, a0, wqkvs[0], wos[0]), np.float32)
err1 = float(np.max(np.abs(out1 - ref1)) / np.max(np.abs(ref1)))
f = jax.jit(chain)
t = time.perf_counter()
out = jax.block_until_ready(f(x0, nws, wqkvs, wos))
compile_s = time.perf_counter() - t
for _ in range(5):
    out2 = jax.block_until_ready(f(x0, nws, wqkvs, wos))
same = bool(np.array_equal(np.asarray(out), np.asarray(out2)))
ts = []
for _ in range(30):
    t = time.perf_counter(); jax.block_until_ready(f(x0, nws, wqkvs, wos)); ts.append(time.perf_counter() - t)
import tempfile
d = tempfile.mkdtemp()
with jax.profiler.trace(d):
    for _ in range(4):
        jax.block_until_ready(f(x0, nws, wqkvs, wos)); time.sleep(0.01)
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
kn = {}
for e in groups[-1]:
    kn.setdefault(e[2][:40], []).append(e[1] - e[0])
np.save(os.path.join(os.environ.get("OUT", "/tmp"), f"ahout-{name}.npy"), np.asarray(out, np.float32))
r = dict(name=name, cfg=cfg, err1=err1, repeat_identical=same, wall_us_per_layer=float(np.median(ts)) / L * 1e6,
         span_us_per_layer=span, busy_us_per_layer=busy, kernels_per_layer=nk, compile_s=compile_s,
         kernels={k: (len(v) / L, float(np.mean(v))) for k, v in kn.items()})
json.dump(r, open(os.path.join(os.environ.get("OUT", "/tmp"), f"ah-{name}.json"), "w"), indent=1)
print(f"{name:10s} {json.dumps(cfg):40s} span {span:6.2f} busy {busy:6.2f} wall {r['wall_us_per_layer']:6.2f} us/layer, {nk:.1f} k/layer, err1 {err1:.1e}, same {same}")
print("   ", "  ".join(f"{k}:{n:.1f}x{t:.2f}" for k, (n, t) in r["kernels"].items()))
