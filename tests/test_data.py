"""Training data: reading, packing, deterministic and resumable batches, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from neo_jax import data
from tests.conftest import TOKENIZER_DIR


def test_pack_joins_documents_with_eos_and_drops_the_tail():
    blocks = data.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos=0)
    np.testing.assert_array_equal(blocks, [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]])
    assert data.pack([[1]], seq_len=4, eos=0).shape == (0, 4)


def test_read_documents_from_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    docs = list(data.read_documents([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")]))
    assert docs == ["first file", "second file", "one", "two"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json}\n", r"c.jsonl:1 is not valid JSON"),
        (json.dumps({"body": "x"}) + "\n", r"c.jsonl:1 has no string field 'text'"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        list(data.read_documents([str(tmp_path / "c.jsonl")]))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file matches .*nothing-here"):
        list(data.read_documents([str(tmp_path / "nothing-here*.txt")]))


def blocks(n=40, seq=8):
    return np.arange(n * seq, dtype=np.int32).reshape(n, seq)


def test_batches_are_deterministic_resumable_and_cover_each_epoch():
    packed = data.PackedData(blocks(), batch_size=4, seed=3, validation_fraction=0.1)
    assert len(packed.validation) == 4 and len(packed.train) == 36 and packed.steps_per_epoch == 9
    straight = [b for _, b in zip(range(20), packed.batches())]
    resumed = [
        b
        for _, b in zip(range(8), data.PackedData(blocks(), batch_size=4, seed=3, validation_fraction=0.1).batches(12))
    ]
    for a, b in zip(straight[12:], resumed):
        np.testing.assert_array_equal(a, b)
    epoch = np.concatenate(straight[:9])
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, packed.train))  # each block once per epoch
    assert not np.array_equal(np.concatenate(straight[9:18]), epoch)  # a new order for the next epoch
    other_seed = data.PackedData(blocks(), batch_size=4, seed=4, validation_fraction=0.1)
    assert not np.array_equal(other_seed.batch(0), packed.batch(0))
    held_out = {tuple(b) for b in packed.validation}
    assert held_out.isdisjoint(map(tuple, packed.train))
    assert sum(len(b) for b in packed.validation_batches()) == 4


def test_too_little_data_is_a_clear_error(tmp_path):
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    (tmp_path / "tiny.txt").write_text("Just a few words.")
    with pytest.raises(ValueError, match="fewer than 64 tokens: not one block of --seq-len"):
        data.load([str(tmp_path / "tiny.txt")], tokenizer, seq_len=64, batch_size=2)
    (tmp_path / "more.txt").write_text("word " * 300)
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        data.load([str(tmp_path / "more.txt")], tokenizer, seq_len=64, batch_size=32)


def test_load_tokenizes_with_the_model_tokenizer(tmp_path):
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": f"Document number {i} says hello."}) for i in range(40))
    )
    packed = data.load([str(tmp_path / "a.jsonl")], tokenizer, seq_len=16, batch_size=2, validation_fraction=0.2)
    stream = np.concatenate([tokenizer(f"Document number {i} says hello.")["input_ids"] + [50256] for i in range(40)])
    everything = np.sort(np.concatenate([packed.train, packed.validation]).ravel())
    np.testing.assert_array_equal(everything, np.sort(stream[: len(everything)]))
    assert (packed.train == 50256).any()  # documents are separated by EOS


def test_a_validation_split_that_would_leave_no_full_batch_is_skipped():
    blocks = np.arange(4 * 8, dtype=np.int32).reshape(4, 8)
    with pytest.warns(UserWarning, match="too few to hold 1 out for validation"):
        packed = data.PackedData(blocks, batch_size=4, validation_fraction=0.01)
    assert len(packed.train) == 4 and len(packed.validation) == 0 and not list(packed.validation_batches())
