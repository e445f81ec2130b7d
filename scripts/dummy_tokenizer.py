"""Write a word-level tokenizer of a given vocabulary size next to a dummy-weight config, so
that the model can be served over HTTP and benchmarked with text prompts.

    python scripts/dummy_tokenizer.py DIR VOCAB_SIZE

Every word of bench_serving.py's word list is one token (a prompt of N words is N tokens);
the other ids decode to "w<id>", so every generated token streams as text. DIR holds the
model's config.json (for `--load-format dummy`), which needs its "model_type" for
transformers to load the tokenizer from that directory.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import WORDS  # noqa: E402


def write_tokenizer(out: Path, vocab_size: int) -> None:
    vocab = {"<unk>": 0}
    for word in dict.fromkeys(WORDS):
        vocab[word] = len(vocab)
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(vocab)} words")
    while len(vocab) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
         "model_max_length": 1 << 20}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    write_tokenizer(Path(sys.argv[1]), int(sys.argv[2]))
