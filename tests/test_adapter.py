"""The adapter layer: the maths of the forward pass, its gradients, injection and merging."""

import pytest
import torch
from torch import nn

from rosa_ds.adapters.inject import adapted_modules, find_targets, inject_adapters
from rosa_ds.adapters.layer import AdaptedLinear
from rosa_ds.config import AdapterConfig
from rosa_ds.errors import UserError
from rosa_ds.export import merge_adapters


def _layer(rank=4, alpha=8.0, bias=True):
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(12, 10, bias=bias), rank, alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_forward_equals_dense_reference():
    layer = _layer()
    x = torch.randn(3, 5, 12)
    w = layer.base.weight + (8.0 / 4) * layer.lora_B @ layer.lora_A
    expected = x @ w.T + layer.base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_starts_as_identity_update():
    base = nn.Linear(12, 10)
    layer = AdaptedLinear(base, 4, 8.0)
    x = torch.randn(2, 12)
    torch.testing.assert_close(layer(x), base(x))


def test_gradients_reach_only_the_adapter():
    layer = _layer()
    layer.base.weight.requires_grad_(False)
    layer.base.bias.requires_grad_(False)
    x = torch.randn(4, 12, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.base.weight.grad is None
    # dL/dA from the dense formula: y = x (W + s B A)^T, L = sum y^2
    y = layer(x).detach()
    expected_a = 2.0 * layer.scale * layer.lora_B.T @ y.T @ x.detach()
    torch.testing.assert_close(layer.lora_A.grad, expected_a, rtol=1e-4, atol=1e-4)


def _tiny_model():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            self.v_proj = nn.Linear(8, 8)
            self.up = nn.Linear(8, 16)

        def forward(self, x):
            return self.up(self.q_proj(x) + self.v_proj(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])
            self.lm_head = nn.Linear(16, 5)

        def forward(self, x):
            return self.lm_head(self.layers[1].up(self.layers[0].q_proj(x)))

    return Model()


def test_all_linear_skips_lm_head_and_patterns_select():
    model = _tiny_model()
    names = find_targets(model, AdapterConfig(targets=["all-linear"]))
    assert "lm_head" not in names and len(names) == 6
    assert find_targets(model, AdapterConfig(targets=["q_proj"])) == [
        "layers.0.q_proj",
        "layers.1.q_proj",
    ]
    assert find_targets(model, AdapterConfig(targets=[r"layers\.1\..*_proj"])) == [
        "layers.1.q_proj",
        "layers.1.v_proj",
    ]


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(UserError, match="matched no linear module"):
        find_targets(_tiny_model(), AdapterConfig(targets=["k_proj"]))


def test_inject_freezes_base_and_merge_reproduces_outputs():
    model = _tiny_model()
    x = torch.randn(3, 8)
    inject_adapters(model, AdapterConfig(rank=2, alpha=4, targets=["all-linear"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    for module in adapted_modules(model).values():
        with torch.no_grad():
            module.lora_B.normal_()
    adapted = model(x)
    merge_adapters(model)
    assert not adapted_modules(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_place_adapters_casts_adapters_and_moves_masks_but_not_the_base():
    """What ZeRO-3 leaves undone for adapters made after zero.Init: dtype and device."""
    from rosa_ds.adapters.inject import place_adapters
    from rosa_ds.kernels.csr import SparseStructure

    layer = AdaptedLinear(nn.Linear(6, 4), rank=2, alpha=4)
    layer.attach_mask(SparseStructure.from_flat_indices(torch.tensor([1, 7, 20]), (4, 6)))
    model = nn.Sequential(layer)
    place_adapters(model, "cpu", torch.bfloat16)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.sparse_values.dtype == torch.bfloat16
    assert layer.base.weight.dtype == torch.float32
    assert all(not b.is_floating_point() for b in layer.buffers(recurse=False))
    assert layer.structure.nnz == 3
