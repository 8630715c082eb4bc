"""Tokenizer: reserved ids, ordering, thresholds, encode/decode, JSON files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from captioner.errors import CaptionerError
from captioner.text.tokenizer import END, PAD, RESERVED, START, UNK, Tokenizer

TRAIN = [
    "a dog runs on the grass",
    "a dog jumps",
    "the cat sleeps",
    "a cat and a dog",
]


def test_reserved_ids():
    tok = Tokenizer.build(TRAIN)
    assert (PAD, UNK, START, END) == (0, 1, 2, 3)
    assert tok.words[:4] == ["<pad>", "<unk>", "<start>", "<end>"] == list(RESERVED)
    assert [tok.index[w] for w in RESERVED] == [0, 1, 2, 3]


def test_words_sorted_by_count_then_alphabetically():
    tok = Tokenizer.build(TRAIN)
    # a:4, dog:3, cat:2, the:2, then the singletons alphabetically
    assert tok.words[4:] == [
        "a",
        "dog",
        "cat",
        "the",
        "and",
        "grass",
        "jumps",
        "on",
        "runs",
        "sleeps",
    ]
    assert tok.counts[4:] == [4, 3, 2, 2, 1, 1, 1, 1, 1, 1]
    assert tok.vocab_size == 14


def test_min_count_threshold():
    tok = Tokenizer.build(TRAIN, min_count=2)
    assert tok.words[4:] == ["a", "dog", "cat", "the"]
    assert tok.vocab_size == 8
    assert tok.encode("the dog sleeps") == [START, 7, 5, UNK, END]
    assert Tokenizer.build(TRAIN, min_count=5).vocab_size == 4


def test_max_length_from_longest_caption_or_argument():
    assert Tokenizer.build(TRAIN).max_length == 6 + 2
    assert Tokenizer.build(TRAIN, max_length=5).max_length == 5
    assert Tokenizer.build(TRAIN, max_length=50).max_length == 8


def test_vocabulary_comes_from_training_captions_only():
    test_caption = "a zebra runs"
    tok = Tokenizer.build(TRAIN)
    assert "zebra" not in tok.index
    assert tok.encode(test_caption) == [START, tok.index["a"], UNK, tok.index["runs"], END]
    assert tok.decode(tok.encode(test_caption)) == "a <unk> runs"


def test_encode_truncates_keeping_the_end_token():
    tok = Tokenizer.build(TRAIN, max_length=5)
    ids = tok.encode("a dog runs on the grass")
    assert ids == [START, 4, 5, tok.index["runs"], END]
    assert tok.encode("a dog runs on the grass", add_special=False) == [4, 5, tok.index["runs"]]
    assert tok.encode("") == [START, END]


def test_encode_decode_round_trip():
    tok = Tokenizer.build(TRAIN)
    for caption in TRAIN:
        assert tok.decode(tok.encode(caption)) == caption
    assert tok.decode([START, 4, 5, END, 6, 7]) == "a dog"
    assert tok.decode(np.array([START, 4, PAD, UNK, END, PAD])) == "a <unk>"
    with pytest.raises(ValueError, match="token id 99 is outside the vocabulary"):
        tok.decode([START, 99])


def test_encode_batch_shapes_and_padding():
    tok = Tokenizer.build(TRAIN)
    batch = tok.encode_batch(["a dog", "the cat sleeps"])
    assert batch.dtype == np.int32 and batch.shape == (2, 8)
    assert batch.tolist() == [
        [START, 4, 5, END, 0, 0, 0, 0],
        [START, 7, 6, 13, END, 0, 0, 0],
    ]
    assert tok.encode_batch([]).shape == (0, 8)


def test_json_round_trip(tmp_path):
    tok = Tokenizer.build(TRAIN, min_count=2, max_length=7)
    path = tmp_path / "vocab.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "captioner.tokenizer" and data["version"] == 1
    assert data["min_count"] == 2 and data["max_length"] == 7
    assert data["words"] == ["<pad>", "<unk>", "<start>", "<end>", "a", "dog", "cat", "the"]
    assert data["counts"] == [0, 0, 0, 0, 4, 3, 2, 2]
    loaded = Tokenizer.load(path)
    assert loaded == tok
    texts = TRAIN + ["a zebra and the cat"]
    assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    np.testing.assert_array_equal(loaded.encode_batch(texts), tok.encode_batch(texts))
    assert Tokenizer.from_json(json.loads(json.dumps(tok.to_json()))) == tok


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CaptionerError, match=r"none\.json: tokenizer file not found"):
        Tokenizer.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": \n', encoding="utf-8")
    with pytest.raises(CaptionerError, match=r"bad\.json:2: invalid JSON"):
        Tokenizer.load(bad)
    data = Tokenizer.build(TRAIN).to_json()
    cases = [
        ({**data, "format": "other"}, "not a captioner tokenizer file"),
        ({**data, "version": 2}, "format version 2 is not supported"),
        ({**data, "words": data["words"][1:]}, "first words must be <pad>, <unk>"),
        ({**data, "counts": data["counts"][:-1]}, "words and counts differ"),
        ({**data, "words": data["words"][:-1] + ["a"]}, "duplicate word"),
        ({k: v for k, v in data.items() if k != "max_length"}, "invalid tokenizer"),
    ]
    for payload, message in cases:
        bad.write_text(json.dumps(payload), encoding="utf-8")
        with pytest.raises(CaptionerError, match=rf"bad\.json: .*{message}"):
            Tokenizer.load(bad)


def test_save_error_names_the_file(tmp_path):
    with pytest.raises(CaptionerError, match=r"no/such/dir does not exist .*no/such/dir/v\.json"):
        Tokenizer.build(TRAIN).save(tmp_path / "no" / "such" / "dir" / "v.json")
