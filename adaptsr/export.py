"""ONNX export of an SR model (adapters merged in), checked against torch before it is written.

``export_onnx(model, "model.onnx")`` exports through torch's dynamo-based exporter with the batch, height
and width left dynamic (the model's size multiple kept), so ONNX Runtime, TensorRT or chaiNNer run it on
any image; ``size=(h, w)`` exports one fixed input size instead, for architectures whose code fixes the
size while it traces (spandrel's Swin family builds its shifted-window mask from the image size) and for
runtimes that want static shapes (upscale in tiles of that size). The graph is the module's forward:
input [B, C, H, W] in [0, 1], output [B, C', H*scale, W*scale], not clamped (spandrel's descriptor
clamps after the model, as ``adaptsr upscale`` does).

torch's exporter runs in a child process (``python -m adaptsr.export``): on some architectures it crashes
the process outright (spandrel's SPAN, torch 2.14), which becomes a ValueError here.

Before the file is written, ONNX Runtime runs the exported graph on random images (the example size and,
for a dynamic export, another size and batch) and its outputs must match torch's; an export that does not
is refused with the size and the difference, and nothing is written.

``half=True`` exports the model in float16, input and output included (what TensorRT, DirectML and chaiNNer
run fastest, at half the file size), for the architectures spandrel marks as running in float16. Its checks
hold two outputs to the float32 model's, within 1e-2 (float16's rounding through the bundled RRDB is 1.1e-3 to
1.6e-3): ONNX Runtime's, for the graph; and torch's float16 forward, for the numbers, since ONNX Runtime's CPU
kernels run float16 layers in float32 and so never show what a GPU runtime meets when an activation leaves
float16's range (65,504): inf or NaN, refused.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from adaptsr.infer import _round_up, image_of
from adaptsr.inject import lora_layers, merge_lora, unwrap_model
from adaptsr.io import atomic_write

__all__ = ["export_onnx"]

# Largest |onnx - torch| accepted, for outputs in about [0, 1]: the float32 rounding of a reordered graph is
# around 1e-6; a wrong graph (a traced-in size, a dropped branch) is off by far more.
_TOLERANCE = 1e-3
# The same for a float16 graph against the float32 model: its rounding is about 1e-3 (module docstring).
_TOLERANCE_FP16 = 1e-2


def _requirements(model) -> tuple[int, int]:
    """(minimum side, multiple of) of a descriptor's inputs; (1, 1) for a plain module."""
    needs = getattr(model, "size_requirements", None)
    if needs is None:
        return 1, 1
    return max(1, needs.minimum), max(1, needs.multiple_of)


def _check_size(size: tuple[int, int], minimum: int, multiple: int) -> None:
    h, w = size
    if min(h, w) < minimum or h % multiple or w % multiple:
        raise ValueError(f"size {h}x{w} does not suit the model: sides of at least {minimum} pixels, multiples of "
                         f"{multiple}")


def _sample_sizes(size: tuple[int, int] | None, minimum: int, multiple: int) -> list[tuple[int, int, int]]:
    """(batch, h, w) of the images the export is checked on: the example first; for a dynamic export also another
    batch and a non-square size, so a size traced in as a constant shows."""
    if size is not None:
        return [(1, *size)]
    side, step = _round_up(max(minimum, 32), multiple), _round_up(8, multiple)
    return [(1, side, side), (2, side + step, side + 2 * step)]


