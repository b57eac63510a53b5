"""`adaptsr bench` and ``adaptsr.bench``: rows, what each method trains, the backend each LoRA row runs."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import adaptsr
from adaptsr.autotune import candidates as autotune_candidates
from adaptsr.bench import bench_training_step, format_bench_table
from adaptsr.cli import main
from adaptsr.demo import bundled_model_path
from adaptsr.inject import lora_layers

TINY = {"batch_size": 1, "patch": 16, "rounds": 2, "warmup": 0}


@pytest.fixture
def swinir():
    return adaptsr.load_model(bundled_model_path("swinir"))


@pytest.fixture
def resolved_backends(monkeypatch):
    """The backends the LoRA ops resolve to during the test, recorded at each call."""
    seen = []
    for stem in ("lora_linear", "lora_conv2d"):
        module = importlib.import_module(f"adaptsr.ops.{stem}")
        original = module.resolve

        def spy(*args, _original=original, **kwargs):
            seen.append(_original(*args, **kwargs))
            return seen[-1]

        monkeypatch.setattr(module, "resolve", spy)
    return seen


def test_rows_count_what_each_method_trains(swinir):
    before = {k: v.clone() for k, v in swinir.model.state_dict().items()}
    rows = bench_training_step(swinir, backends=["reference", "torch"], **TINY)

    assert [r.label for r in rows] == ["frozen", "full fine-tuning", "LoRA (reference)", "LoRA (torch)"]
    total = sum(p.numel() for p in swinir.model.parameters())
    probe = adaptsr.load_model(bundled_model_path("swinir"))
    summary = adaptsr.inject_lora(probe, preset="swinir", rank=8)
    assert rows[0].trainable_params == 0 and rows[0].total_params == total
    assert rows[1].trainable_params == total
    for lora in rows[2:]:
        assert lora.trainable_params == summary.trainable_params
        assert lora.total_params == summary.total_params
    assert rows[0].ratio_to_frozen == 1.0
    for r in rows:
        assert r.median_ms > 0 and r.ratio_to_frozen == pytest.approx(r.median_ms / rows[0].median_ms)
        assert r.peak_memory_bytes is None  # CPU: no peak-memory counter
    # a frozen linear layer keeps only its weight for dx; one with an adapter keeps its input for dA
    assert 0 < rows[0].saved_activation_bytes < rows[2].saved_activation_bytes

    # The user's model is left as it was: no adapters, the same weights.
    assert not list(lora_layers(swinir.model))
    after = swinir.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_each_lora_row_runs_its_backend(swinir, resolved_backends):
    bench_training_step(swinir, backends=["reference", "torch"], full_finetune=False, **TINY)
    assert set(resolved_backends) == {"reference", "torch"}


def test_default_backends_on_the_cpu(swinir, resolved_backends):
    rows = bench_training_step(swinir, full_finetune=False, **TINY)
    assert [r.label for r in rows] == ["frozen", "LoRA (torch)"]
    assert set(resolved_backends) == {"torch"}


def test_targets_and_rank(swinir):
    rows = bench_training_step(swinir, targets=r".*attn\.qkv", rank=2, full_finetune=False, **TINY)
    probe = adaptsr.load_model(bundled_model_path("swinir"))
    summary = adaptsr.inject_lora(probe, targets=r".*attn\.qkv", rank=2)
    assert rows[-1].trainable_params == summary.trainable_params


def test_table_has_a_row_per_method(swinir):
    rows = bench_training_step(swinir, backends=["torch"], **TINY)
    table = format_bench_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[0].split(" | ")[4] == "saved MB"
    assert table[2].startswith("| frozen | 0 |") and "| 1.00 |" in table[2]
    assert table[2].split(" | ")[4] == f"{rows[0].saved_activation_bytes / 2**20:.1f}"
    assert table[-1].startswith("| LoRA (torch) | ") and "(16.6%)" in table[-1]


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "swinir", "--batch-size", "1", "--patch", "16", "--rounds", "2", "--warmup", "0",
                 "--backends", "reference,torch", "--no-full-finetune", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| LoRA (reference) |" in printed and "| LoRA (torch) |" in printed
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["rows"]] == ["frozen", "LoRA (reference)", "LoRA (torch)"]
    assert data["batch_size"] == 1 and data["patch"] == 16 and data["rounds"] == 2


def test_micro_batches_keep_one_pieces_activations(swinir, monkeypatch):
    """With micro-batches each method's step runs adapt's accumulation in pieces, and its saved activations are
    one piece's: a batch of 4 in pieces of 2 keeps what a batch of 2 keeps."""
    from adaptsr import bench

    piece_sizes = []
    accumulate = bench._accumulate_gradients

    def spy(network, objective, lr, hr, use_bf16, micro_batch=0):
        piece_sizes.append(micro_batch)
        return accumulate(network, objective, lr, hr, use_bf16, micro_batch)

    monkeypatch.setattr(bench, "_accumulate_gradients", spy)
    options = {**TINY, "backends": ["torch"], "full_finetune": False}
    pieces = bench_training_step(swinir, **{**options, "batch_size": 4}, micro_batch=2)
    assert set(piece_sizes) == {2}
    whole = bench_training_step(swinir, **{**options, "batch_size": 4})
    half = bench_training_step(swinir, **{**options, "batch_size": 2})
    for p, w, h in zip(pieces, whole, half):
        assert p.saved_activation_bytes == h.saved_activation_bytes < w.saved_activation_bytes


