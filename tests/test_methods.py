"""The method contract table: every method, plain frozen weights (see tests/method_contract.py)."""

from __future__ import annotations

import pytest

from tests.method_contract import (  # noqa: F401  (the shared tests, run for these rows)
    Row,
    test_evaluates,
    test_exports_and_reloads,
    test_gradient_checkpointing_changes_no_loss,
    test_resumes_exactly,
    test_trains,
    test_two_ranks_equal_one_process,
    trained,
)

WARM = "adapter.robust.mask_warmup_steps=2"
ROWS = [
    Row("lora", "lora", "tiny-lora"),
    Row("sparse", "sparse", "tiny-robust", ("adapter.rank=0", WARM)),
    Row("robust", "robust", "tiny-robust", (WARM,)),
    Row("subspace", "subspace", "tiny-subspace", ("adapter.resample_every=2",)),
    Row(
        "hybrid",
        "hybrid",
        "tiny-subspace",
        ("adapter.resample_every=2", "adapter.density=0.05", WARM),
        checkpointing=True,
    ),
    Row("full", "full", "tiny-full", checkpointing=True),
    # chat SFT of a base model: a new special token, the embeddings and head trained whole,
    # partitioned by ZeRO-3 (at 1 and 2 ranks)
    Row(
        "lora-vocab-zero3",
        "lora",
        "tiny-lora",
        (
            "adapter.train_modules=[embed_tokens,lm_head]",
            "model.new_special_tokens=[<|tool|>]",
            "deepspeed.config=zero3",
        ),  # fmt: skip
    ),
]

pytestmark = pytest.mark.slow


@pytest.fixture(params=ROWS, ids=[r.id for r in ROWS])
def row(request) -> Row:
    return request.param
