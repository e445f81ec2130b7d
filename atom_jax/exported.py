"""Programs kept on disk as serialized jax.export modules, so that a warm start skips their
Python tracing and lowering: the persistent compilation cache only spares XLA's compile,
which comes after them. The decode kernel's step takes several seconds to trace and lower to
Mosaic GPU; loaded from here it takes a fraction of a second.

A file is named by a hash of everything that shapes the program: the caller's static
arguments, the arguments' tree and shapes, the JAX version, the platform, the JAX settings
that change what a trace gives, and the source of every module of this project. A file
that fails to load is exported again."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib

import jax
from jax import export

_PACKAGES = ("atom_jax", "models", "kernels_pallas")
logger = logging.getLogger(__name__)


@functools.cache
def _source_hash() -> str:
    root = pathlib.Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def program_key(static, args, platform: str) -> str:
    """The file name's hash for fn(*static)(*args) on platform."""
    shapes = [(tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(args)]
    settings = (jax.config.jax_default_matmul_precision, jax.config.jax_enable_x64)
    text = repr((static, jax.tree.structure(args), shapes, jax.__version__, platform,
                 settings, _source_hash()))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def exported_jit(fn, static: tuple, args: tuple, *, cache_dir: str | None,
                 donate_argnums=()):
    """jax.jit of fn(*static) (static: hashable, with a stable repr) for arguments shaped as
    args: its exported module loaded from cache_dir when an earlier process saved it there,
    else exported now and saved (with cache_dir None, a plain jax.jit)."""
    bound = functools.partial(fn, *static)
    if cache_dir is None:
        return jax.jit(bound, donate_argnums=donate_argnums)
    platform = export.default_export_platform()
    path = pathlib.Path(cache_dir) / f"{program_key(static, args, platform)}.jaxexport"
    exported = None
    if path.exists():
        try:
            exported = export.deserialize(bytearray(path.read_bytes()))
        except Exception:   # cut short or foreign: export it again below
            exported = None
    if exported is None:
        exported = export.export(jax.jit(bound), platforms=[platform])(*args)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_suffix(f".{os.getpid()}.part")
            part.write_bytes(exported.serialize())
            os.replace(part, path)   # whole files only, even with several processes at once
        except OSError as e:   # a cache that cannot be written costs the next start, no more
            logger.warning("could not keep the exported program in %s: %s", cache_dir, e)
    return jax.jit(exported.call, donate_argnums=donate_argnums)
