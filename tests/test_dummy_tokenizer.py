"""scripts/dummy_tokenizer.py: a tokenizer that lets dummy-weight models serve text."""
import json
from pathlib import Path

import pytest

from atom_jax.tokenizer import load_tokenizer
from scripts.bench_serving import WORDS
from scripts.dummy_tokenizer import write_tokenizer


def test_words_are_one_token_each_and_every_id_decodes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 500}))
    write_tokenizer(tmp_path, 500)
    tok = load_tokenizer("dummy", Path(tmp_path))
    words = list(WORDS[:7])
    ids = tok.encode(" ".join(words))
    assert len(ids) == len(words) and len(set(ids)) == len(set(words))
    assert tok.decode(ids + [499]) == " ".join(words) + " w499"
    assert len(tok) == 500


def test_a_vocabulary_smaller_than_the_word_list_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 5"):
        write_tokenizer(tmp_path, 5)
