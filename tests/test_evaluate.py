"""adaptsr.evaluate against pyiqa itself (the referee), and the missing-weights path."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyiqa
import pytest
import torch
from skimage import data as skdata

from adaptsr.evaluate import MissingWeightsError, create_metric, evaluate_pairs, format_table, write_results


def _photo_pairs(scale=2):
    """Two small real photos (HR) and degraded 8-bit 'SR' versions of them."""
    g = torch.Generator().manual_seed(0)
    pairs = {}
    for name in ("astronaut", "coffee"):
        hr = torch.from_numpy(getattr(skdata, name)()[:48, :60].astype(np.float32) / 255).permute(2, 0, 1)
        lr = torch.nn.functional.avg_pool2d(hr[None], scale)
        sr = torch.nn.functional.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
        sr = sr + 0.02 * torch.randn(sr.shape, generator=g)
        pairs[name] = ((sr.clamp(0, 1) * 255).round() / 255, hr[None])
    return pairs


def test_psnr_ssim_equal_pyiqa(tmp_path):
    scale = 2
    pairs = _photo_pairs(scale)
    result = evaluate_pairs(pairs, ["psnr", "ssim", "psnry"], scale)
    assert result["metrics"] == ["psnr", "ssim", "psnry"] and result["skipped"] == {}
    # The referee: pyiqa called directly, with the SR convention spelled out.
    psnr = pyiqa.create_metric("psnr", device="cpu", test_y_channel=True, color_space="ycbcr", crop_border=scale)
    ssim = pyiqa.create_metric("ssim", device="cpu", test_y_channel=True, color_space="ycbcr", crop_border=scale)
    psnry = pyiqa.create_metric("psnry", device="cpu")
    for row, (name, (sr, hr)) in zip(result["images"], pairs.items()):
        assert row["name"] == name
        assert row["psnr"] == pytest.approx(psnr(sr, hr).item(), abs=1e-6)
        assert row["ssim"] == pytest.approx(ssim(sr, hr).item(), abs=1e-7)
        assert row["psnry"] == pytest.approx(psnry(sr, hr).item(), abs=1e-6)
    for m in result["metrics"]:
        assert result["mean"][m] == pytest.approx(np.mean([r[m] for r in result["images"]]))
    # The convention matters: cropping and the colour space change the number.
    plain = pyiqa.create_metric("psnr", device="cpu")
    sr, hr = pairs["astronaut"]
    assert abs(plain(sr, hr).item() - result["images"][0]["psnr"]) > 0.01

    json_path, csv_path = write_results(result, tmp_path / "out")
    doc = json.loads(json_path.read_text())
    assert doc["mean"]["psnr"] == pytest.approx(result["mean"]["psnr"])
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["image", "psnr", "ssim", "psnry"] and rows[-1][0] == "mean" and len(rows) == 4
    assert float(rows[1][1]) == result["images"][0]["psnr"]
    table = format_table(result)
    assert "astronaut" in table and "mean" in table
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_model_and_dataset_path():
    class Bicubic(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)

    pairs = _photo_pairs()
    dataset = [(name, torch.nn.functional.avg_pool2d(hr, 2)[0], hr[0]) for name, (_, hr) in pairs.items()]
    result = evaluate_pairs(model=Bicubic(), dataset=dataset, metrics="psnr,ssim", scale=2)
    psnr = pyiqa.create_metric("psnr", device="cpu", test_y_channel=True, color_space="ycbcr", crop_border=2)
    for row, (_, lr, hr) in zip(result["images"], dataset):
        sr = (Bicubic()(lr[None]).clamp(0, 1) * 255).round() / 255  # the model's output as an 8-bit PNG
        assert row["psnr"] == pytest.approx(psnr(sr, hr[None]).item(), abs=1e-5)


def test_missing_weights_named_and_others_still_run(empty_hub):
    pairs = _photo_pairs()
    result = evaluate_pairs(pairs, ["psnr", "lpips"], 2, download=False)
    assert result["metrics"] == ["psnr"]
    assert result["mean"]["psnr"] > 20
    reason = result["skipped"]["lpips"]
    assert "'lpips'" in reason and ".pth" in reason and str(empty_hub) in reason
    assert "torch.hub.get_dir()/pyiqa" in reason
    assert "skipped lpips" in format_table(result)
    assert not any(empty_hub.rglob("*.pth"))  # nothing was downloaded


def test_failed_download_gives_the_same_message(empty_hub, monkeypatch):
    """With downloads on but no network, the failure is caught and names the file."""
    import torch.hub

    def offline(url, dst, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MissingWeightsError, match=r"needs the weight file .*network is unreachable"):
        create_metric("lpips", 2, download=True)
    assert torch.hub.download_url_to_file is offline  # the guard put things back


def test_downloads_off_means_no_network_at_all(empty_hub, tmp_path, monkeypatch):
    """A metric whose library downloads by itself (AHIQ's timm backbone, from the Hugging Face Hub) is refused
    without a single host lookup, and the message says where such files are cached."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    lookups = []

    def record(host, *args, **kwargs):
        lookups.append(host)
        raise OSError("test: the network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", record)
    with pytest.raises(MissingWeightsError, match=r"'ahiq' needs files from https://huggingface.co .*downloads are "
                                                  r"off.*HF_HOME"):
        create_metric("ahiq", 2, download=False)
    assert lookups == []
    assert socket.getaddrinfo is record  # the guard put things back


def test_a_metric_missing_pkg_resources_says_which_setuptools(monkeypatch):
    """CLIP-IQA's clip package imports pkg_resources, which setuptools 81 removed: the message gives the fix."""
    import builtins
    import sys

    real_import = builtins.__import__

    def without_pkg_resources(name, *args, **kwargs):
        if name == "pkg_resources" or name.startswith("pkg_resources."):
            raise ModuleNotFoundError("No module named 'pkg_resources'", name="pkg_resources")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_pkg_resources)
    for module in [m for m in sys.modules if m == "clip" or m.startswith(("clip.", "pkg_resources"))]:
        monkeypatch.delitem(sys.modules, module)
    result = evaluate_pairs(_photo_pairs(), ["psnr", "clipiqa"], 2, download=False)
    assert result["metrics"] == ["psnr"]
    assert "pip install 'setuptools<81'" in result["skipped"]["clipiqa"]


