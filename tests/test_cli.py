"""The command line end to end: adaptsr eval / upscale / merge through adaptsr.cli.main, one subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import adaptsr
from adaptsr.cli import build_parser, main
from adaptsr.data.images import read_image
from adaptsr.infer import upscale

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sr):
    """A tiny ESRGAN x2 checkpoint, an adapter trained 'for' it, a SwinIR checkpoint, LR/HR image folders."""
    root = tmp_path_factory.mktemp("cli")
    base = tiny_sr.esrgan()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    swin = tiny_sr.swinir(embed_dim=12, depths=[1], mlp_ratio=1.0)
    torch.save(swin.state_dict(), root / "swinir.pth")

    model = adaptsr.load_model(root / "base.safetensors")
    adaptsr.inject_lora(model, preset="esrgan", rank=2, init_lora_weights=False)
    adaptsr.save_adapter(model, root / "adapter")

    rng = np.random.default_rng(0)
    (root / "lr").mkdir()
    (root / "hr").mkdir()
    for name in ("a", "b"):
        hr = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
        Image.fromarray(hr).save(root / "hr" / f"{name}_HR.png")
        Image.fromarray(hr).resize((18, 20), Image.BICUBIC).save(root / "lr" / f"{name}_LR2.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_every_flag():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"demo", "eval", "upscale", "merge"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"adaptsr {name}: flag {action.option_strings or action.dest} has no help"


def test_python_m_adaptsr_help():
    proc = subprocess.run(
        [sys.executable, "-m", "adaptsr", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("eval", "upscale", "merge", "demo"):
        assert name in proc.stdout


def test_the_command_line_starts_without_torch():
    """`adaptsr --help`, `--version` and usage errors answer at once: the package loads torch, spandrel and the
    model code with the first public name a command uses, not at import."""
    code = ("import sys, adaptsr.cli; heavy = sorted({'torch', 'spandrel', 'pyiqa'} & set(sys.modules)); "
            "assert not heavy, heavy; adaptsr.cli.build_parser()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_every_public_name_and_submodule_loads_on_first_use():
    code = """
import sys, adaptsr
assert set(adaptsr.__all__) == set(adaptsr._EXPORTS), set(adaptsr.__all__) ^ set(adaptsr._EXPORTS)
for name in adaptsr.__all__:
    value = getattr(adaptsr, name)
    assert getattr(sys.modules[adaptsr._EXPORTS[name]], name) is value, name
from adaptsr import inject_lora, LoRAConv2d  # the from-import form
assert adaptsr.nn.LoRALinear is adaptsr.LoRALinear and adaptsr.autotune.enabled() in (True, False)
assert set(adaptsr.__all__) <= set(dir(adaptsr))
try:
    adaptsr.no_such_name
except AttributeError as err:
    assert "has no attribute 'no_such_name'" in str(err)
else:
    raise AssertionError("no AttributeError")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"adaptsr {adaptsr.__version__}"


