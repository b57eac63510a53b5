"""Blur kernels of the Real-ESRGAN degradation model (one ``[k, k]`` kernel per call).

Kernels live on a ``k x k`` grid of integer offsets ``p = (x, y)`` from the centre (``k`` odd) and
are normalised to sum to 1. With ``sigma_x``, ``sigma_y`` the standard deviations along the
kernel's own axes and ``theta`` its rotation, the covariance is::

    Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T,   Q(p) = p^T Sigma^-1 p

and the kernel families (Wang et al., Real-ESRGAN, 2021; BasicSR's ``degradations.py``) are::

    gaussian              k(p) = c exp(-Q(p) / 2)
    generalized gaussian  k(p) = c exp(-Q(p)^beta / 2)
    plateau               k(p) = c / (1 + Q(p)^beta)
    sinc (circular ideal low-pass, cutoff omega_c in radians per pixel, r = |p|)
                          k(p) = c omega_c J1(omega_c r) / (2 pi r),  k(0) = c omega_c^2 / (4 pi)

with ``c`` the constant that makes the kernel sum to 1 and ``J1`` the Bessel function of the first
kind of order 1

(``beta = 1`` makes the generalized Gaussian the Gaussian; ``beta < 1`` gives heavier tails,
``beta > 1`` a flatter top; the plateau kernel has a flat top and polynomial tails.)

kornia provides the isotropic / axis-aligned Gaussian (``kornia.filters.get_gaussian_kernel2d``),
used here for the isotropic case. kornia lacks rotated anisotropic Gaussians, generalized
Gaussian, plateau and sinc kernels: those are written by hand below.
"""

from __future__ import annotations

import math

import torch
from kornia.filters import get_gaussian_kernel2d
from torch import Tensor

__all__ = [
    "KERNEL_TYPES",
    "anisotropic_gaussian_kernel",
    "generalized_gaussian_kernel",
    "isotropic_gaussian_kernel",
    "pad_kernel",
    "plateau_kernel",
    "sigma_matrix",
    "sinc_kernel",
]

#: The kernel families a :class:`~adaptsr.data.degradations.StageConfig` can draw from (Real-ESRGAN's names).
KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)


def _check_kernel_size(kernel_size: int) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _normalise(kernel: Tensor) -> Tensor:
    return kernel / kernel.sum()


def sigma_matrix(sigma_x: float, sigma_y: float, theta: float, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """The 2x2 covariance ``R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T``."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=dtype)
    diag = torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=dtype))
    return rot @ diag @ rot.T


def _quadratic_form(kernel_size: int, sigma_x: float, sigma_y: float, theta: float, dtype: torch.dtype) -> Tensor:
    """``Q(p) = p^T Sigma^-1 p`` on the kernel grid, ``[k, k]`` (rows are y, columns x)."""
    _check_kernel_size(kernel_size)
    _check_positive("sigma_x", sigma_x)
    _check_positive("sigma_y", sigma_y)
    inv = torch.linalg.inv(sigma_matrix(sigma_x, sigma_y, theta, dtype=torch.float64))
    ax = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    q = inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy
    return q.to(dtype)


def isotropic_gaussian_kernel(kernel_size: int, sigma: float, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Isotropic Gaussian ``exp(-|p|^2 / (2 sigma^2))``, normalised; kornia's kernel."""
    _check_kernel_size(kernel_size)
    _check_positive("sigma", sigma)
    sig = torch.tensor([[sigma, sigma]], dtype=torch.float64)
    return get_gaussian_kernel2d(kernel_size, sig)[0].to(dtype)


# kornia lacks rotated anisotropic Gaussians (its 2D Gaussian is axis-aligned only).
def anisotropic_gaussian_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float, theta: float, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Rotated anisotropic Gaussian ``exp(-Q(p) / 2)``, normalised."""
    return _normalise(torch.exp(-0.5 * _quadratic_form(kernel_size, sigma_x, sigma_y, theta, torch.float64))).to(dtype)


# kornia lacks the generalized Gaussian kernel.
def generalized_gaussian_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Generalized Gaussian ``exp(-0.5 * Q(p)^beta)``, normalised (BasicSR's ``bivariate_generalized_Gaussian``)."""
    _check_positive("beta", beta)
    q = _quadratic_form(kernel_size, sigma_x, sigma_y, theta, torch.float64)
    return _normalise(torch.exp(-0.5 * q.pow(beta))).to(dtype)


# kornia lacks the plateau kernel.
def plateau_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Plateau-shaped kernel ``1 / (1 + Q(p)^beta)``, normalised (BasicSR's ``bivariate_plateau``)."""
    _check_positive("beta", beta)
    q = _quadratic_form(kernel_size, sigma_x, sigma_y, theta, torch.float64)
    return _normalise(1.0 / (1.0 + q.pow(beta))).to(dtype)


# kornia lacks a sinc (ideal circular low-pass) kernel.
def sinc_kernel(kernel_size: int, cutoff: float, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Circular ideal low-pass ``omega_c J1(omega_c r) / (2 pi r)``, truncated to ``k x k`` and normalised.

    ``cutoff`` (omega_c) is in radians per pixel, in ``(0, pi]``: frequencies above it are removed
    (up to the ringing that truncating the kernel causes). This is the kernel that produces the
    ringing and overshoot artefacts Real-ESRGAN synthesises.
    """
    _check_kernel_size(kernel_size)
    if not (0 < cutoff <= math.pi):
        raise ValueError(f"sinc cutoff must be in (0, pi] radians per pixel, got {cutoff!r}")
    ax = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    r = torch.sqrt(xx * xx + yy * yy)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    k = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    k = torch.where(r == 0, torch.full_like(r, cutoff**2 / (4 * math.pi)), k)
    return _normalise(k).to(dtype)


def pad_kernel(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a centred odd ``[k, k]`` kernel to ``[size, size]`` (``size >= k``, odd); filtering is unchanged."""
    k = kernel.shape[-1]
    if kernel.shape[-2] != k or k % 2 == 0 or size % 2 == 0 or size < k:
        raise ValueError(
            f"cannot pad a {tuple(kernel.shape)} kernel to {size}x{size}: need square odd sizes, size >= k"
        )
    p = (size - k) // 2
    return torch.nn.functional.pad(kernel, (p, p, p, p))
