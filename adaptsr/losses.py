"""The training losses beyond L1: the VGG perceptual loss, the adversarial losses (AdaptSR-GAN), and pyiqa's
learned full-reference distances (LPIPS, DISTS, ...) as losses.

Real-ESRGAN's recipe, which adversarial adaptation follows: L1 (weight 1) + perceptual (1) + GAN
(0.1), the perceptual loss the L1 distance between VGG19 features (before their ReLU) of the SR and
HR images at conv1_2, conv2_2, conv3_4, conv4_4 and conv5_4, weighted 0.1, 0.1, 1, 1, 1, the images
normalised as ImageNet's. Written here because pyiqa's losses are for training quality metrics, and
its LPIPS / DISTS are different distances: those are offered beside it, through pyiqa itself (``IQALoss``), as
recent real-world SR fine-tuning recipes use LPIPS with an L1 or L2 term.

The VGG19 weights are torchvision's (ImageNet, ``vgg19-dcbb9e9d.pth``), downloaded on first use into
``torch.hub.get_dir()/checkpoints``; offline, the error names the file and where to put it.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IQALoss", "VGGPerceptualLoss", "check_iqa_loss_name", "gan_loss", "iqa_loss", "iqa_loss_names",
           "vgg_perceptual_loss"]

# Index of each layer in torchvision's vgg19().features (convs at 0, 2, 5, 7, 10, ...; ReLU after each).
VGG19_LAYERS = {
    "conv1_1": 0, "conv1_2": 2,
    "conv2_1": 5, "conv2_2": 7,
    "conv3_1": 10, "conv3_2": 12, "conv3_3": 14, "conv3_4": 16,
    "conv4_1": 19, "conv4_2": 21, "conv4_3": 23, "conv4_4": 25,
    "conv5_1": 28, "conv5_2": 30, "conv5_3": 32, "conv5_4": 34,
}
REAL_ESRGAN_LAYER_WEIGHTS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg19_features(pretrained: bool) -> nn.Sequential:
    """torchvision's VGG19 feature stack, ImageNet weights when ``pretrained``."""
    from torchvision.models import VGG19_Weights, vgg19

    return vgg19(weights=VGG19_Weights.IMAGENET1K_V1 if pretrained else None).features


