"""Put LoRA adapters into a whole model, and take them out again (merge / unmerge / unload)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from adaptsr.nn import LoRAConv2d, LoRAConvTranspose2d, LoRALayer, LoRALinear, LoRAWindowAttention
from adaptsr.nn.cosine_window_attention import (
    can_fuse_cosine_attention,
    disable_fused_cosine_attention,
    enable_fused_cosine_attention,
)
from adaptsr.nn.overlapping_cross_attention import (
    can_fuse_overlapping_attention,
    disable_fused_overlapping_attention,
    enable_fused_overlapping_attention,
)
from adaptsr.nn.rectangle_window_attention import (
    can_fuse_rectangle_attention,
    disable_fused_rectangle_attention,
    enable_fused_rectangle_attention,
)
from adaptsr.nn.reparameterised import refold
from adaptsr.presets import preset_pattern

__all__ = [
    "LoRASummary", "inject_lora", "lora_layers", "merge_lora", "set_adapter_strength", "unload_lora", "unmerge_lora",
]

_WRAPPERS: dict[type[nn.Module], type[LoRALayer]] = {
    nn.Conv2d: LoRAConv2d, nn.Linear: LoRALinear, nn.ConvTranspose2d: LoRAConvTranspose2d,
}


@dataclass
class LoRASummary:
    """What ``inject_lora`` did: the wrapped layers and the trainable share of the parameters."""

    layers: dict[str, int] = field(default_factory=dict)  # layer name -> rank
    trainable_params: int = 0
    total_params: int = 0
    # window attentions now on adaptsr's op: Swin ones replaced by LoRAWindowAttention, DAT / RGT ones switched
    window_attention: list[str] = field(default_factory=list)

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (
            f"LoRA on {len(self.layers)} layers: {self.trainable_params:,} trainable of "
            f"{self.total_params:,} parameters ({100 * self.trainable_share:.2f}%)"
        )


# The attribute holding the forward pre-hook (_InputRequiresGrad), so that merge_lora can remove it.
_INPUT_GRAD_HOOK = "_adaptsr_input_grad_hook"


class _InputRequiresGrad:
    """Forward pre-hook: in a training forward of a checkpointed model, its input as a leaf that requires grad.

    Reentrant checkpointing gives a block's parameters gradients only when the block's input requires
    grad. Behind a frozen stem (SwinIR's conv_first) it does not, and the adapters inside would silently
    get none (PEFT's models need ``enable_input_require_grads`` for the same reason). The cost is the
    stem's input gradient, computed and dropped.

    Whether a block is checkpointed is read at each forward (spandrel's SwinIR layers run torch's
    reentrant ``checkpoint`` while ``use_checkpoint`` is True; HAT's carry the flag and ignore it), but
    from the modules that carry the flag, found once: walking the whole model every step cost about
    half a millisecond of host time per step on the bundled SwinIR.
    """

    def __init__(self, flag_holders: list[nn.Module]) -> None:
        self.flag_holders = flag_holders

    def __call__(self, module: nn.Module, args: tuple):
        if not (args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()):
            return None
        if args[0].requires_grad or not torch.is_grad_enabled():
            return None
        if not any(holder.use_checkpoint is True for holder in self.flag_holders):
            return None
        return (args[0].detach().requires_grad_(True), *args[1:])


# The attribute of each frozen normalisation layer holding its _frozen_statistics hook.
_FROZEN_STATISTICS_HOOK = "_adaptsr_frozen_statistics_hook"


def _frozen_statistics(norm: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a frozen batch norm: normalise with the running statistics, in training too.

    In training mode a batch norm normalises with the batch's statistics and moves its running ones
    towards them. An adapter file carries no statistics, so base + adapter would not be the model that
    was trained, and the merged model's outputs would drift from it (DAT's attention convs, for one).
    Setting the flag here, before each call, holds whatever ``model.train()`` did to it.
    """
    norm.training = False


def _running_statistics_layers(module: nn.Module) -> list[nn.Module]:
    """The batch (and instance) norm layers that keep running statistics."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def unwrap_model(model) -> nn.Module:
    """The nn.Module inside a spandrel ModelDescriptor, or the module itself."""
    inner = getattr(model, "model", None)
    if not isinstance(model, nn.Module) and isinstance(inner, nn.Module):
        return inner
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a spandrel model descriptor, got {type(model).__name__}")
    return model


def lora_layers(model) -> Iterator[tuple[str, LoRALayer]]:
    """(name, module) for every LoRA layer in ``model``."""
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def _name_matcher(targets: str | Sequence[str]):
    """PEFT's target semantics: a string is a regex matched in full; a list matches names or suffixes."""
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return lambda name: pattern.fullmatch(name) is not None
    names = list(targets)
    return lambda name: any(name == t or name.endswith("." + t) for t in names)


def _pattern_value(patterns: dict[str, float] | None, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a suffix of the name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _window_attention_swaps(
    module: nn.Module, adapted: set[str], mode: bool | None
) -> list[tuple[str, LoRAWindowAttention]]:
    """(name, replacement) for the Swin window attentions to replace: every one (``mode=True``),
    none (``False``), or those whose qkv or proj gets an adapter (``None``)."""
    if mode is False:
        return []
    swaps = []
    for name, child in module.named_modules():
        if not name or not LoRAWindowAttention.can_wrap(child):  # the root cannot be replaced in place
            continue
        if mode is None and not {f"{name}.qkv", f"{name}.proj"} & adapted:
            continue
        swaps.append((name, LoRAWindowAttention.from_module(child)))
    return swaps


def _parents_projections(name: str) -> set[str]:
    """DAT / RGT: a rectangle-window attention sits in its parent's ``attns`` list; the parent projects."""
    parent = name.rsplit(".attns.", 1)[0]
    return {f"{parent}.qkv", f"{parent}.proj"}


def _own_projections(name: str) -> set[str]:
    return {f"{name}.qkv", f"{name}.proj"}


# Attentions kept as they are, whose forward inject_lora switches to one that runs the core on adaptsr's op
# and merge_lora switches back: (which modules, how to switch them, how to switch back, the layers whose
# adapters call for it)
_SWITCHED_ATTENTIONS = (
    (can_fuse_rectangle_attention, enable_fused_rectangle_attention, disable_fused_rectangle_attention,
     _parents_projections),
    (can_fuse_overlapping_attention, enable_fused_overlapping_attention, disable_fused_overlapping_attention,
     _own_projections),
    (can_fuse_cosine_attention, enable_fused_cosine_attention, disable_fused_cosine_attention, _own_projections),
)


def _switch_attentions(module: nn.Module, adapted: set[str], mode: bool | None) -> list[str]:
    """Switch the DAT / RGT rectangle-window attentions, HAT's overlapping cross-attention blocks and
    Swin2SR's cosine window attentions to adaptsr's op: every one (``mode=True``), none (``False``), or
    those whose qkv or proj gets an adapter (``None``); the names switched."""
    if mode is False:
        return []
    switched = []
    for can_switch, enable, _disable, projections in _SWITCHED_ATTENTIONS:
        names = {
            name
            for name, child in module.named_modules()
            if can_switch(child) and (mode or projections(name) & adapted)
        }
        switched += enable(module, names)
    return switched


def _window_attentions(module: nn.Module) -> list[tuple[str, LoRAWindowAttention]]:
    return [(name, m) for name, m in module.named_modules() if name and isinstance(m, LoRAWindowAttention)]


def target_layers(model, *, preset: str | None = None, targets: str | Sequence[str] | None = None):
    """(name, layer) for each Conv2d, ConvTranspose2d and Linear layer of ``model`` that ``preset`` or ``targets``
    selects, as ``inject_lora`` would wrap them; an error naming some of the model's layers when none matches."""
    module = unwrap_model(model)
    if preset is None and targets is None:
        raise ValueError("inject_lora needs a preset or targets (a regex or a list of layer names)")
    matchers = []
    if preset is not None:
        matchers.append(_name_matcher(preset_pattern(preset, module)))
    if targets is not None:
        matchers.append(_name_matcher(targets))
    chosen = [
        (name, child)
        for name, child in module.named_modules()
        if name and type(child) in _WRAPPERS and any(match(name) for match in matchers)
    ]
    if not chosen:
        layer_names = [n for n, m in module.named_modules() if type(m) in _WRAPPERS][:8]
        wanted = preset if targets is None else targets
        raise ValueError(
            f"LoRA targets {wanted!r} matched no Conv2d, ConvTranspose2d or Linear layer of {type(module).__name__}; "
            f"its layers are named like {layer_names}"
        )
    return chosen


def inject_lora(
    model,
    *,
    preset: str | None = None,
    targets: str | Sequence[str] | None = None,
    rank: int = 8,
    alpha: float | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    lora_dropout: float = 0.0,
    init_lora_weights: bool | str = True,
    use_dora: bool = False,
    window_attention: bool | None = None,
) -> LoRASummary:
    """Wrap the targeted nn.Conv2d / nn.ConvTranspose2d / nn.Linear layers of ``model`` with LoRA, in place.

    Targets come from a ``preset`` (see ``adaptsr.presets``), from ``targets`` (a regex matched
    in full against module names, or a list of names / name suffixes), or both. ``alpha``
    defaults to the rank (scaling 1; sqrt(rank) with ``use_rslora``). ``rank_pattern`` /
    ``alpha_pattern`` override them per layer (PEFT's semantics). ``use_dora`` makes them DoRA adapters
    (PEFT's ``use_dora``: a trained magnitude per output channel on top of the low-rank direction;
    ``adaptsr.nn._lora_layer`` has the math). Everything but the adapters is frozen, batch-norm statistics included:
    those layers normalise with their running statistics in training mode too (a forward pre-hook;
    ``merge_lora`` removes it), so the base model plus the adapter file is the model that was trained.

    Swin window attentions (spandrel's SwinIR, HAT, DRCT and ATD ``WindowAttention``) become
    ``LoRAWindowAttention``: same parameters, keys and function, the attention core on adaptsr's
    backends. DAT's and RGT's rectangle-window attentions, HAT's overlapping cross-attention blocks and
    Swin2SR's cosine window attentions keep their modules and run their core on the same op
    (``adaptsr.nn.rectangle_window_attention``, ``overlapping_cross_attention``,
    ``cosine_window_attention``). ``window_attention=None`` (default) does this for the
    attentions whose ``qkv`` or ``proj`` (DAT / RGT: their parent's) gets an adapter (all of them with
    the presets), ``True`` for every one, ``False`` for none. ``merge_lora`` gives spandrel's modules
    and forwards back.
    """
    module = unwrap_model(model)
    existing = [name for name, _ in lora_layers(module)]
    if existing:
        raise ValueError(f"the model already has LoRA adapters (e.g. on {existing[0]!r}); merge or unload them first")
    chosen = target_layers(module, preset=preset, targets=targets)

    # Build every wrapper before swapping any in, so a bad layer leaves the model as it was.
    requires_grad = {p: p.requires_grad for p in module.parameters()}
    wrapped_layers = []
    try:
        for name, child in chosen:
            layer_rank = _pattern_value(rank_pattern, name, rank)
            layer_alpha = _pattern_value(alpha_pattern, name, layer_rank if alpha is None else alpha)
            try:
                wrapped = _WRAPPERS[type(child)](
                    base_layer=child,
                    rank=layer_rank,
                    alpha=layer_alpha,
                    use_rslora=use_rslora,
                    lora_dropout=lora_dropout,
                    init_lora_weights=init_lora_weights,
                    use_dora=use_dora,
                )
            except (ValueError, TypeError) as err:
                raise ValueError(f"cannot add LoRA to layer {name!r}: {err}") from err
            wrapped_layers.append((name, wrapped))
        attention_swaps = _window_attention_swaps(module, {name for name, _ in chosen}, window_attention)
    except BaseException:
        for p, flag in requires_grad.items():  # the wrappers froze their base layers
            p.requires_grad_(flag)
        raise

    for p in module.parameters():
        p.requires_grad_(False)
    summary = LoRASummary()
    # Attentions first: a wrapped qkv / proj is then set on the replacement, which shares the rest.
    for name, attention in attention_swaps:
        _set_submodule(module, name, attention)
        summary.window_attention.append(name)
    for name, wrapped in wrapped_layers:
        _set_submodule(module, name, wrapped)
        summary.layers[name] = wrapped.rank
    summary.window_attention += _switch_attentions(module, {name for name, _ in chosen}, window_attention)

    summary.trainable_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    summary.total_params = sum(p.numel() for p in module.parameters())
    for norm in _running_statistics_layers(module):  # frozen like every base weight: statistics included
        if getattr(norm, _FROZEN_STATISTICS_HOOK, None) is None:
            setattr(norm, _FROZEN_STATISTICS_HOOK, norm.register_forward_pre_hook(_frozen_statistics))
    flag_holders = [m for m in module.modules() if hasattr(m, "use_checkpoint")]
    if flag_holders and getattr(module, _INPUT_GRAD_HOOK, None) is None:  # active only while a block is checkpointed
        hook = module.register_forward_pre_hook(_InputRequiresGrad(flag_holders))
        setattr(module, _INPUT_GRAD_HOOK, hook)
    return summary


def merge_lora(model, *, unload: bool = True):
    """Fold every adapter into its base weight.

    ``unload=True`` (default) replaces each LoRA module by a plain layer with dense weights and
    each ``LoRAWindowAttention`` by spandrel's own ``WindowAttention`` (and gives DAT / RGT attentions,
    HAT's OCABs and Swin2SR's attentions spandrel's forward back), so the model is the original
    architecture again; ``unload=False`` keeps the LoRA modules in merged state (``unmerge_lora``
    takes the adapters back out). Returns ``model``.
    """
    module = unwrap_model(model)
    if unload:  # the attentions first: to_dense() merges their qkv / proj adapters too
        for name, attention in _window_attentions(module):
            _set_submodule(module, name, attention.to_dense())
    for name, layer in list(lora_layers(module)):
        if unload:
            _set_submodule(module, name, layer.to_dense())
        else:
            layer.merge()
    refold(module)  # SPAN's inference convs from the merged branches (adaptsr.nn.reparameterised)
    if unload:
        _restore_forwards_and_hooks(module)
    return model


def unload_lora(model):
    """Remove every adapter without merging it: the base model as it was before ``inject_lora`` (PEFT's
    ``unload()``), merged adapters taken back out of their weights first. Plain layers, spandrel's own
    attention modules and forwards, no hooks; the base weights stay frozen. Use it to load another adapter
    into the same model (``load_adapter`` refuses a model that has adapters). Returns ``model``."""
    module = unwrap_model(model)
    layers, attentions = list(lora_layers(module)), _window_attentions(module)
    if not layers and not attentions:
        raise ValueError("the model has no LoRA adapters to unload")
    for name, layer in layers:  # the attentions' qkv / proj included, so their to_dense() below merges nothing
        layer.unmerge()
        _set_submodule(module, name, layer.base_layer)
    for name, attention in attentions:
        _set_submodule(module, name, attention.to_dense())
    refold(module)  # SPAN's inference convs from the base branches again
    _restore_forwards_and_hooks(module)
    return model


def _restore_forwards_and_hooks(module: nn.Module) -> None:
    """Give the switched attentions spandrel's forward back and remove the hooks ``inject_lora`` added."""
    for _can_switch, _enable, disable, _projections in _SWITCHED_ATTENTIONS:
        disable(module)
    _remove_hook(module, _INPUT_GRAD_HOOK)
    for norm in _running_statistics_layers(module):
        _remove_hook(norm, _FROZEN_STATISTICS_HOOK)


def _remove_hook(holder: nn.Module, attribute: str) -> None:
    """Remove the hook whose handle ``holder`` keeps in ``attribute``, if it has one."""
    hook = getattr(holder, attribute, None)
    if hook is not None:
        hook.remove()
        delattr(holder, attribute)


def set_adapter_strength(model, strength: float):
    """Scale every adapter's update: each layer computes W + strength * s B A from then on.

    1 is the adapter as trained, 0 the base model; values in between blend the adapted model with
    the base one (the update is linear in the strength), which trades the adaptation against the
    base model's behaviour on images unlike the training data; above 1 extrapolates. Set it before
    merging: ``merge_lora`` folds in the scaled update. The strength is not part of an adapter file
    (``save_adapter`` refuses a model whose strength is not 1). Returns ``model``.
    """
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"adapter strength must be a finite number, got {strength}")
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA adapters to scale")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"adapter strength: the adapters are merged (e.g. {merged[0]!r}); unmerge them first")
    for _, layer in layers:
        layer.strength = strength
    return model


def unmerge_lora(model):
    """Take merged adapters back out of the base weights (the inverse of ``merge_lora(unload=False)``)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model
