"""`adaptsr adapt`: train adapters (or the whole model) and write a run folder."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from adaptsr.cli._common import (
    CommandError,
    _add_amp_flag,
    _add_lora_flags,
    _is_same_file,
    _lora_options,
    _nonneg_float,
    _nonneg_int,
)

# The share of a GPU run's time spent waiting for batches above which adapt suggests more --workers.
_DATA_BOUND_SHARE = 0.2
# The architectures whose spandrel forward runs torch's checkpoint where use_checkpoint is set.
_CHECKPOINTING_ARCHITECTURES = ("SwinIR",)
# The recipes the flags default to. Adapters: LoRA+ (lora_B at 16x, the LoRA+ paper's 2^4) from 1e-3, which on the
# bundled SwinIR's low-light task at these defaults (1000 steps of 8) gave 26.11 dB PSNR-Y against plain LoRA's 25.93
# at 2e-3 and 25.25 at 2e-4, the default before 2026-12-06 (README: adapt). Full fine-tuning: 2e-4, BasicSR's
# fine-tuning rate.
_ADAPTER_LR, _ADAPTER_LORA_PLUS_RATIO = 1e-3, 16.0
_FULL_FINETUNE_LR = 2e-4


def add_adapt_command(subparsers) -> None:
    p = subparsers.add_parser(
        "adapt",
        help="train LoRA adapters (or the whole model) for a degradation or a set of real LR/HR pairs",
        description=(
            "Adapt a pretrained SR model: inject LoRA (or unfreeze everything with --full-finetune), train on "
            "HR images degraded online (--hr with --degradation) or on real LR/HR pairs (--pairs), and write a "
            "run folder with the adapter, the merged model, config.json, metrics.json and checkpoint.pt. "
            "Run under torchrun for several GPUs or processes."
        ),
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="base checkpoint (.safetensors/.pth) spandrel loads")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--hr", metavar="DIR",
                      help="folder of HR images, degraded online with --degradation; 'bundled' for the seven "
                           "bundled photos (no HR images of your own needed: the camera is in --degradation)")
    data.add_argument("--pairs", nargs=2, metavar=("LR_DIR", "HR_DIR"), help="real LR/HR pairs in two folders")
    p.add_argument("--degradation", action="append", metavar="PRESET|FILE",
                   help="degradation for --hr and --val-hr: a preset (camera, the default; lowlight, mild, "
                        "realesrgan) or a JSON file describing your camera, e.g. {\"camera_profile\": "
                        "{\"blur_sigma\": 1.0, \"noise\": 15, \"jpeg_quality\": 70}} (README: custom "
                        "degradations); repeat it to train one adapter on their mixture (each crop draws one); "
                        "recorded in RUN_DIR/degradation.json")
    p.add_argument("--val-hr", metavar="DIR",
                   help="validation HR folder, degraded once (fixed seed) and cached; 'bundled' for the three "
                        "bundled held-out photos")
    p.add_argument("--val-pairs", nargs=2, metavar=("LR_DIR", "HR_DIR"), help="validation LR/HR pairs")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created; reused with --resume)")
    _add_lora_flags(p)
    p.add_argument("--allocate-ranks", action="store_true",
                   help="rank-aware allocation: per-layer ranks from the L1 gradients of the first training batches, "
                        "within the parameters of --rank on every layer (written to RUN_DIR/rank_allocation.json)")
    p.add_argument("--allocation-batches", type=int, default=8, metavar="N",
                   help="training batches the rank allocation measures the gradients on (default: 8)")
    p.add_argument("--full-finetune", action="store_true", help="train every weight instead of adapters (baseline)")
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute each Swin block's activations in the backward instead of keeping them (spandrel's "
                        "use_checkpoint; SwinIR): less memory for a slower step")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size, split over processes (default: 8)")
    p.add_argument("--micro-batch", type=_nonneg_int, default=0, metavar="N",
                   help="run each step's batch forward and backward N crops at a time, accumulating the gradients: "
                        "the same step (up to float rounding) in a fraction of the activation memory, for models or "
                        "patches that do not fit the GPU at --batch-size (default: 0, the whole batch at once)")
    p.add_argument("--lr", type=float,
                   help=f"peak learning rate (default: {_ADAPTER_LR:g} for adapters, {_FULL_FINETUNE_LR:g} with "
                        "--full-finetune)")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps before the cosine decay")
    p.add_argument("--lora-plus-ratio", type=float, metavar="R",
                   help=f"LoRA+: lora_B (and one-dimensional parameters) learn at R times --lr (default: "
                        f"{_ADAPTER_LORA_PLUS_RATIO:g} for adapters; 1 is plain LoRA, as PEFT trains it)")
    p.add_argument("--ema-decay", type=_nonneg_float, default=0.0, metavar="D",
                   help="validate and save an exponential moving average of the trained weights with this decay "
                        "(e.g. 0.999, BasicSR's; warmed up over the first steps; default: 0, none)")
    p.add_argument("--patch", type=int, default=32, help="LR patch size of the training crops (default: 32)")
    p.add_argument("--workers", type=_nonneg_int, metavar="N",
                   help="processes that crop and degrade the next steps' batches while the model trains (default: "
                        "on a GPU one per CPU core less one, at most 8, shared among torchrun's ranks; on the CPU "
                        "none); the batches, and so the run, are the same whatever N")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    p.add_argument("--val-every", type=int, default=0,
                   help="steps between validations (default: only at the end); the best-scoring weights so far are "
                        "kept in RUN_DIR/adapter_best (model_best.safetensors with --full-finetune)")
    p.add_argument("--val-metrics", metavar="METRICS",
                   help="comma-separated pyiqa metrics validation scores besides PSNR and SSIM, e.g. lpips,dists "
                        "(what a --gan run is judged by); their weights are fetched, or found missing, before training")
    p.add_argument("--best-by", metavar="METRIC", default="psnr",
                   help="the validation metric whose best value picks the kept weights (RUN_DIR/adapter_best): psnr "
                        "(the default), ssim or one of --val-metrics; lower is better for lpips, dists, niqe, ...")
    p.add_argument("--val-tile", type=_nonneg_int, default=0, metavar="N",
                   help="validate in N x N LR-pixel tiles, overlapping by min(32, N/4) and blended as upscale --tile "
                        "blends them, to bound memory on large validation images (default: whole images)")
    loss = p.add_argument_group("loss (adversarial adaptation, AdaptSR-GAN)")
    loss.add_argument("--gan", action="store_true",
                      help="Real-ESRGAN's recipe: L1 + VGG perceptual loss (weight 1) + GAN loss (weight 0.1) "
                           "against a U-Net discriminator trained alongside; the weights below override it")
    loss.add_argument("--pixel-weight", type=_nonneg_float, default=1.0, metavar="W", help="L1 weight (default: 1)")
    loss.add_argument("--perceptual-weight", type=_nonneg_float, metavar="W",
                      help="VGG19 perceptual loss weight (default: 1 with --gan, else 0); its ImageNet weights are "
                           "downloaded on first use")
    loss.add_argument("--gan-weight", type=_nonneg_float, metavar="W",
                      help="GAN loss weight (default: 0.1 with --gan, else 0)")
    loss.add_argument("--iqa-loss", action="append", default=[], metavar="METRIC=W",
                      help="add pyiqa's full-reference distance METRIC as a loss term of weight W, e.g. lpips=1 "
                           "(LPIPS beside L1, a recent real-world SR recipe) or dists=0.5; repeat for more; its "
                           "weights are downloaded on first use (adaptsr.losses.iqa_loss_names() lists the metrics)")
    loss.add_argument("--discriminator", metavar="CKPT",
                      help="start the discriminator from these weights (.pth or .safetensors; e.g. Real-ESRGAN's "
                           "RealESRGAN_x4plus_netD.pth, or a run's discriminator.safetensors) instead of a fresh one")
    loss.add_argument("--discriminator-lr", type=float, default=1e-4, metavar="LR",
                      help="the discriminator's Adam learning rate (default: 1e-4)")
    _add_amp_flag(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the adapters' initialisation, crops, degradations and batches (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=_adapt)


def _iqa_loss_weights(items: list[str]) -> dict[str, float]:
    """--iqa-loss METRIC=W flags as {metric: weight} (the names are checked against pyiqa's by TrainConfig)."""
    weights: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name.strip() or not (math.isfinite(weight) and weight >= 0):
            raise CommandError(f"--iqa-loss {item}: expected METRIC=W with W a number >= 0, e.g. lpips=1")
        key = name.strip().lower()
        if key in weights:
            raise CommandError(f"--iqa-loss: {key} is given twice")
        weights[key] = weight
    return weights


def _check_allocation_args(args: argparse.Namespace) -> None:
    if args.rank_pattern:
        raise CommandError("--allocate-ranks sets every layer's rank: leave out --rank-pattern")
    if args.allocation_batches < 1:
        raise CommandError(f"--allocation-batches must be at least 1, got {args.allocation_batches}")


def _inject(descriptor, options: dict, seed: int) -> None:
    import torch

    import adaptsr

    torch.manual_seed(seed)  # the adapters' initial A: the same --seed, the same run
    print(adaptsr.inject_lora(descriptor, **options), flush=True)


def _allocated_rank_pattern(args, descriptor, train_set, config, options) -> dict[str, int]:
    """The rank_pattern of --allocate-ranks: measured on the first training batches, or read back from the run
    folder on --resume (the checkpoint holds adapters of those ranks). Under torchrun rank 0 measures and the
    others take its ranks, so every process builds the same adapters."""
    import json

    import torch.distributed as dist

    from adaptsr.io import atomic_write
    from adaptsr.rank_allocation import allocate_ranks, rank_pattern, training_batches
    from adaptsr.train import _init_distributed

    path = Path(args.out) / "rank_allocation.json"
    if args.resume and path.is_file():
        print(f"rank allocation read from {path}", flush=True)
        return rank_pattern(json.loads(path.read_text())["ranks"])
    process, world, device = _init_distributed(args.device)
    message = [None]
    if process == 0:
        descriptor.model.to(device)
        allocation = allocate_ranks(
            descriptor, training_batches(train_set, config, args.allocation_batches), rank=args.rank,
            preset=options["preset"], targets=options["targets"],
        )
        print(allocation, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(allocation.to_dict(), indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        message = [allocation.rank_pattern()]
    if world > 1:
        dist.broadcast_object_list(message, src=0)
    return message[0]


_BUNDLED = "bundled"


def _hr_folder(spec: str, split: str, run_dir: str) -> Path:
    """--hr / --val-hr: a folder, or 'bundled' for the bundled photos of ``split`` ("train" or "held-out"),
    written into the run folder: a camera's adapter needs its degradation, not HR photos of its own."""
    if spec != _BUNDLED or Path(spec).exists():
        return Path(spec)
    from adaptsr.data.bundled import HELD_OUT, TRAIN, write_photos

    return write_photos(TRAIN if split == "train" else HELD_OUT, Path(run_dir) / f"bundled-{split}")


_DEGRADATION_RECORD = "degradation.json"


def _run_degradation(args: argparse.Namespace):
    """--degradation (a preset or a JSON file); on --resume, the one the run started with (its degradation.json)."""
    from adaptsr.data.degradation_files import degradation_to_dict, load_degradation, mixture_of

    degradation = mixture_of(args.degradation or ["camera"])
    recorded_path = Path(args.out) / _DEGRADATION_RECORD
    if args.resume and recorded_path.is_file():
        recorded = load_degradation(recorded_path)
        if recorded != degradation:
            now, then = degradation_to_dict(degradation), degradation_to_dict(recorded)
            changed = sorted(key for key in now.keys() | then.keys() if now.get(key) != then.get(key))
            given = " ".join(f"--degradation {spec}" for spec in args.degradation or ["camera"])
            raise CommandError(f"--resume: the run in {args.out} trained on the degradation in {recorded_path}, and "
                               f"{given} differs ({', '.join(changed)}); resume with the "
                               "run's own degradation (--degradation with that file) or start a new run")
    return degradation


def _record_degradation(args: argparse.Namespace, degradation) -> None:
    """Every field of the run's degradation in RUN_DIR/degradation.json, written once everything else checked out
    (a refused command leaves no run folder behind), by one process under torchrun."""
    import os

    from adaptsr.data.degradation_files import save_degradation

    if degradation is not None and int(os.environ.get("RANK", "0")) == 0:
        save_degradation(degradation, Path(args.out) / _DEGRADATION_RECORD)


def _check_out_is_not_a_data_folder(args: argparse.Namespace) -> None:
    """The run folder gets pictures (comparison.png, curves.png, ...): in an image folder of the run, they
    would become training or validation images of the next run that reads it."""
    folders = {"--hr": [args.hr], "--val-hr": [args.val_hr], "--pairs": args.pairs or [],
               "--val-pairs": args.val_pairs or []}
    for flag, paths in folders.items():
        for path in paths:
            if path and path != _BUNDLED and _is_same_file(Path(args.out), Path(path)):
                raise CommandError(f"--out {args.out} is the {flag} folder: the run's pictures would join its "
                                   "images; write the run to its own folder")


def _adapt(args: argparse.Namespace) -> int:
    import adaptsr
    from adaptsr.data import Degrader
    from adaptsr.data.datasets import CachedValidationSet, HRFolderDataset, PairedFolderDataset
    from adaptsr.discriminator import load_discriminator
    from adaptsr.inject import target_layers
    from adaptsr.presets import preset_for_architecture
    from adaptsr.train import TrainConfig, adapt

    _check_out_is_not_a_data_folder(args)
    descriptor = adaptsr.load_model(args.model)
    scale = descriptor.scale
    degradation = _run_degradation(args) if args.hr or args.val_hr else None

    perceptual_weight = args.perceptual_weight if args.perceptual_weight is not None else (1.0 if args.gan else 0.0)
    gan_weight = args.gan_weight if args.gan_weight is not None else (0.1 if args.gan else 0.0)
    discriminator = None
    if args.discriminator:
        if gan_weight == 0:
            raise CommandError("--discriminator: the run has no GAN loss; add --gan (or --gan-weight W)")
        discriminator = load_discriminator(args.discriminator, descriptor.output_channels)
    val_metrics = tuple(name.strip().lower() for name in args.val_metrics.split(",")) if args.val_metrics else ()
    if (val_metrics or args.best_by != "psnr") and not (args.val_hr or args.val_pairs):
        raise CommandError("--val-metrics and --best-by score validations: give a validation set (--val-hr or "
                           "--val-pairs)")
    if args.best_by.strip().lower() not in ("psnr", "ssim", *val_metrics):
        raise CommandError(f"--best-by {args.best_by}: validation scores psnr, ssim"
                           + "".join(f", {name}" for name in val_metrics) + "; add it to --val-metrics")
    iqa_loss_weights = _iqa_loss_weights(args.iqa_loss)
    lr = args.lr if args.lr is not None else (_FULL_FINETUNE_LR if args.full_finetune else _ADAPTER_LR)
    lora_plus_ratio = args.lora_plus_ratio if args.lora_plus_ratio is not None else (
        1.0 if args.full_finetune else _ADAPTER_LORA_PLUS_RATIO)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=lr, warmup_steps=args.warmup_steps,
        checkpoint_every=args.checkpoint_every, val_every=args.val_every, seed=args.seed, amp=args.amp,
        val_tile=args.val_tile, pixel_weight=args.pixel_weight, perceptual_weight=perceptual_weight,
        gan_weight=gan_weight, iqa_loss_weights=iqa_loss_weights, discriminator_lr=args.discriminator_lr,
        ema_decay=args.ema_decay,
        lora_plus_ratio=lora_plus_ratio, num_workers=args.workers,
        val_metrics=val_metrics, best_metric=args.best_by, micro_batch=args.micro_batch,
    )
    if args.checkpointing and descriptor.architecture.id not in _CHECKPOINTING_ARCHITECTURES:
        # spandrel's HAT (and others) carry a use_checkpoint flag that their forward ignores: only the
        # architectures listed here checkpoint when it is set, and the flag must not promise memory it does not save.
        supported = ", ".join(_CHECKPOINTING_ARCHITECTURES)
        raise CommandError(f"--checkpointing: spandrel checkpoints the blocks of {supported} only, "
                           f"not {descriptor.architecture.name}")

    # Every check on the adapters before the data folders are touched: a refused command writes nothing
    # (--hr bundled writes the photos into the run folder, --val-hr its degraded cache).
    options = None
    if args.full_finetune:
        if args.allocate_ranks:
            raise CommandError("--allocate-ranks sets the adapters' ranks; --full-finetune trains no adapters")
        if lora_plus_ratio != 1.0:
            raise CommandError("--lora-plus-ratio speeds up the adapters' lora_B; --full-finetune trains no adapters")
        descriptor.model.requires_grad_(True)
    else:
        options = _lora_options(args)
        if options["preset"] is None and options["targets"] is None:
            options["preset"] = preset_for_architecture(descriptor.architecture.id)
        if args.allocate_ranks:
            _check_allocation_args(args)
            target_layers(descriptor, preset=options["preset"], targets=options["targets"])
        else:
            _inject(descriptor, options, args.seed)

    degrade_fn = Degrader(degradation)
    if args.hr:
        train_set = HRFolderDataset(_hr_folder(args.hr, "train", args.out), scale, args.patch, degrade_fn,
                                    seed=args.seed)
    else:
        train_set = PairedFolderDataset(args.pairs[0], args.pairs[1], scale=scale, lr_patch=args.patch, seed=args.seed)
    # an epoch of at least one batch: a few photos (or pairs) give several crops each (item i crops photo i mod n)
    train_set.samples_per_epoch = max(train_set.samples_per_epoch, args.batch_size)
    val_set = None
    if args.val_hr:
        val_set = CachedValidationSet(
            _hr_folder(args.val_hr, "held-out", args.out), scale, degrade_fn, degrade_id=repr(degradation),
            cache_dir=Path(args.out) / "val_cache",
            seed=args.seed,
        )
    elif args.val_pairs:
        val_set = PairedFolderDataset(args.val_pairs[0], args.val_pairs[1], scale=scale)

    if options is not None and args.allocate_ranks:
        options["rank_pattern"] = _allocated_rank_pattern(args, descriptor, train_set, config, options)
        _inject(descriptor, options, args.seed)
    if args.checkpointing:
        for block in descriptor.model.modules():
            if hasattr(block, "use_checkpoint"):
                block.use_checkpoint = True

    _record_degradation(args, degradation)
    metrics = adapt(descriptor, train_set, args.out, config, val_set=val_set, resume=args.resume, device=args.device,
                    discriminator=discriminator, base_checkpoint=args.model)
    val = metrics["val"][-1] if metrics["val"] else None
    psnr = f", validation PSNR {val['psnr']:.2f} dB / SSIM {val['ssim']:.4f} (Y)" if val else ""
    if val:
        psnr += "".join(f", {name} {val[name]:.4f}" for name in config.val_metrics)
    seconds, waited = metrics["train_seconds"], metrics["data_seconds"]
    print(f"adapted in {seconds:.0f} s ({waited:.0f} s of it making batches), final loss "
          f"{metrics['final_loss']:.4f}{psnr}; wrote {args.out}")
    if "merged_model" in metrics:  # rank 0's
        layout, *notes = metrics["merged_notes"]
        print(f"merged model: {Path(args.out) / metrics['merged_model']} ({layout})")
        for note in notes:
            print(f"  note: {note}")
    if args.device != "cpu" and seconds > 0 and waited > _DATA_BOUND_SHARE * seconds:  # the GPU sat idle
        print(f"the device waited {100 * waited / seconds:.0f}% of the time for training batches "
              f"({metrics['num_workers']} DataLoader workers): more --workers may shorten the run")
    best = metrics["best_val"]
    if args.val_every and best is not None:
        from adaptsr.train import BEST_ADAPTER, BEST_MODEL

        kept = Path(args.out) / (BEST_MODEL if args.full_finetune else BEST_ADAPTER)
        scores = f"PSNR {best['psnr']:.2f} dB / SSIM {best['ssim']:.4f}"
        if config.best_metric != "psnr":
            scores = f"{config.best_metric} {best[config.best_metric]:.4f} ({scores})"
        print(f"best validation {scores} at step {best['step']}: {kept}")
    if metrics.get("autotune"):  # ADAPTSR_AUTOTUNE=1: the backends auto chose (their times are in metrics.json)
        from adaptsr import autotune

        print(autotune.summary(metrics["autotune"]))
    return 0
