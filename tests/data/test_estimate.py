"""Estimating a camera profile from LR images: the JPEG quality read from the tables, the wavelet noise estimate,
and the calibrated noise on held-out photos with known degradations; `adaptsr estimate` end to end."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from adaptsr.cli import main
from adaptsr.data import camera_profile, degrade, load_degradation
from adaptsr.data.bundled import HELD_OUT, load_photo
from adaptsr.data.estimate import _ijg_table, estimate_camera_profile, jpeg_settings, measured_noise


def _save_jpeg(array: np.ndarray, path, quality: int, subsampling: str = "4:2:0"):
    Image.fromarray(array).save(path, "JPEG", quality=quality, subsampling=subsampling)
    return path


@pytest.mark.parametrize("quality", [1, 5, 20, 49, 50, 51, 60, 75, 90, 95, 99, 100])
def test_the_quality_comes_back_from_the_tables(tmp_path, quality):
    rng = np.random.default_rng(quality)
    path = _save_jpeg(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), tmp_path / "x.jpg", quality)
    settings = jpeg_settings(path)
    found = settings.quality
    assert settings.ijg_exact and settings.subsampling == "4:2:0"
    with Image.open(path) as img:  # where two qualities share a table, either is the file's
        assert np.array_equal(_ijg_table(found), np.asarray(img.quantization[0]))
    assert found == quality or np.array_equal(_ijg_table(found), _ijg_table(quality))


def test_no_tables_no_settings_and_foreign_tables_the_nearest(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    assert jpeg_settings(tmp_path / "x.png") is None
    own_table = [min(255, v + 3) for v in _ijg_table(70)]  # a camera's own table, close to IJG's 70
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG", qtables=[own_table, own_table], subsampling="4:2:2")
    (tmp_path / "cam.jpg").write_bytes(buffer.getvalue())
    settings = jpeg_settings(tmp_path / "cam.jpg")
    assert not settings.ijg_exact and 60 <= settings.quality <= 70 and settings.subsampling == "4:2:2"


def test_measured_noise_is_in_8_bit_levels():
    noise = torch.randn(3, 128, 128, generator=torch.Generator().manual_seed(0)) * 10 / 255
    assert measured_noise((0.5 + noise).clamp(0, 1)) == pytest.approx(10, rel=0.05)
    assert measured_noise(torch.full((3, 64, 64), 0.5)) == pytest.approx(0, abs=1e-6)


def _camera_shots(folder, sigma: float, quality: int | None, subsampling: str = "4:2:0", seed: int = 7,
                  scale: int = 4):
    """The held-out photos (never in the calibration) as a camera takes them: blurred (1.2) and downscaled by
    ``scale``, noise of ``sigma`` added, written as JPEG files at ``quality`` (PNG files for None)."""
    clean = camera_profile(1.2, 0.0, 100)
    clean.first.jpeg_prob = 0.0
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for name in HELD_OUT:
        hr = load_photo(name)
        side = min(hr.shape[1:]) // scale * scale
        lr = degrade(hr[None, :, :side, :side], scale, clean, generator=1)[0]
        lr = (lr + sigma / 255 * torch.randn(lr.shape, generator=generator)).clamp(0, 1)
        array = (lr * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        if quality is None:
            Image.fromarray(array).save(folder / f"{name}.png")
            paths.append(folder / f"{name}.png")
        else:
            paths.append(_save_jpeg(array, folder / f"{name}.jpg", quality, subsampling))
    return paths


@pytest.mark.parametrize(("sigma", "quality", "subsampling"),
                         [(10, 60, "4:2:0"), (25, 50, "4:2:0"), (15, 90, "4:2:0"), (20, 75, "4:4:4")])
def test_the_calibrated_noise_is_close(tmp_path, sigma, quality, subsampling):
    """Measured when written (2026-12-06, 3 noise seeds each, qualities 50 / 75 / 90, both subsamplings): worst
    errors of 2.5 levels for noise 10 to 40, 0.7 for PNG shots; at noise 5 and below it reads high (up to 3.5 at 5,
    7 at 0 under strong JPEG), where JPEG leaves little noise and image texture dominates the measure."""
    estimate = estimate_camera_profile(_camera_shots(tmp_path, sigma, quality, subsampling))
    assert estimate.jpeg_quality == quality
    assert estimate.noise == pytest.approx(sigma, abs=2.5)
    assert [image["name"] for image in estimate.images] == [f"{name}.jpg" for name in HELD_OUT]
    assert all(image["ijg_exact"] and image["subsampling"] == subsampling for image in estimate.images)


@pytest.mark.parametrize(("sigma", "quality", "scale"), [(10, 60, 2), (25, 90, 2), (10, 50, 3), (40, None, 3)])
def test_the_calibration_follows_the_models_scale(tmp_path, sigma, quality, scale):
    """An x2 or x3 LR keeps less texture than an x4 one, which the wavelet estimate would read as noise: shots at
    x2 with noise 10 under JPEG 60 read 0 through the x4 calibration. Measured when written (2026-12-06, noise 5
    to 40, no JPEG and qualities 50 / 60 / 90): worst errors 1.9 levels at noise 10 and above, 2.9 at 5."""
    estimate = estimate_camera_profile(_camera_shots(tmp_path, sigma, quality, scale=scale), scale=scale)
    assert estimate.scale == scale and estimate.noise == pytest.approx(sigma, abs=2.5)


def test_png_shots_count_as_uncompressed(tmp_path):
    estimate = estimate_camera_profile(_camera_shots(tmp_path, 10, None))
    assert estimate.jpeg_quality == 100 and estimate.noise == pytest.approx(10, abs=1.0)
    assert all(image["jpeg_quality"] is None for image in estimate.images)


def test_estimate_errors(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        estimate_camera_profile([])
    with pytest.raises(ValueError, match="blur_sigma must be a positive number"):
        estimate_camera_profile([tmp_path / "x.jpg"], blur_sigma=0)
    with pytest.raises(ValueError, match="scale must be .* from 1 to 8, got 2.0"):
        estimate_camera_profile([tmp_path / "x.jpg"], scale=2.0)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        estimate_camera_profile([tmp_path / "broken.jpg"])


def test_estimate_command_writes_a_degradation_file(tmp_path, capsys):
    shots = tmp_path / "shots"
    shots.mkdir()
    _camera_shots(shots, 25, 60)
    assert main(["estimate", str(shots), "--out", str(tmp_path / "cam.json"), "--blur-sigma", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "astronaut.jpg" in out and "JPEG quality 60" in out and "blur sigma 0.9 (given, not measured)" in out
    data = json.loads((tmp_path / "cam.json").read_text())
    assert set(data) == {"camera_profile"} and data["camera_profile"]["jpeg_quality"] == 60
    assert data["camera_profile"]["noise"] == pytest.approx(25, abs=2.5)
    assert load_degradation(tmp_path / "cam.json") == camera_profile(0.9, data["camera_profile"]["noise"], 60)
    assert "calibrated at x4" in out
    x2 = tmp_path / "x2"
    x2.mkdir()
    _camera_shots(x2, 10, 60, scale=2)
    assert main(["estimate", str(x2), "--out", str(tmp_path / "x2.json"), "--scale", "2"]) == 0
    assert "calibrated at x2" in capsys.readouterr().out
    assert json.loads((tmp_path / "x2.json").read_text())["camera_profile"]["noise"] == pytest.approx(10, abs=2.5)
    (tmp_path / "empty").mkdir()
    assert main(["estimate", str(tmp_path / "empty"), "--out", str(tmp_path / "x.json")]) == 1
    assert "holds no image file" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
