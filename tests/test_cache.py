"""Tokenize once: the cached splits are exactly what tokenizing in a loop gives, later calls
(ranks, resumes, runs) read them instead of tokenizing, the key follows everything that decides
the sequences, and concurrent processes tokenize once."""

from __future__ import annotations

import dataclasses

import pytest

from rosa_ds.config import DataConfig, ModelConfig
from rosa_ds.data import cache
from rosa_ds.data.cache import content_key, tokenized_splits
from rosa_ds.data.tokenize import pack, tokenize_records
from tests.helpers import CLI, start_run

RECORDS = [
    {"prompt": f"What is {i} + {i}?", "response": f"{2 * i}", "reference": str(2 * i)}
    for i in range(30)
] + [{"text": f"Document number {i} is plain text. " * (1 + i % 4), "reference": ""} for i in range(12)] + [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"hello {i}"}],
     "reference": ""} for i in range(6)
]  # fmt: skip


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    from rosa_ds.model import load_tokenizer

    return load_tokenizer(tiny_model_path, ModelConfig())


def _reference(records, tok, data, packed):
    out = tokenize_records(records, tok, data.max_length, data.chat_template, data.train_on_inputs)
    return pack(out, data.max_length) if packed else out


@pytest.mark.parametrize("packing", [False, True])
def test_cached_splits_equal_tokenizing_in_a_loop(tmp_path, tok, packing):
    data = DataConfig(cache_dir=str(tmp_path), packing=packing, max_length=24)
    got = tokenized_splits(RECORDS, RECORDS[:5], tok, data)
    assert not got.from_cache and got.folder.parent == tmp_path
    assert got.train[:] == _reference(RECORDS, tok, data, packing)
    assert got.eval[:] == _reference(RECORDS[:5], tok, data, False)
    assert ("position_ids" in got.train[0]) is packing
    total, labels = got.train.token_counts()
    ref = _reference(RECORDS, tok, data, packing)
    assert total == sum(len(e["input_ids"]) for e in ref)
    assert labels == sum(sum(1 for t in e["labels"] if t != -100) for e in ref)


def test_a_second_call_reads_the_cache_and_tokenizes_nothing(tmp_path, tok, monkeypatch):
    data = DataConfig(cache_dir=str(tmp_path))
    first = tokenized_splits(RECORDS, RECORDS[:5], tok, data)

    def refuse(*args, **kw):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(cache, "_tokenize", refuse)
    again = tokenized_splits(RECORDS, RECORDS[:5], tok, data)
    assert again.from_cache and again.folder == first.folder
    assert again.train[:] == first.train[:]
    with pytest.raises(AssertionError, match="tokenized again"):  # other content: a new entry
        tokenized_splits(RECORDS[1:], RECORDS[:5], tok, data)


def test_the_key_follows_data_tokenizer_and_settings(tok):
    base = DataConfig()
    key = content_key(RECORDS, RECORDS[:2], tok, base)
    assert content_key(list(RECORDS), RECORDS[:2], tok, DataConfig()) == key
    assert content_key(RECORDS[:-1], RECORDS[:2], tok, base) != key
    assert content_key(RECORDS, RECORDS[:3], tok, base) != key
    for change in ({"max_length": 128}, {"train_on_inputs": True}, {"packing": True},
                   {"chat_template": False}):  # fmt: skip
        assert content_key(RECORDS, RECORDS[:2], tok, dataclasses.replace(base, **change)) != key
    # not the cache's own keys
    assert content_key(RECORDS, RECORDS[:2], tok, dataclasses.replace(base, num_proc=3)) == key
    template = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        assert content_key(RECORDS, RECORDS[:2], tok, base) != key
    finally:
        tok.chat_template = template


def test_a_partial_entry_is_rebuilt_and_no_cache_writes_nothing(tmp_path, tok):
    data = DataConfig(cache_dir=str(tmp_path / "c"))
    folder = tmp_path / "c" / content_key(RECORDS, [], tok, data)
    (folder / "train").mkdir(parents=True)  # a crash before the entry was done
    got = tokenized_splits(RECORDS, [], tok, data)
    assert not got.from_cache and got.train[:] == _reference(RECORDS, tok, data, False)
    assert (folder / "done").is_file()
    off = tokenized_splits(RECORDS, [], tok, dataclasses.replace(data, cache=False,
                                                                 cache_dir=str(tmp_path / "off")))  # fmt: skip
    assert off.folder is None and off.train[:] == got.train[:]
    assert not (tmp_path / "off").exists()


def test_processes_tokenize_the_same(tmp_path, tok):
    """datasets.map with worker processes gives the one-process sequences, in order."""
    one = tokenized_splits(RECORDS, [], tok, DataConfig(cache=False))
    two = tokenized_splits(RECORDS, [], tok, DataConfig(cache=False, num_proc=2))
    assert two.train[:] == one.train[:]


def test_concurrent_prepares_tokenize_once(tmp_path):
    """Two rosa-ds prepare processes at once (as a job's ranks start): one tokenizes under the
    entry's lock, the other waits and reads it."""
    cmd = [*CLI, "prepare", "--config", "tiny-lora", f"data.cache_dir={tmp_path}",
           "data.num_train=400"]  # fmt: skip
    procs = [start_run(cmd) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    built = [o for o, _ in outs if "sequences into" in o]
    read = [o for o, _ in outs if "tokenized data from the cache" in o]
    assert len(built) == 1 and len(read) == 1, outs
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
