"""Adapter files: only the LoRA weights of a model, in PEFT's LoRA layout.

A directory holds two files, as PEFT writes them:

- ``adapter_model.safetensors``: ``base_model.model.<layer>.lora_A.weight`` and ``.lora_B.weight``
  for every adapted layer (conv ``A: [r, in/groups, kh, kw]``, ``B: [out, r, 1, 1]``; linear
  ``A: [r, in]``, ``B: [out, r]``), and for DoRA adapters ``.lora_magnitude_vector`` (conv
  ``[1, out, 1, 1]``, linear ``[out]``);
- ``adapter_config.json``: exactly the fields PEFT 0.21's ``LoraConfig`` writes, no others (PEFT
  warns about unknown keys). The most common rank and alpha are ``r`` and ``lora_alpha``; layers
  that differ are in ``rank_pattern`` / ``alpha_pattern`` under keys that match that one layer only
  (``^`` + the escaped layer name, for PEFT's ``(.*\\.)?(key)$`` lookup); ``target_modules`` is a
  regex matching exactly the adapted layers.

What PEFT has no field for lives in the safetensors header metadata under ``"adaptsr"`` (a JSON
string): the format version, the architecture, a hash of the base weights and each layer's
geometry. ``load_adapter`` uses it to refuse an adapter trained for another base model.

PEFT itself loads these files (``PeftModel.from_pretrained``) wherever its LoRA computes what ours
does: linear layers, and convolutions with ``groups=1``, ``dilation=1`` and zero padding (PEFT's
conv adapter ignores the others). ``load_adapter`` reads adapters PEFT wrote.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adaptsr.inject import _WRAPPERS, LoRASummary, _pattern_value, inject_lora, lora_layers, unwrap_model
from adaptsr.io import atomic_write, load_state_dict
from adaptsr.nn.reparameterised import derived_parameter_names

__all__ = ["load_adapter", "save_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's safe_serialization=False
_FILES = f"{CONFIG_NAME} and {WEIGHTS_NAME}"
_FORMAT_VERSION = 1
_KEY_PREFIX = "base_model.model."
_PEFT_LAYOUT_VERSION = "0.21.2"
# PEFT 0.21's LoraConfig fields with their defaults, as LoraConfig.save_pretrained writes them.
_PEFT_LORA_DEFAULTS: dict = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": False,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": _PEFT_LAYOUT_VERSION,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
# <prefix><layer>.lora_A[.<adapter name>].weight; PEFT drops the adapter name when it saves.
_TENSOR_KEY = re.compile(r"(?P<layer>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
# DoRA's <prefix><layer>.lora_magnitude_vector, as PEFT saves it ([.<adapter name>].weight in its state dicts).
_MAGNITUDE_KEY = re.compile(r"(?P<layer>.+)\.lora_magnitude_vector(?:(?:\.(?P<adapter>[^.]+))?\.weight)?")


# -- shared helpers --


def _number(value: float) -> int | float:
    """An alpha as JSON shows it best: 16 rather than 16.0."""
    value = float(value)
    return int(value) if value.is_integer() else value


def _exact_key(name: str) -> str:
    """A rank_pattern / alpha_pattern key that PEFT's ``(.*\\.)?(key)$`` lookup matches for ``name`` only."""
    return "^" + re.escape(name)


def _architecture(model) -> tuple[str, str]:
    """(architecture, model class): spandrel's architecture id when ``model`` is a descriptor."""
    module = unwrap_model(model)
    arch = getattr(getattr(model, "architecture", None), "id", None)
    return (arch if isinstance(arch, str) else type(module).__name__), type(module).__name__


