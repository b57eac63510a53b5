"""The CPU work around the model: making a training batch, writing an upscaled image.

- ``test_bench_training_batch``: one batch of 16 crops of the bundled photos, cropped, flipped and
  degraded with a camera profile in the training process (``adaptsr.data.batches`` without workers),
  per profile and LR patch size. What a GPU step waits for without DataLoader workers (README: adapt,
  ``--workers``); ``extra_info["ms_per_crop"]`` is the median over the batch.
- ``test_bench_png_encode``: ``write_png`` of a 2048 x 2048 RGB result (a bundled photo upscaled), what
  ``adaptsr upscale`` encodes in a background thread while the model runs on the next image.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptsr.data import Degrader, HRFolderDataset, load_degradation
from adaptsr.data.batches import training_batches
from adaptsr.data.bundled import TRAIN, load_photo, write_photos
from adaptsr.data.images import write_png
from adaptsr.train import TrainConfig, _batch_indices

BATCH = 16


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(TRAIN, tmp_path_factory.mktemp("photos"))


@pytest.mark.parametrize("patch", [32, 64])
@pytest.mark.parametrize("profile", ["lowlight", "camera"])
def test_bench_training_batch(benchmark, photos, profile, patch):
    dataset = HRFolderDataset(photos, 4, patch, Degrader(load_degradation(profile)), seed=0,
                              samples_per_epoch=len(TRAIN) * 32)
    config = TrainConfig(batch_size=BATCH)
    batches = training_batches(dataset, range(10**9), lambda step: _batch_indices(step, len(dataset), config),
                               torch.device("cpu"), num_workers=0)
    next(batches)  # decodes the photos into the dataset's cache: the steady state is what a run pays
    benchmark.extra_info.update(provider=f"{profile} degradation", shape=f"{BATCH}x3x{patch}x{patch} LR")
    lr, hr = benchmark(next, batches)
    assert lr.shape == (BATCH, 3, patch, patch) and hr.shape == (BATCH, 3, 4 * patch, 4 * patch)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["ms_per_crop"] = 1000 * benchmark.stats.stats.median / BATCH
    batches.close()


def test_bench_png_encode(benchmark, tmp_path):
    photo = load_photo(TRAIN[0])
    result = F.interpolate(photo[None], size=(2048, 2048), mode="bicubic", align_corners=False).clamp(0, 1)[0]
    benchmark.extra_info.update(provider="write_png (Pillow)", shape="3x2048x2048")
    benchmark(write_png, result, tmp_path / "x4.png")
    assert (tmp_path / "x4.png").stat().st_size > 0