def test_merge(files, capsys, tmp_path):
    for suffix in (".safetensors", ".pth"):
        out = tmp_path / f"merged{suffix}"
        code, _, err = _run(
            capsys, "merge", "--model", files / "base.safetensors", "--adapter", files / "adapter", "--out", out
        )
        assert code == 0, err
        merged = adaptsr.load_model(out)  # spandrel opens it as the original architecture
        assert merged.architecture.id == "ESRGAN" and merged.scale == 2
        assert not any(True for _ in adaptsr.lora_layers(merged.model))
        adapted = adaptsr.load_model(files / "base.safetensors")
        adaptsr.load_adapter(adapted, files / "adapter")
        x = torch.rand(1, 3, 12, 10)
        torch.testing.assert_close(upscale(merged, x), upscale(adapted, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_merge_in_16_bits(files, capsys, tmp_path, precision, dtype):
    """--precision stores the merged weights in 16 bits (merged in fp32 first); integer buffers keep their type."""
    from safetensors.torch import load_file

    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    # an adapter for the SwinIR checkpoint, so that the merge has something to fold in
    swin = adaptsr.load_model(files / "swinir.pth")
    adaptsr.inject_lora(swin, preset="swinir", rank=2, init_lora_weights=False)
    adaptsr.save_adapter(swin, tmp_path / "swin-adapter")
    for out, extra in ((full, []), (half, ["--precision", precision])):
        code, _, err = _run(capsys, "merge", "--model", files / "swinir.pth", "--adapter", tmp_path / "swin-adapter",
                            "--out", out, *extra)
        assert code == 0, err
    stored, reference = load_file(str(half)), load_file(str(full))
    assert stored.keys() == reference.keys()
    for key, tensor in stored.items():
        if reference[key].is_floating_point():
            assert tensor.dtype == dtype, key
            torch.testing.assert_close(tensor, reference[key].to(dtype), rtol=0, atol=0)  # fp32 merge, then cast
        else:
            assert torch.equal(tensor, reference[key]), key  # e.g. relative_position_index
    assert half.stat().st_size < 0.6 * full.stat().st_size
    merged = adaptsr.load_model(half)  # spandrel opens it as the original architecture
    assert merged.architecture.id == "SwinIR"


def test_upscale_file_and_folder(files, capsys, tmp_path):
    code, out, err = _run(
        capsys,
        "upscale",
        files / "lr",
        "--model",
        files / "base.safetensors",
        "--adapter",
        files / "adapter",
        "--out",
        tmp_path / "sr",
        "--tile",
        "8",
        "--overlap",
        "4",
    )
    assert code == 0, err
    assert "a_LR2.png -> " in out and "(36x40)" in out
    written = sorted(p.name for p in (tmp_path / "sr").iterdir())
    assert written == ["a_LR2.png", "b_LR2.png"]
    sr = read_image(tmp_path / "sr" / "a_LR2.png")
    assert sr.shape == (3, 40, 36)
    # the same as the library call with the same tiling (8-bit rounding apart)
    model = adaptsr.load_model(files / "base.safetensors")
    adaptsr.load_adapter(model, files / "adapter")
    expect = upscale(model, read_image(files / "lr" / "a_LR2.png")[None], tile=8, overlap=4)[0]
    assert (sr - expect).abs().max() <= 1 / 255 + 1e-4

    code, _, err = _run(
        capsys, "upscale", files / "lr" / "b_LR2.png", "--model", files / "swinir.pth", "--out", tmp_path / "swin"
    )
    assert code == 0, err
    assert [p.name for p in (tmp_path / "swin").iterdir()] == ["b_LR2.png"]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_upscale_in_16_bits(files, capsys, tmp_path, monkeypatch, precision, dtype):
    """--precision runs the merged model in 16 bits: the library's result with the model cast."""
    import adaptsr.infer

    ran_in = []

    def spy(model, *args, **kwargs):
        ran_in.append({p.dtype for p in model.model.parameters()})
        return upscale(model, *args, **kwargs)

    monkeypatch.setattr(adaptsr.infer, "upscale", spy)
    code, _, err = _run(capsys, "upscale", files / "lr" / "a_LR2.png", "--model", files / "base.safetensors",
                        "--adapter", files / "adapter", "--out", tmp_path / "sr", "--precision", precision)
    assert code == 0, err
    assert ran_in == [{dtype}]
    sr = read_image(tmp_path / "sr" / "a_LR2.png")
    model = adaptsr.load_model(files / "base.safetensors")
    adaptsr.load_adapter(model, files / "adapter")
    adaptsr.merge_lora(model)
    lr = read_image(files / "lr" / "a_LR2.png")[None]
    low = upscale(model.to(dtype), lr)[0]
    assert (sr - low).abs().max() <= 1 / 255 + 1e-4


def test_upscale_keeps_16_bit_depth(files, capsys, tmp_path):
    """A 16-bit input gives a 16-bit PNG holding the library's result to 1/65535; an 8-bit one stays 8-bit."""
    cv2 = pytest.importorskip("cv2")
    lr = read_image(files / "lr" / "a_LR2.png")
    rng = np.random.default_rng(0)  # low bits an 8-bit file cannot hold
    deep = ((lr * 255).round().numpy() * 257 + rng.integers(-100, 100, lr.shape)).clip(0, 65535).astype(np.uint16)
    (tmp_path / "in").mkdir()
    assert cv2.imwrite(str(tmp_path / "in" / "deep.png"), deep.transpose(1, 2, 0)[:, :, ::-1].copy())
    shutil.copy(files / "lr" / "a_LR2.png", tmp_path / "in" / "flat.png")
    code, out, err = _run(capsys, "upscale", tmp_path / "in", "--model", files / "base.safetensors",
                          "--out", tmp_path / "sr")
    assert code == 0, err
    assert "(36x40, 16-bit)" in out and out.count("16-bit") == 1
    written = cv2.imread(str(tmp_path / "sr" / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert written.dtype == np.uint16
    model = adaptsr.load_model(files / "base.safetensors")
    expect = upscale(model, torch.from_numpy(deep.astype(np.float32) / 65535)[None])[0].clamp(0, 1)
    got = torch.from_numpy(written[:, :, ::-1].astype(np.float32) / 65535).permute(2, 0, 1)
    assert (got - expect).abs().max() <= 0.5 / 65535 + 1e-6
    assert cv2.imread(str(tmp_path / "sr" / "flat.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint8


def test_upscale_keeps_transparency(files, capsys, tmp_path):
    """An RGBA input gives an RGBA output: the colour as for the RGB image, the alpha upscaled bicubically."""
    rgb = read_image(files / "lr" / "a_LR2.png")
    alpha = torch.linspace(0, 1, rgb.shape[1] * rgb.shape[2]).reshape(1, *rgb.shape[1:])
    rgba = (torch.cat([rgb, alpha]) * 255).round().byte().permute(1, 2, 0).numpy()
    (tmp_path / "in").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in" / "a.png")
    code, _, err = _run(capsys, "upscale", tmp_path / "in" / "a.png", "--model", files / "base.safetensors",
                        "--out", tmp_path / "sr")
    assert code == 0, err
    assert Image.open(tmp_path / "sr" / "a.png").mode == "RGBA"
    sr = read_image(tmp_path / "sr" / "a.png", alpha=True)
    model = adaptsr.load_model(files / "base.safetensors")
    expect_rgb = upscale(model, read_image(tmp_path / "in" / "a.png")[None])[0]
    expect_alpha = torch.nn.functional.interpolate(read_image(tmp_path / "in" / "a.png", alpha=True)[None, 3:],
                                                   scale_factor=2, mode="bicubic").clamp(0, 1)[0]
    assert sr.shape == (4, 40, 36)
    assert (sr[:3] - expect_rgb).abs().max() <= 1 / 255 + 1e-4
    assert (sr[3:] - expect_alpha).abs().max() <= 1 / 255 + 1e-4


def test_upscale_keeps_grey_inputs_grey(files, capsys, tmp_path):
    """Grey inputs (8-bit, 16-bit, grey + alpha) come out grey: the luma of the model's RGB output, as Pillow
    converts RGB to grey; a colour input in the same folder stays RGB."""
    cv2 = pytest.importorskip("cv2")
    grey = read_image(files / "lr" / "a_LR2.png").mean(0)  # a grey image with the test picture's structure
    levels8 = (grey * 255).round().byte().numpy()
    (tmp_path / "in").mkdir()
    Image.fromarray(levels8, "L").save(tmp_path / "in" / "g8.png")
    assert cv2.imwrite(str(tmp_path / "in" / "g16.png"), levels8.astype(np.uint16) * 257 + 77)
    alpha = np.linspace(0, 255, levels8.size).reshape(levels8.shape).round().astype(np.uint8)
    Image.fromarray(np.stack([levels8, alpha], -1), "LA").save(tmp_path / "in" / "ga.png")
    shutil.copy(files / "lr" / "b_LR2.png", tmp_path / "in" / "colour.png")
    code, out, err = _run(capsys, "upscale", tmp_path / "in", "--model", files / "base.safetensors",
                          "--out", tmp_path / "sr")
    assert code == 0, err
    assert out.count(", grey") == 3 and "(36x40, grey, 16-bit)" in out
    modes = {name: Image.open(tmp_path / "sr" / f"{name}.png").mode for name in ("g8", "g16", "ga", "colour")}
    assert modes["g8"] == "L" and modes["ga"] == "LA" and modes["colour"] == "RGB"
    assert modes["g16"].startswith("I")  # Pillow's modes for 16-bit grey
    model = adaptsr.load_model(files / "base.safetensors")
    for name in ("g8", "ga"):
        rgb = upscale(model, read_image(tmp_path / "in" / f"{name}.png")[None])[0].clamp(0, 1)
        rgb8 = (rgb * 255).round().byte().permute(1, 2, 0).numpy()
        expect = np.asarray(Image.fromarray(rgb8, "RGB").convert("L"), dtype=np.int32)
        got = np.asarray(Image.open(tmp_path / "sr" / f"{name}.png").getchannel(0), dtype=np.int32)
        assert np.abs(got - expect).max() <= 1, name
    written16 = cv2.imread(str(tmp_path / "sr" / "g16.png"), cv2.IMREAD_UNCHANGED)
    assert written16.dtype == np.uint16 and written16.ndim == 2
    rgb = upscale(model, read_image(tmp_path / "in" / "g16.png")[None])[0].clamp(0, 1)
    expect16 = cv2.cvtColor(rgb.permute(1, 2, 0).numpy(), cv2.COLOR_RGB2GRAY)
    assert np.abs(written16 / 65535 - expect16).max() <= 1 / 65535 + 1e-6


def test_upscale_reports_what_it_wrote_before_a_failure(files, capsys, tmp_path):
    """PNGs are written in the background while the next image upscales: a later image's failure still leaves
    (and reports) the earlier results, and a failed write is the command's error."""
    (tmp_path / "in").mkdir()
    shutil.copy(files / "lr" / "a_LR2.png", tmp_path / "in" / "a.png")
    data = (files / "lr" / "b_LR2.png").read_bytes()
    (tmp_path / "in" / "b.png").write_bytes(data[: len(data) // 2])  # its header reads, its pixels do not
    code, out, err = _run(capsys, "upscale", tmp_path / "in", "--model", files / "base.safetensors",
                          "--out", tmp_path / "sr")
    assert code == 1 and "b.png" in err and "truncated" in err
    assert "a.png -> " in out and read_image(tmp_path / "sr" / "a.png").shape == (3, 40, 36)
    assert sorted(p.name for p in (tmp_path / "sr").iterdir()) == ["a.png"]

    (tmp_path / "in" / "b.png").unlink()
    shutil.copy(files / "lr" / "b_LR2.png", tmp_path / "in" / "c.png")
    (tmp_path / "sr" / "c.png").mkdir()  # a folder where the second result goes: its write fails
    code, out, err = _run(capsys, "upscale", tmp_path / "in", "--model", files / "base.safetensors",
                          "--out", tmp_path / "sr")
    assert code == 1 and "c.png" in err
    assert "a.png -> " in out and "c.png -> " not in out


def test_eval_pairs(files, capsys, tmp_path):
    code, out, err = _run(
        capsys,
        "eval",
        "--model",
        files / "base.safetensors",
        "--pairs",
        files / "lr",
        files / "hr",
        "--metrics",
        "psnr,ssim",
        "--out",
        tmp_path / "ev",
    )
    assert code == 0, err
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert [r["name"] for r in doc["images"]] == ["a_LR2", "b_LR2"] and doc["scale"] == 2
    assert "mean" in out and "psnr" in out
    assert (tmp_path / "ev" / "metrics.csv").read_text().splitlines()[0] == "image,psnr,ssim"
    # --tile 0 means whole images, as for upscale; tiles give nearly the same scores
    for tile, folder in (("0", "whole"), ("8", "tiled")):
        args = ["eval", "--model", files / "base.safetensors", "--pairs", files / "lr", files / "hr",
                "--metrics", "psnr", "--out", tmp_path / folder, "--tile", tile, "--overlap", "4"]
        code, _, err = _run(capsys, *args)
        assert code == 0, err
    scores = [json.loads((tmp_path / f / "metrics.json").read_text())["images"][0]["psnr"] for f in ("whole", "tiled")]
    assert scores[0] == pytest.approx(doc["images"][0]["psnr"]) and scores[1] == pytest.approx(scores[0], abs=0.5)


def test_eval_lr_images_alone_with_no_reference_metrics(files, capsys, tmp_path):
    """A camera's photos have no HR images: --lr scores the SR results with no-reference metrics (PIQE runs
    offline), by default NIQE, MUSIQ and PIQE, and refuses full-reference ones."""
    import pyiqa

    code, out, err = _run(capsys, "eval", "--model", files / "base.safetensors", "--lr", files / "lr", "--offline",
                          "--out", tmp_path / "ev")
    assert code == 0, err
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert doc["metrics"] == ["piqe"] and set(doc["skipped"]) == {"niqe", "musiq"}  # their weights: not here
    model = adaptsr.load_model(files / "base.safetensors")
    piqe = pyiqa.create_metric("piqe", device="cpu")
    for row, name in zip(doc["images"], ("a_LR2", "b_LR2")):
        sr = upscale(model, read_image(files / "lr" / f"{name}.png")[None])
        assert row["name"] == name
        assert row["piqe"] == pytest.approx(piqe((sr * 255).round() / 255).item(), rel=1e-5)

    code, _, err = _run(capsys, "eval", "--model", files / "base.safetensors", "--lr", files / "lr", "--metrics",
                        "piqe,psnr,lpips", "--out", tmp_path / "bad")
    assert code == 1 and "--lr: psnr, lpips compare with HR images" in err
    assert not (tmp_path / "bad").exists()


def test_eval_missing_weights_still_reports_psnr(files, capsys, tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        code, out, err = _run(
            capsys,
            "eval",
            "--model",
            files / "base.safetensors",
            "--pairs",
            files / "lr",
            files / "hr",
            "--metrics",
            "psnr,lpips",
            "--offline",
            "--out",
            tmp_path / "ev",
        )
    finally:
        torch.hub.set_dir(old)
    assert code == 0, err
    assert "skipped lpips" in out and str(tmp_path / "hub") in out
    assert "lpips was skipped" in err
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert doc["metrics"] == ["psnr"] and "lpips" in doc["skipped"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["merge", "--model", "{f}/nope.pth", "--adapter", "{f}/adapter", "--out", "{t}/m.pth"], "does not exist"),
        (["merge", "--model", "{f}/swinir.pth", "--adapter", "{f}/adapter", "--out", "{t}/m.pth"], "does not fit"),
        (
            ["merge", "--model", "{f}/base.safetensors", "--adapter", "{f}/adapter", "--out", "{t}/m.onnx"],
            ".safetensors or .pth",
        ),
        (["upscale", "{f}/broken.png", "--model", "{f}/base.safetensors", "--out", "{t}/o"], "broken.png"),
        (["upscale", "{f}/missing.png", "--model", "{f}/base.safetensors", "--out", "{t}/o"], "does not exist"),
        (
            ["upscale", "{f}/lr", "--model", "{f}/swinir.pth", "--out", "{t}/o", "--precision", "fp16"],
            "does not run in fp16: spandrel marks it unsupported; use --precision fp32 or bf16",
        ),
        (
            [
                "eval",
                "--model",
                "{f}/base.safetensors",
                "--pairs",
                "{f}/lr",
                "{f}/hr",
                "--metrics",
                "psnr,lpipz",
                "--out",
                "{t}/o",
            ],
            "unknown metric 'lpipz'",
        ),
        (["eval", "--model", "{f}/base.safetensors", "--pairs", "{f}/lr", "{f}/nohr", "--out", "{t}/o"], "HR folder"),
        (
            [
                "eval",
                "--model",
                "{f}/base.safetensors",
                "--pairs",
                "{f}/hr",
                "{f}/lr",
                "--out",
                "{t}/o",
                "--metrics",
                "psnr",
            ],
            "SR result is 72x80",
        ),
    ],
)
def test_bad_input_one_line_no_output(files, capsys, tmp_path, argv, message):
    argv = [a.format(f=files, t=tmp_path) for a in argv]
    code, _, err = _run(capsys, *argv)
    assert code == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"adaptsr {argv[0]}: error: ")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_eval_hr_with_degradation(files, capsys, tmp_path):
    """HR images degraded once with a preset; the cached LR images make a second run identical."""
    pytest.importorskip("adaptsr.data.degradations")
    argv = ["eval", "--model", files / "base.safetensors", "--hr", files / "hr", "--degradation", "camera",
            "--seed", "3", "--out", tmp_path / "o"]  # fmt: skip
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    first = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert [r["name"] for r in first["images"]] == ["a_HR", "b_HR"]
    assert len(list((tmp_path / "o" / "lr-cache").glob("*.png"))) == 2
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["mean"] == first["mean"]

    code, _, err = _run(capsys, *argv[:-2], "--out", tmp_path / "p", "--degradation", "nosuch")
    assert code == 1 and "degradation 'nosuch' is neither a preset" in err


def test_eval_hr_needs_a_degradation(files, capsys, tmp_path):
    code, _, err = _run(capsys, "eval", "--model", files / "base.safetensors", "--hr", files / "hr",
                        "--out", tmp_path / "o")  # fmt: skip
    assert code == 1 and "--hr needs --degradation" in err
    assert not (tmp_path / "o").exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", "x.pth"])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


def test_tile_takes_a_size_or_auto(capsys):
    from adaptsr.cli import build_parser

    parser = build_parser()
    common = ["--model", "m.pth", "--out", "o"]
    assert parser.parse_args(["upscale", "in.png", *common]).tile == "auto"  # the default
    assert parser.parse_args(["upscale", "in.png", *common, "--tile", "0"]).tile == 0
    assert parser.parse_args(["eval", "--pairs", "a", "b", *common, "--tile", "256"]).tile == 256
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["upscale", "in.png", *common, "--tile", "half"])
    assert exc.value.code == 2 and "'half' is neither a number of pixels" in capsys.readouterr().err


def test_outputs_never_replace_the_inputs(files, capsys, tmp_path):
    """merge --out onto its --model, upscale --out onto (a link to) the input folder: refused, inputs intact."""
    base = tmp_path / "base.safetensors"
    shutil.copy(files / "base.safetensors", base)
    before = base.read_bytes()
    code, _, err = _run(capsys, "merge", "--model", base, "--adapter", files / "adapter", "--out", base)
    assert code == 1 and "is the --model checkpoint" in err and base.read_bytes() == before

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(files / "lr" / "a_LR2.png", photos / "a.png")
    shutil.copy(files / "lr" / "b_LR2.png", photos / "b.jpg")  # writes b.png: no input of that name
    (tmp_path / "link").symlink_to(photos)
    originals = {p.name: p.read_bytes() for p in photos.iterdir()}
    for out in (photos, tmp_path / "link"):
        code, _, err = _run(capsys, "upscale", photos, "--model", base, "--out", out)
        assert code == 1 and "would overwrite the input" in err and "a.png" in err
        assert {p.name: p.read_bytes() for p in photos.iterdir()} == originals
    code, _, err = _run(capsys, "upscale", photos / "b.jpg", "--model", base, "--out", photos)
    assert code == 0, err
    assert (photos / "b.png").exists() and (photos / "b.jpg").read_bytes() == originals["b.jpg"]


def test_upscale_to_jpeg_and_webp(files, capsys, tmp_path):
    """--format jpg: RGB and grey inputs as JPEG at --quality, a transparent one as PNG (JPEG has no alpha);
    --format webp keeps the alpha. Each within the codec's loss of the library's result."""
    (tmp_path / "in").mkdir()
    shutil.copy(files / "lr" / "a_LR2.png", tmp_path / "in" / "colour.png")
    rgb = read_image(files / "lr" / "b_LR2.png")
    Image.fromarray((rgb.mean(0) * 255).round().byte().numpy(), "L").save(tmp_path / "in" / "grey.png")
    alpha = torch.full((1, *rgb.shape[1:]), 0.5)
    Image.fromarray((torch.cat([rgb, alpha]) * 255).round().byte().permute(1, 2, 0).numpy(), "RGBA").save(
        tmp_path / "in" / "clear.png")
    code, out, err = _run(capsys, "upscale", tmp_path / "in", "--model", files / "base.safetensors",
                          "--out", tmp_path / "jpg", "--format", "jpg", "--quality", "90")
    assert code == 0, err
    written = {p.name: Image.open(p) for p in (tmp_path / "jpg").iterdir()}
    assert {name: im.format for name, im in written.items()} == {"colour.jpg": "JPEG", "grey.jpg": "JPEG",
                                                                  "clear.png": "PNG"}
    assert written["grey.jpg"].mode == "L" and written["clear.png"].mode == "RGBA" and "clear.png" in out
    model = adaptsr.load_model(files / "base.safetensors")
    expect = upscale(model, read_image(tmp_path / "in" / "colour.png")[None])[0]
    assert (read_image(tmp_path / "jpg" / "colour.jpg") - expect).abs().mean() < 4 / 255

    code, _, err = _run(capsys, "upscale", tmp_path / "in" / "clear.png", "--model", files / "base.safetensors",
                        "--out", tmp_path / "webp", "--format", "webp", "--quality", "100")
    assert code == 0, err
    lossless = read_image(tmp_path / "webp" / "clear.webp", alpha=True)
    assert lossless.shape[0] == 4
    assert (lossless[:3] - upscale(model, rgb[None])[0]).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(SystemExit):
        _run(capsys, "upscale", tmp_path / "in", "--model", files / "base.safetensors", "--out", tmp_path / "q",
             "--format", "jpg", "--quality", "0")
    assert "0 is not in 1-100" in capsys.readouterr().err


def test_self_ensemble_in_upscale_and_eval(files, capsys, tmp_path):
    """--self-ensemble: upscale writes the library's self-ensembled image; eval scores it and says so."""
    code, _, err = _run(capsys, "upscale", files / "lr" / "a_LR2.png", "--model", files / "base.safetensors",
                        "--out", tmp_path / "sr", "--self-ensemble")
    assert code == 0, err
    model = adaptsr.load_model(files / "base.safetensors")
    image = read_image(files / "lr" / "a_LR2.png")[None]
    expect = upscale(model, image, self_ensemble=True)[0]
    written = read_image(tmp_path / "sr" / "a_LR2.png")
    assert (written - expect).abs().max() <= 1 / 255 + 1e-4
    assert (written - upscale(model, image)[0]).abs().max() > 2 / 255  # not the plain upscaling

    docs = {}
    for name, extra in (("plain", []), ("plus", ["--self-ensemble"])):
        code, out, err = _run(capsys, "eval", "--model", files / "base.safetensors", "--pairs", files / "lr",
                              files / "hr", "--metrics", "psnr", "--out", tmp_path / name, *extra)
        assert code == 0, err
        assert ("self-ensemble" in out) == bool(extra)
        docs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert docs["plain"]["self_ensemble"] is False and docs["plus"]["self_ensemble"] is True
    assert docs["plus"]["mean"]["psnr"] != docs["plain"]["mean"]["psnr"]


def test_upscale_outscale_resizes_the_models_result(files, capsys, tmp_path):
    """--outscale S: the x2 model's result resized to S times the input, as Pillow's bicubic resizes it (which
    averages when it shrinks); a transparent image's alpha follows to that size."""
    model = adaptsr.load_model(files / "base.safetensors")
    lr = read_image(files / "lr" / "a_LR2.png")  # 20 rows of 18, so x2 is 40 x 36
    result = upscale(model, lr[None])[0]
    as_8_bit = Image.fromarray((result * 255).round().byte().permute(1, 2, 0).numpy())
    for outscale, size in (("1.5", (30, 27)), ("3", (60, 54))):  # rows, columns
        out = tmp_path / outscale
        code, printed, err = _run(capsys, "upscale", files / "lr" / "a_LR2.png", "--model", files / "base.safetensors",
                                  "--out", out, "--outscale", outscale)
        assert code == 0, err
        assert f"({size[1]}x{size[0]})" in printed
        written = np.asarray(Image.open(out / "a_LR2.png"), dtype=np.float64)
        pillow = np.asarray(as_8_bit.resize(size[::-1], Image.BICUBIC), dtype=np.float64)
        assert written.shape == (*size, 3)
        assert np.abs(written - pillow).mean() < 0.5 and np.abs(written - pillow).max() <= 3
    # no resize at the model's own scale: the plain result
    code, _, err = _run(capsys, "upscale", files / "lr" / "a_LR2.png", "--model", files / "base.safetensors",
                        "--out", tmp_path / "same", "--outscale", "2")
    assert code == 0, err
    assert (read_image(tmp_path / "same" / "a_LR2.png") - result).abs().max() <= 1 / 255 + 1e-4

    rgba = np.concatenate([np.asarray(as_8_bit.resize((18, 20))), np.full((20, 18, 1), 128, np.uint8)], axis=2)
    (tmp_path / "in").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in" / "t.png")
    code, _, err = _run(capsys, "upscale", tmp_path / "in" / "t.png", "--model", files / "base.safetensors",
                        "--out", tmp_path / "rgba", "--outscale", "1.5")
    assert code == 0, err
    assert read_image(tmp_path / "rgba" / "t.png", alpha=True).shape == (4, 30, 27)
    for bad in ("0", "-1", "nan", "x", "17"):
        with pytest.raises(SystemExit) as exit_info:
            main(["upscale", str(files / "lr"), "--model", str(files / "base.safetensors"), "--out", str(tmp_path),
                  "--outscale", bad])
        assert exit_info.value.code == 2
        assert "is not a scale in (0, 16]" in capsys.readouterr().err


def test_degrade_writes_the_lr_images_eval_scores(files, capsys, tmp_path):
    """`degrade` writes the LR images `eval --hr` makes of the same folder, degradation, scale and seed, bit for bit,
    so `eval --pairs` on them gives the same scores; another seed draws other images."""
    code, printed, err = _run(capsys, "degrade", files / "hr", "--degradation", "camera", "--scale", "2",
                              "--out", tmp_path / "lr")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "lr").iterdir()) == ["a_HR.png", "b_HR.png"]
    assert "(18x20)" in printed and f"--pairs {tmp_path / 'lr'} {files / 'hr'}" in printed
    code, _, err = _run(capsys, "eval", "--model", files / "base.safetensors", "--hr", files / "hr", "--degradation",
                        "camera", "--metrics", "psnr", "--out", tmp_path / "by-hr")
    assert code == 0, err
    for name in ("a_HR", "b_HR"):
        (cached,) = (tmp_path / "by-hr" / "lr-cache").glob(f"{name}.*.png")
        assert np.array_equal(np.asarray(Image.open(cached)), np.asarray(Image.open(tmp_path / "lr" / f"{name}.png")))
    code, _, err = _run(capsys, "eval", "--model", files / "base.safetensors", "--pairs", tmp_path / "lr", files / "hr",
                        "--metrics", "psnr", "--out", tmp_path / "by-pairs")
    assert code == 0, err
    scores = [json.loads((tmp_path / folder / "metrics.json").read_text())["images"] for folder in ("by-hr", "by-pairs")]
    assert scores[0] == scores[1]
    code, _, err = _run(capsys, "degrade", files / "hr", "--degradation", "camera", "--scale", "2", "--seed", "1",
                        "--out", tmp_path / "other")
    assert code == 0, err
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "other" / "a_HR.png")),
                              np.asarray(Image.open(tmp_path / "lr" / "a_HR.png")))