def test_images_without_hr_take_no_reference_metrics_only():
    import pyiqa

    alone = {name: (sr, None) for name, (sr, _) in _photo_pairs().items()}
    result = evaluate_pairs(alone, ["piqe"], 2)
    piqe = pyiqa.create_metric("piqe", device="cpu")
    for row, (sr, _) in zip(result["images"], alone.values()):
        assert row["piqe"] == pytest.approx(piqe(sr).item(), rel=1e-6)
    assert result["lower_better"] == {"piqe": True}
    with pytest.raises(ValueError, match="image 'astronaut' has no HR image, which psnr compare"):
        evaluate_pairs(alone, ["piqe", "psnr"], 2)


def test_bad_input():
    pairs = _photo_pairs()
    with pytest.raises(ValueError, match="unknown metric 'psnrr'.*psnr"):
        evaluate_pairs(pairs, ["psnrr"], 2)
    sr, hr = pairs["coffee"]
    with pytest.raises(ValueError, match="'x'.*SR result is 60x48 but the HR image is 40x30"):
        evaluate_pairs({"x": (sr, hr[..., :30, :40])}, ["psnr"], 2)
    # an HR image a pixel larger than the SR result is cropped to it (mod-crop)
    bigger = torch.nn.functional.pad(hr, (0, 1, 0, 1))
    a = evaluate_pairs({"x": (sr, bigger)}, ["psnr"], 2)["mean"]["psnr"]
    assert a == pytest.approx(evaluate_pairs({"x": (sr, hr)}, ["psnr"], 2)["mean"]["psnr"])
    with pytest.raises(ValueError, match="either pairs"):
        evaluate_pairs(metrics=["psnr"], scale=2)
    with pytest.raises(ValueError, match="self_ensemble applies to a model's upscaling"):
        evaluate_pairs(pairs, ["psnr"], 2, self_ensemble=True)
