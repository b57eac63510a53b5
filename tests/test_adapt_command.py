"""`adaptsr adapt` end to end on tiny real images, and its errors."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from PIL import Image

import adaptsr
from adaptsr.cli import main


@pytest.fixture
def setup(tmp_path, photo_run_inputs):
    return tmp_path, *photo_run_inputs(names=("astronaut", "coffee", "chelsea"))


def _args(checkpoint, hr_dir, run_dir, *extra, degradation="camera"):
    return [
        "adapt", "--model", str(checkpoint), "--hr", str(hr_dir), "--degradation", str(degradation), "--out", str(run_dir),
        "--steps", "4", "--batch-size", "2", "--patch", "16", "--checkpoint-every", "2", "--rank", "4",
        "--lr", "1e-3", "--warmup-steps", "1", "--device", "cpu", *extra,
    ]


def test_adapt_writes_a_run_folder(setup, capsys):
    tmp_path, hr_dir, checkpoint = setup
    run_dir = tmp_path / "run"
    assert main(_args(checkpoint, hr_dir, run_dir, "--val-hr", str(hr_dir))) == 0
    assert "LoRA on" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["loss"]) == 4 and len(metrics["val"]) == 1
    assert set(metrics["val"][0]) == {"step", "psnr", "ssim"}
    for picture in ("curves.png", "comparison.png"):
        assert Image.open(run_dir / picture).size[0] > 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["steps"] == 4 and config["val_tile"] == 0 and config["num_workers"] is None
    # the adapter fits the base it was trained on, and the merged model is that base + adapter
    base = adaptsr.load_model(checkpoint)
    adaptsr.load_adapter(base, run_dir / "adapter")
    merged = adaptsr.load_model(run_dir / "model_merged.safetensors")
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x), base.model(x), rtol=1e-5, atol=1e-5)
    # resume to a longer schedule continues from the checkpoint, its batches from 2 workers in micro-batches;
    # --val-tile, --workers and --micro-batch reach the run's config
    assert main(_args(checkpoint, hr_dir, run_dir, "--resume", "--steps", "6", "--val-hr", str(hr_dir),
                      "--val-tile", "16", "--workers", "2", "--micro-batch", "1")) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["val_tile"] == 16 and config["num_workers"] == 2 and config["micro_batch"] == 1
    assert len(json.loads((run_dir / "metrics.json").read_text())["val"]) == 2


def test_adapt_says_how_long_it_waited_for_batches(setup, capsys, monkeypatch):
    """The summary gives the time spent making batches: here a dataset whose crops take 50 ms each."""
    import re
    import time

    from adaptsr.data.datasets import HRFolderDataset

    tmp_path, hr_dir, checkpoint = setup
    item = HRFolderDataset.__getitem__

    def slow_item(self, index):
        time.sleep(0.05)
        return item(self, index)

    monkeypatch.setattr(HRFolderDataset, "__getitem__", slow_item)
    assert main(_args(checkpoint, hr_dir, tmp_path / "slow")) == 0  # 4 steps of 2 crops: 0.4 s at least
    out = capsys.readouterr().out
    total, waited = map(int, re.search(r"adapted in (\d+) s \((\d+) s of it making batches\)", out).groups())
    metrics = json.loads((tmp_path / "slow" / "metrics.json").read_text())
    assert 0.4 <= metrics["data_seconds"] <= metrics["train_seconds"]
    assert (total, waited) == (round(metrics["train_seconds"]), round(metrics["data_seconds"]))
    assert "more --workers" not in out  # on the CPU, making batches is the same cores' work


def test_adapt_prints_what_autotuning_chose(setup, capsys, monkeypatch):
    """ADAPTSR_AUTOTUNE=1: the summary ends with the backends auto's trials chose (a set clock decides them, for
    torch: interpreted Triton would make the run take minutes)."""
    from adaptsr import autotune

    if len(autotune.candidates(torch.device("cpu"), None)) < 2:
        pytest.skip("a race on the CPU needs triton's interpreter (TRITON_INTERPRET=1, set without a GPU)")
    tmp_path, hr_dir, checkpoint = setup
    monkeypatch.setenv("ADAPTSR_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_switch", None)
    monkeypatch.setattr(autotune, "_median_ms", lambda run, backend, device: {"torch": 1.0, "triton": 2.0}[backend])
    autotune.reset()
    try:
        assert main(_args(checkpoint, hr_dir, tmp_path / "tuned", "--steps", "1")) == 0
    finally:
        autotune.reset()
    records = json.loads((tmp_path / "tuned" / "metrics.json").read_text())["autotune"]
    n = len(records)
    assert n and all(r["op"] == "lora_conv2d" and r["choice"] == "torch" for r in records)
    summary = f"autotune: lora_conv2d: torch {n} of {n} signature{'s' * (n > 1)}"
    *_, choices, cost = capsys.readouterr().out.rstrip().splitlines()
    assert choices == summary and re.fullmatch(r"autotune: the trials took \d+\.\d\d s", cost)


def test_the_merged_model_keeps_the_base_files_format_and_layout(setup, capsys, new_arch_rrdb):
    """A BasicSR .pth base (params_ema, BasicSR's key names): the run's merged model is a .pth in that layout, so
    Real-ESRGAN's own loading reads it; where a weight cannot be placed there, spandrel's layout, said so."""
    tmp_path, hr_dir, _ = setup
    base = tmp_path / "net_g.pth"
    torch.save({"params_ema": new_arch_rrdb(seed=0), "params": new_arch_rrdb(seed=1)}, base)
    run_dir = tmp_path / "run"
    assert main(_args(base, hr_dir, run_dir, "--patch", "8")) == 0
    printed = capsys.readouterr().out
    merged_path = run_dir / "model_merged.pth"
    assert f"merged model: {merged_path} (in the layout of {base})" in printed
    assert "note: dropped params, a second copy" in printed
    assert not (run_dir / "model_merged.safetensors").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["merged_model"] == "model_merged.pth"
    merged = torch.load(merged_path, weights_only=True)
    stored = torch.load(base, weights_only=True)["params_ema"]
    assert list(merged) == ["params_ema"] and list(merged["params_ema"]) == list(stored)
    adapted = adaptsr.load_model(base)
    adaptsr.load_adapter(adapted, run_dir / "adapter")
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(adaptsr.load_model(merged_path).model(x), adapted.model(x), rtol=1e-5, atol=1e-5)

    # two adapted convs with one base weight: the file cannot say which stored copy is whose
    tied = new_arch_rrdb(seed=0)
    tied["body.0.rdb2.conv1.weight"] = tied["body.0.rdb1.conv1.weight"].clone()
    torch.save(tied, tmp_path / "tied.pth")
    run_dir = tmp_path / "tied-run"
    assert main(_args(tmp_path / "tied.pth", hr_dir, run_dir, "--patch", "8")) == 0
    printed = capsys.readouterr().out
    assert f"merged model: {run_dir / 'model_merged.safetensors'} (in spandrel's layout, not that of" in printed
    assert "stored 2 times" in printed and not (run_dir / "model_merged.pth").exists()
    assert adaptsr.load_model(run_dir / "model_merged.safetensors").architecture.id == "ESRGAN"


def test_adapt_validates_with_more_metrics_and_keeps_the_best_by_one(setup, capsys):
    tmp_path, hr_dir, checkpoint = setup
    run_dir = tmp_path / "run"
    assert main(_args(checkpoint, hr_dir, run_dir, "--val-hr", str(hr_dir), "--val-every", "2",
                      "--val-metrics", "gmsd", "--best-by", "gmsd")) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [set(entry) for entry in metrics["val"]] == [{"step", "psnr", "ssim", "gmsd"}] * 2
    best = min(metrics["val"], key=lambda entry: entry["gmsd"])  # lower is better
    assert metrics["best_val"] == best
    assert f"best validation gmsd {best['gmsd']:.4f} (PSNR {best['psnr']:.2f} dB" in printed
    assert f", gmsd {metrics['val'][-1]['gmsd']:.4f}; wrote" in printed
    assert json.loads((run_dir / "config.json").read_text())["best_metric"] == "gmsd"
    for extra, message in ((["--best-by", "gmsd"], "give a validation set"),
                           (["--val-hr", str(hr_dir), "--best-by", "lpips"], "--best-by lpips: validation scores psnr, ssim; add it"),
                           (["--val-hr", str(hr_dir), "--val-metrics", "gmsdd"], "unknown metric 'gmsdd'; did you mean gmsd")):
        assert main(_args(checkpoint, hr_dir, tmp_path / "refused", *extra)) == 1
        assert message in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_adapt_bad_input(setup, capsys):
    tmp_path, hr_dir, checkpoint = setup
    assert main(_args(tmp_path / "missing.pth", hr_dir, tmp_path / "run")) == 1
    assert "missing.pth" in capsys.readouterr().err
    assert main(_args(checkpoint, tmp_path / "no-such-folder", tmp_path / "run")) == 1
    assert "no-such-folder" in capsys.readouterr().err
    assert main(_args(checkpoint, hr_dir, tmp_path / "run2", degradation="nope")) == 1
    assert "nope" in capsys.readouterr().err
    assert main(_args(checkpoint, hr_dir, tmp_path / "fresh", "--resume")) == 1
    assert "no checkpoint" in capsys.readouterr().err
    # a run folder that is one of its image folders: its pictures would join the images
    images = sorted(p.name for p in hr_dir.iterdir())
    assert main(_args(checkpoint, hr_dir, hr_dir)) == 1
    assert "is the --hr folder" in capsys.readouterr().err
    assert main(_args(checkpoint, hr_dir, tmp_path / "val", "--val-hr", str(tmp_path / "val"))) == 1
    assert "is the --val-hr folder" in capsys.readouterr().err
    assert sorted(p.name for p in hr_dir.iterdir()) == images and not (tmp_path / "val").exists()


def test_adapt_without_a_preset_names_the_way_out(setup, capsys):
    """An architecture with no preset (DnCNN, scale 1): --targets, and the command that lists the layer names."""
    from spandrel.architectures.DnCNN import DnCNN

    tmp_path, hr_dir, _ = setup
    checkpoint = tmp_path / "dncnn.safetensors"
    adaptsr.save_model(DnCNN(in_nc=3, out_nc=3, nc=8, nb=17), checkpoint)  # spandrel knows 17 or 20 layers
    assert main(_args(checkpoint, hr_dir, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "no LoRA preset for architecture DnCNN: pass --targets REGEX ('adaptsr layers --model CKPT'" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_adapt_full_finetune_baseline(setup):
    tmp_path, hr_dir, checkpoint = setup
    run_dir = tmp_path / "full"
    assert main(_args(checkpoint, hr_dir, run_dir, "--full-finetune")) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainable_params"] == metrics["total_params"]
    assert not (run_dir / "adapter").exists()  # nothing to save as an adapter
    base = adaptsr.load_model(checkpoint).model
    tuned = adaptsr.load_model(run_dir / "model_merged.safetensors").model
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert not torch.allclose(base(x), tuned(x))


def test_adapt_peft_lora_options(setup):
    """--rank-pattern, --alpha-pattern, --use-rslora and --lora-dropout reach the layers and the adapter files."""
    from safetensors import safe_open

    tmp_path, hr_dir, checkpoint = setup
    run_dir = tmp_path / "patterns"
    extra = ["--rank-pattern", r"conv1\.0=2", "--alpha-pattern", r"conv1\.0=8", "--use-rslora", "--lora-dropout", "0.1"]
    assert main(_args(checkpoint, hr_dir, run_dir, *extra)) == 0
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["lora_dropout"] == 0.1
    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        # safe_open has keys() and no __iter__
        ranks = {key: f.get_slice(key).get_shape()[0] for key in f.keys() if key.endswith("lora_A.weight")}  # noqa: SIM118
    conv1 = {k: r for k, r in ranks.items() if ".conv1.0." in k}
    assert conv1 and set(conv1.values()) == {2}
    assert {r for k, r in ranks.items() if k not in conv1} == {4}
    # the per-layer alpha and rsLoRA scaling survive the round trip into a fresh base
    base = adaptsr.load_model(checkpoint)
    adaptsr.load_adapter(base, run_dir / "adapter")
    scalings = {name: layer.scaling for name, layer in adaptsr.lora_layers(base)}
    for name, scaling in scalings.items():
        assert scaling == pytest.approx(8 / 2**0.5 if name.endswith("conv1.0") else 4 / 4**0.5), name


@pytest.mark.parametrize("flag, value", [("--rank-pattern", "conv1"), ("--rank-pattern", "conv1=two"),
                                         ("--alpha-pattern", "=3")])
def test_adapt_bad_pattern_is_a_usage_error(setup, capsys, flag, value):
    tmp_path, hr_dir, checkpoint = setup
    with pytest.raises(SystemExit) as exit_info:
        main(_args(checkpoint, hr_dir, tmp_path / "run", flag, value))
    assert exit_info.value.code == 2
    assert f"{value!r} is not REGEX=" in capsys.readouterr().err


def test_adapt_with_checkpointing_trains_the_same_adapter(setup, tiny_sr):
    """--checkpointing recomputes the Swin blocks in the backward: the same adapter as without it."""
    from safetensors.torch import load_file

    tmp_path, hr_dir, _ = setup
    checkpoint = tmp_path / "swinir.safetensors"
    adaptsr.save_model(tiny_sr.swinir(), checkpoint)
    adapters = []
    for extra in ([], ["--checkpointing"]):
        run_dir = tmp_path / f"swin{len(extra)}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch asks checkpoint's callers to choose use_reentrant
            assert main(_args(checkpoint, hr_dir, run_dir, "--steps", "3", *extra)) == 0
        adapters.append(load_file(str(run_dir / "adapter" / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    assert any(key.endswith("lora_B.weight") and v.abs().max() > 0 for key, v in adapters[1].items())  # it trained
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("arch", ["esrgan", "hat"])
def test_checkpointing_only_where_spandrel_checkpoints(setup, capsys, tiny_sr, arch):
    """ESRGAN has no such blocks; spandrel's HAT has the use_checkpoint flag but its forward ignores it."""
    tmp_path, hr_dir, _ = setup
    checkpoint = tmp_path / f"{arch}.safetensors"
    adaptsr.save_model(getattr(tiny_sr, arch)(), checkpoint)
    assert main(_args(checkpoint, hr_dir, tmp_path / "run", "--checkpointing")) == 1
    err = capsys.readouterr().err
    assert "--checkpointing: spandrel checkpoints the blocks of SwinIR only, not " in err and err.count("\n") == 1


# -- adversarial adaptation (--gan); the VGG19 with random weights, as the training tests run it --


def test_gan_flags_set_real_esrgans_recipe(setup, random_vgg):
    from adaptsr.discriminator import UNetDiscriminator, load_discriminator

    tmp_path, hr_dir, checkpoint = setup
    assert main(_args(checkpoint, hr_dir, tmp_path / "recipe", "--steps", "2", "--gan")) == 0
    config = json.loads((tmp_path / "recipe" / "config.json").read_text())
    assert (config["pixel_weight"], config["perceptual_weight"], config["gan_weight"]) == (1.0, 1.0, 0.1)
    assert (tmp_path / "recipe" / "discriminator.safetensors").is_file()
    # explicit weights override the recipe; a Real-ESRGAN-style {"params": ...} file starts the discriminator
    torch.manual_seed(2)
    start = UNetDiscriminator(3, features=16)
    torch.save({"params": start.state_dict()}, tmp_path / "netD.pth")
    assert main(_args(checkpoint, hr_dir, tmp_path / "tuned", "--steps", "2", "--gan", "--perceptual-weight", "0",
                      "--gan-weight", "0.05", "--discriminator", str(tmp_path / "netD.pth"),
                      "--discriminator-lr", "2e-4")) == 0
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert (config["perceptual_weight"], config["gan_weight"], config["discriminator_lr"]) == (0.0, 0.05, 2e-4)
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert list(metrics["loss_terms"]) == ["pixel", "gan", "discriminator_real", "discriminator_fake"]
    trained = load_discriminator(tmp_path / "tuned" / "discriminator.safetensors")
    assert trained.conv0.out_channels == 16  # the given discriminator's width, not a fresh default one
    assert not torch.equal(trained.conv0.weight, start.conv0.weight)


def test_gan_flag_errors(setup, capsys):
    from adaptsr.discriminator import UNetDiscriminator

    tmp_path, hr_dir, checkpoint = setup
    torch.save({"params": UNetDiscriminator(3, features=8).state_dict()}, tmp_path / "netD.pth")
    assert main(_args(checkpoint, hr_dir, tmp_path / "a", "--discriminator", str(tmp_path / "netD.pth"))) == 1
    assert "--discriminator: the run has no GAN loss" in capsys.readouterr().err
    assert main(_args(checkpoint, hr_dir, tmp_path / "b", "--gan-weight", "0.1", "--discriminator",
                      str(tmp_path / "nope.pth"))) == 1
    assert "nope.pth does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(_args(checkpoint, hr_dir, tmp_path / "c", "--gan-weight", "-1"))
    assert usage.value.code == 2 and "-1 is negative" in capsys.readouterr().err


def test_missing_vgg_weights_end_the_command_with_their_name(setup, capsys, monkeypatch, empty_hub):
    """The real VGG19 loader, offline: the command stops before any training and names the file to fetch."""
    tmp_path, hr_dir, checkpoint = setup

    def unreachable(url, dst, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    assert main(_args(checkpoint, hr_dir, tmp_path / "run", "--perceptual-weight", "1")) == 1
    err = capsys.readouterr().err
    assert "the VGG perceptual loss needs the weight file vgg19-dcbb9e9d.pth" in err and "network is unreachable" in err
    assert str(empty_hub) in err and not (tmp_path / "run" / "checkpoint.pt").exists()


# -- rank-aware allocation --


def test_adapt_allocates_ranks_and_resumes_with_them(setup, capsys):
    tmp_path, hr_dir, checkpoint = setup
    run_dir = tmp_path / "run"
    assert main(_args(checkpoint, hr_dir, run_dir, "--allocate-ranks", "--allocation-batches", "2")) == 0
    out = capsys.readouterr().out
    assert "rank allocation over" in out and "uncaptured" in out
    allocation = json.loads((run_dir / "rank_allocation.json").read_text())
    assert allocation["batches"] == 2 and allocation["params"] <= allocation["budget"]
    assert len(set(allocation["ranks"].values())) > 1  # not the uniform rank 4 everywhere
    # the trained adapter has exactly those ranks, and opens on the base model
    base = adaptsr.load_model(checkpoint)
    adaptsr.load_adapter(base, run_dir / "adapter")
    assert {name: layer.rank for name, layer in adaptsr.inject.lora_layers(base)} == allocation["ranks"]
    # a resumed run takes the recorded ranks (its checkpoint holds adapters of those ranks)
    assert main(_args(checkpoint, hr_dir, run_dir, "--allocate-ranks", "--resume", "--steps", "6")) == 0
    assert "rank allocation read from" in capsys.readouterr().out
    assert len(json.loads((run_dir / "metrics.json").read_text())["loss"]) == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--rank-pattern", "model.0=2"), "leave out --rank-pattern"),
        (("--full-finetune",), "--full-finetune trains no adapters"),
        (("--allocation-batches", "0"), "--allocation-batches must be at least 1"),
    ],
)
def test_allocate_ranks_conflicts(setup, capsys, extra, message):
    tmp_path, hr_dir, checkpoint = setup
    assert main(_args(checkpoint, hr_dir, tmp_path / "run", "--allocate-ranks", *extra)) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_adapt_ema_decay_reaches_the_run(setup, capsys):
    tmp_path, hr_dir, checkpoint = setup
    assert main(_args(checkpoint, hr_dir, tmp_path / "run", "--ema-decay", "0.99")) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["ema_decay"] == 0.99
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["ema"]["updates"] == 4
    assert main(_args(checkpoint, hr_dir, tmp_path / "bad", "--ema-decay", "1")) == 1
    assert "ema_decay must be in [0, 1)" in capsys.readouterr().err


