r"""Combine several adapters trained on one base model into one: W + sum_i w_i s_i B_i A_i.

Uses for SR:

- **Interpolating a PSNR-oriented and a GAN-trained adapter** (``weights=[1 - t, t]``): ESRGAN's network
  interpolation, which trades fidelity against texture without training again, here between two
  small files on one base: (1 - t) (W + D_1) + t (W + D_2) = W + (1 - t) D_1 + t D_2.
- **Blending two cameras' adapters** (weights summing to 1: the README measures one such blend), or stacking
  adapters for different degradations (``weights=[1, 1]``; two adapters for overlapping degradations then
  overcorrect). Whether a combination serves a mixed domain is an empirical question: score it
  (``adaptsr eval``) against an adapter trained on the mix.
- **Baking a strength into the file** (one adapter, ``weights=[0.7]``).

Without ``rank=`` the combination is exact. Each layer gets one adapter of rank r_1 + r_2 + ... whose factors are the
inputs' concatenated along the rank (A = [A_1; A_2], B = [w_1 s_1 B_1, w_2 s_2 B_2], scaling 1), what PEFT's
``add_weighted_adapter(combination_type="cat")`` builds. Where that rank would exceed what the layer allows
(narrow layers, many inputs), the summed update is factorised again by SVD at the largest rank the layer
allows, which still holds it exactly (its rank cannot be larger). A layer only some of the adapters adapt
gets their part alone.

``rank=`` caps each layer's rank instead: the summed update's best approximation of that rank (SVD), lossy
where the sum needs more, as PEFT's ``combination_type="svd"``; with a single adapter, a smaller copy of it.

The result is an ordinary adapter: ``save_adapter`` writes it (a PEFT LoRA file), ``merge_lora`` folds it
in, ``set_adapter_strength`` scales it as a whole.

DoRA adapters are refused: their update rescales every output channel's weights, which is not low-rank.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from adaptsr.adapter import _AdapterFile, _inject_factors, _read_adapter, _refuse_existing_adapters
from adaptsr.inject import _WRAPPERS, LoRASummary, unwrap_model
from adaptsr.low_rank import concatenate_factors, delta_weight, factorise

__all__ = ["combine_adapters"]


def _combined_factors(
    layer: torch.nn.Module, parts: list[tuple[float, torch.Tensor, torch.Tensor]], max_rank: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with update (scaling 1) sum_i c_i B_i A_i over ``parts`` [(c_i, A_i, B_i), ...], in float64: the
    concatenation where its rank fits ``max_rank`` and the layer, else the sum's leading singular directions."""
    scaled = [(A.double(), B.double() * c) for c, A, B in parts]
    rank = sum(_WRAPPERS[type(layer)]._rank_of(A) for A, _ in scaled)
    fits = min(_WRAPPERS[type(layer)]._max_rank(layer), max_rank or rank)
    if rank <= fits:
        return concatenate_factors(layer, scaled)
    delta = sum(delta_weight(layer, A, B) for A, B in scaled)
    return factorise(layer, delta, fits)


def combine_adapters(
    model,
    directories: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    strict_base: bool = True,
) -> LoRASummary:
    """Inject into ``model`` one adapter per layer whose update is the weighted sum of the adapters'.

    ``model``: a plain base model (nn.Module or spandrel descriptor), as for ``load_adapter``.
    ``directories``: adapter directories, each trained on this base (checked as ``load_adapter`` checks one;
    ``strict_base=False`` skips the base-weights check). ``weights``: one finite number per adapter, the
    multiple of its update (1 each by default; negative ones subtract). ``rank``: at most this rank per layer;
    a layer whose combination needs more keeps the best approximation of that rank (SVD, Eckart-Young; PEFT's
    ``combination_type="svd"``), lossy but smaller. With one adapter this shrinks it. The model is changed
    only if every adapter fits. Returns what ``inject_lora`` returns; ``save_adapter`` then writes the combined adapter.
    """
    directories = list(directories)
    if not directories:
        raise ValueError("combine_adapters needs at least one adapter directory")
    weights = [1.0] * len(directories) if weights is None else [float(w) for w in weights]
    if len(weights) != len(directories):
        raise ValueError(f"{len(weights)} weights for {len(directories)} adapters: give one weight per adapter")
    for directory, weight in zip(directories, weights):
        if not math.isfinite(weight):
            raise ValueError(f"the weight of adapter {directory} is {weight}, not a finite number")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    module = unwrap_model(model)
    _refuse_existing_adapters(module)
    adapters: list[_AdapterFile] = [_read_adapter(model, d, strict_base=strict_base) for d in directories]
    for adapter in adapters:
        if adapter.use_dora:
            # W_dora - W rescales whole rows of W: full rank, so no low-rank adapter holds a sum with it
            raise ValueError(
                f"adapter {adapter.directory} is a DoRA adapter, whose update rescales every output channel's "
                "weights and is not low-rank, so it cannot be summed into one LoRA adapter; combine LoRA adapters, "
                "or load the DoRA adapter alone (load_adapter, set_adapter_strength)"
            )

    names = list(dict.fromkeys(name for adapter in adapters for name in adapter.pairs))
    factors = {}
    for name in names:
        parts = [(weight * adapter.scaling(name), adapter.pairs[name]["A"], adapter.pairs[name]["B"])
                 for adapter, weight in zip(adapters, weights) if name in adapter.pairs]
        factors[name] = _combined_factors(module.get_submodule(name), parts, rank)
    # alpha = r, so each layer's scaling is 1: B carries the w_i s_i
    alphas = {name: float(_WRAPPERS[type(module.get_submodule(name))]._rank_of(A)) for name, (A, _) in factors.items()}
    described = " + ".join(f"{w:g} x {adapter.directory}" for adapter, w in zip(adapters, weights))
    return _inject_factors(module, described, factors, alphas, use_rslora=False, lora_dropout=0.0)
