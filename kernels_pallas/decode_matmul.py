"""Decode-shaped projections with their neighbours fused in (Pallas, lowered through Triton).

At a few tokens per step every projection is a weight stream, and the small ops around it
(the RMSNorm before, the SiLU-multiply or the residual add after) are each a kernel launch
of mostly fixed cost. These kernels do them inside the weight stream:

  rms_norm_matmul(x, norm_w, w)       rms_norm(x) @ w                  (q/k/v projection)
  rms_norm_gate_up(x, norm_w, w_gu)   silu(h @ w_gate) * (h @ w_up),   h = rms_norm(x)
  matmul_add(x, w, residual)          residual + x @ w                 (o and down projections)

Layout: x [M, K] with M a handful of rows (the decode tokens), w [K, N] (the model's
[in, out] layout; w_gu is gate and up concatenated along N). A program owns `block_n`
output columns of every row and streams its [K, block_n] slice of w in `block_k` steps,
the rows placed in a 16-row matrix-instruction operand (no split-K: the epilogue needs
whole sums). The RMSNorm scale of each row is computed by every program from x, which
is small and stays in L2.

Each op has a plain-JAX reference (the same arithmetic as the model's unfused code) and a
dispatcher that takes the kernel only where it applies: GPU, at most MAX_ROWS rows, and
block sizes that divide the shapes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """block_n output columns per program, block_k rows of w per inner step (powers of 2)."""
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Chosen on the H200 (scripts/bench_decode_matmul.py).
NORM_MATMUL_CONFIG = MatmulConfig(block_n=32, block_k=128, num_warps=4, num_stages=3)
GATE_UP_CONFIG = MatmulConfig(block_n=32, block_k=128, num_warps=4, num_stages=3)
MATMUL_ADD_CONFIG = MatmulConfig(block_n=32, block_k=128, num_warps=4, num_stages=3)
# Rows of the matrix-instruction tile; more rows than this go to XLA's GEMMs.
_TILE_ROWS = 16
MAX_ROWS = _TILE_ROWS


# ---------------------------------------------------------------- references (plain JAX)

def rms_norm(x, weight, eps):
    # Statistics in float32, as Hugging Face does, whatever the compute dtype.
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def silu_mul(gate_up):
    f = gate_up.shape[-1] // 2
    return jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:]


def rms_norm_matmul_reference(x, norm_w, w, *, eps, bias=None):
    y = rms_norm(x, norm_w, eps) @ w
    return y if bias is None else y + bias


def rms_norm_gate_up_reference(x, norm_w, w_gate_up, *, eps):
    return silu_mul(rms_norm(x, norm_w, eps) @ w_gate_up)


def matmul_add_reference(x, w, residual):
    return residual + x @ w


# ---------------------------------------------------------------- dispatchers

def rms_norm_matmul(x, norm_w, w, *, eps, bias=None, impl="auto", interpret=False,
                    config: MatmulConfig | None = None):
    cfg = config or NORM_MATMUL_CONFIG
    if not _use_kernel(impl, x, w.shape[1], cfg):
        return rms_norm_matmul_reference(x, norm_w, w, eps=eps, bias=bias)
    return _launch(x, w, cfg, interpret, out_cols=w.shape[1], norm_w=norm_w, eps=eps,
                   bias=bias, name="rms_norm_matmul")


def rms_norm_gate_up(x, norm_w, w_gate_up, *, eps, impl="auto", interpret=False,
                     config: MatmulConfig | None = None):
    cfg = config or GATE_UP_CONFIG
    f = w_gate_up.shape[1] // 2
    if not _use_kernel(impl, x, f, cfg):
        return rms_norm_gate_up_reference(x, norm_w, w_gate_up, eps=eps)
    return _launch(x, w_gate_up, cfg, interpret, out_cols=f, norm_w=norm_w, eps=eps,
                   gate_up=True, name="rms_norm_gate_up")


def matmul_add(x, w, residual, *, impl="auto", interpret=False,
               config: MatmulConfig | None = None):
    cfg = config or MATMUL_ADD_CONFIG
    if not _use_kernel(impl, x, w.shape[1], cfg):
        return matmul_add_reference(x, w, residual)
    return _launch(x, w, cfg, interpret, out_cols=w.shape[1], residual=residual,
                   name="matmul_add")


def resolve_impl(impl: str) -> str:
    """auto: the kernels on GPU, XLA elsewhere (Pallas runs on CPU only interpreted)."""
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"impl must be 'auto', 'xla' or 'pallas', got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


def _use_kernel(impl, x, out_cols, cfg: MatmulConfig) -> bool:
    rows, k = x.shape
    # float32 stays with XLA: a float32 dot on the matrix units would round through TF32.
    return (resolve_impl(impl) == "pallas" and 0 < rows <= MAX_ROWS
            and x.dtype in (jnp.bfloat16, jnp.float16)
            and k % cfg.block_k == 0 and out_cols % cfg.block_n == 0)


# ---------------------------------------------------------------- kernel

def _kernel(*refs, rows, block_n, block_k, k_steps, out_cols, eps, norm, gate_up,
            has_bias, has_residual):
    refs = list(refs)
    x_ref = refs.pop(0)
    nw_ref = refs.pop(0) if norm else None
    w_ref = refs.pop(0)
    b_ref = refs.pop(0) if has_bias else None
    r_ref = refs.pop(0) if has_residual else None
    (o_ref,) = refs
    f32, dtype = jnp.float32, x_ref.dtype

    col = pl.multiple_of(pl.program_id(0) * block_n, block_n)
    col_up = col + out_cols  # gate_up: the up columns sit out_cols after the gate columns

    def k_slice(i):
        start = i * block_k if isinstance(i, int) else pl.multiple_of(i * block_k, block_k)
        return pl.ds(start, block_k)

    scales = [None] * rows
    if norm:
        def sum_squares(i, acc):
            return tuple(a + jnp.sum(jnp.square(x_ref[m, k_slice(i)].astype(f32)))
                         for m, a in enumerate(acc))
        ss = lax.fori_loop(0, k_steps, sum_squares, (jnp.zeros((), f32),) * rows)
        scales = [lax.rsqrt(s / (k_steps * block_k) + eps) for s in ss]

    # The rows go into a 16-row operand of a matrix instruction (its smallest M), one
    # row at a time: Triton has no padding or concatenation of register tensors.
    tile_rows = _TILE_ROWS
    row_of = lax.broadcasted_iota(jnp.int32, (tile_rows, block_k), 0)

    def load_x(i):
        ks = k_slice(i)
        return tuple(x_ref[m, ks] for m in range(rows)) + ((nw_ref[ks],) if norm else ())

    def x_tile(loaded):
        a = jnp.zeros((tile_rows, block_k), dtype)
        for m in range(rows):
            xm = loaded[m]
            if norm:  # same roundings as the reference: normalised in f32, scaled in dtype
                xm = (xm.astype(f32) * scales[m]).astype(dtype) * loaded[rows]
            a = jnp.where(row_of == m, xm[None, :], a)
        return a

    def step(i, carry):
        acc, acc_up, loaded = carry
        # x for the next step is loaded now and used a step later, so its (L2) latency
        # hides behind this step's weight stream, which Triton pipelines.
        nxt = load_x(jnp.minimum(i + 1, k_steps - 1))
        a = x_tile(loaded)
        ks = k_slice(i)
        acc += jnp.dot(a, w_ref[ks, pl.ds(col, block_n)], preferred_element_type=f32)
        if gate_up:
            acc_up += jnp.dot(a, w_ref[ks, pl.ds(col_up, block_n)], preferred_element_type=f32)
        return acc, acc_up, nxt

    zeros = jnp.zeros((tile_rows, block_n), f32)
    acc, acc_up, _ = lax.fori_loop(0, k_steps, step, (zeros, zeros, load_x(0)))

    out_row = lax.broadcasted_iota(jnp.int32, (tile_rows, block_n), 0)
    for m in range(rows):
        def row(t):
            return jnp.sum(jnp.where(out_row == m, t, 0.0), axis=0).astype(dtype).astype(f32)
        y = row(acc)
        if gate_up:
            y = (y / (1.0 + jnp.exp(-y))).astype(dtype).astype(f32) * row(acc_up)
        if has_bias:
            y = y + b_ref[pl.ds(col, block_n)].astype(f32)
        if has_residual:
            y = y + r_ref[m, pl.ds(col, block_n)].astype(f32)
        o_ref[m, pl.ds(col, block_n)] = y.astype(o_ref.dtype)


def _launch(x, w, cfg: MatmulConfig, interpret, *, out_cols, name, norm_w=None, eps=0.0,
            bias=None, residual=None, gate_up=False):
    from jax.experimental.pallas import triton as plgpu
    rows, k = x.shape
    kernel = functools.partial(
        _kernel, rows=rows, block_n=cfg.block_n, block_k=cfg.block_k,
        k_steps=k // cfg.block_k, out_cols=out_cols, eps=float(eps), norm=norm_w is not None,
        gate_up=gate_up, has_bias=bias is not None, has_residual=residual is not None)
    operands = [x] + ([norm_w] if norm_w is not None else []) + [w]
    operands += ([bias] if bias is not None else []) + ([residual] if residual is not None else [])
    params_cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return pl.pallas_call(
        kernel,
        grid=(out_cols // cfg.block_n,),
        out_shape=jax.ShapeDtypeStruct((rows, out_cols), x.dtype),
        compiler_params=params_cls(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=name,
    )(*operands)

