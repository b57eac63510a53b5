"""The adaptation loop: it learns, it resumes exactly (also after SIGKILL), it leaves a usable run folder."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import adaptsr
from adaptsr import train as training
from adaptsr.train import TrainConfig, adapt

# One definition of the task, run in this process and in the subprocesses of the SIGKILL test.
TASK = (Path(__file__).parent / "train_task.py").read_text()
namespace: dict = {}
exec(TASK, namespace)
NoisyPairs, make_model, crashes_after = namespace["NoisyPairs"], namespace["make_model"], namespace["crashes_after"]
lora_state = namespace["lora_state"]


def _config(**overrides) -> TrainConfig:
    settings = dict(steps=12, batch_size=4, lr=2e-3, warmup_steps=2, checkpoint_every=4, log_every=0, seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_loss_decreases(tmp_path):
    model = make_model()
    metrics = adapt(model, NoisyPairs(), tmp_path, _config(steps=40), device="cpu")
    losses = metrics["loss"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_resume_equals_uninterrupted(tmp_path):
    straight = make_model()
    adapt(straight, NoisyPairs(), tmp_path / "straight", _config(), device="cpu")
    with pytest.raises(KeyboardInterrupt):  # batch 4: the 33rd item belongs to step 9
        adapt(make_model(), crashes_after(8 * 4), tmp_path / "parts", _config(), device="cpu")
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["step"] == 8
    resumed = make_model()  # fresh weights: everything must come from the checkpoint
    adapt(resumed, NoisyPairs(), tmp_path / "parts", _config(), device="cpu", resume=True)
    expected, got = lora_state(straight), lora_state(resumed)
    assert expected.keys() == got.keys()
    assert any(v.abs().max() > 0 for k, v in got.items() if k.endswith("lora_B"))
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_losses_recorded_whenever_read(tmp_path):
    """The step losses, held on the device between reads, reach the history complete and in order: read every
    step (progress bar and checkpoint each step), only at checkpoints, and in the checkpoint a run stops after."""
    every_step = adapt(make_model(), NoisyPairs(), tmp_path / "every", _config(log_every=1, checkpoint_every=1),
                       device="cpu")
    at_checkpoints = adapt(make_model(), NoisyPairs(), tmp_path / "checkpoints", _config(checkpoint_every=5),
                           device="cpu")
    assert len(every_step["loss"]) == 12
    assert at_checkpoints["loss"] == every_step["loss"]
    assert at_checkpoints["loss_terms"] == every_step["loss_terms"]
    with pytest.raises(KeyboardInterrupt):
        adapt(make_model(), crashes_after(8 * 4), tmp_path / "stopped", _config(), device="cpu")
    history = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["history"]
    assert history["loss"] == every_step["loss"][:8]
    resumed = adapt(make_model(), NoisyPairs(), tmp_path / "stopped", _config(), device="cpu", resume=True)
    assert resumed["loss"] == every_step["loss"]


def test_resume_after_sigkill(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        TASK
        + textwrap.dedent(
            """
            import sys
            torch.set_num_threads(1)
            from adaptsr.train import TrainConfig, adapt
            config = TrainConfig(steps=200, batch_size=4, lr=2e-3, warmup_steps=2, checkpoint_every=4,
                                 log_every=0, seed=3)
            adapt(make_model(), NoisyPairs(), sys.argv[1], config, device="cpu")
            """
        )
    )
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(script), str(run_dir)], env={**os.environ, "PYTHONHASHSEED": "0"})
    checkpoint = run_dir / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # let it get past the checkpoint, into steps that will be lost
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < killed_at < 200

    config = _config(steps=200)  # the killed run's config
    resumed = make_model()
    adapt(resumed, NoisyPairs(), run_dir, config, device="cpu", resume=True)
    straight = make_model()
    adapt(straight, NoisyPairs(), tmp_path / "straight", config, device="cpu")
    for key, value in lora_state(straight).items():
        assert torch.equal(value, lora_state(resumed)[key]), key


def test_run_folder_is_usable(tmp_path):
    model = make_model()
    adapt(model, NoisyPairs(), tmp_path, _config(steps=6), val_set=NoisyPairs(n=2, seed=9), device="cpu")
    metrics = __import__("json").loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 6 and [entry["step"] for entry in metrics["val"]] == [6]
    # validation numbers are pyiqa's PSNR on Y of the final model's outputs
    from adaptsr.evaluate import evaluate_pairs

    val = NoisyPairs(n=2, seed=9)
    with torch.no_grad():
        pairs = [(model.eval()(val.lr[i : i + 1]).clamp(0, 1)[0], val.hr[i]) for i in range(2)]
    model.train()
    assert metrics["val"][0]["psnr"] == pytest.approx(evaluate_pairs(pairs, ("psnr",), 2)["mean"]["psnr"], rel=1e-6)
    # comparison crops: LR | base | adapted | HR side by side, one row per validation image
    from adaptsr.data.images import read_image

    comparison = read_image(tmp_path / "comparison.png")
    assert comparison.shape == (3, 2 * 16, 4 * 16)
    assert metrics["trainable_params"] == sum(v.numel() for v in lora_state(model).values())
    lr = NoisyPairs(n=1, seed=5).lr
    model.eval()
    with torch.no_grad():
        expected = model(lr)
    base = make_model()
    adaptsr.merge_lora(base)  # B = 0 at init: this is the plain base model
    adaptsr.load_adapter(base, tmp_path / "adapter")
    merged = adaptsr.load_model(tmp_path / "model_merged.safetensors").model
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(lr), expected)
        torch.testing.assert_close(merged(lr), expected, rtol=1e-5, atol=1e-5)


def test_the_wait_for_batches_is_measured(tmp_path):
    class Slow(NoisyPairs):
        def __getitem__(self, i):
            time.sleep(0.02)
            return super().__getitem__(i)

    metrics = adapt(make_model(), Slow(), tmp_path, _config(steps=4), device="cpu")
    assert 4 * 4 * 0.02 <= metrics["data_seconds"] <= metrics["train_seconds"]
    assert metrics["num_workers"] == 0  # the automatic choice on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adapt_on_a_gpu(tmp_path):
    """The whole loop on a GPU: bf16 autocast, batches from workers through pinned memory, a validation, and
    files that give the trained model back on the CPU."""
    import multiprocessing

    model = make_model()
    metrics = adapt(model, NoisyPairs(), tmp_path, _config(steps=8, num_workers=2), val_set=NoisyPairs(n=2, seed=9),
                    device="cuda")
    assert len(metrics["loss"]) == 8 and metrics["skipped_steps"] == 0
    assert all(math.isfinite(loss) for loss in metrics["loss"]) and math.isfinite(metrics["val"][-1]["psnr"])
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert not multiprocessing.active_children()
    lr = NoisyPairs(n=1, seed=5).lr
    with torch.no_grad():
        expected = model.eval()(lr.cuda()).cpu()
        merged = adaptsr.load_model(tmp_path / "model_merged.safetensors").model
        torch.testing.assert_close(merged(lr), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def scripted_validation(monkeypatch):
    """``scripted_validation(scores)``: validations report these PSNRs in turn (the real ones run, for the
    comparison picture); returns the list the model's state dict at each validation is appended to."""

    def script(scores, metric="psnr"):
        real, scripted, states = training._validate, iter(scores), []

        def validate(model, *args, **kwargs):
            means, triples = real(model, *args, **kwargs)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return {**means, metric: next(scripted)}, triples

        monkeypatch.setattr(training, "_validate", validate)
        return states

    return script


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_the_best_validation_is_kept(tmp_path, scripted_validation, ema_decay):
    """Validations every 3 steps scored 21, 25, 23, 24 dB: adapter_best holds the weights scored at step 6 (the
    average, with EMA), and metrics name that validation."""
    states = scripted_validation([21.0, 25.0, 23.0, 24.0])
    metrics = adapt(make_model(), NoisyPairs(), tmp_path, _config(val_every=3, ema_decay=ema_decay),
                    val_set=NoisyPairs(n=2, seed=9), device="cpu")
    assert metrics["best_val"]["step"] == 6 and metrics["best_val"]["psnr"] == 25.0
    assert json.loads((tmp_path / "metrics.json").read_text())["best_val"] == metrics["best_val"]
    best = make_model()
    adaptsr.merge_lora(best)  # the plain base: B = 0 at init
    adaptsr.load_adapter(best, tmp_path / training.BEST_ADAPTER)
    kept = lora_state(best)
    at_step_6, final = ({k: v for k, v in state.items() if "lora_" in k} for state in (states[1], states[3]))
    assert kept.keys() == at_step_6.keys()
    for key, value in at_step_6.items():
        assert torch.equal(kept[key], value), key
    assert any(not torch.equal(kept[key], final[key]) for key in kept)


