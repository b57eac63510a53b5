"""The AdaptSR quality study: how much of full fine-tuning's gain LoRA keeps, at what cost.

On the bundled base models (SwinIR and RRDB, x4, bicubic-trained) and several camera profiles,
each method trains for the same steps on the same degraded crops of the bundled train photos,
then is scored on the degraded held-out photos (Y-PSNR/SSIM, border cropped):

    base        the bicubic-trained model, untouched
    lora4/8/16  adaptsr LoRA at rank 4, 8, 16 on the preset's layers (alpha = rank)
    lora4+/8+   the same with LoRA+ (B at 16x the rate of A; adapt --lora-plus-ratio), at lr 1e-3
    peft8       PEFT's LoRA, rank 8, on exactly the same layers (the peer, for speed and quality)
    full@LR     full fine-tuning at learning rate LR (two rates: full fine-tuning wants a smaller
                one than LoRA, and one rate would make the comparison depend on that choice)
    attn8, mlp8, conv8   (SwinIR) adaptsr LoRA rank 8 on one layer group only: the AdaptSR
                "which layers matter" question; lora8 is the "all groups" row

Every method runs in its own process: a clean allocator, so the peak resident memory of the
training loop (CPU) or the peak allocated memory (GPU) belongs to that method alone. Step times
are the forward + backward + optimizer step only (data loading excluded), median over steps.

    python benchmarks/quality_study.py --out benchmarks/results/quality-study-cpu
    python benchmarks/quality_study.py --quick --out /tmp/study      # seconds: a smoke run

Writes OUT.json (every number) and OUT.md (the tables for the README).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

SCALE = 4
LORA_LR = 2e-3
# LoRA+ (Hayou et al. 2024): B's rate LORA_PLUS_RATIO times A's, the paper's suggested 2^4, from a base rate
# half of LORA_LR's (the pair measured best of four on the demo's task).
LORA_PLUS_LR, LORA_PLUS_RATIO = 1e-3, 16.0
FULL_LRS = (2e-4, 1e-3)
# The SwinIR preset's layer groups (module names matched in full, like the presets).
SWINIR_GROUPS = {
    "attn": r"layers\.\d+\.residual_group\.blocks\.\d+\.attn\.(qkv|proj)",
    "mlp": r"layers\.\d+\.residual_group\.blocks\.\d+\.mlp\.fc[12]",
    "conv": r"layers\.\d+\.conv(\.\d+)?|conv_after_body",
}
PRESET_OF_MODEL = {"swinir": "swinir", "rrdb": "esrgan"}


def methods_for(model: str) -> list[str]:
    names = ["base", "lora4", "lora8", "lora16", "lora4+", "lora8+", "peft8"] + [f"full@{lr:g}" for lr in FULL_LRS]
    if model == "swinir":
        names += [f"{group}8" for group in SWINIR_GROUPS]
    return names


# -- one method, in its own process --


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the peak
    # measured afterwards is the training loop's own.
    Path("/proc/self/clear_refs").write_text("5")


def _prepare(model_name: str, method: str):
    """The bundled model with the method's trainable parameters (PEFT: wrapped by PEFT)."""
    import adaptsr
    from adaptsr.demo import bundled_model_path

    descriptor = adaptsr.load_model(bundled_model_path(model_name))
    module = descriptor.model
    preset = PRESET_OF_MODEL[model_name]
    if method == "base":
        return descriptor, module
    if method.startswith("full@"):
        for p in module.parameters():
            p.requires_grad_(True)
        return descriptor, module
    rank = int("".join(ch for ch in method if ch.isdigit()))
    group = method.rstrip("+").rstrip("0123456789")
    if group == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        # The exact layers adaptsr's preset adapts, found on a throw-away copy of the model.
        probe = adaptsr.load_model(bundled_model_path(model_name))
        targets = list(adaptsr.inject_lora(probe, preset=preset, rank=rank).layers)
        module = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), module)
        return descriptor, module
    if group == "lora":
        adaptsr.inject_lora(descriptor, preset=preset, rank=rank)
    else:
        adaptsr.inject_lora(descriptor, targets=SWINIR_GROUPS[group], rank=rank)
    return descriptor, module


