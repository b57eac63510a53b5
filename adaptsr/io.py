"""Loading and saving whole SR models through spandrel, safely and atomically."""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from spandrel import ModelLoader, canonicalize_state_dict

from adaptsr.inject import lora_layers, merge_lora, unwrap_model

__all__ = ["atomic_write", "load_model", "load_state_dict", "save_model"]

_PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` and rename the result onto ``path``.

    A crash half-way leaves the old file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp, whose 0600 mode (safetensors' writer gives 0600 too) would stick to the result:
    # a checkpoint gets the mode a plain new file gets, 0o666 less the umask.
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors, or a .pth/.pt/.ckpt loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _PICKLE_SUFFIXES:
        raise ValueError(f"checkpoint {path}: unsupported extension {suffix!r} (use .safetensors or .pth)")
    try:
        if suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the loaders raise many types for a corrupt file
        raise ValueError(f"checkpoint {path} could not be read ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        # a ValueError, as for every unreadable checkpoint: the CLI reports those as one line
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")  # noqa: TRY004
    return state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load any spandrel-supported SR checkpoint; returns spandrel's ImageModelDescriptor.

    ``descriptor.model`` is the nn.Module, ``descriptor.scale`` the upscaling factor and
    ``descriptor.architecture.id`` the architecture (e.g. "SwinIR").
    """
    state = load_state_dict(path)
    try:
        descriptor = ModelLoader().load_from_state_dict(canonicalize_state_dict(state))
    except Exception as err:
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise ValueError(f"checkpoint {path}: spandrel does not recognise the architecture ({reason})") from err
    return descriptor.to(device).eval()


def _configuration_buffers(
    module: torch.nn.Module, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The buffers left out of ``state`` (the module's ``state_dict()``) that spandrel needs to detect the
    configuration.

    spandrel's GRL keeps its attention tables and indices as non-persistent buffers of the top-level module;
    the official checkpoints hold them, and spandrel reads the window size, the stripe size and the anchor
    down factor from their shapes (then drops them). A checkpoint without them loads with a guessed
    configuration (window 32, stripes 64 x 64 for SR), a different model unless the guess is right.
    """
    if not (type(module).__name__ == "GRL" and type(module).__module__.startswith("spandrel.")):
        return {}
    return {name: buffer for name, buffer in module.named_buffers(recurse=False) if name not in state}


def save_model(
    model, path: str | os.PathLike, *, dtype: torch.dtype | None = None, like: str | os.PathLike | None = None
) -> list[str]:
    """Write ``model`` (adapters merged in, if any) as a plain checkpoint spandrel opens as the same architecture.

    ``.safetensors`` or ``.pth``; written atomically. The model passed in is not modified. ``dtype``
    (e.g. ``torch.float16``: half the file) stores the floating-point tensors in that type after
    merging; integer buffers (Swin's relative position index) keep theirs.

    ``like``: the base checkpoint the model was loaded from. The file then keeps that checkpoint's layout
    (its wrapper such as BasicSR's ``params_ema``, its key names, its dtypes unless ``dtype`` is given, its
    other entries) with the changed weights replaced (:mod:`adaptsr.layout`), so the architecture's own
    code opens it as it opened the base; without ``like``, the keys are spandrel's module's. Returns notes
    on what the file leaves out of the base's layout (none without ``like``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _PICKLE_SUFFIXES:
        raise ValueError(f"cannot save model to {path}: use a .safetensors or .pth file name")
    module = unwrap_model(model)
    if any(True for _ in lora_layers(module)):
        module = merge_lora(copy.deepcopy(module))
    if like is not None:
        return _save_in_layout_of(module.state_dict(), path, like, dtype)
    # safetensors refuses shared storage; clones also drop views into larger buffers.
    state = module.state_dict()
    tensors = {**state, **_configuration_buffers(module, state)}
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(state, tmp))
    else:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    return []


def _save_in_layout_of(state: dict, path: Path, like: str | os.PathLike, dtype: torch.dtype | None) -> list[str]:
    from adaptsr.layout import flat_weights, state_in_layout_of

    contents, notes = state_in_layout_of(state, like, dtype=dtype)
    if path.suffix.lower() != ".safetensors":
        atomic_write(path, lambda tmp: torch.save(contents, tmp))
        return notes
    flat, more = flat_weights(contents, like)
    flat = {k: v.contiguous().clone() for k, v in flat.items()}  # safetensors refuses shared storage
    metadata = None
    if Path(like).suffix.lower() == ".safetensors":  # e.g. a model card's fields: kept with the weights
        with safe_open(str(like), framework="pt") as base:
            metadata = base.metadata()
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))
    return notes + more