def test_degrade_refusals(files, capsys, tmp_path):
    for argv, message in (
        (["--degradation", "camera", "--out", files / "hr"], "is the HR folder"),
        (["--degradation", "cameraa", "--out", tmp_path / "lr"], "cameraa"),
    ):
        code, _, err = _run(capsys, "degrade", files / "hr", *argv)
        assert code == 1 and message in err, err
    assert not (tmp_path / "lr").exists()
    assert sorted(p.name for p in (files / "hr").iterdir()) == ["a_HR.png", "b_HR.png"]


def test_inputs_that_would_write_one_file_are_refused(files, capsys, tmp_path):
    """a.png and a.jpg would both write a.png: upscale and degrade refuse before writing anything."""
    (tmp_path / "in").mkdir()
    image = Image.open(files / "lr" / "a_LR2.png")
    image.save(tmp_path / "in" / "a.png")
    image.save(tmp_path / "in" / "a.jpg")
    for argv, message in ((["upscale", tmp_path / "in", "--model", files / "base.safetensors"],
                           "several inputs would write a.png; rename them"),
                          (["degrade", tmp_path / "in", "--degradation", "camera", "--scale", "2"],
                           "several HR images would write a.png; rename them")):
        code, _, err = _run(capsys, *argv, "--out", tmp_path / "out")
        assert code == 1 and message in err, err
        assert not (tmp_path / "out").exists()
