"""Training batches prepared in DataLoader workers: the same batches and the same run as without them, the
workers' errors as they would be without them, and no worker left behind."""

from __future__ import annotations

import multiprocessing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from spandrel.architectures.ESRGAN import ESRGAN

import adaptsr

from adaptsr.data import HRFolderDataset, degrade, load_degradation
from adaptsr.data import batches as batches_module
from adaptsr.data import datasets as datasets_module
from adaptsr.data.batches import auto_num_workers, training_batches
from adaptsr.train import TrainConfig, _batch_indices, adapt

TASK = (Path(__file__).parents[1] / "train_task.py").read_text()
namespace: dict = {}
exec(TASK, namespace)
NoisyPairs, make_model, lora_state = namespace["NoisyPairs"], namespace["make_model"], namespace["lora_state"]

_PROFILE = load_degradation("lowlight")  # blur, resize, noise and JPEG: every random draw of the pipeline


def _lowlight(hr, scale, generator):
    return degrade(hr, scale, _PROFILE, generator)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _all_batches(dataset, steps, num_workers, batch_size=4):
    config = TrainConfig(batch_size=batch_size, seed=5)
    return list(training_batches(dataset, steps, lambda s: _batch_indices(s, len(dataset), config),
                                 torch.device("cpu"), num_workers))


def test_workers_give_the_same_batches(photos):
    """Crops, flips and the degradation's draws come from (seed, epoch, index): workers change nothing, across
    epochs (12 items, batches of 4: steps 3 to 7 span two epochs) and from a resumed step on."""
    dataset = HRFolderDataset(photos, 2, 8, _lowlight, seed=1, samples_per_epoch=12)
    steps = range(3, 8)
    here = _all_batches(dataset, steps, 0)
    there = _all_batches(dataset, steps, 2)
    assert len(here) == len(there) == len(steps)
    for (lr_a, hr_a), (lr_b, hr_b) in zip(here, there):
        assert lr_a.shape == (4, 3, 8, 8) and hr_a.shape == (4, 3, 16, 16)
        assert torch.equal(hr_a, hr_b)  # crops and flips: copies, exact anywhere
        # the degradation's float sums run on a worker's one thread instead of the training process's several:
        # bitwise equal on the 2-core AMD EPYC; elsewhere a sum may round to the neighbouring 8-bit LR level
        assert (lr_a - lr_b).abs().max() <= 1 / 255 + 1e-6 and (lr_a != lr_b).float().mean() < 0.01
    assert not torch.equal(here[0][0], here[1][0])  # the steps do differ
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("workers", [0, 2])
def test_steps_are_worked_out_as_they_come(workers):
    """A long run's batches are not all planned up front: only the steps being prepared are."""
    dataset, planned = NoisyPairs(), []
    config = TrainConfig(batch_size=4)

    def step_items(step):
        planned.append(step)
        return _batch_indices(step, len(dataset), config)

    batches = training_batches(dataset, range(10**9), step_items, torch.device("cpu"), workers)
    first, second = next(batches), next(batches)
    batches.close()
    assert first[0].shape == (4, 3, 8, 8) and not torch.equal(first[0], second[0])
    assert planned[:2] == [0, 1] and len(planned) <= 2 + 2 * workers + 2  # DataLoader prefetches 2 per worker
    assert not multiprocessing.active_children()


def test_a_run_with_workers_equals_one_without(tmp_path):
    """The whole run (weights, losses) does not depend on the number of workers: their seeds must not be drawn
    from the global generator that the training step (LoRA dropout here) draws from."""
    runs = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        model = ESRGAN(num_filters=8, num_blocks=1, scale=2)
        adaptsr.inject_lora(model, targets="model[.].*", rank=3, lora_dropout=0.2)
        config = TrainConfig(steps=6, batch_size=4, lr=2e-3, warmup_steps=1, checkpoint_every=3, log_every=0,
                             seed=2, num_workers=workers)
        metrics = adapt(model, NoisyPairs(), tmp_path / str(workers), config, device="cpu")
        runs[workers] = (lora_state(model), metrics["loss"])
    assert runs[0][1] == runs[2][1]
    for key, value in runs[0][0].items():
        assert torch.equal(value, runs[2][0][key]), key
    assert not multiprocessing.active_children()


