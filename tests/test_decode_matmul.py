"""The fused decode projections (Pallas, interpreted on CPU) against their references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import decode_matmul as dm

# Small tiles so the test shapes have several programs and inner steps.
CFG = dm.MatmulConfig(block_n=32, block_k=64, num_warps=4, num_stages=2)
K, N, F = 256, 192, 128


def _inputs(rows, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = (3 * jax.random.normal(ks[0], (rows, K))).astype(dtype)
    norm_w = (1 + 0.1 * jax.random.normal(ks[1], (K,))).astype(dtype)
    w = (jax.random.normal(ks[2], (K, N)) / 16).astype(dtype)
    bias = jax.random.normal(ks[3], (N,)).astype(dtype)
    w_gate_up = (jax.random.normal(ks[4], (K, 2 * F)) / 16).astype(dtype)
    residual = jax.random.normal(ks[5], (rows, N)).astype(dtype)
    return x, norm_w, w, bias, w_gate_up, residual


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    # A rounding of the output (or of the normalised input) may land one ulp apart.
    tol = 2 ** -7 if dtype == jnp.bfloat16 else 2 ** -10
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_kernels_match_references(rows, dtype):
    x, norm_w, w, bias, w_gate_up, residual = _inputs(rows, dtype)
    opts = dict(impl="pallas", interpret=True, config=CFG)
    _close(dm.rms_norm_matmul(x, norm_w, w, eps=1e-5, **opts),
           dm.rms_norm_matmul_reference(x, norm_w, w, eps=1e-5), dtype)
    _close(dm.rms_norm_matmul(x, norm_w, w, eps=1e-5, bias=bias, **opts),
           dm.rms_norm_matmul_reference(x, norm_w, w, eps=1e-5, bias=bias), dtype)
    _close(dm.rms_norm_gate_up(x, norm_w, w_gate_up, eps=1e-5, **opts),
           dm.rms_norm_gate_up_reference(x, norm_w, w_gate_up, eps=1e-5), dtype)
    _close(dm.matmul_add(x, w, residual, **opts), dm.matmul_add_reference(x, w, residual), dtype)


def test_gate_up_reads_gate_and_up_halves():
    # silu(0) * up = 0 and silu(gate) * 0 = 0: a kernel that read one half for both
    # (or the wrong offset) fails one of the two.
    x, norm_w, _, _, w_gate_up, _ = _inputs(2, jnp.bfloat16)
    opts = dict(eps=1e-5, impl="pallas", interpret=True, config=CFG)
    assert np.abs(np.asarray(dm.rms_norm_gate_up(x, norm_w, w_gate_up, **opts))).max() > 0.1
    for half in (slice(0, F), slice(F, 2 * F)):
        zeroed = w_gate_up.at[:, half].set(0)
        assert np.abs(np.asarray(dm.rms_norm_gate_up(x, norm_w, zeroed, **opts))).max() == 0


def test_dispatcher_uses_the_reference_where_the_kernel_does_not_apply(monkeypatch):
    launches = []
    monkeypatch.setattr(dm, "_launch", lambda *a, **k: launches.append(k["name"]))
    x, norm_w, w, _, _, residual = _inputs(dm.MAX_ROWS + 1, jnp.bfloat16)
    dm.matmul_add(x, w, residual, impl="pallas", config=CFG)  # too many rows
    f32 = [a.astype(jnp.float32) for a in (x[:2], w, residual[:2])]
    dm.matmul_add(*f32, impl="pallas", config=CFG)  # float32 stays with XLA
    dm.matmul_add(x[:2], w[:, :N - 16], residual[:2, :N - 16], impl="pallas",
                  config=CFG)  # block_n does not divide N
    dm.matmul_add(x[:2], w, residual[:2], impl="xla", config=CFG)
    assert launches == []
    dm.matmul_add(x[:2], w, residual[:2], impl="pallas", config=CFG)
    assert launches == ["matmul_add"]


def test_auto_is_xla_on_cpu_and_bad_impl_is_named():
    assert dm.resolve_impl("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="impl must be"):
        dm.matmul_add(jnp.ones((1, K)), jnp.ones((K, N)), jnp.ones((1, N)), impl="triton")
