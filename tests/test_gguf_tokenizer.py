"""GGUF tokenizers built without torch match the ones transformers builds (with torch), and
the default model serves on a machine without torch."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from atom_jax.gguf_tokenizer import load_gguf_tokenizer, read_tokenizer_fields
from atom_jax.loader import default_model_path
from atom_jax.tokenizer import load_tokenizer

TEXTS = ["Hello world", " 12345 apples cost $3.50!", "naïve café — 東京 🚀 ",
         "a\n\n\n b\r\n  c", "I'M You'LL don't 2024-11-29", "<|im_start|>user\nhi<|im_end|>",
         "x" * 40, ""]


def reference(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_same_tokenizer(ours, ref):
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids)
        assert (ours.decode(ids, skip_special_tokens=True)
                == ref.decode(ids, skip_special_tokens=True))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref)


def test_the_default_model_tokenizer_matches_transformers():
    path = Path(default_model_path())
    ours, ref = load_gguf_tokenizer(path), reference(path)
    assert_same_tokenizer(ours, ref)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert (ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def write_tokenizer_gguf(path: Path, model: str, pre: str, add_bos: bool) -> Path:
    """A GGUF holding the SmolLM2 vocabulary (plus a "12" token merged first, so digit splits
    show) under another tokenizer model, pre-tokenizer name and BOS flag."""
    import gguf

    src = read_tokenizer_fields(Path(default_model_path()))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(src["tokenizer.ggml.tokens"] + ["12"])
    writer.add_token_types(src["tokenizer.ggml.token_type"] + [1])
    writer.add_token_merges(["1 2"] + src["tokenizer.ggml.merges"])
    writer.add_token_scores([0.0] * (len(src["tokenizer.ggml.tokens"]) + 1))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_byte_level_tokenizers_match_transformers(tmp_path, pre, add_bos):
    path = write_tokenizer_gguf(tmp_path / "t.gguf", "gpt2", pre, add_bos)
    ours = load_gguf_tokenizer(path)
    assert_same_tokenizer(ours, reference(path))
    assert (ours("hi")["input_ids"][0] == 1) == add_bos


def test_pre_tokenizer_names_change_the_split(tmp_path):
    ids = {pre: load_gguf_tokenizer(write_tokenizer_gguf(tmp_path / f"{pre}.gguf", "gpt2", pre,
                                                         False))
           for pre in ("smollm", "llama-bpe", "qwen2")}
    newlines, digits = "a\n\n\n b\r\n  c", " 12345"
    assert ids["smollm"](newlines)["input_ids"] != ids["llama-bpe"](newlines)["input_ids"]
    assert ids["llama-bpe"](digits)["input_ids"] != ids["qwen2"](digits)["input_ids"]


def test_other_vocabularies_are_left_to_transformers(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", "default", True)
    assert load_gguf_tokenizer(path) is None
    path = write_tokenizer_gguf(tmp_path / "odd.gguf", "gpt2", "some-new-pre", False)
    assert load_gguf_tokenizer(path) is None


def test_a_missing_torch_for_transformers_gguf_reader_is_named(tmp_path, monkeypatch):
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", "default", True)

    def needs_torch(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", needs_torch)
    with pytest.raises(ValueError, match="spm.gguf.*torch"):
        load_tokenizer("gguf", path)


@pytest.mark.slow
def test_the_default_model_generates_without_torch():
    """The README's serving set-up installs no torch; torch is blocked here the same way."""
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            "sys.argv = ['generate', '--prompt', 'What is the capital of France?', '--chat', "
            "'--max-tokens', '8', '--json']; "
            "runpy.run_module('atom_jax.generate', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"token_ids"' in out.stdout and "Paris" in out.stdout


def test_the_weight_loader_hands_the_tokenizer_its_metadata(monkeypatch):
    """The engine parses a GGUF file once: the tokenizer is built from the fields the weight
    loader read, not from a second parse."""
    import jax.numpy as jnp

    from atom_jax import gguf_tokenizer
    from atom_jax.loader import load_model

    _, _, kind, path, fields = load_model(None, jnp.float32)

    def parse_again(path):
        raise AssertionError("the GGUF file was parsed a second time")
    monkeypatch.setattr(gguf_tokenizer, "read_tokenizer_fields", parse_again)
    ours = load_tokenizer(kind, path, fields)
    assert_same_tokenizer(ours, reference(path))
