"""How a LoRA adapter's update B A is laid out in a base layer's weight, and how to factorise one back.

An adapter on a layer changes its weight by s * delta(A, B), a low-rank matrix in a view that depends on the
layer type (``update_blocks``):

- ``nn.Linear``, weight [out, in]: delta = B A, B [out, r], A [r, in];
- ``nn.Conv2d``, weight [out, in/g, kh, kw]: the [out, in/g kh kw] matrix B A, with A shared by the groups
  (so B A spans it whole);
- ``nn.ConvTranspose2d``, weight [in, out/g, kh, kw]: per group j, the block [out/g, in/g kh kw] is a rank-r
  matrix of its own, B_j A_j^T (``adaptsr.ops.lora_conv_transpose2d``).

Rank allocation reads gradients through this view; combining adapters concatenates factors along the rank
(exact: B1 A1 + B2 A2 = [B1 B2] [A1; A2] in every view above), or, where the sum's rank would exceed what
the layer allows, factorises the summed update again by SVD (``factorise``).
"""

from __future__ import annotations

import torch
from torch import nn

from adaptsr.ops.lora_conv2d import conv_delta_weight
from adaptsr.ops.lora_conv_transpose2d import conv_transpose_delta_weight

__all__ = ["concatenate_factors", "delta_weight", "factorise", "update_blocks"]


def _rank_dim_of_A(layer: nn.Module) -> int:
    """lora_A holds the rank in dim 1 for transposed convs ([in, r, kh, kw]), in dim 0 otherwise."""
    return 1 if isinstance(layer, nn.ConvTranspose2d) else 0


def update_blocks(layer: nn.Module, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The matrices in which an adapter on ``layer`` makes rank-r updates, as views of a weight-shaped tensor."""
    if isinstance(layer, nn.ConvTranspose2d):
        groups = layer.groups
        in_channels, out_per_group = tensor.shape[:2]
        per_group = tensor.reshape(groups, in_channels // groups, out_per_group, *tensor.shape[2:])
        return [block.transpose(0, 1).reshape(out_per_group, -1) for block in per_group]
    return [tensor.reshape(tensor.shape[0], -1)]


def delta_weight(layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """B A in the shape of ``layer``'s weight (unscaled)."""
    if isinstance(layer, nn.ConvTranspose2d):
        return conv_transpose_delta_weight(lora_A, lora_B, layer.groups)
    return conv_delta_weight(lora_A, lora_B)  # a linear layer's [out, r] @ [r, in] is the 1x1 case


def factorise(layer: nn.Module, delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of ``rank`` with ``delta_weight(layer, A, B)`` the best rank-``rank`` approximation of
    ``delta`` in each of the layer's blocks (Eckart-Young, by SVD): ``delta`` itself where its rank is no more.

    The singular values are split evenly, sqrt(S) to each factor, so A and B have comparable norms.
    """
    factors_A, factors_B = [], []
    for block in update_blocks(layer, delta):  # block [rows, cols] ~ B_j [rows, rank] @ A_j [rank, cols]
        U, S, Vh = torch.linalg.svd(block, full_matrices=False)
        if rank > S.shape[0]:
            raise ValueError(f"rank {rank} is more than a {list(block.shape)} block of {layer} can hold")
        root = S[:rank].sqrt()
        factors_B.append(U[:, :rank] * root)
        factors_A.append(root[:, None] * Vh[:rank])
    weight_shape = delta.shape
    if isinstance(layer, nn.ConvTranspose2d):
        # block j is [out/g, (in/g) kh kw] = B_j A_j with A_j[k, (i, t)] = lora_A[j in/g + i, k, t]
        in_per_group = weight_shape[0] // layer.groups
        lora_A = torch.cat([a.reshape(rank, in_per_group, -1).transpose(0, 1) for a in factors_A])
        lora_A = lora_A.reshape(weight_shape[0], rank, *weight_shape[2:])
        lora_B = torch.cat(factors_B).reshape(-1, rank, 1, 1)
        return lora_A.contiguous(), lora_B.contiguous()
    (lora_A,), (lora_B,) = factors_A, factors_B
    if isinstance(layer, nn.Conv2d):
        return lora_A.reshape(rank, *weight_shape[1:]).contiguous(), lora_B.reshape(-1, rank, 1, 1).contiguous()
    return lora_A.contiguous(), lora_B.contiguous()


def concatenate_factors(
    layer: nn.Module, factors: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank r1 + r2 + ... whose update is the sum of the updates of ``factors`` [(A_i, B_i), ...]."""
    lora_A = torch.cat([A for A, _ in factors], dim=_rank_dim_of_A(layer))
    lora_B = torch.cat([B for _, B in factors], dim=1)
    return lora_A, lora_B
