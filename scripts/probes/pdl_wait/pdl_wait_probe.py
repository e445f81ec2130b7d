"""Where XLA puts the grid-dependency wait in the kernels it emits for a decode-like chain.

An RMSNorm (XLA fusion) feeds a 4-row GEMM (XLA's Triton GEMM), whose output goes
through a small Pallas Triton kernel into a second GEMM. The compiled module's optimised
LLVM IR is dumped, and for every kernel the script prints how many global loads come
before its first grid-dependency wait and whether it lets its dependents launch early.
Run on the GPU: python scripts/probes/pdl_wait/pdl_wait_probe.py
"""

import glob
import os
import re
import sys

out = os.environ.get("OUT", "/tmp/pdl_wait_out")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    f" --xla_dump_to={out}/dump --xla_gpu_dump_llvmir=true --xla_dump_emitter_re=.*"
    " --xla_gpu_force_compilation_parallelism=1")

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def scale_kernel(x_ref, o_ref):
    o_ref[...] = (x_ref[...].astype(jnp.float32) * 0.5).astype(o_ref.dtype)


def pallas_scale(x):
    return pl.pallas_call(
        scale_kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(x.shape[1] // 512,),
        in_specs=[pl.BlockSpec((x.shape[0], 512), lambda j: (0, j))],
        out_specs=pl.BlockSpec((x.shape[0], 512), lambda j: (0, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4),
    )(x)


@jax.jit
def chain(x, g, w1, w2):
    h = x.astype(jnp.float32)
    h = (h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-5)).astype(x.dtype) * g
    y = h @ w1
    y = pallas_scale(y)
    return x + y @ w2


def main():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (4, 4096), jnp.bfloat16)
    g = jnp.ones((4096,), jnp.bfloat16)
    w1 = jax.random.normal(k[1], (4096, 4096), jnp.bfloat16) * 0.02
    w2 = jax.random.normal(k[2], (4096, 4096), jnp.bfloat16) * 0.02
    chain(x, g, w1, w2).block_until_ready()
    print("jax", jax.__version__, jax.devices()[0].device_kind)
    for path in sorted(glob.glob(f"{out}/dump/*jit_chain.*.ir-with-opt.ll")):
        for m in re.finditer(r"^define [^@]*@(\w+)\((.*?)^}", open(path).read(), re.M | re.S):
            body = m.group(2)
            wait = body.find("llvm.nvvm.griddepcontrol.wait")
            head = body if wait < 0 else body[:wait]
            global_load = r"load [^\n]*addrspace\(1\)|ld\.global|cp\.async"
            loads = len(re.findall(global_load, head))
            total = len(re.findall(global_load, body))
            early = "llvm.nvvm.griddepcontrol.launch.dependents" in body
            print(f"{m.group(1)}: wait {'yes' if wait >= 0 else 'no'}, global loads before it {loads} of {total},"
                  f" launch_dependents {'yes' if early else 'no'}")


if __name__ == "__main__":
    sys.exit(main())
