"""Merged weights written in the base checkpoint's own layout, so that whatever opened the base opens them.

spandrel canonicalises a checkpoint as it loads it: it unwraps BasicSR's ``params_ema`` / ``params``,
strips DataParallel's ``module.`` and renames some architectures' keys (new-style ESRGAN's ``conv_first``
becomes ``model.0``). The module's own state dict therefore opens in spandrel (chaiNNer, ComfyUI) but
not in the architecture's own repository: Real-ESRGAN's and BasicSR's inference read ``params_ema`` or
``params`` and load the keys strictly. spandrel keeps no record of where each weight came from, so the
weights the adapters changed are found in the base file by value: each one's base value must occur
exactly once there (bitwise, after the dtype cast spandrel's loading applied). They are replaced in
place, in the file's dtype; everything else in the file is kept as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["flat_weights", "state_in_layout_of"]

_Path = tuple  # the keys leading to an entry: strings, or integers in a pickled checkpoint


def _tensors(tree: dict, prefix: _Path = ()) -> Iterator[tuple[_Path, torch.Tensor]]:
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            yield (*prefix, key), value
        elif isinstance(value, dict):
            yield from _tensors(value, (*prefix, key))


def _node(tree: dict, path: _Path) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _copy_tree(tree: dict) -> dict:
    """The dicts copied, the tensors and other leaves shared (they are replaced, never written into)."""
    return {key: _copy_tree(value) if isinstance(value, dict) else value for key, value in tree.items()}


def _tensor_names(group: dict) -> set:
    return {key for key, value in group.items() if isinstance(value, torch.Tensor)}


def _where(path: _Path) -> str:
    return "/".join(map(str, path))


def state_in_layout_of(
    new_state: dict[str, torch.Tensor], base_path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> tuple[dict, list[str]]:
    """The base checkpoint's contents with the weights that differ between ``new_state`` (a module state dict
    of the base's architecture and configuration, keys as spandrel names them) and the base replaced by
    ``new_state``'s, and notes on what else changed (a second copy of the weights dropped).

    ``dtype``: store the weights' floating-point tensors in this type instead of the base file's.
    Raises ValueError naming the weight when one cannot be placed: its base value is not in the file as such
    (spandrel transformed it while loading), or it is there more than once.
    """
    from adaptsr.io import load_model, load_state_dict

    base_path = Path(base_path)
    stored = load_state_dict(base_path)
    base_state = load_model(base_path).model.state_dict()
    missing = sorted(set(base_state) - set(new_state))
    extra = sorted(set(new_state) - set(base_state))
    if missing or extra:
        raise ValueError(f"the model does not match checkpoint {base_path}: "
                         + (f"it lacks {missing[:3]}" if missing else f"it has {extra[:3]}, which the base lacks"))
    for key, value in base_state.items():
        if tuple(new_state[key].shape) != tuple(value.shape):
            raise ValueError(f"the model does not match checkpoint {base_path}: {key} is "
                             f"{tuple(new_state[key].shape)} here and {tuple(value.shape)} there")
    changed = [key for key, value in base_state.items()
               if not torch.equal(new_state[key].detach().cpu().to(value.dtype), value)]

    by_shape: dict[tuple[int, ...], list[tuple[_Path, torch.Tensor]]] = {}
    for path, tensor in _tensors(stored):
        by_shape.setdefault(tuple(tensor.shape), []).append((path, tensor))
    placed: dict[_Path, tuple[str, torch.Tensor]] = {}  # where in the file: the key and the stored tensor
    for key in changed:
        before = base_state[key]
        found = [(path, tensor) for path, tensor in by_shape.get(tuple(before.shape), [])
                 if tensor.is_floating_point() == before.is_floating_point()
                 and torch.equal(tensor.to(before.dtype), before)]
        if len(found) != 1:
            problem = ("is not stored as such in it (spandrel converts it when loading)" if not found else
                       f"is stored {len(found)} times in it ({', '.join(_where(p) for p, _ in found[:3])}), so "
                       "which copy to replace is ambiguous")
            raise ValueError(f"cannot write the merged weights in the layout of {base_path}: the base value of "
                             f"{key} {problem}; write spandrel's layout instead (adaptsr merge --layout spandrel)")
        (path, stored_tensor), = found
        placed[path] = key, stored_tensor

    out = _copy_tree(stored)
    notes: list[str] = []
    parents = {path[:-1] for path in placed}
    if len(parents) > 1:
        raise ValueError(f"cannot write the merged weights in the layout of {base_path}: they are spread over "
                         f"{len(parents)} groups ({', '.join(sorted(_where(p) or 'the top level' for p in parents))})")
    weights_at = next(iter(parents)) if parents else None
    for path, (key, stored_tensor) in placed.items():
        _node(out, path[:-1])[path[-1]] = new_state[key].detach().cpu().to(stored_tensor.dtype)
    if weights_at is not None:
        # another copy of the same weights (BasicSR keeps `params` beside `params_ema`) would still be the base's
        names = _tensor_names(_node(stored, weights_at))
        for path in sorted({p[:-1] for p, _ in _tensors(stored)} - {weights_at}, key=len, reverse=True):
            if path and _tensor_names(_node(stored, path)) == names:
                _node(out, path[:-1]).pop(path[-1], None)
                notes.append(f"dropped {_where(path)}, a second copy of the weights that would still be the base's")
    if dtype is not None:
        for path, tensor in list(_tensors(out)):
            if tensor.is_floating_point() and (weights_at is None or path[:-1] == weights_at):
                _node(out, path[:-1])[path[-1]] = tensor.to(dtype)
    return out, notes


def flat_weights(state: dict, base_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` (from :func:`state_in_layout_of`) as the flat dict of tensors a safetensors file holds: the one
    group of weights at the top level under its own key names, and notes on what was left out."""
    groups = {path[:-1] for path, _ in _tensors(state)}
    if groups == {()}:
        flat = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
        left = sorted(key for key in state if key not in flat)
        return flat, [f"left out {', '.join(left)}: not tensors, which safetensors cannot hold"] if left else []
    if len(groups) != 1:
        raise ValueError(f"checkpoint {base_path} holds several groups of tensors "
                         f"({', '.join(sorted(_where(p) or 'the top level' for p in groups))}): write a .pth to keep "
                         "its layout")
    (path,) = groups
    group = _node(state, path)
    return ({key: value for key, value in group.items() if isinstance(value, torch.Tensor)},
            [f"wrote the weights of {_where(path)} at the top level: safetensors files have no nesting"])