class VGGPerceptualLoss(nn.Module):
    """sum over layers l of w_l * mean |phi_l(sr) - phi_l(hr)|, phi_l the VGG19 feature at layer l (pre-ReLU).

    The network is frozen and stays in eval mode; the gradient reaches ``sr`` only.
    """

    def __init__(self, layer_weights: dict[str, float] | None = None, *, pretrained: bool = True) -> None:
        super().__init__()
        self.layer_weights = dict(REAL_ESRGAN_LAYER_WEIGHTS if layer_weights is None else layer_weights)
        unknown = sorted(set(self.layer_weights) - set(VGG19_LAYERS))
        if unknown or not self.layer_weights:
            raise ValueError(f"unknown VGG19 layers {unknown}; choose from {', '.join(VGG19_LAYERS)}")
        last = max(VGG19_LAYERS[name] for name in self.layer_weights)
        # only the layers up to the deepest one used: conv5_4 needs all but the last ReLU and pool
        self.features = _vgg19_features(pretrained)[: last + 1].requires_grad_(False).eval()
        for layer in self.features:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False  # torchvision's ReLUs would overwrite the pre-activation features tapped here
        self._taps = {VGG19_LAYERS[name]: weight for name, weight in self.layer_weights.items()}
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        # the feature extractor is a fixed measure (no dropout or batch norm here, but keep it so)
        super().train(mode)
        self.features.eval()
        return self

    def _normalise(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"the VGG perceptual loss takes RGB images [N, 3, H, W], got {tuple(image.shape)}")
        return (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        x = self._normalise(sr)
        with torch.no_grad():
            y = self._normalise(hr)
        # the distances in fp32 at least, also when the network runs under bf16 autocast
        dtype = torch.promote_types(sr.dtype, torch.float32)
        loss = sr.new_zeros((), dtype=dtype)
        for index, layer in enumerate(self.features):
            x = layer(x)
            with torch.no_grad():
                y = layer(y)
            if index in self._taps:
                loss = loss + self._taps[index] * F.l1_loss(x.to(dtype), y.to(dtype))
        return loss


def vgg_perceptual_loss(device: torch.device | str = "cpu", *, download: bool = True) -> VGGPerceptualLoss:
    """Real-ESRGAN's perceptual loss with torchvision's ImageNet VGG19.

    Raises ``adaptsr.evaluate.MissingWeightsError`` (naming the file, its URL and where it goes) when the
    weights are not on this machine and cannot be downloaded.
    """
    from adaptsr.evaluate import MissingWeightsError, _Blocked, _guarded_downloads

    with _guarded_downloads(download):
        try:
            return VGGPerceptualLoss().to(device)
        except _Blocked as err:
            raise MissingWeightsError("vgg", err.url, err.path, err.reason, what="the VGG perceptual loss") from None


def iqa_loss_names() -> list[str]:
    """The pyiqa metrics that can be losses: full-reference, and lower for a closer image (a distance)."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    return [name for name, config in DEFAULT_CONFIGS.items()
            if config.get("metric_mode") == "FR" and config.get("lower_better", False)]


def check_iqa_loss_name(name: str) -> str:
    """``name`` normalised, or a ValueError that says why it cannot be a loss and which names can."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    key = name.strip().lower()
    choices = iqa_loss_names()
    if key in choices:
        return key
    if key in DEFAULT_CONFIGS:
        config = DEFAULT_CONFIGS[key]
        why = ("scores an image alone (no-reference)" if config.get("metric_mode") == "NR"
               else "is higher for a closer image, a score rather than a distance")
        raise ValueError(f"pyiqa metric {key!r} cannot be a loss: it {why}; losses: {', '.join(choices)}")
    close = difflib.get_close_matches(key, choices, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; losses: {', '.join(choices)}"
    raise ValueError(f"unknown loss metric {key!r}{hint}")


class IQALoss(nn.Module):
    """mean over the batch of d(sr, hr), d a pyiqa full-reference distance (``iqa_loss_names()``: LPIPS, DISTS, ...).

    pyiqa's own network and forward (``as_loss=True``), frozen and kept in eval mode; the gradient reaches
    ``sr`` only. Images in [0, 1], RGB, compared in fp32 (the network under the caller's autocast).
    """

    def __init__(self, metric: nn.Module, name: str) -> None:
        super().__init__()
        self.metric = metric.requires_grad_(False).eval()
        self.name = name

    def train(self, mode: bool = True) -> IQALoss:
        super().train(mode)
        self.metric.eval()  # a fixed measure: LPIPS's dropout stays off
        return self

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if sr.dim() != 4 or sr.shape[1] != 3 or sr.shape != hr.shape:
            raise ValueError(f"the {self.name} loss takes RGB images [N, 3, H, W] of one shape, got "
                             f"{tuple(sr.shape)} and {tuple(hr.shape)}")
        loss = self.metric(sr.float(), hr.detach().float()).float().mean()
        if sr.requires_grad and not loss.requires_grad:
            raise RuntimeError(f"pyiqa's {self.name} gives no gradient to the SR image, so it cannot train")
        return loss


def iqa_loss(name: str, device: torch.device | str = "cpu", *, download: bool = True, **options) -> IQALoss:
    """pyiqa's metric ``name`` (a full-reference distance) as a training loss; ``options`` go to pyiqa.

    Raises ValueError for a metric that cannot be a loss, and ``adaptsr.evaluate.MissingWeightsError`` (naming
    the file, its URL and where it goes) when its weights are not here and cannot be downloaded.
    """
    from adaptsr.evaluate import create_metric

    key = check_iqa_loss_name(name)
    metric = create_metric(key, device=device, download=download, what=f"the {key} loss", as_loss=True, **options)
    return IQALoss(metric, key)


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Binary cross-entropy of the discriminator's logits against "real" (``real=True``) or "fake", a mean over
    pixels, in fp32. The generator's GAN loss is ``gan_loss(D(sr), True)``; the discriminator's,
    ``gan_loss(D(hr), True) + gan_loss(D(sr), False)``."""
    target = torch.full_like(logits, 1.0 if real else 0.0, dtype=torch.float32)
    return F.binary_cross_entropy_with_logits(logits.float(), target)