def test_the_best_validation_by_another_metric(tmp_path, scripted_validation):
    """val_metrics adds pyiqa metrics to every validation (GMSD here: one that needs no weight file); best_metric
    picks by one of them, by its lowest value where lower is better."""
    states = scripted_validation([0.30, 0.10, 0.20, 0.15], metric="gmsd")
    config = _config(val_every=3, val_metrics=("gmsd", "PSNR"), best_metric="gmsd")
    assert config.val_metrics == ("gmsd",)  # psnr and ssim are always scored
    metrics = adapt(make_model(), NoisyPairs(), tmp_path, config, val_set=NoisyPairs(n=2, seed=9), device="cpu")
    assert [entry["step"] for entry in metrics["val"]] == [3, 6, 9, 12]
    assert all(set(entry) == {"step", "psnr", "ssim", "gmsd"} for entry in metrics["val"])
    assert metrics["best_val"]["step"] == 6 and metrics["best_val"]["gmsd"] == 0.10
    best = make_model()
    adaptsr.merge_lora(best)
    adaptsr.load_adapter(best, tmp_path / training.BEST_ADAPTER)
    assert all(torch.equal(value, states[1][key]) for key, value in lora_state(best).items())


def test_validation_metrics_are_real_and_checked_before_training(tmp_path, monkeypatch, empty_hub):
    """The added metric is pyiqa's own score of the validation images; an unknown name, a best_metric that
    validation does not score, and a metric whose weights are missing are refused before any step."""
    from adaptsr.evaluate import evaluate_pairs

    val_set = NoisyPairs(n=2, seed=9)
    model = make_model()
    scores, triples = training._validate(model, val_set, torch.device("cpu"), metrics=("psnr", "ssim", "gmsd"))
    expected = evaluate_pairs([(sr, hr) for _, sr, hr in triples], ["gmsd"], 2)["mean"]["gmsd"]
    assert scores["gmsd"] == expected and 0 < expected < 1
    with pytest.raises(ValueError, match="unknown metric 'lpipz'; did you mean lpips"):
        _config(val_metrics=("lpipz",))
    with pytest.raises(ValueError, match="best_metric 'lpips' is not scored by validation: it scores psnr, ssim"):
        _config(best_metric="lpips")

    def unreachable(url, dst, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(RuntimeError, match="metric 'lpips' needs the weight file"):
        adapt(make_model(), NoisyPairs(), tmp_path, _config(val_metrics=("lpips",)), val_set=val_set, device="cpu")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_no_best_without_validations_along_the_way(tmp_path):
    adapt(make_model(), NoisyPairs(), tmp_path, _config(steps=4), val_set=NoisyPairs(n=2), device="cpu")
    assert not (tmp_path / training.BEST_ADAPTER).exists() and not (tmp_path / training.BEST_MODEL).exists()


def test_full_finetuning_keeps_the_best_model(tmp_path, scripted_validation):
    from spandrel.architectures.ESRGAN import ESRGAN

    states = scripted_validation([30.0, 20.0])
    torch.manual_seed(0)
    model = ESRGAN(num_filters=8, num_blocks=1, scale=2)
    adapt(model, NoisyPairs(), tmp_path, _config(steps=4, val_every=2), val_set=NoisyPairs(n=2), device="cpu")
    best = adaptsr.load_model(tmp_path / training.BEST_MODEL).model.state_dict()
    assert best.keys() == states[0].keys()
    for key, value in states[0].items():
        torch.testing.assert_close(best[key], value, rtol=0, atol=0, msg=key)
    assert any(not torch.equal(best[key], states[1][key]) for key in best)


def test_bad_input(tmp_path):
    frozen = make_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        adapt(frozen, NoisyPairs(), tmp_path, _config(), device="cpu")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        adapt(make_model(), NoisyPairs(), tmp_path / "empty", _config(), device="cpu", resume=True)
    with pytest.raises(ValueError, match="fewer than one batch"):
        adapt(make_model(), NoisyPairs(n=2), tmp_path, _config(), device="cpu")
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")


class _SpareLayer(torch.nn.Module):
    """Holds a layer its forward never calls (spandrel's SPAN keeps such convs for its inference form)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1)
        self.spare = torch.nn.Conv2d(12, 12, 1)
        self.shuffle = torch.nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.conv(x))


def test_adapters_on_layers_the_model_never_calls_are_refused(tmp_path):
    """An adapter whose layer is never called trains nothing (and would stall DDP): the first step says which."""
    model = _SpareLayer()
    adaptsr.inject_lora(model, targets=["conv", "spare"], rank=2)
    with pytest.raises(ValueError, match=r"adapters on 1 layer\(s\) got no gradient .*never calls those layers: spare;"):
        adapt(model, NoisyPairs(), tmp_path, _config(), device="cpu")
    assert not (tmp_path / "checkpoint.pt").exists()
    adaptsr.merge_lora(model)
    adaptsr.inject_lora(model, targets=["conv"], rank=2)  # the called layer alone trains
    adapt(model, NoisyPairs(), tmp_path / "conv-only", _config(steps=2), device="cpu")


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    """A rank changed between the runs, or a damaged checkpoint: an error naming the file (and the layer), and
    the checkpoint left as it was."""
    adapt(make_model(), NoisyPairs(), tmp_path, _config(steps=4), device="cpu")
    checkpoint = tmp_path / "checkpoint.pt"
    before = checkpoint.read_bytes()
    torch.manual_seed(0)
    from spandrel.architectures.ESRGAN import ESRGAN

    other_rank = ESRGAN(num_filters=8, num_blocks=1, scale=2)
    adaptsr.inject_lora(other_rank, targets="model[.].*", rank=2)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint\.pt does not match the model: .*lora_A.* is \(3, "):
        adapt(other_rank, NoisyPairs(), tmp_path, _config(steps=8), device="cpu", resume=True)
    assert checkpoint.read_bytes() == before
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "checkpoint.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match=r"damaged/checkpoint\.pt could not be read"):
        adapt(make_model(), NoisyPairs(), damaged, _config(steps=8), device="cpu", resume=True)


def test_schedule_shape():
    from adaptsr.train import _lr_factor

    config = _config(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [_lr_factor(step, config) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # non-increasing after warm-up
    assert factors[-1] > config.min_lr_ratio and _lr_factor(100, config) == pytest.approx(config.min_lr_ratio)


def test_validation_leaves_the_images_alone(tiny_sr):
    """A model that writes into its input (spandrel's RCAN scales it by 255 in place) runs on a copy: the
    validation images, and the LR panel of the comparison picture, stay as they were."""
    from adaptsr.train import _super_resolve

    torch.manual_seed(0)
    val_set = [(torch.rand(3, 8, 8), torch.rand(3, 16, 16)) for _ in range(2)]
    originals = [(lr.clone(), hr.clone()) for lr, hr in val_set]
    triples = _super_resolve(tiny_sr.rcan(), val_set, torch.device("cpu"))
    for (lr, hr), (lr0, hr0), (lr_out, sr, _) in zip(val_set, originals, triples):
        assert torch.equal(lr, lr0) and torch.equal(hr, hr0) and torch.equal(lr_out, lr0)
        assert sr.shape == (3, 16, 16)


class _SizeRecorder(torch.nn.Module):
    """A x2 model with a 3x3 receptive field that records the input sizes it is run on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1, padding_mode="replicate")
        self.seen: list[tuple[int, int]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return torch.nn.functional.pixel_shuffle(self.conv(x), 2)


def test_validation_in_tiles():
    """With a tile size, validation never runs the model on more than a tile (bounded memory), and for a
    model whose receptive field fits in the tiles' overlap the outputs equal the whole-image ones."""
    from adaptsr.train import _super_resolve

    torch.manual_seed(1)
    val_set = [(torch.rand(3, 37, 29), torch.rand(3, 74, 58))]
    model = _SizeRecorder()
    whole = _super_resolve(model, val_set, torch.device("cpu"))
    assert model.seen == [(37, 29)]
    model.seen.clear()
    tiled = _super_resolve(model, val_set, torch.device("cpu"), tile=16)
    assert len(model.seen) > 1 and all(h <= 16 and w <= 16 for h, w in model.seen), model.seen
    torch.testing.assert_close(tiled[0][1], whole[0][1], rtol=1e-5, atol=1e-5)
    assert model.training  # back to training mode afterwards


def test_validation_tile_reaches_adapt(tmp_path):
    """TrainConfig(val_tile=...) is what adapt's validations use."""
    model = _SizeRecorder()
    adaptsr.inject_lora(model, targets="conv", rank=2)
    train_set = [(torch.rand(3, 8, 8), torch.rand(3, 16, 16)) for _ in range(4)]
    val_set = [(torch.rand(3, 40, 40), torch.rand(3, 80, 80))]
    adapt(model, train_set, tmp_path, _config(steps=2, val_tile=16, val_every=1), val_set=val_set, device="cpu")
    validation_sizes = [size for size in model.seen if size != (8, 8)]
    assert validation_sizes and max(max(size) for size in validation_sizes) <= 16
    with pytest.raises(ValueError, match="val_tile"):
        _config(val_tile=-1)


@pytest.mark.parametrize("micro_batch", [1, 3])
def test_micro_batches_take_the_whole_batchs_step(tmp_path, micro_batch):
    """micro_batch: each step's batch of 4 in pieces of 1, or of 3 and 1 (weighted by their shares), gives the
    whole batch's losses and adapters, up to float rounding."""
    whole, pieces = make_model(), make_model()
    expected = adapt(whole, NoisyPairs(), tmp_path / "whole", _config(steps=6), device="cpu")
    got = adapt(pieces, NoisyPairs(), tmp_path / "pieces", _config(steps=6, micro_batch=micro_batch), device="cpu")
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    for key, value in lora_state(whole).items():
        torch.testing.assert_close(lora_state(pieces)[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert json.loads((tmp_path / "pieces" / "config.json").read_text())["micro_batch"] == micro_batch
    with pytest.raises(ValueError, match="micro_batch must be 0"):
        _config(micro_batch=-1)


def test_cudnn_autotunes_a_cuda_runs_convolutions_only():
    """The autotuner is a process-wide switch: on for a CUDA run's training loop, restored after, even when the
    loop fails, and untouched on the CPU. (Setting the flag needs no GPU.)"""
    before = torch.backends.cudnn.benchmark
    with training._tuned_convolutions(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark == before
    with pytest.raises(KeyError), training._tuned_convolutions(torch.device("cuda", 0)):
        assert torch.backends.cudnn.benchmark is True
        raise KeyError("the loop failed")
    assert torch.backends.cudnn.benchmark == before
