"""Per-layer span of a 32-layer chain of decoder projections at 8 rows (Llama-3.1-8B shapes:
q/k/v, o + residual, gate/up, SiLU-multiply, down + residual), as XLA's kernels against one
persistent warp-specialised Mosaic GPU kernel (chain_kernel.py), with the device's copy
bandwidth measured in the same process.

    python scripts/probes/chain_stream/probe.py [variant ...]

Variants: xla[:attn=<context>], or <mode>:<tk>:<slots>[:<option>=<int>...] with mode full /
stream / nobar (options: attn (context tokens; 0 = no attention), silu, blocks; see
chain_kernel.py). JSON under $OUT."""
import json, os, sys, tempfile, time
import numpy as np
import jax, jax.numpy as jnp

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [here, os.path.join(here, "..", "..", "..")]
from chain_kernel import D, F, HD, KVH, NQKV, R, chain_kernel, chain_xla, tile_weight
from scripts.bench_common import copy_bandwidth_gbs, gpu_kernel_events

L = 32
variants = sys.argv[1:] or ["xla", "xla:attn=256", "stream:128:11", "full:128:11",
                           "full:128:11:blocks=128", "full:128:6", "full:128:6:attn=256",
                           "nobar:128:6:attn=256", "full:128:6:attn=256:blocks=128"]
out_dir = os.environ.get("OUT", "/tmp")
key = jax.random.key(0)


def weight(i, k, n):
    w = jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32) * k ** -0.5
    return w.astype(jnp.bfloat16)


shapes = [(D, NQKV), (D, D), (D, 2 * F), (F, D)]
# The o projection scaled down so that x stays finite over 32 layers (gate/up is quadratic).
scale = [1.0, 0.1, 1.0, 1.0]
std = [[(weight(100 * p + l, *shapes[p]) * scale[p]).astype(jnp.bfloat16) for l in range(L)]
       for p in range(4)]
tiled = [jnp.stack([tile_weight(w) for w in ws]) for ws in std]
jax.block_until_ready(tiled)
bytes_per_layer = sum(k * n * 2 for k, n in shapes)
x0 = (0.1 * jax.random.normal(jax.random.fold_in(key, 999), (R, D), jnp.float32)).astype(jnp.bfloat16)
copy_gbs = copy_bandwidth_gbs()


def run(name):
    kind, *rest = name.split(":")
    extra = dict(e.split("=") for e in rest if "=" in e)
    ctx = int(extra.pop("attn", 0))
    kv = kv2 = (None, None)
    if ctx:
        kc, vc = (jax.random.normal(jax.random.fold_in(key, 500 + i), (L, KVH, ctx, HD),
                                    jnp.float32).astype(jnp.bfloat16) for i in range(2))
        kv, kv2 = (kc, vc), (kc[:2], vc[:2])
    if kind == "xla":
        norm = bool(int(extra.get("norm", 0)))
        fn = jax.jit(lambda x, ws, kv: chain_xla(x, *ws, *kv, norm=norm))
        args, args2 = std, [ws[:2] for ws in std]
        cfg = dict(attn=ctx, norm=int(norm))
    else:
        tk, slots = (int(v) for v in rest[:2])
        kcfg = dict(mode=kind, tk=tk, slots=slots, **{k: int(v) for k, v in extra.items()})
        fn = jax.jit(lambda x, ws, kv: chain_kernel(x, *ws, *kv, **kcfg)[0])
        args, args2 = tiled, [t[:2] for t in tiled]
        cfg = dict(kcfg, attn=ctx)
    t = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn(x0, args, kv)), np.float32)
    compile_s = time.perf_counter() - t
    out_small = np.asarray(jax.block_until_ready(fn(x0, args2, kv2)), np.float32)
    again = np.asarray(jax.block_until_ready(fn(x0, args, kv)), np.float32)
    walls = []
    for _ in range(20):
        t = time.perf_counter()
        jax.block_until_ready(fn(x0, args, kv))
        walls.append(time.perf_counter() - t)
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(5):
            jax.block_until_ready(fn(x0, args, kv))
            time.sleep(0.005)
    ev = sorted((s, s + du, nm) for nm, s, du in gpu_kernel_events(d))
    groups, cur = [], [ev[0]]
    for e in ev[1:]:
        if e[0] - max(c[1] for c in cur) > 1000:
            groups.append(cur)
            cur = [e]
        else:
            cur.append(e)
    groups.append(cur)
    spans = [max(e[1] for e in g) - g[0][0] for g in groups]
    span = float(np.median(spans)) / L
    kern = {}
    for e in groups[-1]:
        kern.setdefault(e[2][:48], []).append(e[1] - e[0])
    return dict(name=name, cfg=cfg, compile_s=compile_s, out=out, out_small=out_small,
                repeat_identical=bool(np.array_equal(out, again)),
                span_us_per_layer=span, spans_us=spans,
                wall_us_per_layer=float(np.median(walls)) / L * 1e6,
                kernels_per_layer=len(groups[-1]) / L,
                kernels={k: [len(v) / L, float(np.mean(v))] for k, v in kern.items()},
                tbs=bytes_per_layer / (span * 1e-6) / 1e12)


