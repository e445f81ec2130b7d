"""How XLA's command buffer holds a Mosaic GPU kernel launched with PDL: a 2-layer chain
(XLA norm/SiLU fusion, then x + h @ w as the Mosaic kernel of pdl_kernel.py) is compiled
with its thunk sequence dumped, and the thunks are printed.

Run on the GPU: python scripts/probes/pdl/thunk_kind.py"""
import functools, glob, os, sys
out = os.environ.get("OUT", "/tmp/thunk_kind")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={out}/dump"
import jax, jax.numpy as jnp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pdl_kernel import pdl_residual_matmul

L, K, N = 2, 4096, 4096


def chain(x, gus, ws):
    f = K
    for l in range(L):
        s = jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True) + 1e-6)
        g = gus[l].astype(jnp.float32)
        h = (jax.nn.silu(g[:, :f] * s) * g[:, f:]).astype(jnp.bfloat16)
        x = pdl_residual_matmul(x, h, ws[l], pdl=True, prefetch=True)
    return x


key = jax.random.key(0)
ws = [jax.random.normal(jax.random.fold_in(key, i), (K, N), jnp.bfloat16) * 0.02 for i in range(L)]
gus = [jax.random.normal(jax.random.fold_in(key, 9 + i), (8, 2 * K), jnp.bfloat16) for i in range(L)]
x0 = jax.random.normal(key, (8, N), jnp.bfloat16)
jax.block_until_ready(jax.jit(chain)(x0, gus, ws))
print("jax", jax.__version__, jax.devices()[0].device_kind)
for path in sorted(glob.glob(f"{out}/dump/*jit_chain*thunk_sequence*.txt")):
    print("==", os.path.basename(path))
    print(open(path).read()[:4000])
for path in sorted(glob.glob(f"{out}/dump/*jit_chain*after_optimizations.txt")):
    for line in open(path):
        if "custom-call" in line:
            print(line.strip()[:400])
