"""`adaptsr demo`: the bundled model adapted to a camera profile, scored before and after."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> int:
    from adaptsr.demo import run_demo

    run_demo(model=args.model, profile=args.profile, steps=args.steps, rank=args.rank, out=args.out, seed=args.seed,
             quick=args.quick, device=args.device, use_dora=args.use_dora, lr=args.lr,
             lora_plus_ratio=args.lora_plus_ratio)
    return 0


def add_demo_command(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="adapt the bundled model to a degraded camera profile and report",
        description=(
            "Degrade the bundled held-out photos with a camera profile, score the bundled bicubic-trained model "
            "on them, adapt it with LoRA on the bundled train photos for a few minutes, merge, score again, and "
            "print the table. Nothing is downloaded."
        ),
    )
    demo.add_argument("--model", default="swinir", help="bundled base model: swinir (default) or rrdb")
    demo.add_argument("--profile", default="lowlight", metavar="PRESET|FILE",
                      help="degradation to adapt to: lowlight (default), camera, mild, realesrgan, or a JSON file as "
                           "adapt --degradation takes")
    demo.add_argument("--steps", type=int, help="training steps (default: 300 on a CPU, 2000 on a GPU)")
    demo.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    demo.add_argument("--use-dora", action="store_true", help="train DoRA adapters instead of LoRA ones")
    # the defaults are adaptsr.demo's LR and LORA_PLUS_RATIO, written out so that --help does not import torch
    demo.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    demo.add_argument("--lora-plus-ratio", type=float, default=16.0, metavar="R",
                      help="LoRA+: lora_B learns at R times --lr (default: 16; 1 with --lr 2e-3 is the plain LoRA "
                           "recipe the demo used before)")
    demo.add_argument("--out", default="adaptsr-demo", help="output folder (default: ./adaptsr-demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the degradations and the training (default: 0)")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke run on crops (what the tests run)")
    demo.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    demo.set_defaults(func=_demo)
