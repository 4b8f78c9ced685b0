"""Several datasets in one run (``data.datasets``): each source is loaded as ``data.dataset``
would be, then the training records are mixed by weight.

The mix holds as many training records as its sources together; source ``i`` supplies the share
``weight_i / sum(weights)`` of them, rounded so the counts add up. A source with more than its
share gives a seeded subset, one with less repeats whole and then a seeded remainder, so
weights proportional to the sizes are plain concatenation. The sampler shuffles the mix. The
held-out records of every source are evaluated together; the task metric is the one they share
(``data.metric`` decides when set), else only the loss is measured.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from rosa_ds.config import DataConfig, DatasetSource
from rosa_ds.data.loading import TaskData, load_task_data


def source_config(data: DataConfig, source: DatasetSource) -> DataConfig:
    """The data section as this source sees it: its own keys where set, the section's else."""
    own = {
        f.name: getattr(source, f.name)
        for f in dataclasses.fields(source)
        if f.name not in ("path", "weight") and getattr(source, f.name) is not None
    }
    return dataclasses.replace(data, dataset=source.path, datasets=[], **own)


def shares(weights: list[float], sizes: list[int]) -> list[int]:
    """Records per source: ``sum(sizes)`` split by weight, largest remainders rounded up."""
    total, mass = sum(sizes), sum(weights)
    exact = [w / mass * total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(records: list[dict[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` records of a source: whole copies while they fit, then a seeded subset."""
    whole, rest = divmod(count, len(records))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return records * whole + [records[i] for i in order[:rest]]


@dataclasses.dataclass
class MixedData(TaskData):
    """A mix's records, with what each source gave, for the run's log."""

    parts: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str | None:
        return "data mix: " + "; ".join(self.parts)


def load_mixture(data: DataConfig) -> MixedData:
    """Every source of ``data.datasets``, loaded and mixed by weight."""
    loaded = [load_task_data(source_config(data, s)) for s in data.datasets]
    counts = shares([s.weight for s in data.datasets], [len(t.train) for t in loaded])
    train, held_out, parts = [], [], []
    for i, (source, task, count) in enumerate(zip(data.datasets, loaded, counts, strict=True)):
        train += draw(task.train, count, data.seed + i)
        held_out += task.eval
        how = f"{task.format}, detected" if task.detected_from is not None else task.format
        parts.append(
            f"{source.path} ({how}): {count} training records from {len(task.train)} "
            f"({count / len(task.train):.2f}x), {len(task.eval)} held out"
        )
    metrics = {t.metric for t in loaded}
    metric = (
        data.metric if data.metric != "auto" else (metrics.pop() if len(metrics) == 1 else "none")
    )
    return MixedData(train, held_out, "mixed", metric, parts=parts)


def load_data(data: DataConfig) -> TaskData:
    """The run's records: one dataset (``data.dataset``) or a mix (``data.datasets``)."""
    return load_mixture(data) if data.datasets else load_task_data(data)
