"""The distributed sampler and the collator.

The sampler is a pure function of (seed, step): optimizer step ``t`` consumes the global batch
``t`` of a seeded per-epoch permutation, cut into micro-batches, and micro-batch ``j`` goes to rank
``j % world``. So the set of examples in a step, and how they are grouped into micro-batches, do
not depend on the number of ranks: one process with gradient accumulation and N ranks compute the
same update, and a resumed run (on any number of ranks) continues with the very next batch.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from rosa_ds.data.tokenize import IGNORE


class GlobalBatchSampler:
    """Global batch ``step`` as this rank's micro-batches: the same batches at any world size,
    and a resumed run continues with the batch it stopped at."""

    def __init__(
        self,
        num_examples: int,
        global_batch: int,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
    ) -> None:
        if global_batch % (micro_batch * world):
            raise ValueError("global_batch must be a multiple of micro_batch * world")
        if num_examples < global_batch:
            raise ValueError(
                f"{num_examples} examples cannot fill a global batch of {global_batch}"
            )
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.rank = rank
        self.world = world
        self.seed = seed
        self.steps_per_epoch = num_examples // global_batch
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world)

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            self._perm = list(range(self.num_examples))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._perm)
            self._perm_epoch = epoch
        return self._perm

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch_indices(self, step: int) -> list[int]:
        """Every example of global batch ``step``, on every rank alike."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self._permutation(epoch)[start : start + self.global_batch]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for optimizer step ``step``."""
        batch = self.global_batch_indices(step)
        micro = [batch[i : i + self.micro_batch] for i in range(0, len(batch), self.micro_batch)]
        return micro[self.rank :: self.world]


def label_tokens(example: dict[str, list[int]]) -> int:
    """Tokens of an example that carry loss (after the causal shift: the first never does)."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model gets of a collated batch: packed sequences (``position_ids``) go without
    the attention mask, so that transformers masks attention between the packed examples
    (padding is a sequence of its own, with no labels); the mask stays for counting tokens."""
    if "position_ids" in batch:
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; pads get label -100 and attention 0."""
    width = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, Any] = {"input_ids": [], "labels": [], "attention_mask": []}
    with_pos = "position_ids" in examples[0]
    if with_pos:
        batch["position_ids"] = []
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        batch["labels"].append(e["labels"] + [IGNORE] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        if with_pos:
            batch["position_ids"].append(e["position_ids"] + list(range(pad)))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def shard_evenly(n: int, rank: int, world: int) -> list[int]:
    """Indices ``rank, rank + world, ...`` of ``n`` items: a rank's share of an evaluation set."""
    return list(range(rank, n, world))
