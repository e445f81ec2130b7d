"""Lower and compile the chain kernel (2 layers, no data) with the options given as JSON,
printing the traceback of any failure."""
import json, os, sys, traceback
import jax, jax.numpy as jnp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chain_kernel import D, F, HD, KVH, NQKV, R, chain_kernel

L = 2
sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
ws = [sd(L, NQKV // 64, D, 64), sd(L, D // 64, D, 64), sd(L, 2 * F // 64, D, 64), sd(L, D // 64, F, 64)]
kv = (sd(L, KVH, 256, HD), sd(L, KVH, 256, HD))
for cfg in json.loads(sys.argv[1]):
    fn = jax.jit(lambda x, ws, kv: chain_kernel(x, *ws, *kv, **cfg)[0])
    try:
        fn.trace(sd(R, D), ws, kv if cfg.pop("attn", 1) else (None, None)).lower().compile()
        print(cfg, "compiled")
    except Exception:
        traceback.print_exc()