def test_cli_micro_batch(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "swinir", "--batch-size", "3", "--micro-batch", "2", "--patch", "16",
                 "--rounds", "1", "--warmup", "0", "--backends", "torch", "--no-full-finetune", "--json", str(out)])
    assert code == 0
    assert "batch 3 of 16x16 LR patches in micro-batches of 2," in capsys.readouterr().out
    assert json.loads(out.read_text())["micro_batch"] == 2


def test_cli_accepts_a_checkpoint_file(tmp_path, capsys):
    code = main(["bench", "--model", str(bundled_model_path("rrdb")), "--batch-size", "1", "--patch", "8",
                 "--rounds", "1", "--warmup", "0", "--no-full-finetune"])
    assert code == 0
    assert capsys.readouterr().out.startswith("ESRGAN x4")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backends", "fastest"], "unknown adaptsr backend 'fastest'"),
        (["--backends", "cuda"], "backend 'cuda'"),
        (["--model", "nothere"], "--model nothere is neither a checkpoint file nor a bundled model"),
        (["--model", "nothere.pth"], "nothere.pth"),
        (["--patch", "0"], "a 0x0 LR patch does not fit"),
        (["--rounds", "0"], "rounds must be positive"),
        (["--targets", "nothing_matches"], "nothing_matches"),
    ],
)
def test_bad_input_one_line(argv, message, capsys, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--batch-size", "1", "--patch", "16", "--rounds", "1", "--warmup", "0",
                 "--json", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("adaptsr bench: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "arch",
    [
        "swinir", "hat", "esrgan", "rcan", "compact", "dat", "swin2sr", "drct", "atd", "rgt", "plksr", "safmn", "span",
        "omnisr", "fdat", "mosr", "grl", "craft", "seemore", "ditn", "moesr", "dctlsa", "swiftsrgan", "realcugan",
        "scunet", "nafnet", "mmrealsr", "fbcnn",
    ],
)
def test_every_preset_architecture(arch, tiny_sr, tmp_path):
    """Each architecture with a preset, RCAN included (its forward writes into its input). Batches of 2: DAT's
    channel interaction ends in a batch norm over 1 x 1 maps, which cannot train on a single image. Real-CUGAN and
    SCUNet take patches of 32 and 40 pixels at the least."""
    adaptsr.save_model(getattr(tiny_sr, arch)(), tmp_path / "model.safetensors")
    descriptor = adaptsr.load_model(tmp_path / "model.safetensors")
    patch = max(TINY["patch"], descriptor.size_requirements.minimum)
    rows = bench_training_step(descriptor, backends=["torch"], **{**TINY, "batch_size": 2, "patch": patch})
    probe = adaptsr.load_model(tmp_path / "model.safetensors")
    assert rows[-1].trainable_params == adaptsr.inject_lora(probe, preset=arch, rank=8).trainable_params


def test_gan_row_runs_adapts_gan_step(swinir, random_vgg, monkeypatch):
    """The GAN row's step is adapt --gan's: the VGG and GAN terms in the generator loss, then the discriminator's
    own step, every step; it keeps more for the backward than plain LoRA (the loss networks' activations)."""
    from adaptsr.objective import Objective

    terms, discriminator_steps = [], []
    generator_loss, discriminator_step = Objective.generator_loss, Objective.discriminator_step

    def spy_generator_loss(self, sr, hr):
        total, found = generator_loss(self, sr, hr)
        terms.append(sorted(found))
        return total, found

    def spy_discriminator_step(self, sr, hr, use_bf16, micro_batch=0):
        discriminator_steps.append(sr.shape)
        return discriminator_step(self, sr, hr, use_bf16, micro_batch)

    monkeypatch.setattr(Objective, "generator_loss", spy_generator_loss)
    monkeypatch.setattr(Objective, "discriminator_step", spy_discriminator_step)
    rows = bench_training_step(swinir, backends=["torch"], full_finetune=False, gan=True, **TINY)
    assert [r.label for r in rows] == ["frozen", "LoRA (torch)", "LoRA + GAN (torch)"]
    assert rows[2].trainable_params == rows[1].trainable_params
    assert rows[2].saved_activation_bytes > rows[1].saved_activation_bytes
    assert ["gan", "perceptual", "pixel"] in terms and ["pixel"] in terms
    assert len(discriminator_steps) == TINY["rounds"] + TINY["warmup"]  # every timed GAN step, none elsewhere
    assert discriminator_steps[0] == (1, 3, 64, 64)  # the SR batch: 16 LR pixels at x4


def test_cli_gan_row(capsys, random_vgg):
    argv = ["bench", "--model", "swinir", "--batch-size", "1", "--patch", "16", "--rounds", "1", "--warmup", "0",
            "--no-full-finetune", "--gan"]
    assert main(argv) == 0
    assert "| LoRA + GAN (torch) |" in capsys.readouterr().out


def test_cli_gan_without_vgg_weights_names_them(capsys, empty_hub, monkeypatch):
    """The real VGG19 loader, offline: one line naming the file to fetch and where."""

    def unreachable(url, dst, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    code = main(["bench", "--model", "swinir", "--batch-size", "1", "--patch", "16", "--rounds", "1",
                 "--no-full-finetune", "--gan"])
    err = capsys.readouterr().err
    assert code == 1 and "the VGG perceptual loss needs the weight file vgg19-dcbb9e9d.pth" in err
    assert str(empty_hub) in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(len(autotune_candidates(torch.device("cpu"), None)) < 2,
                    reason="a race on the CPU needs triton's interpreter (TRITON_INTERPRET=1, set without a GPU)")
def test_autotune_row_prints_and_records_its_choices(tmp_path, capsys, monkeypatch):
    """With ADAPTSR_AUTOTUNE=1 the "auto" row runs the trials in its warm-up; the choices are summed up under the
    table and listed in the JSON. A set clock decides the races (interpreted trials of a whole SwinIR are slow)."""
    from adaptsr import autotune
    from adaptsr.bench import default_backends

    monkeypatch.setenv("ADAPTSR_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_switch", None)
    monkeypatch.setattr(autotune, "_median_ms", lambda run, backend, device: {"torch": 1.0, "triton": 2.0}[backend])
    autotune.reset()
    assert default_backends("cuda")[-1] == "auto" and default_backends("cpu") == ["torch"]
    out = tmp_path / "bench.json"
    try:
        code = main(["bench", "--model", "swinir", "--batch-size", "1", "--patch", "16", "--rounds", "1",
                     "--warmup", "1", "--backends", "torch,auto", "--no-full-finetune", "--json", str(out)])
        printed = capsys.readouterr().out
    finally:
        autotune.reset()
    assert code == 0 and "| LoRA (auto) |" in printed
    records = json.loads(out.read_text())["autotune"]
    assert {r["op"] for r in records} >= {"lora_linear", "lora_conv2d"}
    assert all(r["choice"] == "torch" for r in records)
    n_linear = sum(r["op"] == "lora_linear" for r in records)
    assert f"autotune: lora_linear: torch {n_linear} of {n_linear} signature" in printed
