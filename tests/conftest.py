import os

# Compiled programs persist across test processes (and across CI steps of one run).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/atom-jax-test-xla-cache")

import jax  # noqa: E402
import pytest  # noqa: E402


if jax.default_backend() == "gpu":
    # float32 parity checks mean float32: no TF32 matmuls.
    jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (run on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llm():
    """One engine on the default model for the whole run: a 64-token step budget splits long
    prompts into prefill chunks."""
    from atom_jax import LLM
    return LLM(max_num_batched_tokens=64, max_num_seqs=16, max_model_len=1024)
