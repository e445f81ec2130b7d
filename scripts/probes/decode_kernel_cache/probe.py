"""Where does the decode kernel lose its time? One batch-1 decode step of the Llama-3.1-8B
shape (dummy weights, a context of pos tokens plus the new one, pages in a shuffled order),
timed in one process as:
  usual      the engine's usual step (llama.forward: XLA's kernels and the Triton attention)
  stacked    the decode kernel with the cache stacked over layers (one k and one v array)
  variant    as stacked, with kernel_variant.py's knobs: :nowait :noatt :nonorm :norope
             :noextra :wgs=3 :maxreg=232/40/120/120 (see its OPT)
each optionally with :bs=<page size> (16 by default), :pos=<n> (256 by default) and, for the
kernel, :slots=<weight buffers> (8 by default), with each
form's compile time, its step's span on the device timeline (kernels and the gaps between
them), and how far its logits are from the usual step's of the same bs and pos.

    python scripts/probes/decode_kernel_cache/probe.py [form[:bs=N][:pos=N] ...]
        [--lower-only]   (trace and lower for CUDA only: a check on a machine without GPU)

What the kernel's parts cost, with 64-token pages:
    python scripts/probes/decode_kernel_cache/probe.py usual:bs=64 stacked:bs=64 \
        variant:bs=64:nowait variant:bs=64:nowait:noatt ...

JSON under $OUT."""
import dataclasses, functools, json, os, sys, tempfile, time, types
import numpy as np
import jax, jax.numpy as jnp

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [here, os.path.join(here, "..", "..", "..")]
from atom_jax.loader import load_dummy
from kernels_pallas import decode_layers_mgpu
import kernel_variant
from models import llama
from scripts.bench_common import gpu_kernel_events

lower_only = "--lower-only" in sys.argv
forms = [a for a in sys.argv[1:] if not a.startswith("--")] or ["usual", "stacked"]
config = os.path.join(here, "..", "..", "configs", "llama-3.1-8b.json")
TOKENS = 1024   # cache capacity of the sequence
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


def parse(name):
    kind, *rest = name.split("#")[0].split(":")
    opts = {"bs": 16, "pos": 256, "slots": 8}
    for e in rest:
        k, _, v = e.partition("=")
        opts[k] = True if not v else tuple(map(int, v.split("/"))) if "/" in v else int(v)
    return kind, opts["bs"], opts["pos"], opts["slots"]


def knobs(name):
    kind, *rest = name.split("#")[0].split(":")
    opts = {}
    for e in rest:
        k, _, v = e.partition("=")
        if k in kernel_variant.OPT:
            opts[k] = True if not v else tuple(map(int, v.split("/"))) if "/" in v else int(v)
    return opts


