"""Adversarial adaptation (AdaptSR-GAN) in the training loop: the weighted losses, the discriminator trained
alongside and saved, exact resumption with it, and the CLI's --gan flags. The VGG19 network runs with random
weights here (no download in the tests): what is checked is the plumbing, not the ImageNet features. The
CLI's flags are tested with the other `adaptsr adapt` tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adaptsr.discriminator import UNetDiscriminator, load_discriminator
from adaptsr.train import TrainConfig, adapt

TASK = (Path(__file__).parent / "train_task.py").read_text()
namespace: dict = {}
exec(TASK, namespace)
NoisyPairs, make_model, crashes_after = namespace["NoisyPairs"], namespace["make_model"], namespace["crashes_after"]
lora_state = namespace["lora_state"]

GAN = {"perceptual_weight": 0.5, "gan_weight": 0.1}


# the VGG19 with random weights (no download in the tests)
pytestmark = pytest.mark.usefixtures("random_vgg")


def _config(**overrides) -> TrainConfig:
    settings = dict(steps=6, batch_size=4, lr=2e-3, warmup_steps=2, checkpoint_every=3, log_every=0, seed=3, **GAN)
    settings.update(overrides)
    return TrainConfig(**settings)


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
    assert any(v.abs().max() > 0 for k, v in lora_state(model).items() if k.endswith("lora_B"))
    assert json.loads((tmp_path / "config.json").read_text())["gan_weight"] == 0.1


def test_each_loss_moves_the_adapters_its_own_way(tmp_path):
    """Same seed, same data: L1 alone, L1 + perceptual and L1 + GAN end with different adapters, and an
    L1-only run logs one term whose values are its losses."""
    runs = {}
    for name, weights in {"l1": {}, "perceptual": {"perceptual_weight": 1.0}, "gan": {"gan_weight": 0.5}}.items():
        model = make_model()
        settings = {"perceptual_weight": 0.0, "gan_weight": 0.0, **weights}
        metrics = adapt(model, NoisyPairs(), tmp_path / name, _config(**settings), device="cpu")
        runs[name] = (lora_state(model), metrics)
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
        adapt(make_model(), crashes_after(5 * 4), tmp_path / "parts", _config(steps=8, checkpoint_every=4),
              device="cpu")
    resumed = make_model()
    adapt(resumed, NoisyPairs(), tmp_path / "parts", _config(steps=8, checkpoint_every=4), device="cpu", resume=True)
    for key, value in lora_state(straight).items():
        assert torch.equal(value, lora_state(resumed)[key]), key
    a = load_discriminator(tmp_path / "straight" / "discriminator.safetensors")
    b = load_discriminator(tmp_path / "parts" / "discriminator.safetensors")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    logged = [json.loads((tmp_path / run / "metrics.json").read_text())["loss_terms"] for run in ("straight", "parts")]
    assert logged[0] == logged[1]


def test_resume_refuses_another_loss_setup(tmp_path):
    adapt(make_model(), NoisyPairs(), tmp_path / "gan", _config(steps=2), device="cpu")
    model = make_model()
    before = lora_state(model)
    with pytest.raises(ValueError, match=r"gan/checkpoint\.pt was trained with a GAN loss and this run is not"):
        adapt(model, NoisyPairs(), tmp_path / "gan", _config(steps=4, gan_weight=0.0), device="cpu", resume=True)
    assert all(torch.equal(v, lora_state(model)[k]) for k, v in before.items())  # nothing loaded before the refusal
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



def test_the_perceptual_loss_refuses_a_grey_model_up_front(tmp_path):
    with pytest.raises(ValueError, match=r"compares RGB images, and this model puts out 1 channel"):
        adapt(namespace["Grey"](), NoisyPairs(), tmp_path, _config(), device="cpu")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_micro_batches_in_an_adversarial_run(tmp_path):
    """With micro_batch the generator's and the discriminator's steps both run in pieces. The first step's
    pixel and perceptual terms (before any update) are the whole batch's; the discriminator's differ only by
    spectral norm's power iteration, which advances once per piece, so the runs stay close but not equal."""
    runs = {}
    for micro_batch in (0, 1):
        torch.manual_seed(5)
        discriminator = UNetDiscriminator(3, features=8)
        runs[micro_batch] = adapt(make_model(), NoisyPairs(), tmp_path / str(micro_batch),
                                  _config(steps=3, micro_batch=micro_batch), device="cpu", discriminator=discriminator)
    whole, pieces = runs[0]["loss_terms"], runs[1]["loss_terms"]
    for name in ("pixel", "perceptual"):
        assert pieces[name][0] == pytest.approx(whole[name][0], rel=1e-5), name
    for name in ("gan", "discriminator_real", "discriminator_fake"):
        assert all(math.isfinite(v) for v in pieces[name])
        assert pieces[name][0] == pytest.approx(whole[name][0], rel=0.01), name