def test_adapt_and_eval_take_a_degradation_file(setup, capsys):
    """A camera described in JSON: adapt trains on it and records every field in the run folder, --resume holds
    the run to it, eval degrades with it, and a bad file ends the command with its name."""
    from adaptsr.data import camera_profile, load_degradation

    tmp_path, hr_dir, checkpoint = setup
    camera = tmp_path / "my-camera.json"
    camera.write_text(json.dumps({"camera_profile": {"blur_sigma": 0.8, "noise": 12, "jpeg_quality": 75}}))
    run_dir = tmp_path / "run"
    assert main(_args(checkpoint, hr_dir, run_dir, degradation=camera)) == 0
    assert load_degradation(run_dir / "degradation.json") == camera_profile(0.8, 12, 75)
    assert main(_args(checkpoint, hr_dir, run_dir, "--resume", "--steps", "6", degradation=camera)) == 0
    capsys.readouterr()
    assert main(_args(checkpoint, hr_dir, run_dir, "--resume", "--steps", "8")) == 1  # the default, camera
    err = capsys.readouterr().err
    assert f"trained on the degradation in {run_dir / 'degradation.json'}" in err and "differs (first)" in err
    assert len(json.loads((run_dir / "metrics.json").read_text())["loss"]) == 6

    assert main(["eval", "--model", str(checkpoint), "--adapter", str(run_dir / "adapter"), "--hr", str(hr_dir),
                 "--degradation", str(camera), "--out", str(tmp_path / "scores")]) == 0
    assert json.loads((tmp_path / "scores" / "metrics.json").read_text())["mean"]["psnr"] > 0

    camera.write_text(json.dumps({"camera_profile": {"blur_sigma": 0.8, "noise": 12}}))
    assert main(_args(checkpoint, hr_dir, tmp_path / "run2", degradation=camera)) == 1
    err = capsys.readouterr().err
    assert f"degradation file {camera}" in err and "exactly blur_sigma, noise, jpeg_quality" in err
    assert not (tmp_path / "run2").exists()