results = {}
for name in variants:
    try:
        results[name] = run(name)
        r = results[name]
        print(f"{name}: span {r['span_us_per_layer']:.2f} us/layer, {r['tbs']:.2f} TB/s, "
              f"compile {r['compile_s']:.1f} s, same {r['repeat_identical']}", flush=True)
    except Exception as e:  # keep the other variants
        results[name] = dict(name=name, error=f"{type(e).__name__}: {e}"[:2000])
        print(name, "FAILED", results[name]["error"][:800], flush=True)

rows = []
for name, r in results.items():
    if "error" in r:
        continue
    err = err2 = None
    ref = next((q for q in results.values() if q["name"].startswith("xla") and "out" in q
                and q["cfg"]["attn"] == r["cfg"].get("attn")
                and q["cfg"]["norm"] == r["cfg"].get("norm", 0)), None)
    if ref is not None and r is not ref and r["cfg"].get("mode") == "full":
        err = float(np.max(np.abs(r["out"] - ref["out"])) / np.max(np.abs(ref["out"])))
        err2 = float(np.max(np.abs(r["out_small"] - ref["out_small"])) / np.max(np.abs(ref["out_small"])))
    r["err_vs_xla"], r["err2_vs_xla"] = err, err2
    rows.append(r)
for r in results.values():
    r.pop("out", None), r.pop("out_small", None)
json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, layers=L, rows=R,
               bytes_per_layer=bytes_per_layer, copy_gbs=copy_gbs, results=results),
          open(os.path.join(out_dir, "chain_stream.json"), "w"), indent=1)
print(f"copy bandwidth {copy_gbs:.0f} GB/s; weights {bytes_per_layer / 1e6:.1f} MB a layer "
      f"({bytes_per_layer / copy_gbs / 1e3:.2f} us at copy bandwidth)")
print(f"{'variant':14s} {'span us/layer':>13s} {'TB/s':>6s} {'wall':>7s} {'k/layer':>7s} "
      f"{'err32':>8s} {'err2':>8s} {'same':>5s} {'compile s':>9s}")
for r in rows:
    e = lambda v: "-" if v is None else f"{v:.1e}"
    print(f"{r['name']:14s} {r['span_us_per_layer']:13.2f} {r['tbs']:6.2f} {r['wall_us_per_layer']:7.2f} "
          f"{r['kernels_per_layer']:7.2f} {e(r['err_vs_xla']):>8s} {e(r['err2_vs_xla']):>8s} "
          f"{str(r['repeat_identical']):>5s} {r['compile_s']:9.1f}")
for r in rows:
    if r["name"].startswith("xla"):
        print(r["name"], "kernels per layer:",
              "  ".join(f"{k}:{n:.1f}x{t:.2f}" for k, (n, t) in r["kernels"].items()))
