"""The discriminator of adversarial adaptation (AdaptSR-GAN): Real-ESRGAN's U-Net with spectral norm.

Written here because spandrel loads generators only. The layer names and the spectral-norm
parametrisation (``torch.nn.utils.spectral_norm``: ``weight_orig``, ``weight_u``, ``weight_v``) follow
Real-ESRGAN's ``UNetDiscriminatorSN``, so its released discriminators (``RealESRGAN_x4plus_netD.pth``)
load as they are: adapting a Real-ESRGAN generator can start from the discriminator it was trained with.

The output is a realness logit per pixel, [N, 1, H, W]: the U-Net judges local texture, which is what
a real-world degradation changes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

__all__ = ["UNetDiscriminator", "load_discriminator"]


def _down(in_channels: int, out_channels: int) -> nn.Conv2d:
    return spectral_norm(nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False))


def _same(in_channels: int, out_channels: int) -> nn.Conv2d:
    return spectral_norm(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False))


class UNetDiscriminator(nn.Module):
    """Three stride-2 convs down, three bilinear steps up with skip connections, two refining convs, a logit map."""

    def __init__(self, in_channels: int = 3, features: int = 64) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv0 = nn.Conv2d(in_channels, features, 3, padding=1)
        self.conv1 = _down(features, features * 2)
        self.conv2 = _down(features * 2, features * 4)
        self.conv3 = _down(features * 4, features * 8)
        self.conv4 = _same(features * 8, features * 4)
        self.conv5 = _same(features * 4, features * 2)
        self.conv6 = _same(features * 2, features)
        self.conv7 = _same(features, features)
        self.conv8 = _same(features, features)
        self.conv9 = nn.Conv2d(features, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"the discriminator takes [N, {self.in_channels}, H, W] images, got {tuple(x.shape)}")
        x0 = F.leaky_relu(self.conv0(x), 0.2)
        x1 = F.leaky_relu(self.conv1(x0), 0.2)
        x2 = F.leaky_relu(self.conv2(x1), 0.2)
        x3 = F.leaky_relu(self.conv3(x2), 0.2)
        x4 = F.leaky_relu(self.conv4(self._up_to(x3, x2)), 0.2) + x2
        x5 = F.leaky_relu(self.conv5(self._up_to(x4, x1)), 0.2) + x1
        x6 = F.leaky_relu(self.conv6(self._up_to(x5, x0)), 0.2) + x0
        out = F.leaky_relu(self.conv7(x6), 0.2)
        out = F.leaky_relu(self.conv8(out), 0.2)
        return self.conv9(out)

    @staticmethod
    def _up_to(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # To the skip's size rather than a fixed 2x: the same as Real-ESRGAN's for sizes divisible by 8,
        # and any other patch size still lines up with its skip connection.
        return F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)


def load_discriminator(path: str | os.PathLike, in_channels: int = 3) -> UNetDiscriminator:
    """A ``UNetDiscriminator`` with the weights in ``path``: ``.safetensors``, or ``.pth`` (Real-ESRGAN's
    ``{"params": ...}`` files or a bare state dict). Errors name the file and what does not fit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"discriminator checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load and safetensors raise several types for a damaged file
        raise ValueError(f"discriminator checkpoint {path} could not be read ({err})") from err
    for key in ("params", "params_ema", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or "conv0.weight" not in state:
        raise ValueError(f"discriminator checkpoint {path} is not a U-Net discriminator (no conv0.weight)")
    features = state["conv0.weight"].shape[0]
    channels = state["conv0.weight"].shape[1]
    if channels != in_channels:
        raise ValueError(
            f"discriminator checkpoint {path} takes {channels}-channel images, but the model puts out {in_channels}"
        )
    discriminator = UNetDiscriminator(in_channels, features)
    try:
        discriminator.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"discriminator checkpoint {path} does not fit a U-Net discriminator: {err}") from err
    return discriminator
