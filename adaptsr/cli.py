"""Command-line interface: ``adaptsr <command>``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    print(
        "adaptsr demo: coming soon. The bundled base models and the end-to-end demo land with "
        "the demo issue; the library API (inject_lora, merge_lora, save_adapter) works today."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptsr", description="Adapt super-resolution models with LoRA.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="adapt the bundled model to a degraded camera profile and report")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
