"""adaptsr.low_rank: the view in which each adapter's update is low-rank, its delta, its refactorisation by SVD
and the concatenation of factors, for every layer type an adapter wraps, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptsr.inject import _WRAPPERS
from adaptsr.low_rank import concatenate_factors, delta_weight, factorise, update_blocks

LAYERS = pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(12, 10),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.Conv2d(8, 12, 3, padding=1, groups=2),
        nn.Conv2d(6, 9, (3, 2), groups=3),
        nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1),
        nn.ConvTranspose2d(8, 6, 3, groups=2),
    ],
    ids=["linear", "conv", "conv-groups2", "conv-groups3-rect", "convT", "convT-groups2"],
)


def _adapter(layer: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """A float64 LoRA layer around ``layer`` with random A and B (a non-zero update of rank ``rank``)."""
    torch.manual_seed(seed)
    wrapped = _WRAPPERS[type(layer)](base_layer=layer, rank=rank, alpha=3.0).double()
    nn.init.normal_(wrapped.lora_A)
    nn.init.normal_(wrapped.lora_B)
    return wrapped


def _max_rank(layer: nn.Module) -> int:
    return _WRAPPERS[type(layer)]._max_rank(layer)


@LAYERS
def test_the_view_is_the_adapters_factorisation(layer):
    """A rank-2 adapter's update has rank <= 2 in every block of the view, the view holds each weight entry once,
    and a full-rank weight-shaped tensor has more: the view is the one a rank-r update lives in."""
    rank = 2
    wrapped = _adapter(layer, rank)
    delta = wrapped.get_delta_weight().detach()
    blocks = update_blocks(wrapped.base_layer, delta)
    assert all(torch.linalg.matrix_rank(block) <= rank for block in blocks)
    assert sum(block.square().sum() for block in blocks) == pytest.approx(float(delta.square().sum()), rel=1e-12)
    assert sum(block.numel() for block in blocks) == delta.numel()
    full = torch.randn_like(delta)
    assert all(torch.linalg.matrix_rank(block) > rank for block in update_blocks(layer, full))


@LAYERS
def test_delta_weight_is_the_layers_unscaled_update(layer):
    wrapped = _adapter(layer, 2)
    expected = wrapped.get_delta_weight().detach() / wrapped.scaling
    torch.testing.assert_close(delta_weight(wrapped.base_layer, wrapped.lora_A, wrapped.lora_B), expected)


@LAYERS
@pytest.mark.parametrize("target", ["same", "max"])
def test_factorise_recovers_an_update_it_has_the_rank_for(layer, target):
    """An update of rank 2 comes back exactly at rank 2 and at the layer's largest rank, in the shapes the
    layer's adapter has."""
    wrapped = _adapter(layer, 2)
    base = wrapped.base_layer
    delta = delta_weight(base, wrapped.lora_A.detach(), wrapped.lora_B.detach())
    rank = 2 if target == "same" else _max_rank(base)
    lora_A, lora_B = factorise(base, delta, rank)
    assert (tuple(lora_A.shape), tuple(lora_B.shape)) == _WRAPPERS[type(base)]._adapter_shapes(base, rank)
    torch.testing.assert_close(delta_weight(base, lora_A, lora_B), delta, rtol=0, atol=1e-12)


@LAYERS
def test_factorise_keeps_the_best_approximation_it_can(layer):
    """Below the update's rank, each block keeps its leading singular directions: the error left is the energy
    of the rest (Eckart-Young), the smallest any factorisation of that rank leaves."""
    torch.manual_seed(1)
    layer = layer.double()
    delta = torch.randn_like(layer.weight)
    lora_A, lora_B = factorise(layer, delta, 1)
    approx_blocks = update_blocks(layer, delta_weight(layer, lora_A, lora_B))
    for block, approx in zip(update_blocks(layer, delta), approx_blocks):
        sigma = torch.linalg.svdvals(block)
        assert torch.linalg.matrix_rank(approx) == 1
        assert float((block - approx).square().sum()) == pytest.approx(float(sigma[1:].square().sum()), rel=1e-9)


@LAYERS
def test_factorise_refuses_a_rank_beyond_the_blocks(layer):
    delta = torch.randn_like(layer.weight, dtype=torch.float64)
    too_many = min(min(block.shape) for block in update_blocks(layer, delta)) + 1
    with pytest.raises(ValueError, match=f"rank {too_many} is more than"):
        factorise(layer.double(), delta, too_many)


@LAYERS
def test_concatenated_factors_add_the_updates(layer):
    first, second = _adapter(layer, 1, seed=1), _adapter(layer, 3, seed=2)
    base = first.base_layer
    parts = [(m.lora_A.detach(), m.lora_B.detach()) for m in (first, second)]
    lora_A, lora_B = concatenate_factors(base, parts)
    assert _WRAPPERS[type(base)]._rank_of(lora_A) == 4
    expected = sum(delta_weight(base, A, B) for A, B in parts)
    torch.testing.assert_close(delta_weight(base, lora_A, lora_B), expected, rtol=0, atol=1e-12)