def test_adapt_on_a_mixture_of_degradations(setup, capsys):
    """Two --degradation: one adapter on their mixture, recorded as such; resuming with one of them is refused."""
    from adaptsr.data import DegradationMixture, get_preset, load_degradation

    tmp_path, hr_dir, checkpoint = setup
    run_dir = tmp_path / "run"
    mixed = [*_args(checkpoint, hr_dir, run_dir), "--degradation", "lowlight"]  # _args gives camera first
    assert main(mixed) == 0
    expected = DegradationMixture((get_preset("camera"), get_preset("lowlight")))
    assert load_degradation(run_dir / "degradation.json") == expected
    capsys.readouterr()
    assert main([*_args(checkpoint, hr_dir, run_dir), "--resume", "--steps", "6"]) == 1
    assert "--degradation camera differs (" in capsys.readouterr().err
    assert main([*mixed, "--resume", "--steps", "6"]) == 0
    assert len(json.loads((run_dir / "metrics.json").read_text())["loss"]) == 6


def test_adapt_on_the_bundled_photos(setup, capsys):
    """--hr bundled / --val-hr bundled: a camera's adapter from its degradation alone, on the bundled photos."""
    from adaptsr.data.bundled import HELD_OUT, TRAIN

    tmp_path, _, checkpoint = setup
    run_dir = tmp_path / "run"
    argv = [a if a != str(tmp_path / "hr") else "bundled" for a in _args(checkpoint, tmp_path / "hr", run_dir)]
    # a batch larger than the seven photos: an epoch takes several crops of each
    assert main([*argv, "--steps", "2", "--batch-size", "12", "--val-hr", "bundled"]) == 0
    assert sorted(p.stem for p in (run_dir / "bundled-train").iterdir()) == sorted(TRAIN)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["loss"]) == 2 and metrics["val"][0]["psnr"] > 0
    assert sorted(p.stem for p in (run_dir / "bundled-held-out").iterdir()) == sorted(HELD_OUT)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--targets", "no_such_layer"), "matched no Conv2d, ConvTranspose2d or Linear layer"),
        (("--rank", "99"), "larger than this layer allows"),
        (("--allocate-ranks", "--targets", "no_such_layer"), "matched no Conv2d, ConvTranspose2d or Linear layer"),
        (("--checkpointing",), "--checkpointing: spandrel checkpoints the blocks of"),
    ],
)
def test_a_refused_adapt_writes_nothing(setup, capsys, extra, message):
    """Every check on the adapters comes before the data: --hr bundled writes its photos into the run folder and
    --val-hr its degraded cache, so a refused command would otherwise leave a run folder behind."""
    tmp_path, _, checkpoint = setup
    run_dir = tmp_path / "run"
    argv = [a if a != str(tmp_path / "hr") else "bundled" for a in _args(checkpoint, tmp_path / "hr", run_dir)]
    assert main([*argv, "--val-hr", "bundled", *extra]) == 1
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_adapt_on_fewer_pairs_than_a_batch(setup):
    """Three real pairs, batch 8: an epoch takes several crops of each pair instead of refusing to start."""
    tmp_path, hr_dir, checkpoint = setup
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    for path in hr_dir.iterdir():
        Image.open(path).resize((24, 24), Image.BICUBIC).save(lr_dir / path.name)
    argv = ["adapt", "--model", str(checkpoint), "--pairs", str(lr_dir), str(hr_dir), "--out", str(tmp_path / "run"),
            "--steps", "2", "--batch-size", "8", "--patch", "8", "--device", "cpu"]
    assert main(argv) == 0
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["loss"]) == 2
