"""The Hugging Face tokenizers growmem saves: AutoTokenizer and PreTrainedTokenizerFast load
them, and they give growmem's ids for any text (non-ASCII included) and back."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from growmem.tasks.tokenizers import BPETokenizer, ByteTokenizer, find_tokenizer, load_tokenizer

TRAIN_TEXT = "The quick brown fox jumps over the lazy dog. Café, Straße, 東京. " * 30
ALPHABET = "abc xyz ,.!\n\té€日本😀<>/" + "".join(map(chr, range(0x20, 0x7F)))


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randrange(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tokenizer(request):
    if request.param == "byte":
        return ByteTokenizer()
    return BPETokenizer.train([TRAIN_TEXT], 320, special_tokens=["[P]", "[B]", "[E]"])


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    return tokenizer.save(tmp_path_factory.mktemp("tok"), model_max_length=1024)


def test_auto_tokenizer_gives_growmem_ids_and_text(tokenizer, saved):
    hf = AutoTokenizer.from_pretrained(saved)
    assert len(hf) == tokenizer.vocab_size and hf.model_max_length == 1024
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (
        tokenizer.pad_id,
        tokenizer.bos_id,
        tokenizer.eos_id,
    )
    texts = [*random_texts(50), "a <eos> [E] <pad> b", " spaces  . , ?"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids  # no bos or eos added; specials' names are text
        assert hf.decode(ids) == tokenizer.decode(ids) == text
    ids = [tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id, tokenizer.pad_id]
    assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == "hi"
    assert hf.decode(ids) == hf.bos_token + "hi" + hf.eos_token + hf.pad_token


def test_any_id_sequence_decodes_as_growmem_decodes(tokenizer, saved):
    """Cut multi-byte characters become U+FFFD in both."""
    hf = AutoTokenizer.from_pretrained(saved)
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)


def test_tokenizer_file_alone_loads(tokenizer, saved):
    hf = PreTrainedTokenizerFast(tokenizer_file=str(saved / "tokenizer.json"))
    for text in random_texts(10, seed=2):
        assert hf(text)["input_ids"] == tokenizer.encode(text)
    assert hf.convert_tokens_to_ids(tokenizer.to_transformers().eos_token) == tokenizer.eos_id


def test_saved_files_and_round_trip(tokenizer, saved):
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["split_special_tokens"] is True
    loaded = load_tokenizer(saved)
    assert type(loaded) is type(tokenizer)
    assert loaded.fingerprint() == tokenizer.fingerprint()


def test_find_tokenizer_old_and_new_layouts(tmp_path):
    assert find_tokenizer(tmp_path) is None
    ByteTokenizer().save(tmp_path / "tokenizer")  # the layout before HF tokenizers
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer"
    ByteTokenizer().save(tmp_path)
    assert find_tokenizer(tmp_path) == tmp_path
