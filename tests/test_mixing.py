"""Several datasets mixed by weight, train.num_epochs and train.warmup_ratio: the shares, the
step count an epoch gives, the warm-up a ratio gives, and one mixed run end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rosa_ds.config import load_config
from rosa_ds.data.batching import GlobalBatchSampler
from rosa_ds.data.mixing import draw, load_data, shares
from rosa_ds.errors import UserError
from rosa_ds.preflight import resolve_epochs
from rosa_ds.schedule import steps_for_epochs, warmup_steps
from tests.helpers import launch


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_shares_split_the_total_by_weight_and_add_up():
    assert shares([1, 1], [30, 10]) == [20, 20]
    assert shares([3, 1], [30, 10]) == [30, 10]  # weights as the sizes: plain concatenation
    counts = shares([1, 1, 1], [10, 10, 11])
    assert sum(counts) == 31 and max(counts) - min(counts) == 1
    assert shares([0.5, 0.25, 0.25], [7, 7, 6]) == [10, 5, 5]


def test_draw_repeats_whole_then_a_seeded_subset():
    rows = [{"i": i} for i in range(4)]
    got = draw(rows, 10, seed=3)
    assert Counter(r["i"] for r in got[:8]) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert len({r["i"] for r in got[8:]}) == 2
    assert draw(rows, 10, seed=3) == got  # seeded
    assert len({r["i"] for r in draw(rows, 3, seed=1)}) == 3  # a subset, no repeats


def test_a_mix_takes_each_sources_share_and_every_held_out_record(tmp_path):
    text = _jsonl(tmp_path / "text.jsonl", [{"text": f"doc {i}"} for i in range(41)])
    pairs = _jsonl(
        tmp_path / "qa.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(21)]
    )
    cfg = load_config("tiny-lora", [
        f"data.datasets=[{{path: {text}, weight: 1}}, {{path: {pairs}, weight: 1, eval_fraction: 0.1}}]",
    ])  # fmt: skip
    data = load_data(cfg.data)
    kinds = Counter("text" if "text" in r else "pair" for r in data.train)
    sizes = (39, 19)  # 41 - round(0.05 * 41), 21 - round(0.1 * 21)
    assert kinds == {"text": sum(sizes) // 2, "pair": sum(sizes) // 2}
    assert Counter("text" if "text" in r else "pair" for r in data.eval) == {"text": 2, "pair": 2}
    assert data.metric == "none"
    line = data.describe()
    assert "qa.jsonl (prompt_response, detected): 29 training records from 19 (1.53x)" in line


def test_a_mix_of_generators_keeps_the_metric_they_share():
    cfg = load_config("tiny-lora", [
        "data.datasets=[{path: arithmetic, num_train: 30}, {path: multistep, num_train: 10, difficulty: 2, weight: 3}]",
    ])  # fmt: skip
    data = load_data(cfg.data)
    assert data.metric == "number_match" and len(data.train) == 40
    assert len(data.eval) == 2 * cfg.data.num_eval


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.datasets=[{path: a.jsonl, weight: 0}]", "data.datasets[0].weight must be > 0"),
        ("data.datasets=[{weight: 2}]", "data.datasets[0] needs a path"),
        ("data.datasets=[{path: a, wieght: 2}]", "unknown config key data.datasets[0].wieght"),
        ("data.datasets=[{path: a, format: csv}]", "data.datasets[0].format must be"),
        ("data.datasets=[a.jsonl]", "data.datasets[0] must be a mapping"),
        ("train.num_epochs=0", "train.num_epochs must be > 0"),
        ("train.warmup_ratio=1", "train.warmup_ratio must be in [0, 1)"),
        ("data.num_proc=-1", "data.num_proc must be >= 0"),
    ],
)
def test_bad_mix_and_epoch_keys_name_the_problem(override, message):
    with pytest.raises(UserError) as info:
        load_config("tiny-lora", [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_epochs_become_steps_and_each_epoch_sees_every_example_once():
    assert steps_for_epochs(2, 100, 8) == 24 and steps_for_epochs(0.5, 100, 8) == 6
    cfg = load_config("tiny-lora", ["train.num_epochs=2", "train.global_batch_size=4"])
    line = resolve_epochs(cfg, 21)
    assert cfg.train.max_steps == 10 and "10 optimizer steps (5 per epoch" in line
    sampler = GlobalBatchSampler(21, 4, 2, 0, 1, cfg.seed)
    for epoch in range(2):
        seen = [i for s in range(5 * epoch, 5 * epoch + 5) for i in sampler.global_batch_indices(s)]
        assert len(seen) == len(set(seen)) == 20
    # the resolved count is checked as a given one: a continued warm-up must fit in it
    cfg = load_config("tiny-robust", ["train.num_epochs=1", "adapter.robust.mask_warmup_steps=8",
                                      "adapter.robust.after_mask=continue", "train.max_steps=20"])  # fmt: skip
    with pytest.raises(UserError, match="which after_mask=continue counts them in"):
        resolve_epochs(cfg, 40)


@pytest.mark.parametrize("ratio, total", [(0.1, 25), (0.03, 1000), (0.0, 10), (0.5, 3)])
def test_warmup_ratio_gives_the_transformers_warmup(ratio, total, tmp_path):
    from transformers import TrainingArguments

    # transformers 5 takes the ratio as a fractional warmup_steps (4.x: warmup_ratio)
    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, report_to=[])
    assert warmup_steps(10, ratio, total) == args.get_warmup_steps(total)
    assert warmup_steps(10, None, total) == 10


@pytest.mark.slow
def test_a_mixed_prepared_run_trains_both_formats_for_its_epochs(tmp_path):
    """Conversations and plain text in one run, for 1.5 epochs with a warm-up ratio, after
    rosa-ds prepare: the run maps the cached data, trains the resolved step count and learns."""
    turns = {
        "messages": [
            {"role": "user", "content": "3+4?"},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "and 1+1?"},
            {"role": "assistant", "content": "2"},
        ]
    }
    chat = _jsonl(tmp_path / "chat.jsonl", [turns] * 24)
    text = _jsonl(tmp_path / "text.jsonl", [{"text": "Ava has 3 apples and buys 4 more."}] * 12)
    out = tmp_path / "run"
    args = ["--config", "tiny-lora", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}",
            f"data.datasets=[{{path: {chat}, weight: 2}}, {{path: {text}, weight: 1}}]",
            "data.eval_split=null", "train.num_epochs=1.5", "train.warmup_ratio=0.5",
            "train.scheduler=linear", "eval.num_generate=0", "train.lr=2e-2"]  # fmt: skip
    prep = launch(["prepare", *args])
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert "tokenized 34 training and 2 held-out sequences into" in prep.stdout
    assert "one epoch 4 optimizer steps at global batch 8" in prep.stdout
    proc = launch(["train", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rosa-ds: tokenized data from the cache" in proc.stderr
    assert "chat.jsonl (messages, detected)" in proc.stderr
    assert "train.num_epochs=1.5: 6 optimizer steps (4 per epoch" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    losses = summary["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in line]  # fmt: skip
    assert lrs[:3] == pytest.approx([2e-2 / 3, 2 * 2e-2 / 3, 2e-2])  # warm-up: ceil(0.5 * 6)
