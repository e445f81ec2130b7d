"""gpu_memory_utilization: the share of GPU memory JAX's allocator is told to take."""
import logging

import pytest

from atom_jax import EngineConfig
from atom_jax import engine as engine_module
from atom_jax import model_runner
from atom_jax.cli_args import add_engine_args, engine_config_from_args

ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


@pytest.fixture
def fresh_process(monkeypatch):
    """As if JAX's backends had not started yet, with no fraction in the environment."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(engine_module, "backends_are_initialized", lambda: False)
    return monkeypatch


def test_default_claims_nine_tenths(fresh_process):
    engine_module.claim_gpu_memory(None)
    assert engine_module.os.environ[ENV] == "0.9"


def test_explicit_fraction_wins_over_the_environment(fresh_process):
    fresh_process.setenv(ENV, "0.5")
    engine_module.claim_gpu_memory(0.8)
    assert engine_module.os.environ[ENV] == "0.8"


def test_environment_is_kept_when_no_fraction_is_asked_for(fresh_process):
    fresh_process.setenv(ENV, "0.6")
    engine_module.claim_gpu_memory(None)
    assert engine_module.os.environ[ENV] == "0.6"


def test_too_late_to_apply_is_said_and_changes_nothing(fresh_process, caplog):
    fresh_process.setattr(engine_module, "backends_are_initialized", lambda: True)
    with caplog.at_level(logging.WARNING, logger="atom_jax.engine"):
        engine_module.claim_gpu_memory(0.8)
        engine_module.claim_gpu_memory(None)  # the default is not worth a warning
    assert ENV not in engine_module.os.environ
    assert len(caplog.records) == 1
    assert "gpu_memory_utilization=0.8 not applied" in caplog.records[0].getMessage()


@pytest.mark.parametrize("bad", [0, -0.1, 1.5])
def test_out_of_range_fraction_is_rejected(bad):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=bad).validate()


def test_cli_flag_reaches_the_config():
    import argparse
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["--gpu-memory-utilization", "0.85"]))
    assert config.gpu_memory_utilization == 0.85


GiB = 2**30


def test_preallocated_allocator_offers_what_is_not_in_use():
    # one region of the whole limit, taken at start; each layer's arrays may fill a hole
    stats = dict(bytes_limit=100 * GiB, bytes_in_use=20 * GiB, pool_bytes=100 * GiB,
                 largest_free_block_bytes=60 * GiB)
    assert not model_runner.grows_on_demand(stats)
    assert engine_module.allocatable_bytes(stats) == 80 * GiB


def test_allocator_growing_on_demand_offers_what_it_has_not_taken():
    # XLA_PYTHON_CLIENT_PREALLOCATE=false: 20 GiB in use inside 32 GiB of regions
    stats = dict(bytes_limit=100 * GiB, bytes_in_use=20 * GiB, pool_bytes=32 * GiB,
                 largest_free_block_bytes=12 * GiB)
    assert model_runner.grows_on_demand(stats)
    assert engine_module.allocatable_bytes(stats) == 68 * GiB
    # regions up to the limit: the largest leftover is all it has
    stats.update(pool_bytes=96 * GiB)
    assert engine_module.allocatable_bytes(stats) == 12 * GiB


def test_allocator_without_region_figures_counts_as_preallocated():
    stats = dict(bytes_limit=100 * GiB, bytes_in_use=30 * GiB)
    assert not model_runner.grows_on_demand(stats)
    assert engine_module.allocatable_bytes(stats) == 70 * GiB


def test_kv_cache_cannot_be_sized_without_an_allocator_limit():
    from types import SimpleNamespace
    fake = SimpleNamespace(  # the parts of an EngineCore the sizing reads
        model_config=SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=64),
        config=EngineConfig(), kv_cache_dtype="bfloat16", kv_cache_scaled=False)
    # the CPU device reports no memory figures, as the platform allocator does not
    with pytest.raises(ValueError, match="kv_cache_memory_gb"):
        engine_module.EngineCore._blocks_for_memory(fake, on_gpu=True)
