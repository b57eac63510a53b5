"""`adaptsr layers`: a dry run of the adapters `adapt` would train."""

from __future__ import annotations

import argparse

from adaptsr.cli._common import (
    _add_lora_flags,
    _lora_options,
    _print_columns,
)


def _layer_shape(layer) -> str:
    """``in -> out`` and, for a conv, its kernel and the options that differ from the default."""
    if not hasattr(layer, "kernel_size"):
        return f"{layer.in_features} -> {layer.out_features}"
    text = f"{layer.in_channels} -> {layer.out_channels}, {'x'.join(map(str, layer.kernel_size))}"
    for option, default in (("stride", (1, 1)), ("output_padding", (0, 0)), ("dilation", (1, 1)), ("groups", 1)):
        value = getattr(layer, option, default)
        if value != default:
            text += f", {option} {'x'.join(map(str, value)) if isinstance(value, tuple) else value}"
    return text


def _layers(args: argparse.Namespace) -> int:
    import adaptsr
    from adaptsr.inject import _WRAPPERS
    from adaptsr.presets import ARCHITECTURE_PRESETS

    descriptor = adaptsr.load_model(args.model)
    architecture = descriptor.architecture
    # the names and shapes before injection: a wrapped layer keeps its name, its base layer moves one level down
    plain = [(name, m) for name, m in descriptor.model.named_modules() if type(m) in _WRAPPERS]
    options = _lora_options(args)
    if options["preset"] is None and options["targets"] is None:
        options["preset"] = ARCHITECTURE_PRESETS.get(architecture.id)
    adapted: dict[str, tuple[int, int]] = {}  # name -> (rank, adapter parameters)
    if options["preset"] is None and options["targets"] is None:
        headline = (f"no LoRA preset for {architecture.name}: choose layers with --targets REGEX (a regex matched "
                    "in full against the names below)")
    else:
        summary = adaptsr.inject_lora(descriptor, **options)
        for name, layer in adaptsr.lora_layers(descriptor.model):
            # the layer's own parameters: A, B and DoRA's magnitudes (the frozen base is a child module)
            adapted[name] = (layer.rank, sum(p.numel() for p in layer.parameters(recurse=False)))
        chosen = f"preset {options['preset']}" if options["preset"] else ""
        if options["targets"]:
            chosen += (" and " if chosen else "") + f"--targets {options['targets']}"
        headline = f"{chosen}: {summary}"
    print(f"{architecture.name} x{descriptor.scale} ({args.model}), {len(plain)} layers LoRA can wrap; {headline}")

    rows = [("layer", "type", "shape", "rank", "adapter params")]
    for name, layer in plain:
        if args.adapted and name not in adapted:
            continue
        rank, size = adapted.get(name, (None, None))
        rows.append((name, type(layer).__name__, _layer_shape(layer), "-" if rank is None else str(rank),
                     "-" if size is None else f"{size:,}"))
    _print_columns(rows, left=3)
    return 0


def add_layers_command(subparsers) -> None:
    p = subparsers.add_parser(
        "layers",
        help="list the model's conv and linear layers and the ones LoRA adapts",
        description=(
            "A dry run of the adapters 'adaptsr adapt' would train: every Conv2d, ConvTranspose2d and Linear layer "
            "of the model (the layer types LoRA wraps) with its shape, and the rank and adapter size of those the "
            "preset or --targets selects. Use it to check a preset, or to write --targets for an architecture "
            "without one."
        ),
    )
    p.add_argument("--model", required=True, metavar="CKPT",
                   help="model checkpoint, .safetensors or .pth, any architecture spandrel loads")
    _add_lora_flags(p)
    p.add_argument("--adapted", action="store_true", help="list only the layers that get an adapter")
    p.set_defaults(func=_layers)
