"""Command-line interface: ``adaptsr <command>``, one module per command (``_common`` holds what they share).

Each command's module has an ``add_<name>_command(subparsers)`` function that creates its parser
and sets ``func`` (``args -> exit code``) as a default. Errors a user can cause (a missing file, an
adapter for another model, an unreadable image, an unknown metric) are raised as ValueError /
OSError / MissingWeightsError and reported by ``main`` as one line on stderr with exit code 1;
outputs are written atomically, so a failed run leaves no half-written file. Heavy imports
(pyiqa, the model code) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from adaptsr import __version__
from adaptsr.cli._common import PROG, CommandError
from adaptsr.cli.adapt import add_adapt_command
from adaptsr.cli.bench import add_bench_command
from adaptsr.cli.combine import add_combine_command
from adaptsr.cli.degrade import add_degrade_command
from adaptsr.cli.demo import add_demo_command
from adaptsr.cli.estimate import add_estimate_command
from adaptsr.cli.evaluation import add_eval_command
from adaptsr.cli.export import add_export_command
from adaptsr.cli.layers import add_layers_command
from adaptsr.cli.merge import add_merge_command
from adaptsr.cli.upscale import add_upscale_command

__all__ = ["PROG", "CommandError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Adapt super-resolution models with LoRA. Run 'adaptsr COMMAND --help' for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_command(commands)
    add_adapt_command(commands)
    add_eval_command(commands)
    add_upscale_command(commands)
    add_merge_command(commands)
    add_combine_command(commands)
    add_export_command(commands)
    add_estimate_command(commands)
    add_degrade_command(commands)
    add_layers_command(commands)
    add_bench_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # spandrel's Swin architectures call torch.meshgrid without indexing=: noise, not the user's problem
    warnings.filterwarnings("ignore", message="torch.meshgrid")

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError, RuntimeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1

