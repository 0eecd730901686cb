"""Tests of growmem.tasks.tokenizers: round trips, BPE training, save/load and fingerprints."""

from __future__ import annotations

import json

import pytest

from growmem.tasks.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer

TEXTS = [
    "plain ASCII, with punctuation: a=b+c; (x)!",
    "naïve café, Straße, 東京, Ελληνικά",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 in one line",
    "",
    "tabs\tand\nnewlines\r\n  and   spaces ",
]
TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. Return the number of items in the list. "
    "Read and return up to n bytes from the stream. "
) * 40


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([TRAIN_TEXT, "café 東京"], vocab_size=400)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_specials_are_dropped_and_bad_bytes_replaced():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]) == "hi"
    cut = tok.encode("é")[:1]  # half of a two-byte character
    assert tok.decode(cut) == "\ufffd"
    with pytest.raises(ValueError, match="ids"):
        tok.decode([259])
    with pytest.raises(ValueError, match="ids"):
        tok.decode([-1])


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    assert bpe.encode_batch([text, "x"]) == [ids, bpe.encode("x")]


def test_bpe_learns_merges_and_special_ids(bpe):
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    assert 256 + 3 < bpe.vocab_size <= 400
    sentence = "Return the number of items in the list."
    assert len(bpe.encode(sentence)) < len(sentence.encode("utf-8")) / 2


def test_bpe_special_token_strings_in_text_are_text(bpe):
    ids = bpe.encode("a <eos> b <pad>")
    assert bpe.eos_id not in ids and bpe.pad_id not in ids
    assert bpe.decode(ids) == "a <eos> b <pad>"
    assert bpe.decode([bpe.bos_id, *bpe.encode("ab"), bpe.eos_id]) == "ab"


@pytest.mark.parametrize("make", [ByteTokenizer, None], ids=["byte", "bpe"])
@pytest.mark.parametrize("text", TEXTS)
def test_token_byte_lengths_sum_to_utf8_length(bpe, make, text):
    tok = make() if make else bpe
    lengths = tok.token_byte_lengths()
    assert len(lengths) == tok.vocab_size
    assert lengths[tok.eos_id] == lengths[tok.pad_id] == lengths[tok.bos_id] == 0
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_bpe_save_load_round_trip(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, BPETokenizer)
    assert loaded.fingerprint() == bpe.fingerprint()
    assert (loaded.vocab_size, loaded.eos_id) == (bpe.vocab_size, bpe.eos_id)
    for text in TEXTS:
        assert loaded.encode(text) == bpe.encode(text)
    assert loaded.encode("<eos>") == bpe.encode("<eos>")  # still text after loading


def test_bpe_custom_special_tokens_survive_save(tmp_path):
    tok = BPETokenizer.train([TRAIN_TEXT], 300, special_tokens=["[P]", "[B]", "[E]", "[X]"])
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    loaded = load_tokenizer(tok.save(tmp_path))
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
    assert loaded.fingerprint() == tok.fingerprint()


def test_plain_tokenizer_json_loads(bpe, tmp_path):
    bpe.save(tmp_path)
    (tmp_path / "growmem_tokenizer.json").unlink()
    assert load_tokenizer(tmp_path).fingerprint() == bpe.fingerprint()


def test_fingerprints_tell_tokenizers_apart(bpe):
    other_size = BPETokenizer.train([TRAIN_TEXT, "café 東京"], vocab_size=300)
    other_text = BPETokenizer.train([TRAIN_TEXT.upper(), "café 東京"], vocab_size=400)
    again = BPETokenizer.train([TRAIN_TEXT, "café 東京"], vocab_size=400)
    assert again.fingerprint() == bpe.fingerprint()
    prints = {bpe.fingerprint(), other_size.fingerprint(), other_text.fingerprint()}
    prints.add(ByteTokenizer().fingerprint())
    assert len(prints) == 4


def test_fingerprints_tell_apart_bpes_of_one_size_with_other_merges():
    lower = BPETokenizer.train([TRAIN_TEXT], vocab_size=300)
    upper = BPETokenizer.train([TRAIN_TEXT.upper()], vocab_size=300)
    assert lower.vocab_size == upper.vocab_size == 300
    assert lower.encode("the list") != upper.encode("the list")  # other merges
    assert lower.fingerprint() != upper.fingerprint()


def test_byte_save_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    description = json.loads((tmp_path / "growmem_tokenizer.json").read_text())
    assert description["kind"] == "byte"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.fingerprint() == ByteTokenizer().fingerprint() == "byte-259"
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=r"growmem_tokenizer\.json"):
        load_tokenizer(tmp_path)  # exists but empty
    (tmp_path / "growmem_tokenizer.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="sentencepiece"):
        load_tokenizer(tmp_path)


def test_train_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train([TRAIN_TEXT], vocab_size=200)
    with pytest.raises(ValueError, match="special_tokens"):
        BPETokenizer.train([TRAIN_TEXT], vocab_size=300, special_tokens=["<pad>", "<eos>"])
    with pytest.raises(ValueError, match="special_tokens"):
        BPETokenizer.train([TRAIN_TEXT], 300, special_tokens=["<a>", "<a>", "<b>"])


def test_split_digits_gives_every_digit_its_own_token_and_survives_save(tmp_path):
    numbers = [f"value {n}. " for n in (1234567, 1200034, 7654321, 1212121)] * 50
    merged = BPETokenizer.train([TRAIN_TEXT, *numbers], vocab_size=400)
    split = BPETokenizer.train([TRAIN_TEXT, *numbers], vocab_size=400, split_digits=True)
    assert any(len(merged.decode([i]).strip()) > 1 for i in merged.encode(" 1234567"))
    text = "Return 1234567 items, then 89 more."
    pieces = [split.decode([i]) for i in split.encode(text)]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("123456789")
    assert split.decode(split.encode(text)) == text
    assert split.fingerprint() != merged.fingerprint()
    loaded = load_tokenizer(split.save(tmp_path))
    assert loaded.fingerprint() == split.fingerprint()
    assert loaded.encode(text) == split.encode(text)
