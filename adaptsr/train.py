"""The adaptation loop: train LoRA adapters (or the whole model) on (LR, HR) pairs, resumably.

``adapt(model, train_set, run_dir, config)`` trains every parameter of ``model`` that requires
grad (after ``inject_lora`` those are the adapters) with AdamW, a linear warm-up then cosine
decay, an L1 loss, gradient clipping and a guard that skips non-finite steps. Adversarial
adaptation (AdaptSR-GAN) adds Real-ESRGAN's VGG perceptual loss and a GAN loss against a U-Net
discriminator trained alongside (``perceptual_weight``, ``gan_weight``; ``adaptsr.objective``);
``ema_decay`` > 0 validates and saves a moving average of the trained weights (``adaptsr.ema``). Every
``checkpoint_every`` steps it writes ``run_dir/checkpoint.pt`` atomically (trainable weights,
optimizer, schedule, history, the discriminator with its optimizer, the average); ``resume=True`` continues
from it and, on the CPU, ends with the same weights as an uninterrupted run: batches are a pure
function of (seed, step), not of an iterator's hidden state.

Under ``torchrun`` (or with a process group already initialised) the model is wrapped in
DistributedDataParallel (nccl on GPUs, gloo on CPUs): each step's global batch of
``batch_size`` is split evenly over the ranks, gradients are averaged, each rank validates every
world-th validation image (the scores gathered, so the means are the whole set's), and only rank 0
logs and writes files.

At the end the run folder holds ``config.json``, ``metrics.json`` (losses, validation PSNR/SSIM
on Y), ``curves.png``, ``comparison.png`` (LR | base | adapted | HR crops of the validation
images, on a fresh start with a validation set), and, for a LoRA model, ``adapter/``
(PEFT-layout adapter files); always the merged model: given ``base_checkpoint`` (the file the model was
loaded from), in that file's format and layout (``model_merged.pth`` beside a pickled base, with its
``params_ema`` wrapper and key names, so the architecture's own code opens it as it opened the base), else
``model_merged.safetensors`` in spandrel's layout (a plain checkpoint spandrel opens as the original
architecture); with a GAN loss ``discriminator.safetensors``. With validations along
the way (``val_every``), the weights of the best validation so far (by PSNR, or ``best_metric``: a pyiqa
metric that ``val_metrics`` adds to PSNR and SSIM) are kept too, as they are scored
(the average, with EMA): ``adapter_best/`` for a LoRA model, ``model_best.safetensors`` otherwise;
``metrics.json`` names that validation (``best_val``). Picking the best on the validation set flatters its
score: judge the pick on other images.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from adaptsr import autotune
from adaptsr.adapter import save_adapter
from adaptsr.data.batches import auto_num_workers, training_batches
from adaptsr.discriminator import UNetDiscriminator
from adaptsr.ema import ParameterEMA
from adaptsr.infer import image_of, upscale
from adaptsr.inject import lora_layers, unwrap_model
from adaptsr.io import atomic_write, save_model
from adaptsr.objective import Objective, batch_pieces, syncing_last
from adaptsr.optim import _check_lora_plus_ratio, _optimizer_groups, _trainable

__all__ = ["TrainConfig", "adapt"]

_CHECKPOINT = "checkpoint.pt"
# with validations every val_every steps: the best-scoring weights so far (by validation PSNR, or best_metric)
BEST_ADAPTER = "adapter_best"
BEST_MODEL = "model_best.safetensors"
# what every validation scores (on the Y channel, the border cropped: the SR convention); config.val_metrics adds more
_VAL_METRICS = ("psnr", "ssim")
# Consecutive non-finite losses tolerated before the run stops: a few can come from a bad
# batch under mixed precision; many mean the learning rate or the data is broken.
_MAX_BAD_STEPS = 10


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    checkpoint_every: int = 100
    val_every: int = 0  # 0: validate only at the end (when a validation set is given)
    log_every: int = 10  # steps between loss updates on the progress bar; 0: no progress bar
    seed: int = 0
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16", "off"
    val_tile: int = 0  # validate in overlapping tiles of this many LR pixels (adaptsr.infer.upscale); 0: whole images
    # The loss (adaptsr.objective): L1, plus for adversarial adaptation Real-ESRGAN's VGG perceptual loss and a
    # GAN loss; its recipe is pixel 1, perceptual 1, gan 0.1.
    pixel_weight: float = 1.0
    perceptual_weight: float = 0.0
    gan_weight: float = 0.0
    # pyiqa's full-reference distances as loss terms, metric name -> weight (e.g. {"lpips": 1.0}: LPIPS with L1, a
    # recent real-world SR fine-tuning recipe); adaptsr.losses.iqa_loss_names() lists the metrics that can be losses
    iqa_loss_weights: dict[str, float] = field(default_factory=dict)
    discriminator_lr: float = 1e-4  # the discriminator's Adam learning rate (constant)
    # > 0: validate and save an exponential moving average of the trained weights (adaptsr.ema; BasicSR's 0.999)
    ema_decay: float = 0.0
    # LoRA+ (Hayou et al., 2024): lora_B and the one-dimensional parameters learn at this many times lr; 1: off
    lora_plus_ratio: float = 1.0
    # DataLoader worker processes preparing the next steps' batches (adaptsr.data.batches); None: on a GPU one
    # per CPU core less one, at most 8, shared among the ranks of a distributed run; on the CPU none. The batches
    # are the same whatever the number.
    num_workers: int | None = None
    # Validation scores PSNR and SSIM (Y channel), plus these pyiqa metrics (e.g. lpips, dists: what a GAN run is
    # judged by); best_metric picks the validation whose weights are kept (adapter_best/): its highest value, or its
    # lowest for a metric where lower is better (lpips, dists).
    val_metrics: tuple[str, ...] = ()
    best_metric: str = "psnr"
    # > 0: each step's batch (each process's share of it) runs forward and backward in pieces of this many items,
    # their gradients accumulated: the same step up to float rounding, with one piece's activations in memory
    micro_batch: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        for name in ("pixel_weight", "perceptual_weight", "gan_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.iqa_loss_weights = _checked_iqa_loss_weights(self.iqa_loss_weights)
        if self.pixel_weight == 0 and self.perceptual_weight == 0 and not any(self.iqa_loss_weights.values()):
            raise ValueError("pixel_weight, perceptual_weight and iqa_loss_weights are all 0: a GAN loss alone does "
                             "not keep the image's content; give one of them a weight")
        if not (math.isfinite(self.discriminator_lr) and self.discriminator_lr > 0):
            raise ValueError(f"discriminator_lr must be positive, got {self.discriminator_lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no average), got {self.ema_decay}")
        if self.val_tile < 0:
            raise ValueError(f"val_tile must be 0 (whole images) or a tile size in pixels, got {self.val_tile}")
        _check_lora_plus_ratio(self.lora_plus_ratio)
        if self.micro_batch < 0:
            raise ValueError(f"micro_batch must be 0 (whole batches) or a number of items, got {self.micro_batch}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be None (automatic), 0 (no workers) or more, got {self.num_workers}")
        _uses_bf16(self.amp, "cpu")  # a clear error for an unknown amp now, not at the first step
        from adaptsr.evaluate import _check_names

        extra = [name for name in _check_names(self.val_metrics) if name not in _VAL_METRICS] if self.val_metrics else []
        self.val_metrics = tuple(extra)  # unknown names raise, naming the nearest pyiqa names
        self.best_metric = self.best_metric.strip().lower()
        if self.best_metric not in (*_VAL_METRICS, *self.val_metrics):
            raise ValueError(f"best_metric {self.best_metric!r} is not scored by validation: it scores "
                             f"{', '.join((*_VAL_METRICS, *self.val_metrics))} (add it to val_metrics)")


def _checked_iqa_loss_weights(weights) -> dict[str, float]:
    """The loss metrics' names normalised (pyiqa's, and distances: a clear error otherwise), weights finite and >= 0."""
    if not weights:
        return {}
    if not isinstance(weights, dict):
        raise ValueError(f"iqa_loss_weights must map pyiqa metric names to weights, got {weights!r}")
    from adaptsr.losses import check_iqa_loss_name

    checked = {}
    for name, weight in weights.items():
        key = check_iqa_loss_name(str(name))
        if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"iqa_loss_weights[{key!r}] must be a finite number >= 0, got {weight!r}")
        if key in checked:
            raise ValueError(f"iqa_loss_weights names {key!r} twice")
        checked[key] = float(weight)
    return checked


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _batch_indices(step: int, num_items: int, config: TrainConfig) -> tuple[list[int], int]:
    """The dataset indices of ``step`` and its epoch: a fresh permutation per epoch, seeded by (seed, epoch)."""
    per_epoch = max(1, num_items // config.batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(num_items, generator=generator)
    start = position * config.batch_size
    return order[start:start + config.batch_size].tolist(), epoch


def _load_batch(dataset, indices: list[int], epoch: int, device: torch.device):
    """One batch built in this process (the training loop's come from adaptsr.data.batches)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    pairs = [dataset[i] for i in indices]
    lr = torch.stack([p[0] for p in pairs]).to(device)
    hr = torch.stack([p[1] for p in pairs]).to(device)
    return lr, hr


def _timed(batches, history: dict):
    """``batches``, adding the time spent waiting for each to ``history["data_seconds"]``: how data-bound the
    run is (more DataLoader workers help where this is a large share of ``train_seconds``)."""
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        history["data_seconds"] += time.perf_counter() - start
        yield batch


def _uses_bf16(amp: str, device_type: str) -> bool:
    """Whether the forward runs under bf16 autocast: TrainConfig's ``amp`` ("auto": on CUDA) on this device."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {amp!r}")
    return amp == "bf16" or (amp == "auto" and device_type == "cuda")


def _training_loss(network: nn.Module, objective: Objective, lr: torch.Tensor, hr: torch.Tensor, use_bf16: bool):
    """(the objective's generator loss, its terms, the SR batch) of one batch, the forward under bf16 autocast
    when asked (the losses in fp32)."""
    with torch.autocast(lr.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        sr = image_of(network(lr))
        loss, terms = objective.generator_loss(sr, hr)
    return loss, terms, sr


def _accumulate_gradients(network: nn.Module, objective: Objective, lr: torch.Tensor, hr: torch.Tensor,
                          use_bf16: bool, micro_batch: int = 0):
    """Forward and backward of one batch, the gradients set to None first: in pieces of ``micro_batch`` items
    (0: the whole batch), each piece's loss weighted by its share of the batch, so the gradients accumulate to
    the whole batch's. Returns ``_training_loss``'s values for the whole batch, detached."""
    for p in network.parameters():
        p.grad = None
    pieces = batch_pieces(micro_batch, lr, hr)
    loss, terms, outputs = 0.0, {}, []
    for i, (share, (lr_part, hr_part)) in enumerate(pieces):
        with syncing_last(network, i == len(pieces) - 1):
            part_loss, part_terms, sr = _training_loss(network, objective, lr_part, hr_part, use_bf16)
            (part_loss * share if share != 1 else part_loss).backward()
        loss = loss + part_loss.detach() * share
        for name, value in part_terms.items():
            terms[name] = terms.get(name, 0.0) + value.detach() * share
        outputs.append(sr.detach())
    return loss, terms, outputs[0] if len(outputs) == 1 else torch.cat(outputs)


@contextlib.contextmanager
def _tuned_convolutions(device: torch.device):
    """cuDNN's autotuner on for a CUDA run (BasicSR's default too): training crops all have one shape, so timing
    each convolution's algorithms once, at the first step, pays for itself; the setting is restored afterwards,
    since it is global to the process. On the GPU this gives up bitwise-repeatable runs, which only the CPU
    promises anyway."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _apply_gradients(params: dict[str, nn.Parameter], optimizer, grad_clip: float) -> None:
    """Global-norm clipping of the accumulated gradients (``grad_clip`` 0: none), then one optimizer step."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
    optimizer.step()


def _check_adapters_run(module: nn.Module) -> None:
    """After the first backward: every adapter got a gradient, or its layer is never called.

    A model can hold layers its training forward never calls (spandrel's SPAN keeps convs for its
    inference form); an adapter there trains nothing, and under DDP its gradient never arrives, which
    fails a step later with an unhelpful message. Say which layers, once, up front. (A model that reads
    an adapted layer's weight instead of calling it trains the adapter through ``LoRALayer.weight``.)
    """
    idle = [name for name, layer in lora_layers(module) if layer.lora_B.grad is None and layer.lora_A.grad is None]
    if idle:
        raise ValueError(
            f"the adapters on {len(idle)} layer(s) got no gradient in the first training step, so the model never "
            f"calls those layers: {', '.join(idle[:4])}{', ...' if len(idle) > 4 else ''}; leave them out of the "
            "LoRA targets"
        )


def _init_distributed(device: torch.device | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device), joining the process group torchrun describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), torch.device(device or "cpu")


@torch.no_grad()
def _super_resolve(model, val_set, device: torch.device, tile: int = 0, items=None) -> list[tuple[torch.Tensor, ...]]:
    """(lr, sr, hr) on the CPU for every validation item (or those at ``items``), the model in eval mode.

    Through ``upscale``, as ``adaptsr upscale`` and ``eval`` run it: the model's size requirements met by
    padding, the input copied (spandrel's RCAN writes into it), and with ``tile`` > 0 the image cut into
    overlapping tiles, so a large validation image cannot run the GPU out of memory halfway through a run.
    """
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    triples = []
    for i in range(len(val_set)) if items is None else items:
        lr, hr = val_set[i][:2]
        scale = hr.shape[-1] // lr.shape[-1]
        # overlap as upscale's default (32) where the tile allows, so small tiles work too
        sr = upscale(model, lr[None].to(device), scale, tile=tile or None, overlap=min(32, tile // 4))[0].float().cpu()
        triples.append((lr, sr, hr))
    module.train(was_training)
    return triples


def _validation_share(num_items: int, rank: int, world: int) -> range:
    """The validation items one process scores: every world-th, so a DDP run validates world times faster."""
    return range(rank, num_items, world)


def _validate(model, val_set, device: torch.device, tile: int = 0, rank: int = 0, world: int = 1,
              metrics: tuple[str, ...] = _VAL_METRICS):
    """The mean of each of ``metrics`` (pyiqa names; PSNR and SSIM on the Y channel, border cropped by the scale:
    the SR convention) over the whole validation set, and the (lr, sr, hr) triples this process scored (its
    share under DDP).

    Under DDP every rank scores its share and the per-image scores are gathered, so every rank returns the
    same means, summed in item order as one process sums them.
    """
    from adaptsr.evaluate import evaluate_pairs

    share = _validation_share(len(val_set), rank, world)
    triples = _super_resolve(model, val_set, device, tile, share)
    lr, hr = (triples[0][0], triples[0][2]) if triples else val_set[0][:2]  # a rank with no share still needs the scale
    result = evaluate_pairs([(sr, hr) for _, sr, hr in triples], metrics, hr.shape[-1] // lr.shape[-1])
    if result["skipped"]:  # checked when the run started: only a weight file removed since then gets here
        raise RuntimeError("validation: " + "; ".join(result["skipped"].values()))
    scored = [(i, {m: row[m] for m in metrics}) for i, row in zip(share, result["images"])]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, scored)
        scored = sorted((item for part in gathered for item in part), key=lambda item: item[0])
    means = {m: sum(scores[m] for _, scores in scored) / len(scored) for m in metrics}
    return means, triples


def _lower_is_better(metric: str) -> bool:
    """Whether a lower value of a validation metric is better (LPIPS, DISTS, NIQE), as pyiqa records it."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    return bool(DEFAULT_CONFIGS[metric].get("lower_better", False))


def _check_val_metrics(metrics: tuple[str, ...]) -> None:
    """Create each extra validation metric once before training, so a missing weight file (which the message names,
    with where to put it) stops the run at its start rather than at its first validation."""
    from adaptsr.evaluate import create_metric

    for name in metrics:
        create_metric(name, device="cpu")


def _save_best(model, module: nn.Module, run_dir: Path) -> None:
    """``adapter_best/`` for a LoRA model (small); the whole model, ``model_best.safetensors``, otherwise."""
    if any(True for _ in lora_layers(module)):
        save_adapter(model, run_dir / BEST_ADAPTER)
    else:
        save_model(model, run_dir / BEST_MODEL)


def _beats(scores: dict, other: dict, metric: str) -> bool:
    """Whether ``scores`` are strictly better than ``other``'s on ``metric`` (higher, or lower where lower is better)."""
    sign = -1 if _lower_is_better(metric) else 1
    return sign * scores[metric] > sign * other[metric]


def _best_validation(history: dict, metric: str = "psnr") -> dict | None:
    """The validation with the best ``metric`` (the earliest of equals), among those that scored it (a resumed run
    may have changed its metrics)."""
    best = None
    for entry in history["val"]:
        if metric in entry and (best is None or _beats(entry, best, metric)):
            best = entry
    return best


def _write_curves(path: Path, history: dict) -> None:
    """Training loss and validation PSNR against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; and never the interactive backend of a notebook
    import matplotlib.pyplot as plt

    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
    loss_axis.plot(range(1, len(history["loss"]) + 1), history["loss"], lw=0.8, color="tab:blue")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    if history["val"]:
        psnr_axis = loss_axis.twinx()
        steps = [entry["step"] for entry in history["val"]]
        psnr_axis.plot(steps, [entry["psnr"] for entry in history["val"]], "o-", color="tab:red")
        psnr_axis.set_ylabel("validation PSNR (Y, dB)", color="tab:red")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _write_comparison(path: Path, before, after, crop: int = 96, rows: int = 4) -> None:
    """Side-by-side crops, one validation image per row: LR (nearest-upscaled) | base | adapted | HR."""
    from adaptsr.data.images import write_png

    tiles = []
    for (lr, base_sr, hr), (_, adapted_sr, _) in list(zip(before, after))[:rows]:
        size = min(crop, hr.shape[-2], hr.shape[-1])
        top, left = (hr.shape[-2] - size) // 2, (hr.shape[-1] - size) // 2
        lr_up = F.interpolate(lr[None].float(), size=hr.shape[-2:], mode="nearest")[0]
        panels = [t[:, top:top + size, left:left + size] for t in (lr_up, base_sr, adapted_sr, hr.float())]
        tiles.append(torch.cat(panels, dim=2))
    width = max(t.shape[-1] for t in tiles)
    tiles = [F.pad(t, (0, width - t.shape[-1])) for t in tiles]
    write_png(torch.cat(tiles, dim=1), path)


def _save_merged(model, run_dir: Path, base_checkpoint) -> tuple[Path, list[str]]:
    """Write the merged model: in the base checkpoint's format and layout, where there is one and every changed
    weight can be placed in it, else in spandrel's layout. Returns its path and notes on the layout."""
    if base_checkpoint is not None:
        suffix = ".safetensors" if Path(base_checkpoint).suffix.lower() == ".safetensors" else ".pth"
        path = run_dir / f"model_merged{suffix}"
        try:
            return path, [f"in the layout of {base_checkpoint}", *save_model(model, path, like=base_checkpoint)]
        # e.g. two layers share a weight's base value, so the file cannot say which is which; or the base is gone
        except (ValueError, OSError) as err:
            fallback = f"in spandrel's layout, not that of {base_checkpoint}: {err}"
    else:
        fallback = "in spandrel's layout"
    path = run_dir / "model_merged.safetensors"
    save_model(model, path)
    return path, [fallback]


def _write_json(path: Path, data: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    atomic_write(path, write)


def _fresh_discriminator(channels: int, seed: int) -> UNetDiscriminator:
    """A new U-Net discriminator for ``channels``-channel images, its initial weights (spectral norm's
    power-iteration vectors included) a function of the seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNetDiscriminator(channels)


def _save_discriminator(path: Path, discriminator: nn.Module) -> None:
    from safetensors.torch import save_file

    state = {name: value.detach().cpu().contiguous() for name, value in discriminator.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def adapt(
    model,
    train_set,
    run_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    val_set=None,
    resume: bool = False,
    device: str | torch.device | None = None,
    discriminator: nn.Module | None = None,
    base_checkpoint: str | os.PathLike | None = None,
) -> dict:
    """Train ``model``'s trainable parameters on ``train_set`` (items are (lr, hr) tensors).

    With ``config.gan_weight`` > 0 a discriminator trains alongside: ``discriminator`` (e.g. Real-ESRGAN's,
    through ``adaptsr.discriminator.load_discriminator``), or a fresh ``UNetDiscriminator`` seeded by
    ``config.seed``; its weights end in ``run_dir/discriminator.safetensors``. ``base_checkpoint``: the file
    ``model`` was loaded from, whose format and layout the merged model keeps (the module docstring).

    Returns the metrics written to ``run_dir/metrics.json``.
    """
    config = config or TrainConfig()
    module = unwrap_model(model)
    rank, world, device = _init_distributed(device)
    module.to(device).train()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if len(train_set) < config.batch_size:
        raise ValueError(f"the training set has {len(train_set)} items, fewer than one batch of {config.batch_size}")
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} does not split evenly over {world} processes")
    params = _trainable(module)
    network = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None) if world > 1 else module
    optimizer = torch.optim.AdamW(_optimizer_groups(params, config.lr, config.lora_plus_ratio), lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    use_bf16 = _uses_bf16(config.amp, device.type)
    channels = getattr(model, "output_channels", 3)  # a spandrel descriptor's; a bare module's shows at its first step
    if config.perceptual_weight > 0 and channels != 3:
        raise ValueError(f"the VGG perceptual loss compares RGB images, and this model puts out {channels} channel(s); "
                         "set perceptual_weight to 0")
    rgb_only = [name for name, weight in config.iqa_loss_weights.items() if weight > 0]
    if rgb_only and channels != 3:
        raise ValueError(f"the {', '.join(rgb_only)} loss compares RGB images, and this model puts out {channels} "
                         "channel(s); leave it out of iqa_loss_weights")
    if discriminator is not None and config.gan_weight == 0:
        raise ValueError("a discriminator was given but gan_weight is 0: the run would not use it")
    if config.gan_weight > 0 and discriminator is None:
        discriminator = _fresh_discriminator(channels, config.seed)
    objective = Objective(config, device, discriminator, world)
    ema = ParameterEMA(params, config.ema_decay) if config.ema_decay > 0 else None
    if val_set is not None:
        _check_val_metrics(config.val_metrics)

    history = {"loss": [], "loss_terms": {name: [] for name in objective.terms}, "val": [], "skipped_steps": 0,
               "train_seconds": 0.0, "data_seconds": 0.0}
    final_outputs = None  # the last validation's (lr, sr, hr): the comparison picture's "after"

    def validate(step: int) -> None:
        nonlocal final_outputs
        with ema.averaged() if ema is not None else contextlib.nullcontext():
            scores, final_outputs = _validate(model, val_set, device, config.val_tile, rank, world,
                                              (*_VAL_METRICS, *config.val_metrics))
            # with validations along the way, the weights that scored best so far (the average, with EMA)
            best = _best_validation(history, config.best_metric)
            if config.val_every and rank == 0 and (best is None or _beats(scores, best, config.best_metric)):
                _save_best(model, module, run_dir)
        history["val"].append({"step": step, **scores})

    start_step = 0
    checkpoint_path = run_dir / _CHECKPOINT
    if resume:
        if not checkpoint_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        try:
            state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        except Exception as err:  # torch.load's errors (zip, pickle, truncation) come as several types
            raise ValueError(f"--resume: checkpoint {checkpoint_path} could not be read ({err})") from err
        missing = set(params) - set(state["trainable"])
        if missing:
            raise ValueError(f"checkpoint {checkpoint_path} does not match the model: no weights for {sorted(missing)[:3]}")
        extra = set(state["trainable"]) - set(params)
        if extra:  # e.g. DoRA's magnitudes, resumed without --use-dora: they would be dropped
            raise ValueError(f"checkpoint {checkpoint_path} does not match the model: it trained {sorted(extra)[:3]}, "
                             "which this model does not have; resume with the run's own LoRA options (targets, "
                             "use_dora), or start a new run")
        for name, p in params.items():
            saved = state["trainable"][name]
            if saved.shape != p.shape:
                raise ValueError(
                    f"checkpoint {checkpoint_path} does not match the model: {name} is {tuple(saved.shape)} there and "
                    f"{tuple(p.shape)} here; resume with the run's own LoRA options (rank, targets), or start a new run"
                )
        if state.get("lora_plus_ratio", 1.0) != config.lora_plus_ratio:
            raise ValueError(f"checkpoint {checkpoint_path} was trained with lora_plus_ratio "
                             f"{state.get('lora_plus_ratio', 1.0):g} and this run has {config.lora_plus_ratio:g}; "
                             f"resume with the run's own ratio (adaptsr adapt --lora-plus-ratio "
                             f"{state.get('lora_plus_ratio', 1.0):g}), or start a new run")
        if (state.get("ema") is None) != (ema is None):
            had = "with" if ema is None else "without"
            raise ValueError(f"checkpoint {checkpoint_path} was trained {had} an EMA of the weights and this run is "
                             "not; resume with the run's own ema_decay, or start a new run")
        objective.load_state_dict(state.get("discriminator"), str(checkpoint_path))  # checks before it loads
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["trainable"][name])
        if ema is not None:
            ema.load_state_dict(state["ema"], str(checkpoint_path))
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history = state["history"]
        history.setdefault("loss_terms", {name: [] for name in objective.terms})
        history.setdefault("data_seconds", 0.0)
        start_step = state["step"]
    if rank == 0:
        _write_json(run_dir / "config.json", asdict(config))

    def save_checkpoint(step: int) -> None:
        state = {
            "step": step,
            "trainable": {name: p.detach().cpu() for name, p in params.items()},
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "lora_plus_ratio": config.lora_plus_ratio,
            "history": history,
            "discriminator": objective.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
        }
        if rank == 0:
            atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))

    # The base model's outputs, for the comparison crops (only on a fresh start: after a resume
    # the model is no longer the base): rank 0's validation share, the images its final validation returns.
    fresh_validation = val_set is not None and rank == 0 and not resume
    before = None
    if fresh_validation:
        before = _super_resolve(model, val_set, device, config.val_tile, _validation_share(len(val_set), 0, world))

    # tqdm shows it/s and the ETA; rank 0 only, and silent with log_every=0.
    progress = tqdm(total=config.steps, initial=start_step, unit="step", disable=rank != 0 or not config.log_every)
    bad_in_a_row = 0
    adapters_checked = False
    clock = time.perf_counter()

    def rank_items(step: int) -> tuple[list[int], int]:
        indices, epoch = _batch_indices(step, len(train_set), config)
        return indices[rank::world], epoch

    # Each trained step's [loss, *terms], left on the device until the progress bar, a checkpoint or the end reads
    # them in one copy: reading them every step would make the host wait for the step's last kernel, idling a GPU
    # while it queues the next step (the non-finite check before the optimizer step is the one wait a step keeps).
    pending_losses: list[torch.Tensor] = []

    def record_losses() -> None:
        if not pending_losses:
            return
        logged = torch.stack(pending_losses)
        pending_losses.clear()
        if world > 1:  # log the global batch's losses, the same on every rank (every rank records at the same steps)
            dist.all_reduce(logged)
            logged /= world
        for loss, *term_values in logged.tolist():
            history["loss"].append(loss)
            for name, value in zip(objective.terms, term_values):
                history["loss_terms"][name].append(value)

    steps = range(start_step, config.steps)
    # the ranks of a distributed run on this machine share its cores (torchrun's LOCAL_WORLD_SIZE)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    num_workers = auto_num_workers(device, local_ranks) if config.num_workers is None else config.num_workers
    batches = training_batches(train_set, steps, rank_items, device, num_workers)
    # stops the workers however the loop ends; cuDNN picks each conv's fastest algorithm for the crops' fixed shapes
    with contextlib.closing(batches), _tuned_convolutions(device):
        for step, (lr, hr) in zip(steps, _timed(batches, history)):
            loss, terms, sr = _accumulate_gradients(network, objective, lr, hr, use_bf16, config.micro_batch)
            finite = torch.isfinite(loss).float()
            if world > 1:  # every rank must skip together, or DDP's all-reduce waits forever
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                history["skipped_steps"] += 1
                bad_in_a_row += 1
                if bad_in_a_row > _MAX_BAD_STEPS:
                    raise RuntimeError(f"{bad_in_a_row} non-finite losses in a row at step {step}: "
                                       "lower the learning rate")
                schedule.step()
                continue
            bad_in_a_row = 0
            _apply_gradients(params, optimizer, config.grad_clip)
            if ema is not None:
                ema.update()
            if not adapters_checked:  # this run's first step that trained
                _check_adapters_run(module)
                adapters_checked = True
            if objective.discriminator is not None:
                terms.update(objective.discriminator_step(sr, hr, use_bf16, config.micro_batch))
            schedule.step()
            pending_losses.append(torch.stack([loss.detach().float()] +
                                              [terms[name].detach().float() for name in objective.terms]))
            done = step + 1
            progress.update(1)
            if config.log_every and done % config.log_every == 0:
                record_losses()
                progress.set_postfix(loss=f"{history['loss'][-1]:.4f}")
            # the last step validates before its checkpoint, so a later --resume keeps this run's final scores
            if val_set is not None and (config.val_every and done % config.val_every == 0 or done == config.steps):
                validate(done)
            if done % config.checkpoint_every == 0 or done == config.steps:
                record_losses()
                history["train_seconds"] += time.perf_counter() - clock
                clock = time.perf_counter()
                save_checkpoint(done)
    record_losses()  # a run whose last steps were skipped has not checkpointed them

    progress.close()
    if ema is not None:  # the run's result is the average: the model returned, validated and saved
        ema.copy_to_params()
    if val_set is not None and not (history["val"] and history["val"][-1]["step"] == config.steps):
        validate(config.steps)
    metrics = {
        "steps": config.steps,
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "train_seconds": history["train_seconds"],
        "num_workers": num_workers,
        "trainable_params": sum(p.numel() for p in params.values()),
        "total_params": sum(p.numel() for p in module.parameters()),
        "best_val": _best_validation(history, config.best_metric),
        **history,
    }
    if autotune.enabled():  # the backends "auto" timed and chose, op by op (adaptsr.autotune)
        metrics["autotune"] = autotune.measurements()
    if rank == 0:
        if any(True for _ in lora_layers(module)):
            save_adapter(model, run_dir / "adapter")
        merged, notes = _save_merged(model, run_dir, base_checkpoint)
        metrics.update(merged_model=merged.name, merged_notes=notes)
        if objective.discriminator is not None:
            _save_discriminator(run_dir / "discriminator.safetensors", objective.discriminator)
        _write_json(run_dir / "metrics.json", metrics)
        _write_curves(run_dir / "curves.png", history)
        if before is not None:  # a fresh run: it validated at its last step
            _write_comparison(run_dir / "comparison.png", before, final_outputs)
    if world > 1:
        dist.barrier()  # no rank leaves (and reads the run folder) before rank 0 has written it
    return metrics

