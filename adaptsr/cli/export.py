"""`adaptsr export`: the model (adapters merged in) as an ONNX file, checked against torch before it is written."""

from __future__ import annotations

import argparse
import re

from adaptsr.cli._common import CommandError, _add_model_flags, _load


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or 0 in (int(match[1]), int(match[2])):
        raise argparse.ArgumentTypeError(f"{text} is not a size HxW in pixels, e.g. 256x256")
    return int(match[1]), int(match[2])


def _export(args: argparse.Namespace) -> int:
    from adaptsr.export import export_onnx

    descriptor = _load(args)  # adapters merged
    try:
        report = export_onnx(descriptor, args.out, size=args.size, opset=args.opset, half=args.fp16)
    except ImportError as err:
        raise CommandError(str(err)) from err
    shape = "dynamic batch, height and width" if report["dynamic"] else f"fixed input 1x{args.size[0]}x{args.size[1]}"
    checks = ", ".join(f"{b}x{h}x{w} ({d:.1e})" for b, h, w, d in report["checked"])
    print(f"wrote {args.out}: {descriptor.architecture.name} x{descriptor.scale}, {report['dtype']}, {shape}; "
          "ONNX Runtime matches torch "
          f"on {checks} (batch x height x width, largest difference)")
    return 0


def add_export_command(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the model (base, base + adapter, or merged) to ONNX, checked against torch",
        description=(
            "Merge the adapter (if any) and export the model to ONNX with torch's exporter: input 'input' "
            "[B, C, H, W] in [0, 1], output 'output' upscaled, not clamped. By default batch, height and width stay "
            "dynamic; --size HxW exports one input size, for architectures whose code fixes the size while it is "
            "traced (the Swin family) and for runtimes that want static shapes. ONNX Runtime runs the exported "
            "graph before the file is written, and an export whose output differs from torch's is refused. Needs "
            "pip install 'adaptsr[onnx]'."
        ),
    )
    _add_model_flags(p)
    p.add_argument("--out", required=True, metavar="FILE", help="the ONNX file to write (.onnx)")
    p.add_argument("--size", type=_size, metavar="HxW",
                   help="export one fixed input size, e.g. 256x256 (default: dynamic sizes)")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset version (default: the exporter's)")
    p.add_argument("--fp16", action="store_true",
                   help="export in float16, input and output included (TensorRT, DirectML, chaiNNer), checked against "
                        "the float32 model within 1e-2; a model whose values overflow float16 is refused")
    p.set_defaults(func=_export, device="cpu", precision="fp32")
