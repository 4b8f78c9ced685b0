"""Subspace adaptation maths: a resample preserves the function, the samplings and splits do
what they say, owners balance the SVD cost, and resampling escapes LoRA's rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rosa_ds.adapters.inject import adapted_modules
from rosa_ds.adapters.layer import AdaptedLinear
from rosa_ds.adapters.resample import (
    assign_owners,
    choose_indices,
    effective_rank,
    lowrank_delta,
    resample_all,
    resample_matrix,
    rounds,
    svd_cost,
)


@pytest.mark.parametrize("sampling", ["random_block", "random_subset", "top", "bottom"])
@pytest.mark.parametrize("split", ["balanced", "one_sided"])
def test_resample_preserves_the_merged_weight(sampling, split):
    g = torch.Generator().manual_seed(0)
    w, a, b = (
        torch.randn(20, 12, generator=g),
        torch.randn(3, 12, generator=g),
        torch.randn(20, 3, generator=g),
    )
    scale = 2.5
    f = resample_matrix(w, a, b, scale, sampling, split, torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        f.w_fixed + scale * f.b @ f.a, w + scale * b @ a, atol=1e-4, rtol=1e-5
    )
    assert f.a.shape == a.shape and f.b.shape == b.shape
    # the new adapter is exactly the chosen singular triplets of the merged weight
    u, s, vh = torch.linalg.svd(w + scale * b @ a, full_matrices=False)
    chosen = (u[:, f.indices] * s[f.indices]) @ vh[f.indices]
    torch.testing.assert_close(scale * f.b @ f.a, chosen, atol=1e-4, rtol=1e-4)
    if split == "balanced":  # sqrt(S) on each side: the factors have equal column/row norms
        torch.testing.assert_close(f.b.norm(dim=0), f.a.norm(dim=1), atol=1e-4, rtol=1e-4)
    else:  # one-sided: A has orthonormal rows
        torch.testing.assert_close(f.a @ f.a.T, torch.eye(3), atol=1e-5, rtol=1e-5)


def test_choose_indices():
    g = torch.Generator().manual_seed(3)
    assert choose_indices(10, 3, "top", g).tolist() == [0, 1, 2]
    assert choose_indices(10, 3, "bottom", g).tolist() == [7, 8, 9]
    blocks = {tuple(choose_indices(10, 3, "random_block", g).tolist()) for _ in range(50)}
    assert all(b == tuple(range(b[0], b[0] + 3)) for b in blocks) and len(blocks) > 3
    subsets = [choose_indices(10, 3, "random_subset", g).tolist() for _ in range(50)]
    assert any(s != list(range(s[0], s[0] + 3)) for s in subsets)  # not always contiguous
    assert all(len(set(s)) == 3 and s == sorted(s) for s in subsets)
    with pytest.raises(ValueError, match="unknown sampling"):
        choose_indices(10, 3, "lucky", g)


def test_owners_balance_cost_and_rounds_cover_everything():
    shapes = {f"m{i}": (64 * (1 + i % 4), 64) for i in range(11)}
    owners = assign_owners(shapes, 3)
    load = [sum(svd_cost(shapes[n]) for n, r in owners.items() if r == k) for k in range(3)]
    assert max(load) - min(load) <= max(svd_cost(s) for s in shapes.values())
    plan = rounds(owners, 3)
    assert sorted(n for rnd in plan for n in rnd) == sorted(shapes)
    assert all(len({owners[n] for n in rnd}) == len(rnd) for rnd in plan)  # one per owner


def test_model_function_unchanged_by_resample_all():
    torch.manual_seed(0)
    model = nn.Sequential(
        AdaptedLinear(nn.Linear(16, 24), 4, 8.0), nn.GELU(), AdaptedLinear(nn.Linear(24, 8), 4, 8.0)
    )
    for m in adapted_modules(model).values():
        with torch.no_grad():
            m.lora_B.normal_()
    x = torch.randn(5, 16)
    before = model(x)
    report = resample_all(
        model, sampling="random_subset", split="balanced", seed=1, count=0, has_optimizer=False
    )
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)
    assert set(report.indices) == {"0", "2"} and all(len(v) == 4 for v in report.indices.values())


def _regression(rank: int, resample_every: int | None, epochs: int = 60):
    """The paper's synthetic setting, shrunk: a linear target with a rank-12 update."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, true_rank = 48, 16, 12
    w0 = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    target = (
        w0
        + torch.randn(d_out, true_rank, generator=g)
        @ torch.randn(true_rank, d_in, generator=g)
        / d_in**0.5
    )
    x = torch.randn(1024, d_in, generator=g)
    y = x @ target.T
    base = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
    layer = AdaptedLinear(base, rank, float(rank))
    base.weight.requires_grad_(False)
    torch.manual_seed(0)

    def optimizer():
        return torch.optim.Adam([layer.lora_A, layer.lora_B], lr=3e-3)

    opt = optimizer()
    for epoch in range(epochs):
        if resample_every and epoch and epoch % resample_every == 0:
            resample_all(
                layer,
                sampling="random_subset",
                split="balanced",
                seed=0,
                count=epoch,
                has_optimizer=False,
            )
            opt = optimizer()  # fresh moments, as after a resample
        for i in range(0, 1024, 64):
            loss = ((layer(x[i : i + 64]) - y[i : i + 64]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        final = float(((layer(x) - y) ** 2).mean())
        update = base.weight + layer.delta_weight() - w0
    return final, effective_rank(update)


def test_resampling_escapes_the_rank_of_lora():
    lora_loss, lora_rank = _regression(2, None)
    rosa_loss, rosa_rank = _regression(2, 5)
    assert lora_rank <= 2 < rosa_rank  # the accumulated update's rank grows past r
    assert rosa_loss < 0.5 * lora_loss  # and reaches what rank-2 LoRA cannot


def test_lowrank_delta_is_exact_at_its_rank():
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(30, 5, generator=g) @ torch.randn(5, 20, generator=g)
    b, a = lowrank_delta(delta, max_rank=12)
    assert a.shape[0] == 5
    torch.testing.assert_close(b @ a, delta, atol=1e-4, rtol=1e-4)


def test_rewarm_factor_rises_linearly_without_repeating():
    from rosa_ds.methods.subspace import ReWarm

    rewarm = ReWarm(4)
    assert rewarm.factor(3) == 1.0  # no resample yet
    rewarm.since = 10
    assert [rewarm.factor(s) for s in range(10, 16)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