def _onnx_outputs(path: Path, x: torch.Tensor):
    """The graph's output for ``x``, given in the graph's input type (float16 or float32)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    dtype = torch.float16 if first.type == "tensor(float16)" else torch.float32
    return session.run(None, {first.name: x.to(dtype).numpy()})[0]


def export_onnx(model, path: str | os.PathLike, *, size: tuple[int, int] | None = None,
                opset: int | None = None, seed: int = 0, half: bool = False) -> dict:
    """Write ``model`` (a spandrel descriptor or an nn.Module; adapters are merged into a copy) to ``path`` as ONNX.

    ``size``: a fixed (height, width) input; None exports dynamic batch, height and width. ``opset``: the ONNX
    opset (None: the exporter's default). ``half``: a float16 graph (module docstring). Returns
    ``{"dynamic", "dtype", "checked": [(batch, h, w, max_difference)]}``, the differences to the float32 model.
    Raises ValueError (nothing written) when the exporter cannot trace the model or the exported graph's output
    differs from torch's, and ImportError naming the packages when onnx, onnxscript or onnxruntime is missing.
    """
    try:
        import onnx  # noqa: F401  (the exporter and the check need all three)
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({err}): "
                          "pip install 'adaptsr[onnx]'") from err
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"cannot export to {path}: use a .onnx file name")
    if half and getattr(model, "supports_half", True) is False:
        raise ValueError(f"{model.architecture.name} does not run in float16: spandrel marks it unsupported; "
                         "export it in float32")
    module = unwrap_model(model)
    module = copy.deepcopy(module).cpu().float().eval()
    if any(True for _ in lora_layers(module)):
        merge_lora(module)
    minimum, multiple = _requirements(model)
    if size is not None:
        _check_size(size, minimum, multiple)
    samples = _sample_sizes(size, minimum, multiple)
    generator = torch.Generator().manual_seed(seed)
    channels = getattr(model, "input_channels", None) or _input_channels(module)
    example = torch.rand(1, channels, *samples[0][1:], generator=generator)

    blocks = None if size is not None else (max(2, -(-minimum // multiple)), 8192 // multiple, multiple)
    checked = []
    with tempfile.TemporaryDirectory(prefix="adaptsr-onnx-") as scratch:
        scratch_path = Path(scratch) / path.name
        traced = copy.deepcopy(module).half() if half else module
        _trace_in_a_child(traced, example.half() if half else example, blocks, opset, scratch_path, size)
        tolerance = _TOLERANCE_FP16 if half else _TOLERANCE
        for batch, h, w in samples:
            x = example if (batch, h, w) == samples[0] else torch.rand(batch, channels, h, w, generator=generator)
            with torch.no_grad():
                expected = image_of(module(x.clone()))  # a copy: some models (RCAN) write into their input
            try:
                got = torch.from_numpy(_onnx_outputs(scratch_path, x)).float()
            except Exception as err:  # onnxruntime reports a bad reshape etc. as its own exception types
                # at another size than the traced one, the usual cause is a size the model's code fixed while traced
                hint = ("" if (batch, h, w) == samples[0] else
                        ": it holds a size traced in as a constant; export one input size with size=(h, w) (adaptsr "
                        "export --size HxW)")
                raise ValueError(f"the exported graph fails on a {batch}x{channels}x{h}x{w} input ({type(err).__name__}: "
                                 f"{str(err).strip().splitlines()[0]}){hint}") from err
            if got.shape != expected.shape:
                raise ValueError(f"the exported graph turns a {batch}x{channels}x{h}x{w} input into "
                                 f"{tuple(got.shape)}, and the model into {tuple(expected.shape)}")
            difference = float((got - expected).abs().max())
            if not difference <= tolerance:
                raise ValueError(f"the exported graph's output differs from the model's by {difference:.3g} on a "
                                 f"{batch}x{channels}x{h}x{w} input (at most {tolerance:g} accepted)")
            if half:
                _check_float16(traced, x, expected)
            checked.append((batch, h, w, difference))
        atomic_write(path, lambda tmp: shutil.copyfile(scratch_path, tmp))
    return {"dynamic": size is None, "dtype": "float16" if half else "float32", "checked": checked}


def _check_float16(half_module: torch.nn.Module, x: torch.Tensor, expected: torch.Tensor) -> None:
    """Refuse a model whose float16 forward (every activation stored in float16) strays from its float32 output."""
    with torch.no_grad():
        got = image_of(half_module(x.half())).float()
    difference = float((got - expected).abs().max())
    if not difference <= _TOLERANCE_FP16:
        cause = ("an activation leaves float16's range (65,504)" if not got.isfinite().all()
                 else "float16's rounding adds up through the layers")
        shape = "x".join(str(n) for n in x.shape)
        raise ValueError(f"in float16 the model's output differs from its float32 output by {difference:.3g} on a "
                         f"{shape} input (at most {_TOLERANCE_FP16:g} accepted): {cause}; export it in float32")


def _trace_in_a_child(module: torch.nn.Module, example: torch.Tensor, blocks, opset, target: Path, size) -> None:
    """Trace ``module`` on ``example`` and save the ONNX graph to ``target``, in a child process: torch's exporter
    crashes the process outright on some architectures (a segmentation fault on spandrel's SPAN, torch 2.14), and
    it logs pages of guard failures where it gives up; here both become one ValueError, and the caller survives."""
    job = target.with_suffix(".job.pt")
    torch.save({"module": module, "example": example, "blocks": blocks, "opset": opset}, job)
    child = subprocess.run([sys.executable, "-m", "adaptsr.export", str(job), str(target)], capture_output=True,
                           text=True, check=False)
    name = type(module).__name__
    if child.returncode < 0:
        raise ValueError(f"torch's ONNX exporter crashed tracing {name} (signal {-child.returncode}): it cannot "
                         "export this architecture; the merged checkpoint (adaptsr merge) runs in torch")
    if child.returncode != 0:
        lines = [line for line in child.stderr.strip().splitlines() if line.startswith(_CHILD_ERROR)]
        reason = lines[-1][len(_CHILD_ERROR):] if lines else (child.stderr.strip().splitlines() or ["no message"])[-1]
        hint = "" if size is not None else (
            "; this architecture's code may fix the image size while it is traced (spandrel's Swin family builds "
            "its window mask from it): export one input size with size=(h, w) (adaptsr export --size HxW) and "
            "upscale in tiles of that size")
        raise ValueError(f"the ONNX exporter could not trace {name} ({reason}){hint}")


_CHILD_ERROR = "adaptsr-export-error: "


def _trace(job_path: str, target: str) -> None:
    """The child's work (``python -m adaptsr.export JOB TARGET``): torch.onnx.export with dynamic batch, height and
    width in blocks of the model's size multiple (so the exporter knows which sizes it may assume), or static."""
    job = torch.load(job_path, weights_only=False)  # written by this process's parent a moment ago
    dynamic_shapes = None
    if job["blocks"] is not None:
        from torch.export import Dim

        smallest, largest, multiple = job["blocks"]
        dynamic_shapes = ({0: Dim("batch", max=256), 2: multiple * Dim("h_blocks", min=smallest, max=largest),
                           3: multiple * Dim("w_blocks", min=smallest, max=largest)},)
    with torch.no_grad():
        program = torch.onnx.export(job["module"], (job["example"],), None, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=["input"], output_names=["output"], opset_version=job["opset"],
                                    verbose=False)
    program.save(target)


def _reason(err: Exception) -> str:
    """One line saying why the exporter failed: its exception summary's cause where it gives one (the first line
    of its message is only "Failed to export the model with torch.export"), colour codes removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    causes = [line.strip() for line in text.splitlines() if line.strip().startswith("<class '")]
    line = causes[0] if causes else (text.splitlines()[0] if text else "")
    return f"{type(err).__name__}: {line}"


def _input_channels(module: torch.nn.Module) -> int:
    first = next((m for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is None:
        raise ValueError("cannot tell the model's input channels: export a spandrel descriptor")
    return first.in_channels


if __name__ == "__main__":
    try:
        _trace(sys.argv[1], sys.argv[2])
    except Exception as err:  # the exporter's failures (tracing, guards, unsupported ops) come as many types
        print(f"{_CHILD_ERROR}{_reason(err)}", file=sys.stderr)
        sys.exit(1)
