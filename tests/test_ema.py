"""The EMA of the trained weights: its recurrence, that a run validates and saves the average, exact resumption,
and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import adaptsr
from adaptsr.ema import ParameterEMA
from adaptsr.train import TrainConfig, adapt

TASK = (Path(__file__).parent / "train_task.py").read_text()
namespace: dict = {}
exec(TASK, namespace)
NoisyPairs, make_model, crashes_after = namespace["NoisyPairs"], namespace["make_model"], namespace["crashes_after"]
lora_state = namespace["lora_state"]


def _config(**overrides) -> TrainConfig:
    settings = {"steps": 8, "batch_size": 4, "lr": 2e-3, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 0,
                "seed": 3, "ema_decay": 0.9}
    settings.update(overrides)
    return TrainConfig(**settings)


def test_the_recurrence_with_its_warm_up():
    weight = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    ema = ParameterEMA({"w": weight}, decay=0.5)
    expected = torch.zeros(3, dtype=torch.float64)
    for t in range(1, 7):
        with torch.no_grad():
            weight.add_(1.0)
        ema.update()
        d = min(0.5, (1 + t) / (10 + t))  # 2/11, 3/12, ... until it reaches the decay
        expected = d * expected + (1 - d) * weight.detach()
        torch.testing.assert_close(ema.shadow["w"].double(), expected)
    with ema.averaged():
        torch.testing.assert_close(weight.detach(), expected)
    assert torch.equal(weight.detach(), torch.full((3,), 6.0, dtype=torch.float64))  # the trained value is back
    with pytest.raises(ValueError, match=r"EMA decay must be in \(0, 1\)"):
        ParameterEMA({"w": weight}, decay=1.0)


def test_a_run_validates_and_saves_the_average(tmp_path):
    """The same run with and without the EMA: the average differs from the last weights, and it is what the
    adapter, the merged model, the returned model and the final validation hold."""
    plain = make_model()
    adapt(plain, NoisyPairs(), tmp_path / "plain", _config(ema_decay=0.0), device="cpu")
    averaged = make_model()
    metrics = adapt(averaged, NoisyPairs(), tmp_path / "ema", _config(), val_set=NoisyPairs(n=2, seed=9),
                    device="cpu")
    assert any(not torch.equal(v, lora_state(averaged)[k]) for k, v in lora_state(plain).items())
    assert metrics["loss"] == json.loads((tmp_path / "plain" / "metrics.json").read_text())["loss"]  # same training
    state = torch.load(tmp_path / "ema" / "checkpoint.pt", weights_only=True)
    assert state["ema"]["updates"] == 8
    for name, value in state["ema"]["shadow"].items():
        torch.testing.assert_close(dict(averaged.named_parameters())[name].detach(), value, rtol=0, atol=0)
    base = make_model()
    adaptsr.merge_lora(base)
    adaptsr.load_adapter(base, tmp_path / "ema" / "adapter")
    x = NoisyPairs(n=1, seed=5).lr
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(x), averaged.eval()(x))
    from adaptsr.evaluate import evaluate_pairs

    val = NoisyPairs(n=2, seed=9)
    with torch.no_grad():
        pairs = [(averaged(val.lr[i:i + 1]).clamp(0, 1)[0], val.hr[i]) for i in range(2)]
    assert metrics["val"][-1]["psnr"] == pytest.approx(evaluate_pairs(pairs, ("psnr",), 2)["mean"]["psnr"], rel=1e-6)


def test_resume_with_an_ema_equals_uninterrupted(tmp_path):
    straight = make_model()
    adapt(straight, NoisyPairs(), tmp_path / "straight", _config(), device="cpu")
    with pytest.raises(KeyboardInterrupt):  # batch 4: the 25th item belongs to step 7
        adapt(make_model(), crashes_after(6 * 4), tmp_path / "parts", _config(), device="cpu")
    resumed = make_model()
    adapt(resumed, NoisyPairs(), tmp_path / "parts", _config(), device="cpu", resume=True)
    for key, value in lora_state(straight).items():
        assert torch.equal(value, lora_state(resumed)[key]), key


def test_resume_refuses_another_ema_setting(tmp_path):
    adapt(make_model(), NoisyPairs(), tmp_path / "ema", _config(steps=4), device="cpu")
    with pytest.raises(ValueError, match=r"ema/checkpoint\.pt was trained with an EMA of the weights"):
        adapt(make_model(), NoisyPairs(), tmp_path / "ema", _config(steps=6, ema_decay=0.0), device="cpu",
              resume=True)
    adapt(make_model(), NoisyPairs(), tmp_path / "plain", _config(steps=4, ema_decay=0.0), device="cpu")
    with pytest.raises(ValueError, match=r"plain/checkpoint\.pt was trained without an EMA"):
        adapt(make_model(), NoisyPairs(), tmp_path / "plain", _config(steps=6), device="cpu", resume=True)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        _config(ema_decay=1.0)
