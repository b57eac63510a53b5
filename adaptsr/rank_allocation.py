r"""Rank-aware allocation: give the layers that the target domain asks most of more rank, at a fixed adapter size.

AdaptSR allocates LoRA ranks by layer importance. adaptsr measures importance on the target data itself,
before training: the gradient of the L1 loss with respect to each target layer's frozen weight, G_l,
averaged over a few batches. A rank-r adapter's update is a rank-r matrix in the layer's factorised view
(``adaptsr.low_rank.update_blocks``), and a gradient step restricted to rank r lowers the loss, to first order, by
lr * sum_{i<r} sigma_i(G_l)^2. Each rank unit costs the adapter ``c_l`` parameters (one row of A and
one column of B), so the allocation maximises

    sum_l sum_{i < r_l} sigma_i(G_l)^2      subject to   sum_l r_l c_l <= budget,  r_min <= r_l <= r_max(l)

greedily: every layer starts at ``min_rank`` and the budget goes, one rank unit at a time, to the
layer whose next singular value gives the most per parameter. The gains of a layer only fall as its
rank grows, so with equal unit costs the greedy choice is the optimum.

The default budget is the size of the uniform-rank adapter (``rank`` on every target layer), so an
allocated adapter costs no more memory or time per step than the uniform one it replaces. The result
feeds ``inject_lora(..., rank_pattern=allocation.rank_pattern())``; adapter files record per-layer
ranks as PEFT's ``rank_pattern``.

Written here because PEFT's rank allocation (AdaLoRA) prunes an SVD-parametrised adapter during
training, which is a different adapter; this one is plain LoRA, merged and saved as any other.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adaptsr.adapter import _exact_key
from adaptsr.infer import _run
from adaptsr.inject import _WRAPPERS, target_layers, unwrap_model
from adaptsr.low_rank import update_blocks

__all__ = ["RankAllocation", "allocate_ranks", "rank_pattern", "training_batches"]


def rank_pattern(ranks: dict[str, int]) -> dict[str, int]:
    """``inject_lora``'s / PEFT's ``rank_pattern`` for per-layer ranks: one key per layer, matching its name only."""
    return {_exact_key(name): rank for name, rank in ranks.items()}


@dataclass
class RankAllocation:
    """Per-layer ranks within an adapter-parameter budget, and how much of the measured gradient they capture."""

    ranks: dict[str, int]
    uniform_rank: int
    budget: int  # adapter parameters allowed (the uniform-rank adapter's by default)
    params: int  # adapter parameters the allocated ranks take
    captured: float  # share of the gradients' whole energy (sum of all sigma^2) the allocated ranks capture
    uniform_captured: float  # the same share for the uniform rank
    batches: int = 0
    unit_params: dict[str, int] = field(default_factory=dict)  # adapter parameters per rank unit, per layer

    def rank_pattern(self) -> dict[str, int]:
        """``inject_lora``'s / PEFT's ``rank_pattern`` for these ranks."""
        return rank_pattern(self.ranks)

    def __str__(self) -> str:
        # the uncaptured shares: the top singular values hold most of a gradient's energy, so the captured
        # shares of any allocation read 99.x%
        values = sorted(self.ranks.values())
        return (
            f"rank allocation over {len(self.ranks)} layers from {self.batches} batches: "
            f"ranks {values[0]}-{values[-1]} (median {values[len(values) // 2]}), {self.params:,} adapter parameters "
            f"of a {self.budget:,} budget; the ranks leave {100 * (1 - self.captured):.3g}% of the gradient energy "
            f"uncaptured, uniform rank {self.uniform_rank} {100 * (1 - self.uniform_captured):.3g}%"
        )

    def to_dict(self) -> dict:
        return {"ranks": self.ranks, "uniform_rank": self.uniform_rank, "budget": self.budget, "params": self.params,
                "captured": self.captured, "uniform_captured": self.uniform_captured, "batches": self.batches}


def _marginal_gains(layer: nn.Module, grad: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, float]:
    """(gains, energy): gains[i] the gradient energy the (i+1)-th rank unit adds, summed over the layer's blocks;
    energy the whole of it, every singular value's (the squared Frobenius norm), beyond max_rank too."""
    gains = torch.zeros(max_rank, dtype=torch.float64)
    energy = 0.0
    for block in update_blocks(layer, grad.double()):
        sigma = torch.linalg.svdvals(block)
        gains[: min(len(sigma), max_rank)] += sigma[:max_rank].square()
        energy += float(sigma.square().sum())
    return gains, energy