def batch_for(bs, at):
    pages = TOKENS // bs
    table = np.random.default_rng(0).permutation(pages).astype(np.int32)
    pos = np.array([at], np.int32)
    return dict(input_ids=jnp.array([7], jnp.int32), positions=jnp.asarray(pos),
                slot_mapping=jnp.asarray(table[pos // bs] * bs + pos % bs),
                query_start_loc=jnp.array([0, 1], jnp.int32),
                seq_lens=jnp.array([at + 1], jnp.int32),
                block_tables=jnp.asarray(table)[None], logits_indices=jnp.array([0], jnp.int32))


def cache(bs):
    shape = (L, TOKENS // bs, bs, KVH, HD)
    if lower_only:
        k = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        return k, k
    kv = [jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(jnp.bfloat16)
          for i in range(2)]
    return tuple(kv)


def step_fn(kind, slots):
    if kind == "usual":
        return jax.jit(lambda p, w, c, b: llama.forward(p, c, b, cfg), donate_argnums=(2,))
    chosen = kernel_variant if kind == "variant" else decode_layers_mgpu
    module = types.SimpleNamespace(
        decode_layers=functools.partial(chosen.decode_layers, slots=slots))

    def step(p, w, c, b):
        real = llama.decode_layers_mgpu
        llama.decode_layers_mgpu = module   # forward_decode_kernel calls module.decode_layers
        try:
            return llama.forward_decode_kernel(p, w, c, b, cfg, num_sms)
        finally:
            llama.decode_layers_mgpu = real

    return jax.jit(step, donate_argnums=(2,))


results = {}


def run_form(form):
    kind, bs, at, slots = parse(form)
    fn, batch = step_fn(kind, slots), batch_for(bs, at)
    w = weights
    base_opt = dict(kernel_variant.OPT)
    kernel_variant.OPT.update(knobs(form))
    t = time.perf_counter()
    if lower_only:
        fn.trace(params, w, cache(bs), batch).lower(lowering_platforms=("cuda",))
        kernel_variant.OPT.update(base_opt)
        print(form, f"lowered for cuda in {time.perf_counter() - t:.1f} s", flush=True)
        return
    lowered = fn.lower(params, w, cache(bs), batch)
    kernel_variant.OPT.update(base_opt)
    lower_s = time.perf_counter() - t
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    kv = cache(bs)
    t = time.perf_counter()
    kv, logits = compiled(params, w, kv, batch)
    logits.block_until_ready()
    first_call_s = time.perf_counter() - t
    logits = np.asarray(logits[0], np.float32)
    walls = []
    for _ in range(20):
        t = time.perf_counter()
        kv, _ = jax.block_until_ready(compiled(params, w, kv, batch))
        walls.append(time.perf_counter() - t)
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(5):
            kv, _ = jax.block_until_ready(compiled(params, w, kv, batch))
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
    results[form] = dict(lower_s=lower_s, compile_s=compile_s, first_call_s=first_call_s, span_us=float(np.median(spans)), spans_us=spans,
                         wall_us=float(np.median(walls)) * 1e6, kernels=len(groups[-1]),
                         top=sorted(((k, len(v), float(np.sum(v))) for k, v in kern.items()),
                                    key=lambda r: -r[2])[:6],
                         logits=logits)
    del kv
    print(form, f"span {results[form]['span_us']:.0f} us, lower {lower_s:.1f} s, compile "
          f"{compile_s:.1f} s, first call {first_call_s:.1f} s", flush=True)


for form in forms:
    form = next(f"{form}#{i}" for i in range(1, 99) if f"{form}#{i}" not in results) \
        if form in results else form   # a repeated form: timed again
    try:
        run_form(form)
    except Exception:   # one form failing (say, a variant that does not compile) spares the rest
        import traceback
        traceback.print_exc()
        print(form, "FAILED", flush=True)

if not lower_only:
    logits = {form: r.pop("logits") for form, r in results.items()}
    for form, r in results.items():
        _, bs, at, _ = parse(form)
        ref = next((f for f in results if parse(f)[:3] == ("usual", bs, at)), None)
        if ref and form != ref:
            lg, rl = logits[form], logits[ref]
            r["logits_err"] = float(np.max(np.abs(lg - rl)) / np.max(np.abs(rl)))
            r["same_top"] = bool(np.argmax(lg) == np.argmax(rl))
    json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, results=results),
              open(os.path.join(out_dir, "decode_kernel_cache.json"), "w"), indent=1)
    print(f"{'form':22s} {'span us':>8s} {'us/layer':>8s} {'tok/s':>6s} {'wall us':>8s} "
          f"{'kernels':>7s} {'compile s':>9s}  logits err / same top")
    for form, r in results.items():
        print(f"{form:22s} {r['span_us']:8.0f} {r['span_us'] / L:8.2f} {1e6 / r['span_us']:6.1f} "
              f"{r['wall_us']:8.0f} {r['kernels']:7d} {r['compile_s']:9.1f}  "
              f"{r.get('logits_err', '')} {r.get('same_top', '')}")
        print("   ", "  ".join(f"{k}:{n}x{t / n:.1f}" for k, n, t in r["top"]))
