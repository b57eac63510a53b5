"""LoRA+ (``TrainConfig.lora_plus_ratio``, ``adapt --lora-plus-ratio``): the parameter groups PEFT's
``create_loraplus_optimizer`` builds, their learning rates through the schedule, resume, and the command line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus_optimizer
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SwinIR import SwinIR

from adaptsr import inject_lora
from adaptsr.optim import _optimizer_groups, _trainable, create_loraplus_optimizer
from adaptsr.train import TrainConfig, adapt


def _swinir_dora():
    """Linear layers (1-D DoRA magnitudes) and a conv (a [1, out, 1, 1] magnitude): every case of the sorting."""
    torch.manual_seed(0)
    model = SwinIR(img_size=16, embed_dim=16, depths=[2], num_heads=[2], window_size=4, upscale=2,
                   upsampler="pixelshuffledirect", drop_path_rate=0.0)
    inject_lora(model, preset="swinir", rank=2, use_dora=True)
    return model


@pytest.mark.parametrize("ratio", [16.0, 0.5])
def test_groups_are_peft_loraplus_groups(ratio):
    model = _swinir_dora()
    ours = create_loraplus_optimizer(model, lr=1e-3, lora_plus_ratio=ratio, weight_decay=0.0)
    peft = peft_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio)

    def by_lr(optimizer):
        groups = {}
        for group in optimizer.param_groups:
            groups.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
        return {lr: ids for lr, ids in groups.items() if ids}

    assert by_lr(ours) == by_lr(peft)
    assert set(by_lr(ours)) == {1e-3, 1e-3 * ratio}
    assert isinstance(ours, torch.optim.AdamW) and all(g["weight_decay"] == 0.0 for g in ours.param_groups)


def test_defaults_are_adapts_optimizer():
    """lr 1e-3, ratio 16 and TrainConfig's weight decay (0), not AdamW's 0.01; a weight decay given is kept."""
    model = _swinir_dora()
    ours = create_loraplus_optimizer(model)
    assert sorted(g["lr"] for g in ours.param_groups) == [1e-3, 16e-3]
    assert all(g["weight_decay"] == TrainConfig().weight_decay == 0.0 for g in ours.param_groups)
    assert all(g["weight_decay"] == 0.05 for g in create_loraplus_optimizer(model, weight_decay=0.05).param_groups)
    assert isinstance(create_loraplus_optimizer(model, optimizer_cls=torch.optim.SGD), torch.optim.SGD)


def test_ratio_one_is_one_group_and_a_model_without_lora_b_is_refused():
    model = _swinir_dora()
    assert len(_optimizer_groups(_trainable(model), 1e-3, 1.0)) == 1
    full = ESRGAN(num_filters=8, num_blocks=1, scale=2)
    weights = {name: p for name, p in full.named_parameters() if p.ndim > 1}
    with pytest.raises(ValueError, match="no lora_B to speed up"):
        _optimizer_groups(weights, 1e-3, 16.0)
    with pytest.raises(ValueError, match="lora_plus_ratio must be a positive number"):
        TrainConfig(lora_plus_ratio=0)
    with pytest.raises(ValueError, match="lora_plus_ratio must be a positive number"):
        create_loraplus_optimizer(model, lora_plus_ratio=float("nan"))


def _pairs():
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(3, 8, 8, generator=generator), torch.rand(3, 16, 16, generator=generator)) for _ in range(4)]


def test_b_learns_at_ratio_times_the_scheduled_rate_and_resume_holds_the_ratio(tmp_path):
    torch.manual_seed(0)
    model = ESRGAN(num_filters=8, num_blocks=1, scale=2)
    inject_lora(model, preset="esrgan", rank=2)
    config = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=1, lora_plus_ratio=8)
    adapt(model, _pairs(), tmp_path / "run", config, device="cpu")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    slow, fast = state["optimizer"]["param_groups"]
    assert fast["initial_lr"] == pytest.approx(8 * slow["initial_lr"]) and slow["initial_lr"] == 1e-3
    assert fast["lr"] == pytest.approx(8 * slow["lr"]) and 0 < slow["lr"] < 1e-3  # the cosine scales both alike
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lora_plus_ratio"] == 8

    torch.manual_seed(0)
    again = ESRGAN(num_filters=8, num_blocks=1, scale=2)
    inject_lora(again, preset="esrgan", rank=2)
    with pytest.raises(ValueError, match=r"trained with lora_plus_ratio 8 and this run has 4; .*--lora-plus-ratio 8\)"):
        adapt(again, _pairs(), tmp_path / "run", dataclasses.replace(config, steps=4, lora_plus_ratio=4),
              device="cpu", resume=True)
    adapt(again, _pairs(), tmp_path / "run", dataclasses.replace(config, steps=4), device="cpu", resume=True)


def test_the_command_line_flag(tmp_path, capsys):
    from PIL import Image
    from skimage import data

    import adaptsr
    from adaptsr.cli import main

    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    Image.fromarray(data.astronaut()).resize((48, 48), Image.BICUBIC).save(hr_dir / "a.png")
    torch.manual_seed(0)
    checkpoint = tmp_path / "base.safetensors"
    adaptsr.save_model(ESRGAN(num_filters=8, num_blocks=1, scale=2), checkpoint)
    argv = ["adapt", "--model", str(checkpoint), "--hr", str(hr_dir), "--steps", "1", "--batch-size", "2",
            "--patch", "16", "--rank", "2", "--device", "cpu"]

    def recipe(run: str) -> tuple[float, float, list[float]]:
        config = json.loads((tmp_path / run / "config.json").read_text())
        groups = torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
        return config["lr"], config["lora_plus_ratio"], [group["initial_lr"] for group in groups]

    # the defaults: adapters train with LoRA+ x16 from 1e-3, full fine-tuning plainly at 2e-4
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert recipe("run") == (1e-3, 16.0, [1e-3, 16e-3])
    assert main([*argv, "--full-finetune", "--out", str(tmp_path / "full")]) == 0
    assert recipe("full") == (2e-4, 1.0, [2e-4])
    # the flags override them
    assert main([*argv, "--lr", "2e-3", "--lora-plus-ratio", "1", "--out", str(tmp_path / "plain")]) == 0
    assert recipe("plain") == (2e-3, 1.0, [2e-3])
    assert main([*argv, "--full-finetune", "--lora-plus-ratio", "16", "--out", str(tmp_path / "refused")]) == 1
    assert "--full-finetune trains no adapters" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