class _BadItem(NoisyPairs):
    def __getitem__(self, i):
        if i == 5:
            raise ValueError("image /data/broken.png is truncated or corrupt (OSError: unexpected end of file)")
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_item_raises_its_own_error(workers):
    with pytest.raises(ValueError) as caught:
        _all_batches(_BadItem(), range(3), workers)
    assert str(caught.value) == "image /data/broken.png is truncated or corrupt (OSError: unexpected end of file)"
    if not workers:  # raised where it happened, its traceback intact
        assert any(entry.name == "__getitem__" and entry.path.name == "test_batches.py" for entry in caught.traceback)
    assert not multiprocessing.active_children()


def test_adapt_stops_its_workers_when_the_run_fails(tmp_path):
    config = TrainConfig(steps=6, batch_size=4, warmup_steps=1, log_every=0, num_workers=2)
    with pytest.raises(ValueError, match="broken.png"):
        adapt(make_model(), _BadItem(), tmp_path, config, device="cpu")
    assert not multiprocessing.active_children()


def test_spawned_workers_need_a_picklable_dataset(monkeypatch):
    """Where workers are spawned (macOS, Windows), a dataset holding a lambda cannot reach them: the batches
    are built here instead, with a warning saying why."""
    dataset = NoisyPairs()
    dataset.transform = lambda x: x
    monkeypatch.setattr(batches_module.multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    with pytest.warns(UserWarning, match="cannot be pickled"):
        got = _all_batches(dataset, range(2), 2)
    assert len(got) == 2 and not multiprocessing.active_children()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _all_batches(NoisyPairs(), range(1), 0)  # no workers asked for: nothing to warn about


def test_the_commands_datasets_reach_spawned_workers(photos, monkeypatch):
    """adapt's and the demo's degradations are Degrader objects, not closures: their datasets pickle, so spawned
    workers get them, and a pickled copy gives the same items."""
    import pickle

    from adaptsr.data import Degrader, mixture_of

    dataset = HRFolderDataset(photos, 2, 8, Degrader(mixture_of(["camera", "lowlight"])), seed=1, samples_per_epoch=8)
    copy = pickle.loads(pickle.dumps(dataset))
    for index in range(3):
        for a, b in zip(dataset[index], copy[index]):
            assert torch.equal(a, b)
    monkeypatch.setattr(batches_module.multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the training process
        there = _all_batches(dataset, range(2), 2)
    here = _all_batches(dataset, range(2), 0)
    assert all((a[0] - b[0]).abs().max() <= 1 / 255 + 1e-6 for a, b in zip(here, there))  # as above


def test_auto_num_workers(monkeypatch):
    assert auto_num_workers(torch.device("cpu")) == 0
    for cores, expected in ((1, 0), (2, 1), (16, 8), (64, 8)):
        monkeypatch.setattr(batches_module.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert auto_num_workers(torch.device("cuda")) == expected
    # four ranks on one machine share its cores
    monkeypatch.setattr(batches_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert auto_num_workers(torch.device("cuda"), processes=4) == 3
    assert auto_num_workers(torch.device("cuda"), processes=16) == 0


def test_bad_num_workers():
    with pytest.raises(ValueError, match="num_workers must be None"):
        TrainConfig(num_workers=-1)
    with pytest.raises(ValueError, match="got -2"):
        _all_batches(NoisyPairs(), range(1), -2)


def test_workers_share_the_decoded_image_budget(photos, monkeypatch):
    """Each worker keeps its own decoded images: together they stay within cache_bytes."""
    one_image = 3 * 40 * 48 * 4
    cache = datasets_module._DecodedImages(budget=4 * one_image)
    monkeypatch.setattr(datasets_module, "get_worker_info", lambda: type("Info", (), {"num_workers": 4})())
    cache(photos / "p0.png")
    assert cache._bytes == one_image  # a quarter of the budget: exactly one image
    cache(photos / "p1.png")
    assert cache._bytes == one_image
    monkeypatch.setattr(datasets_module, "get_worker_info", lambda: None)  # the training process: all of it
    cache(photos / "p1.png")
    assert cache._bytes > one_image
