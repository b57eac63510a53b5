"""Degradations in JSON files: a camera's degradation written down once and named on the command line.

``adaptsr adapt --degradation my-camera.json`` (and ``adaptsr eval``) take a file where they take a preset
name. A file holds one JSON object in one of two forms:

- a camera profile (``adaptsr.data.camera_profile``: one blur, one noise level, one JPEG quality, as the
  ``camera`` and ``lowlight`` presets are)::

      {"camera_profile": {"blur_sigma": 1.0, "noise": 15, "jpeg_quality": 70}}

- any :class:`~adaptsr.data.DegradationConfig`, as changes to a preset (``realesrgan`` when ``"preset"`` is
  left out); stages change field by field::

      {"preset": "mild", "first": {"noise_range": [1, 15]}, "final_jpeg_range": [50, 90]}

  ``"second": null`` makes it single-stage; a ``"second"`` given to a single-stage preset starts from
  Real-ESRGAN's second stage.

A mixture (:class:`~adaptsr.data.DegradationMixture`: each image draws one; uniformly unless weighted) lists
degradations of those forms or preset names::

      {"mixture": ["camera", {"camera_profile": {"blur_sigma": 0.8, "noise": 20, "jpeg_quality": 80}}],
       "weights": [1, 2]}

:func:`degradation_to_dict` lists every field, the form ``adapt`` records in its run folder
(``degradation.json``); read back, it gives the same config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from adaptsr.data.degradations import (
    DEGRADATION_PRESETS,
    DegradationConfig,
    DegradationMixture,
    _second_stage_default,
    camera_profile,
    get_preset,
)
from adaptsr.io import atomic_write

__all__ = ["degradation_from_dict", "degradation_to_dict", "load_degradation", "mixture_of", "save_degradation"]

_CAMERA_KEY = "camera_profile"
_MIXTURE_KEY = "mixture"
_CAMERA_FIELDS = ("blur_sigma", "noise", "jpeg_quality")
_STAGES = ("first", "second")


def degradation_to_dict(config: DegradationConfig | DegradationMixture) -> dict:
    """Every field of ``config`` as JSON types (tuples as lists); a mixture as its components and weights."""
    if isinstance(config, DegradationMixture):
        data: dict = {_MIXTURE_KEY: [degradation_to_dict(c) for c in config.configs]}
        if config.weights is not None:
            data["weights"] = list(config.weights)
        return data
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value(value, like, where: str):
    """``value`` read from JSON as the type of the field's current value ``like``. Ranges, probabilities and
    names are checked by ``validate`` afterwards; this catches what it would trip over."""
    if isinstance(like, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
    elif _is_number(like):
        if not _is_number(value):
            raise ValueError(f"{where} must be a number, got {value!r}")
    elif isinstance(like, str):
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
    elif isinstance(like, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        wants_numbers = not like or _is_number(like[0])
        if not all(_is_number(v) if wants_numbers else isinstance(v, str) for v in value):
            raise ValueError(f"{where} must be a list of {'numbers' if wants_numbers else 'strings'}, got {value!r}")
        return tuple(value)
    return value


def _changed(config, changes, where: str):
    """A copy of the dataclass ``config`` with ``changes`` (a JSON object of some of its fields) applied."""
    kind = type(config).__name__
    if not isinstance(changes, dict):
        raise ValueError(f"{where or 'the degradation'} must be a JSON object of {kind} fields, got {changes!r}")
    names = [f.name for f in dataclasses.fields(config)]
    updates = {}
    for key, value in changes.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ValueError(f"unknown field {path!r}; a {kind} has {', '.join(names)}")
        current = getattr(config, key)
        if key in _STAGES and isinstance(config, DegradationConfig):
            if value is None and key == "second":
                updates[key] = None
            else:
                updates[key] = _changed(current if current is not None else _second_stage_default(), value, path)
        else:
            updates[key] = _value(value, current, path)
    return dataclasses.replace(config, **updates)


def _mixture_from_dict(data: dict) -> DegradationMixture:
    extra = set(data) - {_MIXTURE_KEY, "weights"}
    if extra:
        raise ValueError(f"a mixture has {_MIXTURE_KEY!r} and 'weights' only, not {', '.join(map(repr, sorted(extra)))}")
    components = data[_MIXTURE_KEY]
    if not isinstance(components, list) or not components:
        raise ValueError(f"{_MIXTURE_KEY} must be a non-empty list of degradations, got {components!r}")
    configs = []
    for k, component in enumerate(components):
        try:
            if isinstance(component, dict) and _MIXTURE_KEY in component:
                raise ValueError("a mixture cannot hold another mixture")
            configs.append(get_preset(component) if isinstance(component, str) else degradation_from_dict(component))
        except ValueError as err:
            raise ValueError(f"{_MIXTURE_KEY}[{k}]: {err}") from err
    weights = data.get("weights")
    if weights is not None and not isinstance(weights, list):
        raise ValueError(f"weights must be a list of numbers, got {weights!r}")
    mixture = DegradationMixture(tuple(configs), None if weights is None else tuple(weights))
    mixture.validate()
    return mixture


def degradation_from_dict(data: dict) -> DegradationConfig | DegradationMixture:
    """The config a JSON object describes (a form of the module docstring), validated."""
    if not isinstance(data, dict):
        raise ValueError(f"a degradation is a JSON object, got {type(data).__name__}")
    if _MIXTURE_KEY in data:
        return _mixture_from_dict(data)
    if _CAMERA_KEY in data:
        if len(data) > 1:
            others = ", ".join(repr(k) for k in data if k != _CAMERA_KEY)
            raise ValueError(f"{_CAMERA_KEY!r} describes the whole degradation; leave out {others}")
        camera = data[_CAMERA_KEY]
        if not isinstance(camera, dict) or set(camera) != set(_CAMERA_FIELDS):
            raise ValueError(f"{_CAMERA_KEY} must be an object with exactly {', '.join(_CAMERA_FIELDS)}, got {camera!r}")
        return camera_profile(**camera)
    changes = dict(data)
    preset = changes.pop("preset", "realesrgan")
    if preset not in DEGRADATION_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(DEGRADATION_PRESETS)}")
    config = _changed(get_preset(preset), changes, "")
    config.validate()
    return config


def load_degradation(spec: str | os.PathLike) -> DegradationConfig | DegradationMixture:
    """A preset by name, or the config in a JSON file."""
    if isinstance(spec, str) and spec in DEGRADATION_PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"degradation {str(spec)!r} is neither a preset ({', '.join(DEGRADATION_PRESETS)}) nor a file; "
            f"a file holds JSON such as {{\"{_CAMERA_KEY}\": {{\"blur_sigma\": 1.0, \"noise\": 15, "
            "\"jpeg_quality\": 70}}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"degradation file {path} is not valid JSON ({err})") from err
    try:
        return degradation_from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"degradation file {path}: {err}") from err


def mixture_of(specs: list[str | os.PathLike]) -> DegradationConfig | DegradationMixture:
    """The degradation of one spec (a preset or a file), or the uniform mixture of several."""
    if len(specs) == 1:
        return load_degradation(specs[0])
    configs = [load_degradation(spec) for spec in specs]
    if any(isinstance(config, DegradationMixture) for config in configs):
        raise ValueError("a mixture file cannot be one of several degradations; list its components instead")
    return DegradationMixture(tuple(configs))


def save_degradation(config: DegradationConfig | DegradationMixture, path: str | os.PathLike) -> Path:
    """Write every field of ``config`` to ``path`` as JSON (atomically); ``load_degradation`` reads it back."""
    path = Path(path)
    text = json.dumps(degradation_to_dict(config), indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
