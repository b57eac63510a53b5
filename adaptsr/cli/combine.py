"""`adaptsr combine`: one adapter that applies the weighted sum of several."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptsr.cli._common import (
    CommandError,
    _adapters_and_strengths,
    _add_model_flags,
    _positive_int,
    _weighted_sum,
    _which_adapters,
)


def _combine(args: argparse.Namespace) -> int:
    import adaptsr

    adapters, strengths = _adapters_and_strengths(args)
    out = Path(args.out)
    if any(Path(a).resolve() == out.resolve() for a in adapters):
        raise CommandError(f"--out {out} is one of the --adapter directories; write the combination elsewhere")
    descriptor = adaptsr.load_model(args.model)
    try:
        summary = adaptsr.combine_adapters(descriptor, adapters, strengths, rank=args.rank)
    except ValueError as err:
        raise CommandError(f"{_which_adapters(adapters)} not fit model {args.model}: {err}") from err
    adaptsr.save_adapter(descriptor, out)  # atomically, file by file
    ranks = sorted(set(summary.layers.values()))
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    print(f"wrote {out}: {_weighted_sum(adapters, strengths)} as one adapter on {len(summary.layers)} layers "
          f"({rank}, {summary.trainable_params:,} parameters)")
    return 0


def add_combine_command(subparsers) -> None:
    p = subparsers.add_parser(
        "combine",
        help="one adapter that applies the weighted sum of several trained on the same model",
        description=(
            "Write one adapter whose update is the weighted sum of the --adapter updates (one --strength each, "
            "in the same order): e.g. 0.7 x a PSNR-trained adapter + 0.3 x a GAN-trained one, ESRGAN's network "
            "interpolation between fidelity and texture, or a blend of two cameras' adapters. "
            "Exact: the factors are concatenated along the rank (PEFT's add_weighted_adapter 'cat'), so its rank "
            "is the sum of theirs, at most what each layer allows; --rank caps it, keeping the sum's best "
            "approximation of that rank (SVD; with one --adapter, a smaller copy of it). eval, upscale and merge "
            "take several --adapter directly; this writes the combination as a PEFT LoRA adapter of its own."
        ),
    )
    _add_model_flags(p, adapter_required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the combined adapter")
    p.add_argument("--rank", type=_positive_int, metavar="R",
                   help="at most this rank per layer: a layer whose combination needs more keeps its best rank-R "
                        "approximation (lossy, smaller; default: exact, the ranks' sum)")
    p.set_defaults(func=_combine)
