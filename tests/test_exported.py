"""Programs kept on disk as jax.export modules (atom_jax/exported.py): a second process finds
the program without tracing it, and anything that shapes the program names another file."""
import os

import jax.numpy as jnp
import numpy as np

from atom_jax.exported import exported_jit

traced = []


def scaled_sum(scale, x, y):
    traced.append(scale)   # runs only when the function is traced
    return x * scale + y, y


def files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".jaxexport"))


def test_loaded_from_disk_without_tracing(tmp_path):
    x, y = jnp.arange(4.0), jnp.ones(4)
    traced.clear()
    first = exported_jit(scaled_sum, (2.0,), (x, y), cache_dir=str(tmp_path))
    np.testing.assert_allclose(first(x, y)[0], [1, 3, 5, 7])
    assert traced == [2.0] and len(files(tmp_path)) == 1

    again = exported_jit(scaled_sum, (2.0,), (x, y), cache_dir=str(tmp_path))
    np.testing.assert_allclose(again(x, y)[0], [1, 3, 5, 7])
    assert traced == [2.0]   # loaded: not traced again

    other = exported_jit(scaled_sum, (3.0,), (x, y), cache_dir=str(tmp_path))
    np.testing.assert_allclose(other(x, y)[0], [1, 4, 7, 10])
    longer = exported_jit(scaled_sum, (2.0,), (jnp.arange(5.0), jnp.ones(5)),
                          cache_dir=str(tmp_path))
    np.testing.assert_allclose(longer(jnp.arange(5.0), jnp.ones(5))[0], [1, 3, 5, 7, 9])
    assert traced == [2.0, 3.0, 2.0] and len(files(tmp_path)) == 3


def test_a_broken_file_is_exported_again(tmp_path):
    x, y = jnp.arange(3.0), jnp.zeros(3)
    traced.clear()
    exported_jit(scaled_sum, (2.0,), (x, y), cache_dir=str(tmp_path))
    (name,) = files(tmp_path)
    (tmp_path / name).write_bytes(b"not a serialized module")
    program = exported_jit(scaled_sum, (2.0,), (x, y), cache_dir=str(tmp_path))
    np.testing.assert_allclose(program(x, y)[0], [0, 2, 4])
    assert traced == [2.0, 2.0] and files(tmp_path) == [name]
    assert (tmp_path / name).read_bytes() != b"not a serialized module"


def test_without_a_cache_dir_a_plain_jit(tmp_path):
    x, y = jnp.arange(2.0), jnp.ones(2)
    program = exported_jit(scaled_sum, (2.0,), (x, y), cache_dir=None, donate_argnums=(1,))
    np.testing.assert_allclose(program(x, y)[0], [1, 3])
    assert files(tmp_path) == []


def test_a_setting_that_changes_the_trace_names_another_file(tmp_path):
    import jax
    x, y = jnp.arange(3.0), jnp.ones(3)
    traced.clear()
    exported_jit(scaled_sum, (2.0,), (x, y), cache_dir=str(tmp_path))
    with jax.default_matmul_precision("highest"):
        exported_jit(scaled_sum, (2.0,), (x, y), cache_dir=str(tmp_path))
    assert traced == [2.0, 2.0] and len(files(tmp_path)) == 2


def test_a_cache_that_cannot_be_written_only_warns(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    x, y = jnp.arange(2.0), jnp.ones(2)
    program = exported_jit(scaled_sum, (2.0,), (x, y), cache_dir=str(blocked / "exports"))
    np.testing.assert_allclose(program(x, y)[0], [1, 3])
    assert "could not keep the exported program" in caplog.text
