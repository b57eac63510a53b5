"""The training batches of a run, step by step, prepared ahead of the step in DataLoader workers.

Every item is a pure function of (seed, epoch, index) (see :mod:`adaptsr.data.datasets`), so the
batches do not depend on who prepares them (bitwise on the CPUs measured; a worker sums floats on one
thread, which on other CPUs may round an LR pixel to the next 8-bit level): ``num_workers=0`` builds each batch in the training
process when its step comes, ``num_workers=N`` lets N worker processes crop, augment and degrade the
next steps' items while the model trains on this one. On a GPU the synthetic degradation of a batch
costs more CPU time than the step's GPU time, so without workers the GPU would mostly wait.

A worker's failure (a corrupt image, a degradation returning the wrong shape) reaches the training
process as the same exception type and message it would have had without workers, not as
DataLoader's traceback text.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["auto_num_workers", "training_batches"]

# Enough to keep a GPU fed with the bundled models' batches of 16 Real-ESRGAN-degraded crops
# (about 9 ms of CPU per crop), without claiming a large machine's every core.
_MAX_AUTO_WORKERS = 8


def auto_num_workers(device: torch.device, processes: int = 1) -> int:
    """The workers ``num_workers=None`` picks: on a GPU, one per CPU core this process may use, less one for
    the training process, at most 8, the cores shared out among ``processes`` training processes (the ranks
    of a distributed run, which share the machine's cores); on the CPU none, since workers would take cores
    from the model's own threads."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(_MAX_AUTO_WORKERS, cores // max(1, processes) - 1))


class _Failure:
    """An exception raised in a worker, carried back as data: its type and message survive intact."""

    def __init__(self, error: Exception) -> None:
        self.error_type = type(error)
        self.message = str(error)

    def reraise(self):
        try:
            error = self.error_type(self.message)
        except Exception:  # an exception type whose constructor wants more than a message
            error = RuntimeError(f"{self.error_type.__name__}: {self.message}")
        raise error


class _EpochItems(Dataset):
    """``dataset`` addressed by (epoch, index), so a worker's copy serves any epoch's items. ``in_worker``:
    errors come back as data (:class:`_Failure`); in the training process they propagate as they are."""

    def __init__(self, dataset, in_worker: bool) -> None:
        self.dataset = dataset
        self.in_worker = in_worker

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        try:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            return self.dataset[index]
        except Exception as err:
            if not self.in_worker:
                raise
            return _Failure(err)


class _StepKeys:
    """Each step's (epoch, index) keys, worked out as the loader reaches the step (a long run's all at once
    would cost a permutation of the dataset per step before the first one)."""

    def __init__(self, steps: Sequence[int], step_items: Callable[[int], tuple[list[int], int]]) -> None:
        self.steps, self.step_items = steps, step_items

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in self.steps:
            indices, epoch = self.step_items(step)
            yield [(epoch, index) for index in indices]


def _stack(items: list) -> tuple[torch.Tensor, torch.Tensor] | _Failure:
    for item in items:
        if isinstance(item, _Failure):
            return item
    return torch.stack([lr for lr, _ in items]), torch.stack([hr for _, hr in items])


def _can_pickle(dataset) -> bool:
    try:
        pickle.dumps(dataset)
    except Exception:
        return False
    return True


def training_batches(
    dataset,
    steps: Sequence[int],
    step_items: Callable[[int], tuple[list[int], int]],
    device: torch.device,
    num_workers: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (lr, hr) batch of each step in ``steps``, on ``device``; ``step_items(step)`` gives its dataset
    indices and epoch. A generator: close it (or let it be collected) to stop the workers."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 (no workers) or more, got {num_workers}")
    keys = _StepKeys(steps, step_items)
    if num_workers and multiprocessing.get_start_method(allow_none=False) != "fork" and not _can_pickle(dataset):
        # spawned workers (macOS, Windows) receive the dataset pickled: a lambda degradation cannot be
        warnings.warn(
            f"the training set cannot be pickled for {num_workers} spawned DataLoader workers (a lambda or a "
            "local function as its degradation?); preparing batches in the training process instead",
            stacklevel=3,
        )
        num_workers = 0
    items = _EpochItems(dataset, in_worker=num_workers > 0)
    if num_workers == 0:
        batches = (_stack([items[key] for key in step_keys]) for step_keys in keys)
    else:
        # its own generator for the workers' seeds: drawn from the global one, they would shift what the training
        # step draws (dropout), so a run would depend on its number of workers
        batches = iter(DataLoader(items, batch_sampler=keys, collate_fn=_stack, num_workers=num_workers,
                                  pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0)))
    try:
        for batch in batches:
            if isinstance(batch, _Failure):
                batch.reraise()
            lr, hr = batch
            yield lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
    finally:
        # now, not when the iterator is collected: an exception's traceback keeps this frame, and the workers
        # with it, alive (DataLoader has no public way to stop its workers)
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