def _base_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters under its original state-dict keys (LoRA wrappers looked through).

    Buffers are left out: in SR models they are derived from the architecture and input size
    (attention masks, position indices), not trained. So are parameters the model derives from
    others (SPAN's folded inference convs, rewritten at every evaluation: adaptsr.nn.reparameterised).
    """
    lora_names = [name for name, _ in lora_layers(module)]
    derived = derived_parameter_names(module)
    params: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, nn.Parameter) or key in derived:
            continue
        owner = next((n for n in lora_names if key.startswith(n + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1 :]
            if rest.startswith("lora_"):
                continue
            key = f"{owner}.{rest.removeprefix('base_layer.')}"
        params[key] = value
    return params


@torch.no_grad()
def _base_hash(module: nn.Module) -> str:
    """sha256 over the base parameters: sorted keys, each with its dtype, shape and bytes."""
    digest = hashlib.sha256()
    for key, value in sorted(_base_parameters(module).items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _geometry(layer: nn.Module) -> dict:
    """What an adapter file records about one base layer."""
    geometry: dict = {"type": type(layer).__name__, "weight_shape": list(layer.weight.shape)}
    if isinstance(layer, nn.Conv2d):
        geometry.update(
            stride=list(layer.stride),
            padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            dilation=list(layer.dilation),
            groups=layer.groups,
            padding_mode=layer.padding_mode,
        )
    elif isinstance(layer, nn.ConvTranspose2d):
        geometry.update(
            stride=list(layer.stride),
            padding=list(layer.padding),
            output_padding=list(layer.output_padding),
            dilation=list(layer.dilation),
            groups=layer.groups,
        )
    return geometry


def _peft_computes_the_same(layer: nn.Module) -> bool:
    """PEFT's conv adapter uses groups=1, dilation=1 and zero padding whatever the base layer has."""
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and tuple(layer.dilation) == (1, 1) and layer.padding_mode == "zeros"
    return not isinstance(layer, nn.ConvTranspose2d)  # PEFT has no LoRA for transposed convs


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


# -- saving --


def save_adapter(model, directory: str | os.PathLike) -> Path:
    """Write the LoRA adapters of ``model`` to ``directory`` in PEFT's layout; returns the directory.

    ``adapter_model.safetensors`` (the adapter weights, plus adaptsr's metadata in its header)
    and ``adapter_config.json`` (a PEFT ``LoraConfig``). Each file is written atomically; the
    directory is created if missing. ``model`` is an nn.Module or a spandrel descriptor with
    adapters injected (``inject_lora``) and not merged.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save an adapter to {directory}: it is a file, not a directory")
    module = unwrap_model(model)
    layers = list(lora_layers(module))
    if not layers:
        raise ValueError(f"{type(module).__name__} has no LoRA layers to save; call inject_lora first")
    for name, layer in layers:
        if not isinstance(layer, tuple(_WRAPPERS.values())):
            raise ValueError(
                f"cannot save layer {name!r}: adapter files hold LoRAConv2d, LoRALinear and LoRAConvTranspose2d, "
                f"not {type(layer).__name__}"
            )
        if layer.merged:
            raise ValueError(
                f"layer {name!r} has its adapter merged into the base weight, so the base model is not "
                "available to record; call adaptsr.unmerge_lora(model) before save_adapter"
            )
        if layer.strength != 1.0:
            # the file holds the adapter as trained; a strength is a choice made where it is used
            raise ValueError(
                f"layer {name!r} runs its adapter at strength {layer.strength:g}, which an adapter file does not "
                "record; call adaptsr.set_adapter_strength(model, 1) before save_adapter"
            )
    rslora = {layer.use_rslora for _, layer in layers}
    if len(rslora) > 1:
        raise ValueError("the model mixes rsLoRA and plain LoRA layers; one adapter file holds one kind")
    dora = {layer.use_dora for _, layer in layers}
    if len(dora) > 1:
        raise ValueError("the model mixes DoRA and plain LoRA layers; one adapter file holds one kind")

    tensors: dict[str, torch.Tensor] = {}
    layer_info: dict[str, dict] = {}
    for name, layer in layers:
        for part in ("A", "B"):
            param = getattr(layer, f"lora_{part}")
            tensors[f"{_KEY_PREFIX}{name}.lora_{part}.weight"] = param.detach().to("cpu").contiguous().clone()
        if layer.use_dora:
            magnitude = layer.lora_magnitude_vector.detach().to("cpu").contiguous().clone()
            tensors[f"{_KEY_PREFIX}{name}.lora_magnitude_vector"] = magnitude
        layer_info[name] = {**_geometry(layer.base_layer), "rank": layer.rank, "alpha": _number(layer.alpha)}

    rank = _most_common(layer.rank for _, layer in layers)
    alpha = _most_common(_number(layer.alpha) for _, layer in layers)
    config = dict(_PEFT_LORA_DEFAULTS)
    config.update(
        r=rank,
        lora_alpha=alpha,
        rank_pattern={_exact_key(n): layer.rank for n, layer in layers if layer.rank != rank},
        alpha_pattern={_exact_key(n): _number(layer.alpha) for n, layer in layers if _number(layer.alpha) != alpha},
        target_modules="|".join(re.escape(name) for name, _ in layers),
        use_rslora=rslora.pop(),
        use_dora=dora.pop(),
        lora_dropout=_most_common(layer.lora_dropout for _, layer in layers),
    )
    architecture, model_class = _architecture(model)
    info = {
        "format_version": _FORMAT_VERSION,
        "architecture": architecture,
        "model_class": model_class,
        "base_hash": _base_hash(module),
        "peft_compatible": all(_peft_computes_the_same(layer.base_layer) for _, layer in layers),
        "layers": layer_info,
    }
    metadata = {"format": "pt", "adaptsr": json.dumps(info, sort_keys=True)}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory


# -- loading --


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"adapter config {path} does not exist (an adapter directory holds {_FILES})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"adapter config {path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"adapter config {path} holds a JSON {type(config).__name__}, not an object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"adapter config {path}: peft_type is {peft_type!r}; only LoRA adapters can be loaded")
    for flag, what in (("lora_bias", "LoRA bias terms"), ("use_qalora", "QALoRA")):
        if config.get(flag):
            raise ValueError(f"adapter config {path}: {what} ({flag}=true) is not supported, only plain LoRA")
    if config.get("modules_to_save"):
        raise ValueError(
            f"adapter config {path}: modules_to_save={config['modules_to_save']!r} (fully trained modules) "
            "is not supported"
        )
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter config {path}: bias={config['bias']!r} is not supported, only \"none\"")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise ValueError(f"adapter config {path}: {field} must be an object, got {config[field]!r}")
    return config


def _read_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor], dict | None]:
    """(file, tensors, adaptsr metadata or None)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = directory / _PICKLE_WEIGHTS_NAME
        if pickled.is_file():
            return pickled, load_state_dict(pickled), None
        raise FileNotFoundError(f"adapter weights {path} do not exist (an adapter directory holds {_FILES})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ValueError(f"adapter weights {path} could not be read ({type(err).__name__}: {err})") from err
    info = None
    if "adaptsr" in metadata:
        try:
            info = json.loads(metadata["adaptsr"])
        except json.JSONDecodeError as err:
            raise ValueError(f"adapter weights {path}: the adaptsr metadata in its header is not JSON ({err})") from err
        if not isinstance(info, dict):
            raise ValueError(f"adapter weights {path}: the adaptsr metadata in the header is not a JSON object")
        version = info.get("format_version")
        if not isinstance(version, int) or version > _FORMAT_VERSION:
            raise ValueError(
                f"adapter weights {path}: adapter format version {version!r} is newer than this adaptsr reads "
                f"({_FORMAT_VERSION}); upgrade adaptsr"
            )
    return path, tensors, info


def _adapter_pairs(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """layer name -> {"A": tensor, "B": tensor} (and "M": DoRA's magnitude), from PEFT's key variants."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapters: set[str] = set()
    for key, tensor in tensors.items():
        match = _TENSOR_KEY.fullmatch(key.removeprefix(_KEY_PREFIX))
        if match is None:
            match = _MAGNITUDE_KEY.fullmatch(key.removeprefix(_KEY_PREFIX))
        if match is None:
            if ".lora_embedding_" in key:
                reason = "LoRA on embedding layers is not supported"
            elif key.endswith(".bias") and ".lora_" in key:
                reason = "LoRA bias terms are not supported"
            else:
                reason = "expected <layer>.lora_A.weight or <layer>.lora_B.weight"
            raise ValueError(f"adapter weights {path}: unexpected tensor {key!r} ({reason})")
        if match["adapter"] is not None:
            adapters.add(match["adapter"])
        layer = pairs.setdefault(match["layer"], {})
        part = match.groupdict().get("part") or "M"
        if part in layer:
            raise ValueError(f"adapter weights {path}: layer {match['layer']!r} has more than one {_PART_NAMES[part]}")
        layer[part] = tensor
    if len(adapters) > 1:
        raise ValueError(f"adapter weights {path} hold several adapters ({sorted(adapters)}); keep one per directory")
    if not pairs:
        raise ValueError(f"adapter weights {path} holds no LoRA tensors")
    for name, parts in pairs.items():
        for part in ("A", "B"):
            if part not in parts:
                others = " and ".join(_PART_NAMES[p] for p in parts)
                raise ValueError(f"adapter weights {path}: layer {name!r} has {others} but no lora_{part}")
    return pairs


_PART_NAMES = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector"}


def _check_magnitudes(path: Path, config_path: Path, use_dora: bool, pairs: dict) -> None:
    """A DoRA adapter (use_dora in its config) has one magnitude per output channel of every layer; a LoRA one none.
    Runs after ``_check_layer``, so each lora_B fits its layer and its first dimension is the output channels."""
    for name, parts in pairs.items():
        if not use_dora:
            if "M" in parts:
                raise ValueError(f"adapter weights {path}: layer {name!r} has a DoRA lora_magnitude_vector, but "
                                 f"{config_path} does not set use_dora")
            continue
        if "M" not in parts:
            raise ValueError(f"adapter weights {path}: layer {name!r} has no lora_magnitude_vector, which a DoRA "
                             f"adapter ({config_path} sets use_dora) needs for every layer")
        out_channels = parts["B"].shape[0]
        if parts["M"].numel() != out_channels:
            raise ValueError(f"adapter weights {path}: layer {name!r} has a lora_magnitude_vector of shape "
                             f"{list(parts['M'].shape)}, but its {out_channels} output channels need {out_channels} "
                             "magnitudes")


def _check_layer(path: Path, info: dict | None, module: nn.Module, name: str, parts: dict[str, torch.Tensor]) -> int:
    """Check that the adapter for ``name`` fits ``module``; returns its rank."""
    try:
        layer = module.get_submodule(name)
    except AttributeError:
        names = [n for n, m in module.named_modules() if type(m) in _WRAPPERS][:6]
        raise ValueError(
            f"adapter {path} has weights for layer {name!r}, which this {type(module).__name__} does not have "
            f"(its adaptable layers are named like {names}); was the adapter made for another architecture "
            "or depth?"
        ) from None
    if type(layer) not in _WRAPPERS:
        raise ValueError(
            f"adapter {path} has weights for layer {name!r}, but in this model it is a {type(layer).__name__}; "
            "adapters load into nn.Conv2d, nn.Linear and nn.ConvTranspose2d layers only"
        )
    A, B = parts["A"], parts["B"]
    rank = _WRAPPERS[type(layer)]._rank_of(A)
    want_A, want_B = _WRAPPERS[type(layer)]._adapter_shapes(layer, rank)
    if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
        recorded = ((info or {}).get("layers") or {}).get(name, {}).get("weight_shape")
        made_for = f"; the adapter was made for a layer with weight {recorded}" if recorded else ""
        hint = ""
        if isinstance(layer, nn.Conv2d) and layer.groups > 1:
            hint = " (PEFT's grouped-conv layout, lora_A [r, in, kh, kw], is not supported)"
        raise ValueError(
            f"adapter {path} does not fit layer {name!r}: it has lora_A {list(A.shape)} and lora_B "
            f"{list(B.shape)}, but this model's {type(layer).__name__} with weight {list(layer.weight.shape)} "
            f"needs lora_A {list(want_A)} and lora_B {list(want_B)}{made_for}{hint}; was the adapter trained "
            "for a model of another width?"
        )
    max_rank = _WRAPPERS[type(layer)]._max_rank(layer)
    if not 1 <= rank <= max_rank:
        raise ValueError(
            f"adapter {path}: layer {name!r} has rank {rank}, but its {type(layer).__name__} with weight "
            f"{list(layer.weight.shape)} allows ranks 1 to {max_rank}"
        )
    return rank


@dataclass
class _AdapterFile:
    """An adapter directory read and checked against a model: per layer its factors, rank and alpha."""

    directory: Path
    pairs: dict[str, dict[str, torch.Tensor]]  # layer name -> {"A": lora_A, "B": lora_B}
    ranks: dict[str, int]
    alphas: dict[str, float]
    use_rslora: bool
    lora_dropout: float
    use_dora: bool = False

    def magnitudes(self) -> dict[str, torch.Tensor] | None:
        """DoRA's magnitude per layer, or None for a LoRA adapter."""
        return {name: parts["M"] for name, parts in self.pairs.items()} if self.use_dora else None

    def scaling(self, name: str) -> float:
        """The layer's alpha / r (alpha / sqrt(r) with rsLoRA)."""
        rank = self.ranks[name]
        return self.alphas[name] / (math.sqrt(rank) if self.use_rslora else rank)


def _refuse_existing_adapters(module: nn.Module) -> None:
    existing = [name for name, _ in lora_layers(module)]
    if existing:
        raise ValueError(
            f"the model already has LoRA adapters (e.g. on {existing[0]!r}); load adapters into a plain base "
            "model, or remove the ones it has first (adaptsr.unload_lora, or adaptsr.merge_lora to keep them)"
        )


def _read_adapter(model, directory: str | os.PathLike, *, strict_base: bool) -> _AdapterFile:
    """Read the adapter at ``directory`` and check that it fits ``model`` (which it leaves unchanged)."""
    module = unwrap_model(model)
    directory = Path(directory)
    if not directory.is_dir():
        if directory.is_file():
            raise ValueError(f"{directory} is a file; an adapter is the directory that holds {_FILES}")
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    config_path = directory / CONFIG_NAME
    config = _read_config(config_path)
    path, tensors, info = _read_weights(directory)
    pairs = _adapter_pairs(path, tensors)

    if strict_base and info is not None:
        saved_arch, saved_class = info.get("architecture"), info.get("model_class")
        arch, model_class = _architecture(model)
        if saved_class is not None and saved_class != model_class:
            raise ValueError(
                f"adapter {path} was trained for a {saved_arch} model ({saved_class}), not for this {arch} "
                f"({model_class}); pass strict_base=False to load it anyway"
            )

    ranks = {name: _check_layer(path, info, module, name, parts) for name, parts in pairs.items()}
    use_dora = bool(config.get("use_dora", False))
    _check_magnitudes(path, config_path, use_dora, pairs)

    if strict_base and info is not None and info.get("base_hash"):
        actual = _base_hash(module)
        if actual != info["base_hash"]:
            raise ValueError(
                f"adapter {path} was trained for another base model (base weights sha256 "
                f"{_short(info['base_hash'])}..., this model's {_short(actual)}...); load the checkpoint the "
                "adapter was trained on, or pass strict_base=False to load it into this model anyway"
            )

    default_alpha = config.get("lora_alpha", 8)
    alphas = {name: _pattern_value(config.get("alpha_pattern"), name, default_alpha) for name in pairs}
    for name, alpha in alphas.items():
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"adapter config {config_path}: the alpha for layer {name!r} is {alpha!r}, not a number")
    return _AdapterFile(
        directory=directory,
        pairs=pairs,
        ranks=ranks,
        alphas={name: float(alpha) for name, alpha in alphas.items()},
        use_rslora=bool(config.get("use_rslora", False)),
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        use_dora=use_dora,
    )


def _inject_factors(
    module: nn.Module,
    source: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    alphas: dict[str, float],
    *,
    use_rslora: bool,
    lora_dropout: float,
    magnitudes: dict[str, torch.Tensor] | None = None,
) -> LoRASummary:
    """Wrap the layers named in ``factors`` ({name: (lora_A, lora_B)}) with adapters holding those factors
    (DoRA adapters with ``magnitudes``, {name: lora_magnitude_vector})."""
    ranks = {name: _WRAPPERS[type(module.get_submodule(name))]._rank_of(A) for name, (A, _) in factors.items()}
    try:
        summary = inject_lora(
            module,
            targets="|".join(re.escape(name) for name in factors),
            rank_pattern={_exact_key(name): rank for name, rank in ranks.items()},
            alpha_pattern={_exact_key(name): alphas[name] for name in factors},
            use_rslora=use_rslora,
            lora_dropout=lora_dropout,
            use_dora=magnitudes is not None,
        )
    except ValueError as err:
        raise ValueError(f"adapter {source}: {err}") from err
    with torch.no_grad():
        for name, layer in lora_layers(module):
            layer.lora_A.copy_(factors[name][0])
            layer.lora_B.copy_(factors[name][1])
            if magnitudes is not None:
                layer.lora_magnitude_vector.copy_(magnitudes[name].reshape(layer.lora_magnitude_vector.shape))
    return summary


def load_adapter(model, directory: str | os.PathLike, *, strict_base: bool = True) -> LoRASummary:
    """Inject LoRA layers into ``model`` for the layers in the adapter at ``directory`` and load their weights.

    ``model`` is a plain base model (nn.Module or spandrel descriptor) without adapters. Ranks
    come from the tensor shapes, alphas from ``lora_alpha`` / ``alpha_pattern``, rsLoRA from the
    config, DoRA from ``use_dora``; adapters PEFT saved load too. With ``strict_base`` (default) an adapter saved by
    adaptsr must have been trained on this very base model (same architecture, same weights);
    ``strict_base=False`` skips that check. The model is changed only if everything fits.
    Returns what ``inject_lora`` returns. ``adaptsr.combine_adapters`` loads a weighted sum of several.
    """
    module = unwrap_model(model)
    _refuse_existing_adapters(module)
    adapter = _read_adapter(model, directory, strict_base=strict_base)
    factors = {name: (parts["A"], parts["B"]) for name, parts in adapter.pairs.items()}
    return _inject_factors(module, adapter.directory, factors, adapter.alphas, use_rslora=adapter.use_rslora,
                           lora_dropout=adapter.lora_dropout, magnitudes=adapter.magnitudes())
