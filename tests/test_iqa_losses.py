"""pyiqa's full-reference distances as training losses (adaptsr.losses.IQALoss, TrainConfig.iqa_loss_weights,
`adaptsr adapt --iqa-loss`): the loss is pyiqa's own metric, with a gradient to the SR image only; metrics that are
scores or need no reference are refused by name; the terms join the run's weighted sum.

pyiqa is the referee: each value is checked against ``pyiqa.create_metric`` built as a metric (not a loss) holding
the same network weights. LPIPS's and DISTS's backbones get seeded random weights here (torchvision's ImageNet
weights would be downloaded), and GMSD has none to fetch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyiqa
import pytest
import torch
import torchvision

import adaptsr.objective
from adaptsr.cli import main
from adaptsr.evaluate import MissingWeightsError
from adaptsr.losses import IQALoss, iqa_loss, iqa_loss_names
from adaptsr.train import TrainConfig, adapt

TASK = (Path(__file__).parent / "train_task.py").read_text()
namespace: dict = {}
exec(TASK, namespace)
NoisyPairs, make_model, lora_state = namespace["NoisyPairs"], namespace["make_model"], namespace["lora_state"]

# the networks' own weights (LPIPS's linear heads, DISTS's alpha / beta) left random, not downloaded
RANDOM = {"lpips": {"pretrained": False}, "lpips-vgg": {"pretrained": False}, "dists": {"pretrained": False},
          "gmsd": {}}


@pytest.fixture
def random_backbones(monkeypatch):
    """torchvision's AlexNet and VGG16 with seeded random weights, as pyiqa's LPIPS and DISTS build them."""
    for name in ("alexnet", "vgg16"):
        build = getattr(torchvision.models, name)

        def untrained(*args, build=build, **kwargs):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                return build(weights=None)

        monkeypatch.setattr(torchvision.models, name, untrained)


@pytest.fixture
def offline_iqa_loss(monkeypatch, random_backbones):
    """Objective's iqa_loss with the networks' weights random (RANDOM), so a run builds them without a download."""
    monkeypatch.setattr(adaptsr.objective, "iqa_loss", lambda name, device: iqa_loss(name, device, **RANDOM[name]))


@pytest.mark.parametrize("name", ["lpips", "lpips-vgg", "dists", "gmsd"])
def test_the_loss_is_pyiqas_metric_with_a_gradient_to_sr_only(random_backbones, name):
    loss = iqa_loss(name, **RANDOM[name])
    referee = pyiqa.create_metric(name, device=torch.device("cpu"), **RANDOM[name])
    referee.net.load_state_dict(loss.metric.net.state_dict())
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(3, 3, 48, 40, generator=g)
    sr = (hr + 0.1 * torch.randn(hr.shape, generator=g)).clamp(0, 1).requires_grad_()
    value = loss(sr, hr)
    assert value.dim() == 0 and value.dtype == torch.float32
    torch.testing.assert_close(value, referee(sr.detach(), hr).mean(), rtol=1e-5, atol=1e-6)
    value.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())
    loss.train()  # a fixed measure: LPIPS's dropout stays off
    assert not loss.metric.training and not loss.metric.net.training
    assert loss(hr, hr).item() == pytest.approx(0.0, abs=1e-5)


def test_what_can_be_a_loss():
    names = iqa_loss_names()
    assert {"lpips", "lpips-vgg", "dists", "gmsd"} <= set(names) and not {"psnr", "ssim", "niqe"} & set(names)
    with pytest.raises(ValueError, match=r"pyiqa metric 'psnr' cannot be a loss: it is higher for a closer image"):
        iqa_loss("psnr")
    with pytest.raises(ValueError, match=r"'niqe' cannot be a loss: it scores an image alone"):
        iqa_loss("niqe")
    with pytest.raises(ValueError, match=r"unknown loss metric 'lpip'; did you mean lpips"):
        iqa_loss("lpip")


def test_bad_input_is_named(random_backbones):
    loss = iqa_loss("gmsd")
    with pytest.raises(ValueError, match=r"the gmsd loss takes RGB images .* got \(1, 1, 8, 8\) and \(1, 1, 8, 8\)"):
        loss(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\) and \(1, 3, 8, 9\)"):
        loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))

    class NoGradient(torch.nn.Module):
        def forward(self, sr, hr):
            return (sr - hr).abs().mean().detach()

    with pytest.raises(RuntimeError, match="pyiqa's stopped gives no gradient to the SR image"):
        IQALoss(NoGradient(), "stopped")(torch.rand(1, 3, 8, 8, requires_grad=True), torch.rand(1, 3, 8, 8))


def test_missing_weights_are_named(empty_hub):
    with pytest.raises(MissingWeightsError, match=r"the lpips loss needs the weight file \S+\.pth") as info:
        iqa_loss("lpips", download=False)
    assert info.value.path.startswith(str(empty_hub))


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"psnr": 1.0}, "'psnr' cannot be a loss"),
        ({"lpips": -1.0}, r"iqa_loss_weights\['lpips'\] must be a finite number >= 0, got -1.0"),
        ({"lpips": float("nan")}, "must be a finite number"),
        ({"lpips": True}, "must be a finite number >= 0, got True"),
        ({"lpips": 1.0, " LPIPS": 2.0}, "names 'lpips' twice"),
        (["lpips"], "must map pyiqa metric names to weights"),
    ],
)
def test_bad_loss_weights_in_the_config(weights, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(iqa_loss_weights=weights)


def test_config_names_are_normalised_and_a_distance_alone_keeps_the_content():
    assert TrainConfig(iqa_loss_weights={" LPIPS": 1}).iqa_loss_weights == {"lpips": 1.0}
    TrainConfig(pixel_weight=0.0, iqa_loss_weights={"lpips": 1.0})  # LPIPS alone is a content loss
    with pytest.raises(ValueError, match="pixel_weight, perceptual_weight and iqa_loss_weights are all 0"):
        TrainConfig(pixel_weight=0.0, iqa_loss_weights={"lpips": 0.0})


def _config(**overrides) -> TrainConfig:
    settings = {"steps": 4, "batch_size": 4, "lr": 2e-3, "warmup_steps": 1, "log_every": 0, "seed": 3}
    return TrainConfig(**{**settings, **overrides})


def test_the_terms_join_the_weighted_sum_and_move_the_adapters(tmp_path, offline_iqa_loss):
    l1_model, model = make_model(), make_model()
    pairs = NoisyPairs(size=64)  # AlexNet's strides and pools (LPIPS) need 64 pixels
    adapt(l1_model, pairs, tmp_path / "l1", _config(), device="cpu")
    weights = {"gmsd": 0.5, "lpips": 0.25}
    metrics = adapt(model, pairs, tmp_path / "iqa", _config(pixel_weight=2.0, iqa_loss_weights=weights),
                    device="cpu")
    terms = metrics["loss_terms"]
    assert list(terms) == ["pixel", "gmsd", "lpips"]
    # (LPIPS's random linear heads may weigh the feature distances negatively: finite and non-zero is what holds)
    assert all(len(values) == 4 and all(math.isfinite(v) and v != 0 for v in values) for values in terms.values())
    for step, total in enumerate(metrics["loss"]):
        expected = 2.0 * terms["pixel"][step] + 0.5 * terms["gmsd"][step] + 0.25 * terms["lpips"][step]
        assert total == pytest.approx(expected, rel=1e-5)
    assert json.loads((tmp_path / "iqa" / "config.json").read_text())["iqa_loss_weights"] == weights
    l1, tuned = lora_state(l1_model), lora_state(model)
    assert any(not torch.equal(l1[k], tuned[k]) for k in l1), "the distances left the adapters as L1 alone trains them"


def test_a_zero_weight_builds_no_network(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(adaptsr.objective, "iqa_loss", lambda name, device: built.append(name))
    metrics = adapt(make_model(), NoisyPairs(), tmp_path, _config(steps=1, iqa_loss_weights={"lpips": 0.0}),
                    device="cpu")
    assert not built and list(metrics["loss_terms"]) == ["pixel"]


def test_a_grey_model_is_refused_up_front(tmp_path, offline_iqa_loss):
    with pytest.raises(ValueError, match=r"the lpips loss compares RGB images, and this model puts out 1 channel"):
        adapt(namespace["Grey"](), NoisyPairs(), tmp_path, _config(iqa_loss_weights={"lpips": 1.0}), device="cpu")
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.fixture
def cli_setup(photo_run_inputs):
    hr_dir, checkpoint = photo_run_inputs(size=64)  # AlexNet's strides and pools (LPIPS) need 64 pixels
    return ["adapt", "--model", str(checkpoint), "--hr", str(hr_dir), "--degradation", "camera", "--steps", "2",
            "--batch-size", "2", "--patch", "32", "--rank", "4", "--warmup-steps", "1", "--device", "cpu"]


def test_the_command_line_flag(tmp_path, cli_setup, capsys, offline_iqa_loss):
    run = tmp_path / "run"
    assert main([*cli_setup, "--out", str(run), "--iqa-loss", "gmsd=0.5", "--iqa-loss", "LPIPS=1"]) == 0
    assert json.loads((run / "config.json").read_text())["iqa_loss_weights"] == {"gmsd": 0.5, "lpips": 1.0}
    assert list(json.loads((run / "metrics.json").read_text())["loss_terms"]) == ["pixel", "gmsd", "lpips"]
    capsys.readouterr()
    for value, message in [("lpips", "--iqa-loss lpips: expected METRIC=W"), ("lpips=-1", "expected METRIC=W"),
                           ("lpips=x", "expected METRIC=W"), ("psnr=1", "'psnr' cannot be a loss")]:
        assert main([*cli_setup, "--out", str(tmp_path / "bad"), "--iqa-loss", value]) == 1
        assert message in capsys.readouterr().err
    assert main([*cli_setup, "--out", str(tmp_path / "bad"), "--iqa-loss", "gmsd=1", "--iqa-loss", "gmsd=2"]) == 1
    assert "--iqa-loss: gmsd is given twice" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()
