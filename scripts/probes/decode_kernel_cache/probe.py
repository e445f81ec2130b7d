"""Does the decode kernel lose its time to the cache as one array per layer? One batch-1 decode
step of the Llama-3.1-8B shape (dummy weights, context 256, 16-token pages in a shuffled
order), timed in one process as:
  usual      the engine's usual step (llama.forward: XLA's kernels and the Triton attention)
  per_layer  the decode kernel with the engine's cache, a (k, v) array pair per layer, which
             the kernel reaches through a choice among 32 at each copy
  stacked    the decode kernel with the same cache stacked over layers (one k and one v
             array): no choice, one descriptor per kind of copy
with each form's compile time, its step's span on the device timeline (kernels and the gaps
between them), and how far its logits are from the usual step's.

    python scripts/probes/decode_kernel_cache/probe.py [usual] [per_layer] [stacked]
        [--lower-only]   (trace and lower for CUDA only: a check on a machine without GPU)

JSON under $OUT."""
import dataclasses, json, os, sys, tempfile, time
import numpy as np
import jax, jax.numpy as jnp

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(here, "..", "..", "..")]
from atom_jax.loader import load_dummy
from atom_jax.model_runner import allocate_kv_cache
from kernels_pallas import decode_layers_mgpu
from models import llama
from scripts.bench_common import gpu_kernel_events

lower_only = "--lower-only" in sys.argv
forms = [a for a in sys.argv[1:] if not a.startswith("--")] or ["usual", "per_layer", "stacked"]
config = os.path.join(here, "..", "..", "configs", "llama-3.1-8b.json")
CONTEXT, BS, PAGES = 256, 16, 64   # pos 256; a cache of 64 pages of 16 tokens
out_dir = os.environ.get("OUT", "/tmp")

if lower_only:   # shapes only
    cfg = llama.ModelConfig.from_json_file(config)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), llama.param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    params = jax.eval_shape(lambda p: llama.fuse_projections(p, cfg), params)
    params = jax.eval_shape(lambda p: llama.to_qk_halves(p, cfg)[0], params)
    cfg = dataclasses.replace(cfg, qk_halves=True)
    weights = jax.eval_shape(decode_layers_mgpu.prepare_weights, params["layers"])
    num_sms = 132
else:
    cfg, params = load_dummy(config, jnp.bfloat16)
    params, cfg = llama.to_qk_halves(llama.fuse_projections(params, cfg), cfg)
    weights = decode_layers_mgpu.prepare_weights(params["layers"])
    num_sms = jax.devices()[0].core_count
L, KVH, HD = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
rng = np.random.default_rng(0)
table = rng.permutation(PAGES).astype(np.int32)
pos = np.array([CONTEXT], np.int32)
batch = dict(input_ids=jnp.array([7], jnp.int32), positions=jnp.asarray(pos),
             slot_mapping=jnp.asarray(table[pos // BS] * BS + pos % BS),
             query_start_loc=jnp.array([0, 1], jnp.int32),
             seq_lens=jnp.array([CONTEXT + 1], jnp.int32),
             block_tables=jnp.asarray(table)[None], logits_indices=jnp.array([0], jnp.int32))


def cache(form):
    shape = (L, PAGES, BS, KVH, HD)
    if lower_only:
        k = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        return (k, k) if form == "stacked" else [(k.update(shape=shape[1:]),) * 2] * L
    kv = [jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(jnp.bfloat16)
          for i in range(2)]
    if form == "stacked":
        return tuple(kv)
    return [(kv[0][i], kv[1][i]) for i in range(L)]


def step_fn(form):
    if form == "usual":
        return jax.jit(lambda p, w, c, b: llama.forward(p, c, b, cfg), donate_argnums=(2,))
    return jax.jit(lambda p, w, c, b: llama.forward_decode_kernel(p, w, c, b, cfg, num_sms),
                   donate_argnums=(2,))


results = {}
for form in forms:
    fn = step_fn(form)
    t = time.perf_counter()
    if lower_only:
        fn.trace(params, weights, cache(form), batch).lower(lowering_platforms=("cuda",))
        print(form, f"lowered for cuda in {time.perf_counter() - t:.1f} s", flush=True)
        continue
    compiled = fn.lower(params, weights, cache(form), batch).compile()
    compile_s = time.perf_counter() - t
    kv = cache(form)
    kv, logits = compiled(params, weights, kv, batch)
    logits = np.asarray(logits[0], np.float32)
    walls = []
    for _ in range(20):
        t = time.perf_counter()
        kv, _ = jax.block_until_ready(compiled(params, weights, kv, batch))
        walls.append(time.perf_counter() - t)
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(5):
            kv, _ = jax.block_until_ready(compiled(params, weights, kv, batch))
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
    kern = {}
    for e in groups[-1]:
        kern.setdefault(e[2][:48], []).append(e[1] - e[0])
    results[form] = dict(compile_s=compile_s, span_us=float(np.median(spans)), spans_us=spans,
                         wall_us=float(np.median(walls)) * 1e6, kernels=len(groups[-1]),
                         top=sorted(((k, len(v), float(np.sum(v))) for k, v in kern.items()),
                                    key=lambda r: -r[2])[:6],
                         logits=logits)
    del kv
    print(form, f"span {results[form]['span_us']:.0f} us, compile {compile_s:.1f} s", flush=True)

if not lower_only:
    logits = {form: r.pop("logits") for form, r in results.items()}
    for form, r in results.items():
        if "usual" in logits and form != "usual":
            lg, rl = logits[form], logits["usual"]
            r["logits_err"] = float(np.max(np.abs(lg - rl)) / np.max(np.abs(rl)))
            r["same_top"] = bool(np.argmax(lg) == np.argmax(rl))
    json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, context=CONTEXT,
                   block_size=BS, results=results),
              open(os.path.join(out_dir, "decode_kernel_cache.json"), "w"), indent=1)
    print(f"{'form':10s} {'span us':>8s} {'us/layer':>8s} {'tok/s':>6s} {'wall us':>8s} "
          f"{'kernels':>7s} {'compile s':>9s}  logits err / same top")
    for form, r in results.items():
        print(f"{form:10s} {r['span_us']:8.0f} {r['span_us'] / L:8.2f} {1e6 / r['span_us']:6.1f} "
              f"{r['wall_us']:8.0f} {r['kernels']:7d} {r['compile_s']:9.1f}  "
              f"{r.get('logits_err', '')} {r.get('same_top', '')}")
        print("   ", "  ".join(f"{k}:{n}x{t / n:.1f}" for k, n, t in r["top"]))
