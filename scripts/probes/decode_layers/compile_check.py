"""Lower (and, on a GPU, compile) the decode-layer kernel for 2 layers with the options given
as JSON, printing the traceback of any failure. Without a GPU it lowers for CUDA only, which
does not show that the kernel compiles."""
import json, os, sys, traceback
import jax, jax.numpy as jnp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layer_kernel import D, F, HD, KVH, NQKV, R, TC, decode_layers_kernel

L = 2
sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
ws = [sd(L, NQKV // 64, D, 64), sd(L, D // 64, D, 64), sd(L, 2 * F // 64, D, 64), sd(L, D // 64, F, 64)]
on_gpu = jax.devices()[0].platform == "gpu"
for cfg in json.loads(sys.argv[1] if len(sys.argv) > 1 else '[{"context": 256}]'):
    ctx = cfg["context"]
    kv = sd(L, KVH, ctx + TC, HD)
    fn = jax.jit(lambda x, ws, kc, vc, pos: decode_layers_kernel(x, *ws, kc, vc, pos, **cfg))
    try:
        tr = fn.trace(sd(R, D), ws, kv, kv, sd(1, dt=jnp.int32))
        if on_gpu:
            tr.lower().compile()
            print(cfg, "compiled", flush=True)
        else:
            tr.lower(lowering_platforms=("cuda",))
            print(cfg, "lowered for cuda", flush=True)
    except Exception:
        traceback.print_exc()
