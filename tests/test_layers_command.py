"""``adaptsr layers``: the model's conv and linear layers and the adapters ``adaptsr adapt`` would give them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptsr
from adaptsr.cli import main


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_sr):
    """A tiny ESRGAN x2 (a preset architecture) and a tiny DnCNN (spandrel loads it; no preset)."""
    root = tmp_path_factory.mktemp("layers")
    adaptsr.save_model(tiny_sr.esrgan(), root / "esrgan.safetensors")
    from spandrel.architectures.DnCNN import DnCNN

    torch.manual_seed(0)
    adaptsr.save_model(DnCNN(in_nc=3, out_nc=3, nc=8, nb=17), root / "dncnn.safetensors")  # spandrel knows 17 or 20
    return root


def _run(capsys, *argv):
    code = main(["layers", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _table(out: str) -> dict[str, list[str]]:
    """layer name -> its row's cells (type, shape, rank, adapter params), from the printed table."""
    lines = out.splitlines()
    header = lines[1].split()
    assert header[:4] == ["layer", "type", "shape", "rank"]
    rows = {}
    for line in lines[2:]:
        name, kind, rest = line.split(maxsplit=2)
        shape, rank, size = rest.rsplit(maxsplit=2)
        rows[name] = [kind, shape.strip(), rank, size]
    return rows


def _plain_layers(path) -> dict[str, nn.Module]:
    model = adaptsr.load_model(path).model
    return {name: m for name, m in model.named_modules() if type(m) in (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)}


def test_lists_every_layer_and_the_preset_adapters(checkpoints, capsys):
    code, out, err = _run(capsys, "--model", checkpoints / "esrgan.safetensors", "--rank", 4)
    assert code == 0, err

    expected = adaptsr.load_model(checkpoints / "esrgan.safetensors")
    summary = adaptsr.inject_lora(expected, preset="esrgan", rank=4)
    adapters = dict(adaptsr.lora_layers(expected.model))
    plain = _plain_layers(checkpoints / "esrgan.safetensors")
    rows = _table(out)

    assert out.splitlines()[0].endswith(f"preset esrgan: {summary}")
    assert list(rows) == list(plain)  # every layer, in the model's order
    for name, (kind, shape, rank, size) in rows.items():
        layer = plain[name]
        assert kind == type(layer).__name__
        assert shape.startswith(f"{layer.in_channels} -> {layer.out_channels}, 3x3")
        if name in adapters:
            assert rank == "4"
            assert size == f"{adapters[name].lora_A.numel() + adapters[name].lora_B.numel():,}"
        else:
            assert rank == size == "-", name
    assert {name for name, row in rows.items() if row[2] != "-"} == set(summary.layers)


def test_targets_rank_pattern_and_adapted_only(checkpoints, capsys):
    code, out, err = _run(
        capsys, "--model", checkpoints / "esrgan.safetensors", "--targets", r"model\.0|model\.1\.sub\.1",
        "--rank", 2, "--rank-pattern", r"model\.0=3", "--adapted",
    )
    assert code == 0, err
    assert "--targets" in out.splitlines()[0] and "preset" not in out.splitlines()[0]
    rows = _table(out)
    assert {name: row[2] for name, row in rows.items()} == {"model.0": "3", "model.1.sub.1": "2"}


def test_dora_adapters_count_their_magnitudes(checkpoints, capsys):
    code, out, err = _run(capsys, "--model", checkpoints / "esrgan.safetensors", "--rank", 2, "--use-dora", "--adapted")
    assert code == 0, err
    plain = _plain_layers(checkpoints / "esrgan.safetensors")
    for name, (_, _, rank, size) in _table(out).items():
        weight = plain[name].weight  # A [2, in, 3, 3], B [out, 2, 1, 1], one magnitude per output channel
        assert size == f"{2 * weight[0].numel() + weight.shape[0] * 2 + weight.shape[0]:,}", name


def test_architecture_without_a_preset_lists_its_layers(checkpoints, capsys):
    code, out, err = _run(capsys, "--model", checkpoints / "dncnn.safetensors")
    assert code == 0, err
    assert "no LoRA preset for DnCNN: choose layers with --targets REGEX" in out.splitlines()[0]
    rows = _table(out)
    assert list(rows) == list(_plain_layers(checkpoints / "dncnn.safetensors"))
    assert all(row[2] == "-" for row in rows.values())

    # ... and with --targets it shows what they pick
    code, out, _ = _run(capsys, "--model", checkpoints / "dncnn.safetensors", "--targets", r"model\.2", "--adapted")
    assert code == 0 and list(_table(out)) == ["model.2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "{c}/missing.safetensors"], "does not exist"),
        (["--model", "{c}/esrgan.safetensors", "--targets", "nothing_like_this"], "nothing_like_this"),
        (["--model", "{c}/esrgan.safetensors", "--preset", "edsr"], "unknown LoRA preset 'edsr'"),
    ],
)
def test_bad_input_one_line(checkpoints, capsys, argv, message):
    code, out, err = _run(capsys, *(a.format(c=checkpoints) for a in argv))
    assert code == 1 and out == ""
    assert err.startswith("adaptsr layers: error: ") and message in err and err.count("\n") == 1


def test_transposed_convs_are_listed_and_adapted(tiny_sr, tmp_path, capsys):
    """Real-CUGAN's up-sampling layers: ConvTranspose2d rows, with their stride, adapted by the preset."""
    adaptsr.save_model(tiny_sr.realcugan(), tmp_path / "realcugan.safetensors")
    code, out, err = _run(capsys, "--model", tmp_path / "realcugan.safetensors")
    assert code == 0, err
    rows = _table(out)
    up = rows["unet1.conv2_up"]
    assert up[:3] == ["ConvTranspose2d", "64 -> 64, 2x2, stride 2x2", "8"]
    assert rows["unet1.conv_bottom"][0] == "ConvTranspose2d" and rows["unet1.conv_bottom"][2] == "-"
