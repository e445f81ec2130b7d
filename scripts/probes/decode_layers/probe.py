"""Per-layer span of the 32 decoder layers of a batch-1 decode step (Llama-3.1-8B shapes, 8
rows, a context of `ctx` cached tokens plus the new one), as XLA's kernels against one
persistent Mosaic GPU kernel (layer_kernel.py) followed by the K/V write, with the device's
copy bandwidth measured in the same process; and how far the kernel's results are from XLA's.

    python scripts/probes/decode_layers/probe.py [variant ...]

Variants: xla[:ctx=<n>][:pos=<n>], or kernel:<slots>[:<option>=<int>...] (options blocks, ctx
(256 by default), pos (the new token's position, ctx by default), rope, norm, newtok, xr; see
layer_kernel.py). Errors are against the xla row of the same ctx and pos.
JSON under $OUT."""
import json, os, sys, tempfile, time
import numpy as np
import jax, jax.numpy as jnp

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [here, os.path.join(here, "..", "..", "..")]
from layer_kernel import (D, F, HD, KVH, NQKV, R, TC, decode_layers_kernel, decode_layers_xla,
                          HEAD_PERM, permute_qk_columns, tile_weight)
from scripts.bench_common import copy_bandwidth_gbs, gpu_kernel_events

L = 32
variants = sys.argv[1:] or ["xla", "kernel:7", "kernel:7:newtok=0",
                           "kernel:6:rope=0:norm=0:newtok=0:xr=0"]
out_dir = os.environ.get("OUT", "/tmp")
key = jax.random.key(0)


def weight(i, k, n):
    w = jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32) * k ** -0.5
    return w.astype(jnp.bfloat16)


shapes = [(D, NQKV), (D, D), (D, 2 * F), (F, D)]
scale = [1.0, 0.1, 1.0, 1.0]
std = [[(weight(100 * p + l, *shapes[p]) * scale[p]).astype(jnp.bfloat16) for l in range(L)]
       for p in range(4)]
tiled = [jnp.stack([tile_weight(w) for w in ws]) for ws in std]
tiled_qkv_permuted = jnp.stack([tile_weight(permute_qk_columns(w)) for w in std[0]])
jax.block_until_ready((tiled, tiled_qkv_permuted))
bytes_per_layer = sum(k * n * 2 for k, n in shapes)
x0 = jnp.zeros((R, D), jnp.bfloat16).at[0].set(
    jax.random.normal(jax.random.fold_in(key, 999), (D,), jnp.float32).astype(jnp.bfloat16))
copy_gbs = copy_bandwidth_gbs()


def cache(ctx, layers):
    return tuple(jax.random.normal(jax.random.fold_in(key, 500 + i), (layers, KVH, ctx + TC, HD),
                                   jnp.float32).astype(jnp.bfloat16) for i in range(2))


