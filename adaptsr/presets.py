"""Which layers the AdaptSR recipe adapts in each spandrel architecture.

AdaptSR puts adapters on the body's attention, MLP and convolution layers and leaves the
shallow feature extractor (``conv_first`` / head) and the reconstruction / upsampling tail as
they are: those see pixels, not features, and are tiny. Tiny channel-attention 1x1 convs
(squeeze to C/16 channels) are skipped too: a rank-8 adapter would be as large as the layer.

Each preset is a regular expression matched in full against module names (as PEFT does with a
string ``target_modules``); only nn.Conv2d and nn.Linear modules among the matches are wrapped.

The swinir and hat presets adapt every block's ``attn.qkv`` and ``attn.proj``, so ``inject_lora``
also replaces every block's ``WindowAttention`` by ``LoRAWindowAttention`` (the attention core on
adaptsr's backends; ``inject_lora(..., window_attention=False)`` keeps spandrel's). HAT's
overlapping cross-attention (OCAB) is a different module and stays as it is.
"""

from __future__ import annotations

PRESETS: dict[str, str] = {
    # SwinIR: per block attn.qkv, attn.proj, mlp.fc1, mlp.fc2; each RSTB's conv ('1conv') or
    # convs ('3conv': conv.0, conv.2, conv.4); the conv after the body.
    "swinir": (
        r"layers\.\d+\.residual_group\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
        r"|layers\.\d+\.conv(\.\d+)?"
        r"|conv_after_body"
    ),
    # HAT: the same per block, plus the block's conv branch (CAB convs) and the overlapping
    # cross-attention block (OCAB) of each residual group.
    "hat": (
        r"layers\.\d+\.residual_group\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12]|conv_block\.cab\.[02])"
        r"|layers\.\d+\.residual_group\.overlap_attn\.(qkv|proj|mlp\.fc[12])"
        r"|layers\.\d+\.conv(\.\d+)?"
        r"|conv_after_body"
    ),
    # ESRGAN (RRDBNet in spandrel's old-architecture layout): the five convs of every residual
    # dense block, and the trunk conv closing the body.
    "esrgan": r"model\.1\.sub\.\d+\.RDB\d\.conv\d\.0|model\.1\.sub\.\d+",
    # RCAN: the two convs of every RCAB, each residual group's closing conv, the body's closing conv.
    "rcan": r"body\.\d+\.body\.\d+\.body\.[02]|body\.\d+\.body\.\d+|body\.\d+",
}

# spandrel's architecture ids for the presets above, so a preset can be picked from a model.
ARCHITECTURE_PRESETS: dict[str, str] = {"SwinIR": "swinir", "HAT": "hat", "ESRGAN": "esrgan", "RCAN": "rcan"}


def preset_pattern(name: str) -> str:
    """The target regex of preset ``name``; a clear error for an unknown one."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown LoRA preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]


def preset_for_architecture(architecture_id: str) -> str:
    """The preset of a spandrel architecture id; a clear error naming the alternative where there is none."""
    preset = ARCHITECTURE_PRESETS.get(architecture_id)
    if preset is None:
        raise ValueError(
            f"no LoRA preset for architecture {architecture_id}: pass --targets REGEX "
            f"(presets exist for {', '.join(sorted(ARCHITECTURE_PRESETS))})"
        )
    return preset
