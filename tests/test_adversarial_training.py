"""Adversarial adaptation (AdaptSR-GAN) in the training loop: the weighted losses, the discriminator trained
alongside and saved, exact resumption with it, and the CLI's --gan flags. The VGG19 network runs with random
weights here (no download in the tests): what is checked is the plumbing, not the ImageNet features."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import adaptsr.losses
from adaptsr.discriminator import UNetDiscriminator, load_discriminator
from adaptsr.train import TrainConfig, adapt

TASK = (Path(__file__).parent / "train_task.py").read_text()
namespace: dict = {}
exec(TASK, namespace)
NoisyPairs, make_model, crashes_after = namespace["NoisyPairs"], namespace["make_model"], namespace["crashes_after"]

GAN = {"perceptual_weight": 0.5, "gan_weight": 0.1}


@pytest.fixture(autouse=True)
def random_vgg(monkeypatch):
    """torchvision's VGG19 without its ImageNet weights (which would be downloaded), seeded."""
    build = adaptsr.losses._vgg19_features

    def untrained(pretrained):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return build(False)

    monkeypatch.setattr(adaptsr.losses, "_vgg19_features", untrained)


def _config(**overrides) -> TrainConfig:
    settings = dict(steps=6, batch_size=4, lr=2e-3, warmup_steps=2, checkpoint_every=3, log_every=0, seed=3, **GAN)
    settings.update(overrides)
    return TrainConfig(**settings)


def _lora(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_the_loss_is_the_weighted_sum_and_the_discriminator_trains(tmp_path):
    torch.manual_seed(5)
    discriminator = UNetDiscriminator(3, features=8)
    start = {k: v.clone() for k, v in discriminator.state_dict().items()}
    model = make_model()
    metrics = adapt(model, NoisyPairs(), tmp_path, _config(pixel_weight=2.0), device="cpu", discriminator=discriminator)
    terms = metrics["loss_terms"]
    assert list(terms) == ["pixel", "perceptual", "gan", "discriminator_real", "discriminator_fake"]
    assert all(len(values) == 6 and all(math.isfinite(v) for v in values) for values in terms.values())
    for step, total in enumerate(metrics["loss"]):
        expected = 2.0 * terms["pixel"][step] + 0.5 * terms["perceptual"][step] + 0.1 * terms["gan"][step]
        assert total == pytest.approx(expected, rel=1e-5)
    # the discriminator given was trained in place (weights and spectral norm's vectors), and saved at the end
    changed = [k for k, v in discriminator.state_dict().items() if not torch.equal(v, start[k])]
    assert {"conv0.weight", "conv1.weight_orig", "conv1.weight_u", "conv9.bias"} <= set(changed)
    saved = load_discriminator(tmp_path / "discriminator.safetensors")
    for key, value in discriminator.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert any(v.abs().max() > 0 for k, v in _lora(model).items() if k.endswith("lora_B"))
    assert json.loads((tmp_path / "config.json").read_text())["gan_weight"] == 0.1


def test_each_loss_moves_the_adapters_its_own_way(tmp_path):
    """Same seed, same data: L1 alone, L1 + perceptual and L1 + GAN end with different adapters, and an
    L1-only run logs one term whose values are its losses."""
    runs = {}
    for name, weights in {"l1": {}, "perceptual": {"perceptual_weight": 1.0}, "gan": {"gan_weight": 0.5}}.items():
        model = make_model()
        settings = {"perceptual_weight": 0.0, "gan_weight": 0.0, **weights}
        metrics = adapt(model, NoisyPairs(), tmp_path / name, _config(**settings), device="cpu")
        runs[name] = (_lora(model), metrics)
    l1_metrics = runs["l1"][1]
    assert list(l1_metrics["loss_terms"]) == ["pixel"] and l1_metrics["loss_terms"]["pixel"] == l1_metrics["loss"]
    assert not (tmp_path / "l1" / "discriminator.safetensors").exists()
    for name in ("perceptual", "gan"):
        differs = any(not torch.equal(runs["l1"][0][k], runs[name][0][k]) for k in runs["l1"][0])
        assert differs, f"the {name} term left the adapters as L1 alone trains them"


def test_resume_with_a_discriminator_equals_uninterrupted(tmp_path):
    straight = make_model()
    adapt(straight, NoisyPairs(), tmp_path / "straight", _config(steps=8, checkpoint_every=4), device="cpu")

    with pytest.raises(KeyboardInterrupt):  # batch 4: the 21st item belongs to step 6
        adapt(make_model(), crashes_after(5 * 4), tmp_path / "parts", _config(steps=8, checkpoint_every=4), device="cpu")
    resumed = make_model()
    adapt(resumed, NoisyPairs(), tmp_path / "parts", _config(steps=8, checkpoint_every=4), device="cpu", resume=True)
    for key, value in _lora(straight).items():
        assert torch.equal(value, _lora(resumed)[key]), key
    a = load_discriminator(tmp_path / "straight" / "discriminator.safetensors")
    b = load_discriminator(tmp_path / "parts" / "discriminator.safetensors")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    logged = [json.loads((tmp_path / run / "metrics.json").read_text())["loss_terms"] for run in ("straight", "parts")]
    assert logged[0] == logged[1]


def test_resume_refuses_another_loss_setup(tmp_path):
    adapt(make_model(), NoisyPairs(), tmp_path / "gan", _config(steps=2), device="cpu")
    model = make_model()
    before = _lora(model)
    with pytest.raises(ValueError, match=r"gan/checkpoint\.pt was trained with a GAN loss and this run is not"):
        adapt(model, NoisyPairs(), tmp_path / "gan", _config(steps=4, gan_weight=0.0), device="cpu", resume=True)
    assert all(torch.equal(v, _lora(model)[k]) for k, v in before.items())  # nothing loaded before the refusal
    adapt(make_model(), NoisyPairs(), tmp_path / "l1", _config(steps=2, gan_weight=0.0), device="cpu")
    with pytest.raises(ValueError, match=r"l1/checkpoint\.pt was trained without a GAN loss"):
        adapt(make_model(), NoisyPairs(), tmp_path / "l1", _config(steps=4), device="cpu", resume=True)


def test_a_discriminator_without_a_gan_loss_is_refused(tmp_path):
    with pytest.raises(ValueError, match="a discriminator was given but gan_weight is 0"):
        adapt(make_model(), NoisyPairs(), tmp_path, _config(gan_weight=0.0), device="cpu",
              discriminator=UNetDiscriminator(3, features=8))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"gan_weight": -0.1}, "gan_weight must be a finite number >= 0"),
        ({"perceptual_weight": float("nan")}, "perceptual_weight must be"),
        ({"pixel_weight": 0.0, "perceptual_weight": 0.0}, "a GAN loss alone"),
        ({"discriminator_lr": 0.0}, "discriminator_lr must be positive"),
    ],
)
def test_bad_loss_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


