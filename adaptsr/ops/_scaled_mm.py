"""One GEMM for a scaled product, shared by the LoRA ops' backward passes."""

from __future__ import annotations

import torch


def scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scaling: float, *, like: torch.Tensor) -> torch.Tensor:
    """``scaling * (m1 @ m2)`` as one addmm: alpha scales in the GEMM's epilogue, where a separate
    multiply would be a second kernel launch (on a GPU these small per-layer ops are bound by their
    launches, not their math). beta = 0 makes addmm ignore its first operand (NaNs in it too), so
    ``like``, any tensor of the result's shape, dtype and device, only has to be there.
    """
    return torch.addmm(like, m1, m2, beta=0, alpha=scaling)
