"""Rank-aware allocation: the greedy allocation is optimal where it can be and always within its budget,
the measurement leaves the model alone, and the ranks reach inject_lora, the adapter files and
`adaptsr adapt --allocate-ranks`."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptsr
from adaptsr.inject import _WRAPPERS, lora_layers
from adaptsr.rank_allocation import _allocate, _mean_gradients, allocate_ranks, training_batches
from adaptsr.train import TrainConfig

TASK = (Path(__file__).parent / "train_task.py").read_text()
namespace: dict = {}
exec(TASK, namespace)
NoisyPairs = namespace["NoisyPairs"]
TARGETS = "model[.].*"


def _esrgan():
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    return ESRGAN(num_filters=8, num_blocks=1, scale=2)


def _batches(n=2, batch=4):
    data = NoisyPairs()
    return [(data.lr[i * batch:(i + 1) * batch], data.hr[i * batch:(i + 1) * batch]) for i in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_optimal_when_rank_units_cost_the_same(seed):
    generator = torch.Generator().manual_seed(seed)
    gains = {name: torch.rand(5, generator=generator, dtype=torch.float64).sort(descending=True).values
             for name in ("a", "b", "c")}
    unit = {name: 10 for name in gains}
    budget = 10 * int(torch.randint(3, 15, (1,), generator=generator))
    ranks = _allocate(gains, unit, budget, min_rank=1)
    best = max(
        sum(float(gains[n][:r].sum()) for n, r in zip(gains, combo))
        for combo in itertools.product(range(1, 6), repeat=3)
        if 10 * sum(combo) <= budget
    )
    assert sum(float(gains[n][: ranks[n]].sum()) for n in gains) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_stays_within_budget_and_bounds(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = {"a": 3, "b": 6, "c": 8, "d": 2}
    gains = {n: torch.rand(k, generator=generator, dtype=torch.float64).sort(descending=True).values
             for n, k in lengths.items()}
    unit = {"a": 7, "b": 13, "c": 29, "d": 5}
    budget = int(torch.randint(60, 400, (1,), generator=generator))
    ranks = _allocate(gains, unit, budget, min_rank=1)
    spent = sum(ranks[n] * unit[n] for n in gains)
    assert spent <= budget
    assert all(1 <= ranks[n] <= lengths[n] for n in gains)
    # nothing left that still fits: the greedy spends the budget while any rank unit fits it
    assert all(ranks[n] == lengths[n] or unit[n] > budget - spent for n in gains)


def test_a_budget_below_the_minimum_is_refused():
    gains = {"a": torch.ones(4, dtype=torch.float64), "b": torch.ones(4, dtype=torch.float64)}
    with pytest.raises(ValueError, match="below rank 2 on every layer"):
        _allocate(gains, {"a": 10, "b": 10}, budget=30, min_rank=2)


def test_mean_gradients_and_the_model_left_as_it_was():
    model = _esrgan()
    model.model[0].bias.requires_grad_(False)  # a flag that must come back as it was
    before = copy.deepcopy(model.state_dict())
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    batches = _batches(2)
    gradients, count = _mean_gradients(model, batches, None, TARGETS)
    assert count == 2 and not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # the mean over batches of the L1 loss's gradient, computed here by autograd on a copy
    reference = copy.deepcopy(model).train()
    losses = [F.l1_loss(reference(lr), hr) for lr, hr in batches]
    conv = reference.model[1].sub[0].RDB2.conv3[0]
    (expected,) = torch.autograd.grad(sum(losses) / len(losses), conv.weight)
    layer, grad = gradients["model.1.sub.0.RDB2.conv3.0"]
    assert isinstance(layer, nn.Conv2d)
    torch.testing.assert_close(grad, expected.double(), rtol=1e-5, atol=1e-8)


def test_allocated_ranks_reach_the_adapters_and_their_files(tmp_path):
    model = _esrgan()
    allocation = allocate_ranks(model, _batches(3), rank=3, targets=TARGETS)
    assert allocation == allocate_ranks(model, _batches(3), rank=3, targets=TARGETS)  # deterministic
    names = [name for name, m in model.named_modules() if name and type(m) in _WRAPPERS]
    assert sorted(allocation.ranks) == sorted(names)
    uniform = sum(min(3, _WRAPPERS[type(m)]._max_rank(m)) * allocation.unit_params[n]
                  for n, m in model.named_modules() if n in allocation.ranks)
    assert allocation.budget == uniform and allocation.params <= uniform
    assert len(set(allocation.ranks.values())) > 1 and max(allocation.ranks.values()) <= 12
    assert 0 < allocation.uniform_captured <= 1 and 0 < allocation.captured <= 1
    summary = adaptsr.inject_lora(model, targets=TARGETS, rank=3, rank_pattern=allocation.rank_pattern())
    assert summary.layers == allocation.ranks
    assert summary.trainable_params == allocation.params  # the adapters are the whole trainable set
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.01)
    adaptsr.save_adapter(model, tmp_path / "adapter")
    fresh = _esrgan()
    adaptsr.load_adapter(fresh, tmp_path / "adapter")
    assert {name: layer.rank for name, layer in lora_layers(fresh)} == allocation.ranks
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_training_batches_are_adapts_first_batches():
    data = NoisyPairs()
    config = TrainConfig(batch_size=4, seed=3)
    from adaptsr.train import _batch_indices

    batches = training_batches(data, config, 2)
    for step, (lr, hr) in enumerate(batches):
        indices, _ = _batch_indices(step, len(data), config)
        assert torch.equal(lr, data.lr[indices]) and torch.equal(hr, data.hr[indices])


def test_bad_settings():
    with pytest.raises(ValueError, match="1 <= min_rank <= max_rank"):
        allocate_ranks(_esrgan(), _batches(1), rank=2, targets=TARGETS, min_rank=0)
    with pytest.raises(ValueError, match="at least one batch"):
        allocate_ranks(_esrgan(), [], rank=2, targets=TARGETS)
    with pytest.raises(ValueError, match="matched no Conv2d"):
        allocate_ranks(_esrgan(), _batches(1), rank=2, targets="nothing")


@pytest.mark.parametrize("arch", ["rcan", "fbcnn"])
def test_models_that_write_into_their_input_or_return_pairs(arch, tiny_sr):
    """RCAN multiplies its input in place; FBCNN returns (image, quality): the batches stay as they were and the
    gradients come from the image."""
    model = getattr(tiny_sr, arch)()
    scale = 1 if arch == "fbcnn" else 2
    torch.manual_seed(0)
    lr = torch.rand(2, 3, 16, 16)
    hr = torch.rand(2, 3, 16 * scale, 16 * scale)
    kept = lr.clone()
    allocation = allocate_ranks(model, [(lr, hr)], rank=2, preset=arch)
    assert torch.equal(lr, kept)
    assert allocation.params <= allocation.budget and allocation.captured > 0


def test_the_captured_share_is_of_the_whole_gradient_energy():
    """Gains stop at max_rank, but the share they capture is of every singular value's energy: a layer at its
    max_rank does not read as capturing everything."""
    from adaptsr.rank_allocation import _captured, _marginal_gains

    grad = torch.randn(12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gains, energy = _marginal_gains(torch.nn.Linear(10, 12), grad, max_rank=2)
    sigma = torch.linalg.svdvals(grad)
    torch.testing.assert_close(gains, sigma[:2].square())
    assert energy == pytest.approx(float(grad.square().sum()))
    share = _captured({"fc": gains}, {"fc": 2}, {"fc": energy})
    assert share == pytest.approx(float(sigma[:2].square().sum() / sigma.square().sum())) and share < 0.9