# -- the command line --


@pytest.fixture
def setup(tmp_path):
    from PIL import Image
    from skimage import data
    from spandrel.architectures.ESRGAN import ESRGAN

    import adaptsr

    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).resize((48, 48), Image.BICUBIC).save(hr_dir / f"{name}.png")
    torch.manual_seed(0)
    checkpoint = tmp_path / "base.safetensors"
    adaptsr.save_model(ESRGAN(num_filters=8, num_blocks=1, scale=2), checkpoint)
    return tmp_path, hr_dir, checkpoint


def _args(checkpoint, hr_dir, run_dir, *extra):
    return [
        "adapt", "--model", str(checkpoint), "--hr", str(hr_dir), "--out", str(run_dir), "--steps", "2",
        "--batch-size", "2", "--patch", "16", "--rank", "4", "--warmup-steps", "1", "--device", "cpu", *extra,
    ]


def test_gan_flags_set_real_esrgans_recipe(setup):
    from adaptsr.cli import main

    tmp_path, hr_dir, checkpoint = setup
    assert main(_args(checkpoint, hr_dir, tmp_path / "recipe", "--gan")) == 0
    config = json.loads((tmp_path / "recipe" / "config.json").read_text())
    assert (config["pixel_weight"], config["perceptual_weight"], config["gan_weight"]) == (1.0, 1.0, 0.1)
    assert (tmp_path / "recipe" / "discriminator.safetensors").is_file()
    # explicit weights override the recipe; a Real-ESRGAN-style {"params": ...} file starts the discriminator
    torch.manual_seed(2)
    start = UNetDiscriminator(3, features=16)
    torch.save({"params": start.state_dict()}, tmp_path / "netD.pth")
    assert main(_args(checkpoint, hr_dir, tmp_path / "tuned", "--gan", "--perceptual-weight", "0", "--gan-weight",
                      "0.05", "--discriminator", str(tmp_path / "netD.pth"), "--discriminator-lr", "2e-4")) == 0
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert (config["perceptual_weight"], config["gan_weight"], config["discriminator_lr"]) == (0.0, 0.05, 2e-4)
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert list(metrics["loss_terms"]) == ["pixel", "gan", "discriminator_real", "discriminator_fake"]
    trained = load_discriminator(tmp_path / "tuned" / "discriminator.safetensors")
    assert trained.conv0.out_channels == 16  # the given discriminator's width, not a fresh default one
    assert not torch.equal(trained.conv0.weight, start.conv0.weight)


def test_gan_flag_errors(setup, capsys):
    from adaptsr.cli import main

    tmp_path, hr_dir, checkpoint = setup
    torch.save({"params": UNetDiscriminator(3, features=8).state_dict()}, tmp_path / "netD.pth")
    assert main(_args(checkpoint, hr_dir, tmp_path / "a", "--discriminator", str(tmp_path / "netD.pth"))) == 1
    assert "--discriminator: the run has no GAN loss" in capsys.readouterr().err
    assert main(_args(checkpoint, hr_dir, tmp_path / "b", "--gan", "--discriminator", str(tmp_path / "nope.pth"))) == 1
    assert "nope.pth does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(_args(checkpoint, hr_dir, tmp_path / "c", "--gan-weight", "-1"))
    assert usage.value.code == 2 and "-1 is negative" in capsys.readouterr().err


def test_missing_vgg_weights_end_the_command_with_their_name(setup, capsys, monkeypatch):
    """No random VGG here: the real loader, offline, fails before any training with the file to fetch."""
    from adaptsr.cli import main

    tmp_path, hr_dir, checkpoint = setup
    monkeypatch.setattr(adaptsr.losses, "_vgg19_features", _real_vgg19_features)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def unreachable(url, dst, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    assert main(_args(checkpoint, hr_dir, tmp_path / "run", "--perceptual-weight", "1")) == 1
    err = capsys.readouterr().err
    assert "the VGG perceptual loss needs the weight file vgg19-dcbb9e9d.pth" in err and "network is unreachable" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


_real_vgg19_features = adaptsr.losses._vgg19_features
