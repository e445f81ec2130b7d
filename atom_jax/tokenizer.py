"""Tokenizer loading (HF directory or GGUF file) and incremental detokenization."""
from __future__ import annotations

from pathlib import Path


def load_tokenizer(kind: str, path: Path, gguf_fields: dict | None = None):
    """kind: gguf | hf | dummy. Dummy weights may come without tokenizer files: then None,
    and the engine takes token ids only (text outputs stay empty)."""
    if kind == "dummy":
        has_files = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                                       "tokenizer_config.json"))
        return load_tokenizer("hf", path) if has_files else None
    if kind == "gguf":
        return _load_gguf_tokenizer(path, gguf_fields)
    from transformers import AutoTokenizer  # here: importing it costs seconds of start-up
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means the directory lacks a usable tokenizer
        raise ValueError(f"model: cannot load a tokenizer from {path}: {e}") from e


def _load_gguf_tokenizer(path: Path, fields: dict | None):
    from .gguf_tokenizer import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(path, fields)
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:  # transformers' GGUF reader imports torch
        raise ValueError(f"model: the tokenizer of {path.name} is not byte-level BPE, and "
                         f"transformers, which builds it, needs {e.name or e} for GGUF files; "
                         f"install it (a CPU build is enough)") from e


def check_token_ids(prompt, vocab_size: int, name: str) -> list[int]:
    """A prompt given as token ids, checked: non-empty, every id an int in the vocabulary."""
    ids = list(prompt)
    if not ids:
        raise ValueError("prompt must not be empty")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)
           or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name}: {bad[:3]} are not token ids in [0, {vocab_size})")
    return ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character
    (a delta is held back while the decoded text ends in U+FFFD)."""

    CONTEXT_TOKENS = 5  # prompt tokens decoded alongside, so the first word gets its spacing right

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int, final: bool = False) -> str:
        self.ids.append(token_id)
        return self.flush() if final else self._delta(final=False)

    def _delta(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        return self._delta(final=True)