def run(name):
    kind, *rest = name.split(":")
    extra = {k: int(v) for k, v in (e.split("=") for e in rest if "=" in e)}
    ctx = extra.pop("ctx", 256)
    at = extra.pop("pos", ctx)   # the new token's position (newtok=3 needs it below ctx)
    pos = jnp.array([at], jnp.int32)
    if kind == "xla":
        fn = jax.jit(lambda x, ws, kc, vc, pos: decode_layers_xla(x, *ws, kc, vc, pos, ctx),
                     donate_argnums=(2, 3))
        args, cfg = std, dict(ctx=ctx, pos=at)
    else:
        kcfg = dict(slots=int(rest[0]), context=ctx, **extra)
        fn = jax.jit(lambda x, ws, kc, vc, pos: decode_layers_kernel(x, *ws, kc, vc, pos, **kcfg),
                     donate_argnums=(2, 3))
        args = tiled if kcfg.get("rope", 1) not in (2, 3) else [tiled_qkv_permuted, *tiled[1:]]
        cfg = dict(kcfg, ctx=ctx, pos=at)
    perm = cfg.get("rope") == 3   # k in the permuted order of head dimensions
    kfix = (lambda k: k[..., HEAD_PERM]) if perm else (lambda k: k)

    def given(layers):
        kc, vc = cache(ctx, layers)
        return kfix(kc), vc

    t = time.perf_counter()
    x, kc, vc = jax.block_until_ready(fn(x0, args, *given(L), pos))
    compile_s = time.perf_counter() - t
    out = dict(x=np.asarray(x, np.float32), k=np.asarray(kfix(kc[:, :, at]), np.float32),
               v=np.asarray(vc[:, :, at], np.float32))
    x2, kc2, vc2 = fn(x0, [a[:2] for a in args], *given(2), pos)
    out2 = dict(x=np.asarray(x2, np.float32), k=np.asarray(kfix(kc2[:, :, at]), np.float32),
                v=np.asarray(vc2[:, :, at], np.float32))
    x_again, kc, vc = fn(x0, args, kc, vc, pos)
    same = bool(np.array_equal(np.asarray(x_again, np.float32), out["x"]))
    walls = []
    for _ in range(20):
        t = time.perf_counter()
        _, kc, vc = jax.block_until_ready(fn(x0, args, kc, vc, pos))
        walls.append(time.perf_counter() - t)
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(5):
            _, kc, vc = jax.block_until_ready(fn(x0, args, kc, vc, pos))
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
    return dict(name=name, cfg=cfg, compile_s=compile_s, out=out, out2=out2,
                repeat_identical=same, span_us_per_layer=span, spans_us=spans,
                wall_us_per_layer=float(np.median(walls)) / L * 1e6,
                kernels_per_call=len(groups[-1]),
                kernels={k: [len(v), float(np.mean(v))] for k, v in kern.items()},
                tbs=bytes_per_layer / (span * 1e-6) / 1e12)


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


results = {}
for name in variants:
    try:
        results[name] = run(name)
        r = results[name]
        print(f"{name}: span {r['span_us_per_layer']:.2f} us/layer, {r['tbs']:.2f} TB/s, "
              f"compile {r['compile_s']:.1f} s, same {r['repeat_identical']}", flush=True)
    except Exception as e:  # keep the other variants
        import traceback
        traceback.print_exc()
        results[name] = dict(name=name, error=f"{type(e).__name__}: {e}"[:3000])
        print(name, "FAILED", results[name]["error"][:1500], flush=True)

rows = []
for name, r in results.items():
    if "error" in r:
        continue
    ref = next((q for q in results.values() if q["name"].startswith("xla") and "out" in q
                and q["cfg"]["ctx"] == r["cfg"]["ctx"] and q["cfg"]["pos"] == r["cfg"]["pos"]),
               None)
    r["err"] = None
    if ref is not None and r is not ref:
        r["err"] = {f"{w}{n}": rel(o[w], ro[w]) for n, o, ro in
                    ((32, r["out"], ref["out"]), (2, r["out2"], ref["out2"])) for w in "xkv"}
    rows.append(r)
for r in results.values():
    r.pop("out", None), r.pop("out2", None)
json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, layers=L, rows=R,
               bytes_per_layer=bytes_per_layer, copy_gbs=copy_gbs, results=results),
          open(os.path.join(out_dir, "decode_layers.json"), "w"), indent=1)
print(f"copy bandwidth {copy_gbs:.0f} GB/s; weights {bytes_per_layer / 1e6:.1f} MB a layer "
      f"({bytes_per_layer / copy_gbs / 1e3:.2f} us at copy bandwidth)")
print(f"{'variant':22s} {'span us/layer':>13s} {'TB/s':>6s} {'wall':>7s} {'kernels':>7s} "
      f"{'same':>5s} {'compile s':>9s}  errors vs XLA (x, k, v after 32 and 2 layers)")
for r in rows:
    e = "" if not r["err"] else " ".join(f"{k}={v:.1e}" for k, v in r["err"].items())
    print(f"{r['name']:22s} {r['span_us_per_layer']:13.2f} {r['tbs']:6.2f} "
          f"{r['wall_us_per_layer']:7.2f} {r['kernels_per_call']:7d} "
          f"{str(r['repeat_identical']):>5s} {r['compile_s']:9.1f}  {e}")
for r in rows:
    print(r["name"], "kernels per call:",
          "  ".join(f"{k}:{n}x{t:.2f}" for k, (n, t) in list(r["kernels"].items())[:12]))
