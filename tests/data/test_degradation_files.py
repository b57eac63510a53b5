"""Degradations in JSON files: presets round-trip, both file forms build the configs they describe, and a bad
file is refused with its name and the field at fault."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from adaptsr.data import (
    DEGRADATION_PRESETS,
    DegradationMixture,
    camera_profile,
    degradation_to_dict,
    degrade,
    get_preset,
    load_degradation,
    min_input_size,
    mixture_of,
    save_degradation,
)
from adaptsr.data.degradations import _second_stage_default


def _file(tmp_path, data, name="camera.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("preset", DEGRADATION_PRESETS)
def test_every_preset_round_trips_through_a_file(tmp_path, preset):
    config = get_preset(preset)
    path = save_degradation(config, tmp_path / "d.json")
    assert json.loads(path.read_text()) == degradation_to_dict(config)
    assert load_degradation(path) == config
    assert load_degradation(preset) == config


@pytest.mark.parametrize(("preset", "sigma", "noise", "quality"), [("camera", 1.2, 10, 60), ("lowlight", 1.2, 25, 50)])
def test_a_camera_profile_file_is_the_preset_it_names(tmp_path, preset, sigma, noise, quality):
    data = {"camera_profile": {"blur_sigma": sigma, "noise": noise, "jpeg_quality": quality}}
    assert load_degradation(_file(tmp_path, data)) == get_preset(preset)


def test_a_camera_profile_degrades_as_described():
    """Blur 1.0, no noise, JPEG 100: the LR image is the blurred HR resized, up to JPEG and 8-bit rounding."""
    hr = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lr = degrade(hr, 2, camera_profile(blur_sigma=1.0, noise=0, jpeg_quality=100), generator=0)
    sharper = degrade(hr, 2, camera_profile(blur_sigma=0.3, noise=0, jpeg_quality=100), generator=0)
    assert lr.shape == (1, 3, 16, 16)
    assert lr.std() < sharper.std()  # more blur, less contrast left


def test_changes_to_a_preset_replace_those_fields_only(tmp_path):
    data = {"preset": "mild", "first": {"noise_range": [1, 15], "kernel_types": ["iso", "aniso"],
                                        "kernel_probs": [0.5, 0.5]},
            "final_jpeg_range": [50, 90], "share_resize_across_batch": True}
    mild = get_preset("mild")
    expected = dataclasses.replace(
        mild,
        first=dataclasses.replace(mild.first, noise_range=(1, 15), kernel_types=("iso", "aniso"),
                                  kernel_probs=(0.5, 0.5)),
        final_jpeg_range=(50, 90),
        share_resize_across_batch=True,
    )
    assert load_degradation(_file(tmp_path, data)) == expected
    assert load_degradation(_file(tmp_path, {"first": {"jpeg_prob": 0.5}})) == dataclasses.replace(
        get_preset("realesrgan"), first=dataclasses.replace(get_preset("realesrgan").first, jpeg_prob=0.5))


def test_the_second_stage_can_be_dropped_or_added(tmp_path):
    assert load_degradation(_file(tmp_path, {"second": None})).second is None
    added = load_degradation(_file(tmp_path, {"preset": "camera", "second": {"noise_range": [0, 2]}}))
    assert added.first == get_preset("camera").first
    assert added.second == dataclasses.replace(_second_stage_default(), noise_range=(0, 2))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nois_range": [1, 2]}, "unknown field 'nois_range'; a DegradationConfig has first, second"),
        ({"first": {"nois_range": [1, 2]}}, "unknown field 'first.nois_range'; a StageConfig has blur_prob"),
        ({"first": {"noise_range": "5"}}, "first.noise_range must be a list, got '5'"),
        ({"first": {"noise_range": [1, "2"]}}, "first.noise_range must be a list of numbers"),
        ({"first": {"kernel_types": [1]}}, "first.kernel_types must be a list of strings"),
        ({"final_jpeg_prob": True}, "final_jpeg_prob must be a number, got True"),
        ({"share_resize_across_batch": 1}, "share_resize_across_batch must be true or false"),
        ({"first": {"jpeg_range": [50, 120]}}, "first.jpeg_range must lie at or below 100"),
        ({"first": 3}, "first must be a JSON object of StageConfig fields"),
        ({"first": None}, "first must be a JSON object of StageConfig fields"),
        ({"preset": "nope"}, "unknown preset 'nope'; presets: realesrgan"),
        ({"camera_profile": {"blur_sigma": 1, "noise": 5}}, "exactly blur_sigma, noise, jpeg_quality"),
        ({"camera_profile": {"blur_sigma": 0, "noise": 5, "jpeg_quality": 70}},
         "camera profile: blur_sigma must be a positive number, got 0"),
        ({"camera_profile": {"blur_sigma": 1, "noise": 5, "jpeg_quality": 101}}, "jpeg_quality must be a number in"),
        ({"camera_profile": {"blur_sigma": 1, "noise": 5, "jpeg_quality": 70}, "preset": "mild"},
         "'camera_profile' describes the whole degradation; leave out 'preset'"),
        ([1, 2], "a degradation is a JSON object, got list"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_a_bad_file_names_itself_and_the_field(tmp_path, data, message):
    path = _file(tmp_path, data)
    with pytest.raises(ValueError, match="degradation file") as err:
        load_degradation(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_neither_a_preset_nor_a_file(tmp_path):
    with pytest.raises(ValueError, match=r"'nosuch' is neither a preset \(realesrgan, mild, camera, lowlight\) nor a"):
        load_degradation("nosuch")
    with pytest.raises(ValueError, match="nor a file"):
        load_degradation(tmp_path / "missing.json")


# -- mixtures: one adapter for several cameras --


def _deterministic(sigma: float):
    """A camera with no noise and lossless JPEG: the same image always degrades the same way."""
    return camera_profile(blur_sigma=sigma, noise=0, jpeg_quality=100)


def test_each_image_of_a_mixture_takes_one_of_its_degradations():
    sharp, blurred = _deterministic(0.3), _deterministic(2.0)
    hr = torch.rand(16, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    lr = degrade(hr, 2, DegradationMixture((sharp, blurred)), generator=5)
    alone = [degrade(hr, 2, config, generator=0) for config in (sharp, blurred)]
    picked = [[torch.equal(lr[i], alone[k][i]) for k in range(2)] for i in range(16)]
    assert all(sum(p) == 1 for p in picked)  # exactly one component each
    assert {p.index(True) for p in picked} == {0, 1}  # both drawn (all 16 alike has probability 2^-15)
    assert torch.equal(degrade(hr, 2, DegradationMixture((sharp, blurred)), generator=5), lr)
    only_blurred = degrade(hr, 2, DegradationMixture((sharp, blurred), weights=(0, 1)), generator=5)
    assert torch.equal(only_blurred, alone[1])


def test_a_mixture_needs_the_largest_input_of_its_components():
    mixture = DegradationMixture((get_preset("camera"), get_preset("realesrgan")))
    assert min_input_size(mixture, 4) == max(min_input_size("camera", 4), min_input_size("realesrgan", 4))


@pytest.mark.parametrize(
    ("mixture", "message"),
    [
        (DegradationMixture(()), "needs at least one degradation"),
        (DegradationMixture((_deterministic(1.0),), weights=(1, 2)), "2 weights for 1 degradations"),
        (DegradationMixture((_deterministic(1.0),), weights=(-1,)), "mixture weights must be non-negative"),
        (DegradationMixture((_deterministic(1.0),), weights=(float("nan"),)), "mixture weights must be non-negative"),
        (DegradationMixture((_deterministic(1.0), dataclasses.replace(get_preset("mild"), final_jpeg_prob=2.0))),
         "mixture component 1: final_jpeg_prob must be a probability"),
    ],
)
def test_a_bad_mixture_is_refused(mixture, message):
    with pytest.raises(ValueError, match=message):
        degrade(torch.rand(1, 3, 32, 32), 2, mixture)


def test_a_mixture_file_round_trips_and_names_its_bad_component(tmp_path):
    data = {"mixture": ["camera", {"camera_profile": {"blur_sigma": 0.8, "noise": 20, "jpeg_quality": 80}}],
            "weights": [1, 2]}
    mixture = load_degradation(_file(tmp_path, data))
    assert mixture == DegradationMixture((get_preset("camera"), camera_profile(0.8, 20, 80)), weights=(1, 2))
    assert load_degradation(save_degradation(mixture, tmp_path / "again.json")) == mixture
    for bad, message in [
        ({"mixture": ["camera", "nope"]}, "mixture[1]: unknown degradation preset 'nope'"),
        ({"mixture": ["camera", {"first": {"nois_range": [1, 2]}}]}, "mixture[1]: unknown field 'first.nois_range'"),
        ({"mixture": [{"mixture": ["camera"]}]}, "mixture[0]: a mixture cannot hold another mixture"),
        ({"mixture": []}, "mixture must be a non-empty list"),
        ({"mixture": ["camera"], "weights": [1, 2]}, "1 degradations"),
        ({"mixture": ["camera"], "preset": "mild"}, "a mixture has 'mixture' and 'weights' only, not 'preset'"),
    ]:
        path = _file(tmp_path, bad)
        with pytest.raises(ValueError, match="degradation file") as err:
            load_degradation(path)
        assert message in str(err.value), err.value


def test_several_specs_make_a_uniform_mixture(tmp_path):
    assert mixture_of(["camera"]) == get_preset("camera")
    assert mixture_of(["camera", "lowlight"]) == DegradationMixture((get_preset("camera"), get_preset("lowlight")))
    nested = save_degradation(mixture_of(["camera", "mild"]), tmp_path / "mix.json")
    with pytest.raises(ValueError, match="a mixture file cannot be one of several degradations"):
        mixture_of([nested, "camera"])
