"""The losses of adversarial adaptation: the VGG perceptual loss taps the layers it names, as torchvision's
VGG19 computes them; the GAN loss is binary cross-entropy on logits; missing VGG weights are named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import vgg19

from adaptsr.evaluate import MissingWeightsError
from adaptsr.losses import REAL_ESRGAN_LAYER_WEIGHTS, VGGPerceptualLoss, gan_loss, vgg_perceptual_loss


def _torchvision_reference(loss: VGGPerceptualLoss, sr: torch.Tensor, hr: torch.Tensor, taps: dict[int, float]):
    """The same loss through a whole torchvision VGG19 holding the loss's weights, its features read by forward
    hooks on the conv layers at ``taps`` (indices into vgg19().features): an independent route to the layers."""
    network = vgg19(weights=None).double()
    network.features[: len(loss.features)].load_state_dict(loss.features.state_dict())
    captured: dict[int, torch.Tensor] = {}
    for index in taps:
        # torchvision's ReLUs run in place on the conv's output: keep a copy of the pre-activation feature
        network.features[index].register_forward_hook(
            lambda m, i, out, index=index: captured.__setitem__(index, out.clone())
        )
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    network.features((sr - mean) / std)
    sr_features = dict(captured)
    with torch.no_grad():
        network.features((hr - mean) / std)
    return sum(weight * F.l1_loss(sr_features[i], captured[i]) for i, weight in taps.items())


@pytest.mark.parametrize(
    "layer_weights, taps",
    [
        ({"conv1_2": 1.0}, {2: 1.0}),
        ({"conv2_2": 0.5, "conv3_4": 2.0}, {7: 0.5, 16: 2.0}),
        (None, {2: 0.1, 7: 0.1, 16: 1.0, 25: 1.0, 34: 1.0}),  # Real-ESRGAN's five layers and weights
    ],
    ids=["conv1_2", "two-layers", "real-esrgan"],
)
def test_perceptual_loss_taps_the_named_pre_activation_features(layer_weights, taps):
    torch.manual_seed(0)
    loss = VGGPerceptualLoss(layer_weights, pretrained=False).double()
    sr = torch.rand(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    hr = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    ours = loss(sr, hr)
    (grad,) = torch.autograd.grad(ours, sr)

    sr_ref = sr.detach().clone().requires_grad_(True)
    expected = _torchvision_reference(loss, sr_ref, hr, taps)
    (grad_expected,) = torch.autograd.grad(expected, sr_ref)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-6, atol=1e-12)
    # only the layers up to the deepest tap are kept
    assert len(loss.features) == max(taps) + 1


def test_perceptual_loss_is_a_fixed_measure():
    torch.manual_seed(0)
    loss = VGGPerceptualLoss(pretrained=False)
    loss.train()
    assert not loss.features.training and not any(p.requires_grad for p in loss.parameters())
    hr = torch.rand(1, 3, 24, 24)
    assert loss(hr, hr).item() == 0.0
    sr = (hr + 0.05 * torch.randn_like(hr)).requires_grad_(True)
    loss(sr, hr).backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())
    assert set(REAL_ESRGAN_LAYER_WEIGHTS) == set(loss.layer_weights)


def test_perceptual_loss_bad_input():
    with pytest.raises(ValueError, match="conv6_1"):
        VGGPerceptualLoss({"conv6_1": 1.0}, pretrained=False)
    loss = VGGPerceptualLoss({"conv1_2": 1.0}, pretrained=False)
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8\)"):
        loss(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_missing_vgg_weights_are_named(empty_hub):
    message = r"the VGG perceptual loss needs the weight file vgg19-dcbb9e9d\.pth"
    with pytest.raises(MissingWeightsError, match=message) as info:
        vgg_perceptual_loss(download=False)
    assert info.value.path.startswith(str(empty_hub)) and info.value.url.endswith("vgg19-dcbb9e9d.pth")


def test_gan_loss_is_binary_cross_entropy_on_logits():
    logits = torch.randn(2, 1, 5, 7, dtype=torch.float64)
    # -log sigmoid(l) for "real", -log(1 - sigmoid(l)) for "fake", averaged over every pixel
    torch.testing.assert_close(gan_loss(logits, True).double(), -torch.log(torch.sigmoid(logits)).mean())
    torch.testing.assert_close(gan_loss(logits, False).double(), -torch.log(1 - torch.sigmoid(logits)).mean())
    assert gan_loss(logits.bfloat16(), True).dtype == torch.float32
