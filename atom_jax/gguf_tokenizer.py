"""A GGUF file's byte-level BPE tokenizer, built without torch.

transformers reads a GGUF file's tokenizer through a metadata reader that imports torch (5.17
and later), a dependency the engine does not otherwise have. The byte-level BPE vocabularies
(GGUF's `gpt2` model: SmolLM2, Llama 3, Qwen2/3) are therefore built here from the file's
metadata with the tokenizers library, the way transformers builds them; any other vocabulary
is left to transformers.
"""
from __future__ import annotations

from pathlib import Path

# How text is split before the merges, by llama.cpp's pre-tokenizer name
# (`tokenizer.ggml.pre`), as transformers splits it. None: GPT-2's own pattern.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {
    None: None, "default": None, "gpt2": None, "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types


def tokenizer_fields(reader) -> dict:
    """The `tokenizer.*` metadata of an open `gguf.GGUFReader`, as Python values."""
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.")}


def read_tokenizer_fields(path: Path) -> dict:
    """The file's `tokenizer.*` metadata. Parsing a GGUF file takes seconds for a large
    vocabulary, so the weight loader hands over the fields of the reader it opened instead."""
    from gguf import GGUFReader

    return tokenizer_fields(GGUFReader(str(path)))


def byte_level_bpe(fields: dict):
    """A `tokenizers.Tokenizer` for a byte-level BPE vocabulary, or None for any other kind
    (or a pre-tokenizer this module does not know)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    pre = fields.get("tokenizer.ggml.pre")
    if (fields.get("tokenizer.ggml.model") != "gpt2" or pre not in SPLITS
            or "tokenizer.ggml.merges" not in fields):
        return None
    spelling = bytes_to_unicode()  # byte -> the printable character vocabularies spell it with
    alphabet = set(spelling.values())
    tokens = fields["tokenizer.ggml.tokens"]
    # A token outside the byte alphabet (a mislabelled added token) is respelled byte by byte.
    vocab = {token if set(token) <= alphabet
             else "".join(spelling[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in fields["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                     continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False))
    split = SPLITS[pre]
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (like <|im_end|>) stay whole and count as special; user-defined ones
    # (like <think>) stay whole as plain text.
    types = fields.get("tokenizer.ggml.token_type") or ()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, types)
                                  if kind == _CONTROL and set(t) <= alphabet])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind in zip(tokens, types)
                          if kind == _USER_DEFINED and t in vocab])
    return tokenizer


def load_gguf_tokenizer(path: Path, fields: dict | None = None):
    """A transformers tokenizer for the file's byte-level BPE vocabulary, or None when the file
    holds another kind. fields: its `tokenizer.*` metadata, where already read."""
    fields = read_tokenizer_fields(path) if fields is None else fields
    backend = byte_level_bpe(fields)
    if backend is None:
        return None
    from transformers import PreTrainedTokenizerFast

    tokens = fields["tokenizer.ggml.tokens"]

    def token(key):
        index = fields.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    special = {name: token(key) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token")) and special["bos_token"] is not None
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=fields.get("tokenizer.chat_template"),
        add_bos_token=add_bos, **{name: value for name, value in special.items() if value})
    if add_bos:
        _prepend_bos(tokenizer, special["bos_token"])
    return tokenizer


def _prepend_bos(tokenizer, bos: str):
    """Files that ask for a BOS before every text (Llama 3's) get it from the post-processor,
    set here because older transformers ignore `add_bos_token` on a generic fast tokenizer."""
    from tokenizers import processors

    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, bos_id)])
