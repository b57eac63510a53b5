"""`adaptsr bench` and ``adaptsr.bench``: rows, what each method trains, the backend each LoRA row runs."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import adaptsr
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