def _datasets(args, out: Path):
    from adaptsr.data import CachedValidationSet, HRFolderDataset, degrade, get_preset
    from adaptsr.data.bundled import HELD_OUT, TRAIN, load_photo, write_photos

    degradation = get_preset(args.preset)

    def degrade_fn(hr, scale, generator):
        return degrade(hr, scale, degradation, generator)

    held_out = [load_photo(name) for name in HELD_OUT]
    if args.quick:  # centre crops: the same pipeline in seconds
        held_out = [p[:, p.shape[1] // 2 - 32:p.shape[1] // 2 + 32, p.shape[2] // 2 - 32:p.shape[2] // 2 + 32]
                    for p in held_out]
    val_set = CachedValidationSet(held_out, SCALE, degrade_fn, degrade_id=f"{args.preset}:{degradation!r}",
                                  cache_dir=out / "lr-cache", seed=args.seed)
    train_set = HRFolderDataset(write_photos(TRAIN, out / "photos"), SCALE, args.patch, degrade_fn, seed=args.seed,
                                samples_per_epoch=len(TRAIN) * 32)
    return train_set, val_set


def _timed_step(module, params, optimizer, lr_img: torch.Tensor, hr: torch.Tensor) -> tuple[float, float]:
    """One forward + backward + optimizer step as ``adaptsr.adapt`` takes it (L1, bf16 autocast on
    CUDA, clipping); returns its wall time (GPU synchronised) and the loss."""
    device = lr_img.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = F.l1_loss(module(lr_img).float(), hr.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic, loss.item()


def _train(module, train_set, args, lr: float, device: torch.device, lora_plus_ratio: float = 1.0) -> dict:
    """The loop of ``adaptsr.adapt`` (same batches, schedule, loss, clipping, LoRA+ groups), timed per step."""
    from adaptsr.optim import create_loraplus_optimizer
    from adaptsr.train import TrainConfig, _batch_indices, _load_batch, _lr_factor

    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, warmup_steps=min(20, args.steps // 5),
                         seed=args.seed, lora_plus_ratio=lora_plus_ratio)
    params = [p for p in module.parameters() if p.requires_grad]
    # AdamW's own default weight decay (0.01), as in the study's first runs, not TrainConfig's 0
    optimizer = create_loraplus_optimizer(module, lr, lora_plus_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    module.to(device).train()
    step_seconds, losses = [], []
    start = time.perf_counter()
    for step in range(config.steps):
        indices, epoch = _batch_indices(step, len(train_set), config)
        lr_img, hr = _load_batch(train_set, indices, epoch, device)
        seconds, loss = _timed_step(module, params, optimizer, lr_img, hr)
        schedule.step()
        step_seconds.append(seconds)
        losses.append(loss)
    return {
        "train_seconds": time.perf_counter() - start,
        # the first steps include one-off allocations and kernel selection
        "step_ms": 1000 * statistics.median(step_seconds[min(3, len(step_seconds) - 1):]),
        "final_loss": statistics.fmean(losses[-10:]),
    }


TIMED_METHODS = ("lora8", "peft8", "full@0.0002")


def interleaved_step_times(args) -> dict:
    """Median forward + backward + optimizer step of TIMED_METHODS on one fixed batch, the methods
    stepping in turn round after round, so load that drifts (a shared machine) hits each alike."""
    from adaptsr.train import TrainConfig, _load_batch

    device = torch.device(args.device)
    train_set, _ = _datasets(args, Path(args.work))
    lr_img, hr = _load_batch(train_set, list(range(args.batch_size)), 0, device)
    steppers = {}
    for method in TIMED_METHODS:
        _, module = _prepare(args.model, method)
        module.to(device).train()
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=TrainConfig.lr)
        steppers[method] = functools.partial(_timed_step, module, params, optimizer, lr_img, hr)
    times = {method: [] for method in steppers}
    for round_ in range(args.timing_rounds + 3):
        for method, step in steppers.items():
            seconds, _ = step()
            if round_ >= 3:  # warm-up rounds: allocations, kernel selection
                times[method].append(seconds)
    return {"model": args.model, "rounds": args.timing_rounds,
            "step_ms": {m: 1000 * statistics.median(t) for m, t in times.items()}}


def run_one(args) -> dict:
    """Train (unless base) and score one method; the result as a dict."""
    from adaptsr.evaluate import evaluate_pairs

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out = Path(args.work)
    train_set, val_set = _datasets(args, out)
    _, module = _prepare(args.model, args.method)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    # the share is trainable / all parameters, adapters included (PEFT's print_trainable_parameters)
    total = sum(p.numel() for p in module.parameters())
    result = {"model": args.model, "preset": args.preset, "method": args.method,
              "trainable_params": trainable if args.method != "base" else 0, "total_params": total}
    if args.method != "base":
        lr = float(args.method.split("@")[1]) if args.method.startswith("full@") else LORA_LR
        ratio = LORA_PLUS_RATIO if args.method.endswith("+") else 1.0
        if ratio != 1.0:
            lr = LORA_PLUS_LR
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            _reset_peak_rss()
            before = _rss_mb("VmRSS")
        result.update(_train(module, train_set, args, lr, device, ratio), lr=lr, lora_plus_ratio=ratio)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb("VmHWM")
        result["peak_mb"] = peak - before
    module.eval()
    scores = evaluate_pairs(model=module, dataset=val_set, metrics=("psnr", "ssim"), scale=SCALE, device=device)
    result.update(scores["mean"])
    return result


# -- the whole study --


def _write_text(path: Path, text: str) -> None:
    from adaptsr.io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _child_command(args, model: str, preset: str, method: str, result: Path) -> list[str]:
    command = [sys.executable, __file__, "--one", "--model", model, "--preset", preset, "--method", method,
               "--result", str(result), "--work", str(args.work), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--patch", str(args.patch), "--seed", str(args.seed),
               "--device", args.device]
    return command + (["--quick"] if args.quick else [])


def _markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# AdaptSR quality study ({meta['date']}, {meta['device']})", "",
             (f"{meta['steps']} steps of batch {meta['batch_size']} ({meta['patch'] * SCALE}px HR crops) per method; "
             f"LoRA lr {LORA_LR:g} (LoRA+: {LORA_PLUS_LR:g}, B at {LORA_PLUS_RATIO:g}x); held-out photos degraded once with the named camera profile (fixed seed); "
             "Y-PSNR/SSIM with a 4-pixel border cropped; step = forward + backward + optimizer (median); "
             "peak = training loop's peak memory over the model's (RSS on CPU, allocated on GPU)."), ""]
    for model in dict.fromkeys(r["model"] for r in results):
        for preset in dict.fromkeys(r["preset"] for r in results if r["model"] == model):
            rows = [r for r in results if r["model"] == model and r["preset"] == preset]
            base = next((r for r in rows if r["method"] == "base"), None)
            lines += [f"## {model}, profile `{preset}`", "",
                      "| method | trainable | PSNR-Y | SSIM-Y | vs base | step ms | train s | peak MB |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                share = f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.1f}%)"
                gain = f"{r['psnr'] - base['psnr']:+.2f}" if base else "-"
                timing = (f"{r['step_ms']:.0f} | {r['train_seconds']:.0f} | {r['peak_mb']:.0f}"
                          if "step_ms" in r else "- | - | -")
                lines.append(f"| {r['method']} | {share} | {r['psnr']:.2f} | {r['ssim']:.4f} | {gain} | {timing} |")
            lines.append("")
    return "\n".join(lines)


def _timing_markdown(timings: list[dict]) -> str:
    if not timings:
        return ""
    lines = ["", "## Step time, interleaved", "",
             "One fixed batch; the methods step in turn for each round, so load that drifts hits each alike.", "",
             "| model | rounds | " + " | ".join(f"{m} ms" for m in TIMED_METHODS) + " | PEFT / adaptsr |",
             "|---|---|" + "---|" * len(TIMED_METHODS) + "---|"]
    for t in timings:
        ms = t["step_ms"]
        cells = " | ".join(f"{ms[m]:.0f}" for m in TIMED_METHODS)
        lines.append(f"| {t['model']} | {t['rounds']} | {cells} | {ms['peft8'] / ms['lora8']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="swinir,rrdb", help="comma-separated bundled models")
    parser.add_argument("--presets", default="lowlight,camera", help="comma-separated degradation presets")
    parser.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch", type=int, default=32, help="LR patch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="2 steps on small crops: checks the pipeline only")
    parser.add_argument("--timing-rounds", type=int, default=15,
                        help="rounds of the interleaved step timing of " + ", ".join(TIMED_METHODS) + " (0: skip it)")
    parser.add_argument("--out", help="results path without suffix: writes OUT.json and OUT.md")
    parser.add_argument("--work", help="folder for photos and the LR cache (default: OUT's folder / study-work)")
    # one method in this process (how the study runs each method)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.patch, args.timing_rounds = 2, 2, 8, min(args.timing_rounds, 1)

    if args.one:
        warnings.filterwarnings("ignore", message="torch.meshgrid")  # spandrel's Swin code
        result = interleaved_step_times(args) if args.method == "timing" else run_one(args)
        _write_text(Path(args.result), json.dumps(result))
        return
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    args.work = Path(args.work or out.parent / "study-work")
    wanted = set(args.methods.split(",")) if args.methods else None
    from adaptsr.data import get_preset
    from adaptsr.demo import bundled_model_path

    try:  # every name checked before hours of training start
        for model in args.models.split(","):
            bundled_model_path(model)
            if model not in PRESET_OF_MODEL:
                raise ValueError(f"the study has no LoRA preset for model {model!r}")
        for preset in args.presets.split(","):
            get_preset(preset)
    except ValueError as err:
        sys.exit(f"quality study: {err}")

    results, timings = [], []
    for model in args.models.split(","):
        if args.timing_rounds:  # on the first preset's crops: the degradation does not change the cost
            result_file = args.work / f"{model}-timing.json"
            result_file.parent.mkdir(parents=True, exist_ok=True)
            command = _child_command(args, model, args.presets.split(",")[0], "timing", result_file)
            if subprocess.run(command + ["--timing-rounds", str(args.timing_rounds)], check=False).returncode:
                sys.exit(f"quality study: the step timing of {model} failed")
            timings.append(json.loads(result_file.read_text()))
            print(f"{model:7} interleaved step ms: {timings[-1]['step_ms']}", flush=True)
        for preset in args.presets.split(","):
            for method in methods_for(model):
                if wanted is not None and method not in wanted:
                    continue
                result_file = args.work / f"{model}-{preset}-{method}.json"
                result_file.parent.mkdir(parents=True, exist_ok=True)
                tic = time.perf_counter()
                completed = subprocess.run(_child_command(args, model, preset, method, result_file), check=False)
                if completed.returncode != 0:
                    sys.exit(f"quality study: {model} / {preset} / {method} failed (exit {completed.returncode})")
                results.append(json.loads(result_file.read_text()))
                r = results[-1]
                print(f"{model:7} {preset:9} {method:10} PSNR {r['psnr']:.2f} SSIM {r['ssim']:.4f} "
                      f"({time.perf_counter() - tic:.0f} s)", flush=True)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    meta = {"date": date.today().isoformat(), "device": device, "torch": torch.__version__,
            "python": platform.python_version(), "steps": args.steps, "batch_size": args.batch_size,
            "patch": args.patch, "seed": args.seed}
    _write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "results": results, "timing": timings}, indent=2))
    _write_text(out.with_suffix(".md"), _markdown(results, meta) + _timing_markdown(timings))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