def _mean_gradients(model, batches: Iterable, preset, targets) -> tuple[dict[str, tuple[nn.Module, torch.Tensor]], int]:
    """({layer name: (layer, mean gradient of the L1 loss with respect to its weight)}, number of batches) over
    ``batches`` of (lr, hr).

    The model is left as it was: its parameters' requires_grad flags and gradients, and its buffers (batch-norm
    statistics a training-mode forward would move). It runs in training mode, the mode ``adapt`` trains it in.
    """
    module = unwrap_model(model)
    layers = target_layers(module, preset=preset, targets=targets)
    flags = {p: (p.requires_grad, p.grad) for p in module.parameters()}
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    was_training = module.training
    device = next(module.parameters()).device
    sums = {name: torch.zeros_like(layer.weight, dtype=torch.float64) for name, layer in layers}
    count = 0
    try:
        for p in module.parameters():
            p.requires_grad_(False)
            p.grad = None
        for _, layer in layers:
            layer.weight.requires_grad_(True)
        module.train()
        for lr, hr in batches:
            # _run: on a copy (spandrel's RCAN writes into its input), the image of models that return pairs
            loss = F.l1_loss(_run(module, lr.to(device)).float(), hr.to(device).float())
            grads = torch.autograd.grad(loss, [layer.weight for _, layer in layers], allow_unused=True)
            for (name, _), grad in zip(layers, grads):
                if grad is not None:
                    sums[name] += grad.double()
            count += 1
    finally:
        for p, (flag, grad) in flags.items():
            p.requires_grad_(flag)
            p.grad = grad
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
        module.train(was_training)
    if count == 0:
        raise ValueError("rank allocation needs at least one batch of (lr, hr) images")
    return {name: (layer, sums[name] / count) for name, layer in layers}, count


def _allocate(gains: dict[str, torch.Tensor], unit_params: dict[str, int], budget: int, min_rank: int):
    """Greedy: every layer at min_rank (or its largest rank, if smaller), then each rank unit to the best gain per
    parameter that still fits the budget."""
    ranks = {name: min(min_rank, len(g)) for name, g in gains.items()}
    spent = sum(ranks[name] * unit_params[name] for name in gains)
    if spent > budget:
        raise ValueError(f"the budget of {budget:,} adapter parameters is below rank {min_rank} on every layer "
                         f"({spent:,}): lower min_rank or raise the budget")
    # max-heap on gain per parameter; ties go to the layer listed first, so the result is deterministic
    order = {name: i for i, name in enumerate(gains)}
    heap = [(-float(g[ranks[n]]) / unit_params[n], order[n], n) for n, g in gains.items() if ranks[n] < len(g)]
    heapq.heapify(heap)
    while heap:
        _, _, name = heapq.heappop(heap)
        if spent + unit_params[name] > budget:
            continue  # too large for what is left; a cheaper layer may still fit
        ranks[name] += 1
        spent += unit_params[name]
        if ranks[name] < len(gains[name]):
            heapq.heappush(heap, (-float(gains[name][ranks[name]]) / unit_params[name], order[name], name))
    return ranks


def _captured(gains: dict[str, torch.Tensor], ranks: dict[str, int], energy: dict[str, float]) -> float:
    """The share of the layers' whole gradient energy that their first ``ranks`` singular directions hold."""
    total = sum(energy.values())
    return sum(float(g[: ranks[n]].sum()) for n, g in gains.items()) / total if total > 0 else 0.0


def allocate_ranks(
    model,
    batches: Iterable,
    *,
    rank: int = 8,
    preset: str | None = None,
    targets=None,
    budget: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> RankAllocation:
    """Per-layer ranks for the layers ``preset`` / ``targets`` select, from the L1 gradients on ``batches``
    (an iterable of (lr, hr) batches of the target domain), within ``budget`` adapter parameters (default: what
    rank ``rank`` on every layer takes). Ranks stay between ``min_rank`` and ``max_rank`` (default 4 x ``rank``)
    and what each layer allows.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    max_rank = 4 * rank if max_rank is None else max_rank
    if not 1 <= min_rank <= max_rank:
        raise ValueError(f"need 1 <= min_rank <= max_rank, got {min_rank} and {max_rank}")
    spectra, count = _mean_gradients(model, batches, preset, targets)
    gains, energy, unit_params, uniform = {}, {}, {}, {}
    for name, (layer, grad) in spectra.items():
        wrapper = _WRAPPERS[type(layer)]
        allowed = min(max_rank, wrapper._max_rank(layer))
        gains[name], energy[name] = _marginal_gains(layer, grad, allowed)
        a_shape, b_shape = wrapper._adapter_shapes(layer, 1)
        unit_params[name] = math.prod(a_shape) + math.prod(b_shape)
        uniform[name] = min(rank, wrapper._max_rank(layer))
    uniform_params = sum(uniform[n] * unit_params[n] for n in gains)
    budget = uniform_params if budget is None else int(budget)
    ranks = _allocate(gains, unit_params, budget, min_rank)
    return RankAllocation(
        ranks=ranks, uniform_rank=rank, budget=budget, params=sum(ranks[n] * unit_params[n] for n in gains),
        captured=_captured(gains, ranks, energy), uniform_captured=_captured(gains, uniform, energy), batches=count,
        unit_params=unit_params,
    )



def training_batches(train_set, config, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches ``adapt`` will train on (``config``'s seed and batch size), on the CPU."""
    from adaptsr.train import _batch_indices, _load_batch

    batches = []
    for step in range(count):
        indices, epoch = _batch_indices(step, len(train_set), config)
        batches.append(_load_batch(train_set, indices, epoch, torch.device("cpu")))
    return batches
