"""Which layers the AdaptSR recipe adapts in each spandrel architecture.

AdaptSR puts adapters on the body's attention, MLP and convolution layers and leaves the
shallow feature extractor (``conv_first`` / head) and the reconstruction / upsampling tail as
they are: those see pixels, not features, and are tiny. Tiny channel-attention 1x1 convs
(squeeze to C/16 channels) are skipped too: a rank-8 adapter would be as large as the layer.

Each preset is a regular expression matched in full against module names (as PEFT does with a
string ``target_modules``), or, where the layers to leave out depend on the configuration (the
last conv of a Compact model), a function of the model that returns one; only nn.Conv2d,
nn.ConvTranspose2d and nn.Linear modules among the matches are wrapped.

The swinir, hat and drct presets adapt every block's ``attn.qkv`` and ``attn.proj`` (atd: its
``attn_win.proj``), so ``inject_lora`` also replaces every block's ``WindowAttention`` by
``LoRAWindowAttention`` (the attention core on adaptsr's backends;
``inject_lora(..., window_attention=False)`` keeps spandrel's). HAT's
overlapping cross-attention blocks (OCAB), DAT's and RGT's rectangle-window attentions and Swin2SR's
cosine window attentions keep their modules and run their attention core on the same op
(``adaptsr.nn.overlapping_cross_attention``, ``rectangle_window_attention``, ``cosine_window_attention``).
"""

from __future__ import annotations

import re
from typing import Callable, Union

from torch import nn


def _compact_body(model: nn.Module) -> str:
    """Compact (Real-ESRGAN's SRVGGNetCompact) is one sequence ``body``: conv, activation, then
    ``num_conv`` x (conv, activation), then the conv that makes the pixel-shuffled output. The first
    conv reads pixels and the last writes them; the body is the convs between."""
    convs = [name for name, m in model.named_modules() if re.fullmatch(r"body\.\d+", name) and type(m) is nn.Conv2d]
    return "|".join(re.escape(name) for name in convs[1:-1])


Preset = Union[str, Callable[[nn.Module], str]]

PRESETS: dict[str, Preset] = {
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
    # Compact (SRVGGNetCompact: realesr-general-x4v3, realesr-animevideov3, ...): the body's convs
    # between the first and the last (see _compact_body).
    "compact": _compact_body,
    # DAT: per block the attention's qkv and proj (spatial-window and channel blocks alike) and the
    # FFN's fc1 / fc2; each residual group's conv; the conv after the body. Left out: the dynamic
    # position bias MLPs (inputs of 2 coordinates), the depthwise conv and the tiny interaction
    # convs of the adaptive interaction module (down to 1 channel), and the spatial gate's
    # depthwise conv.
    "dat": r"layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|ffn\.fc[12])|layers\.\d+\.conv|conv_after_body",
    # Swin2SR: as SwinIR. spandrel's Swin2SR applies attn.qkv as F.linear(x, self.qkv.weight,
    # q_bias + v_bias) without calling it; a LoRA layer's weight is W + s B A, so its adapter takes
    # part all the same. The continuous position bias MLP (cpb_mlp, 2 inputs) stays frozen.
    "swin2sr": (
        r"layers\.\d+\.residual_group\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
        r"|layers\.\d+\.conv(\.\d+)?"
        r"|conv_after_body"
    ),
    # DRCT: each residual dense group's five Swin blocks (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) and
    # the 1x1 convs (adjust1..5) that squeeze each block's output into the dense growth channels; the
    # conv after the body. DRCT's WindowAttention is SwinIR's, so it becomes LoRAWindowAttention too.
    "drct": r"layers\.\d+\.(swin\d+\.(attn\.(qkv|proj)|mlp\.fc[12])|adjust\d+)|conv_after_body",
    # ATD: per block the window attention's qkv (wqkv, shared with the category attention) and proj,
    # the token-dictionary attention's value projection, the category attention's proj and the
    # conv FFN's fc1 / fc2; each residual group's conv; the conv after the body. Left out: the
    # dictionary attention's q / k, which project to reducted_dim channels (a handful: spandrel's
    # default is 4), so a rank-8 adapter would be larger than the layer, and the FFN's depthwise conv.
    "atd": (
        r"layers\.\d+\.residual_group\.layers\.\d+\.(wqkv|attn_win\.proj|attn_atd\.wv|attn_aca\.proj|convffn\.fc[12])"
        r"|layers\.\d+\.conv"
        r"|conv_after_body"
    ),
    # RGT: the rectangle-window blocks' qkv and proj, the recursive-generalization blocks' q, k, v,
    # proj and 1x1 reduction conv, every block's MLP fc1 / fc2; each residual group's conv; the conv
    # after the body. Left out: the depthwise convs (get_v, dwconv, cpe, the strided reduction1,
    # the spatial gate's conv) and the dynamic position bias MLPs (inputs of 2 coordinates).
    "rgt": (
        r"layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj|q|k|v|conv)|mlp\.fc[12])"
        r"|layers\.\d+\.conv"
        r"|conv_after_body"
    ),
    # PLKSR and RealPLKSR (one spandrel architecture): per block the channel mixer's two convs
    # (PLKSR spells it channe_mixer), the element-wise attention's conv and the 1x1 refine conv.
    # Left out: the partial large-kernel conv, which acts on dim/4 channels (16 in the released
    # models), so a rank-8 adapter would be half the layer's rank.
    "plksr": r"feats\.\d+\.(channel?_mixer\.[02]|attn\.f\.0|refine)",
    # SPAN: the re-parameterised 3x3 convs (Conv3XC) of the six blocks and the one closing the body:
    # the training branches they are made of (sk, conv.0-2) and the 1x1 conv merging the features.
    # In evaluation each Conv3XC folds its branches' weights into eval_conv, reading the adapted
    # weights of the LoRA layers (LoRALayer.weight), so train and eval modes agree; eval_conv itself
    # is never trained. Left out: conv_1, which reads the pixels.
    "span": r"(block_\d+\.c[123]_r|conv_2)\.(sk|conv\.[012])|conv_cat",
    # FDAT: per block the attention's qkv and proj (spatial-window and channel blocks alike) and the
    # FFN's fc1 / fc2; each group's conv; the conv after the body. Left out: the depthwise convs
    # (conv, the FFN's smix) and the interaction module's tiny convs (down to 1 and C/8 channels).
    "fdat": r"groups\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|ffn\.fc[12])|groups\.\d+\.conv|conv_after",
    # MoSR: the gated CNN blocks' fc1 / fc2 convs and the convs that close the body (the sequence
    # gblocks past its first conv, which reads the pixels). Left out: the blocks' depthwise convs and
    # the shortcut branch, which works on the pixels.
    "mosr": r"gblocks\.[1-9]\d*(\.fc[12])?",
    # SAFMN: per block the feature modulation's 1x1 aggregation conv and the convolutional channel
    # mixer's two convs. Left out: the multi-scale depthwise convs (mfr).
    "safmn": r"feats\.\d+\.(safm\.aggr|ccm\.ccm\.[02])",
    # OmniSR: per Omni block the MBConv's expand and project 1x1 convs, the window and grid attentions'
    # to_qkv / to_out, the channel attentions' qkv and project_out, the gated FFNs' project_in /
    # project_out; each residual group's closing 1x1 conv; the conv closing the body (output). Left
    # out: depthwise convs, the MBConv's squeeze-excitation gate (down to C/4) and the ESA convs
    # (a 16-channel bottleneck).
    "omnisr": (
        r"residual_layer\.\d+\.residual_layer\.\d+\.layer\.\d+\.fn\."
        r"(0|5|to_qkv|to_out\.0|qkv|project_in|project_out)"
        r"|residual_layer\.\d+\.residual_layer\.\d+"
        r"|output"
    ),
    # GRL: per block the mixed attention's qkv projection (the pointwise conv where it is a separable
    # conv), its anchor projection (dim -> dim/2, the stripe attention's anchors) and proj, the MLP's
    # fc1 / fc2 and, with local_connection, the conv branch's two convs (as HAT's); each residual group's
    # conv(s); the conv after the body. Left out: the continuous position bias MLPs (cpb_mlp, 2
    # coordinates in), depthwise convs and the conv branch's channel attention.
    "grl": (
        r"layers\.\d+\.blocks\.\d+\."
        r"(attn\.(qkv\.body(\.1)?|anchor\.body\.\d+(\.reduction)?|proj)|mlp\.fc[12]|conv\.cab\.[02])"
        r"|layers\.\d+\.conv(\.\d+)?"
        r"|conv_after_body"
    ),
    # CRAFT: the shifted-rectangle window blocks' qkv, proj and MLP; the high-frequency enhancement
    # blocks' convs (fc, conv and last_fc; fc and conv act on half the channels); the high-frequency
    # attention blocks' q, kv and project_out, and their FFN's project_in / project_out; each residual
    # group's conv; the conv after the body. Left out: the depthwise convs (get_v, q_dwconv, kv_dwconv,
    # the FFN's dwconv) and the dynamic position bias MLPs.
    "craft": (
        r"layers\.\d+\.residual_group\."
        r"(srwa_blocks\.\d+\.(qkv|proj|mlp\.fc[12])"
        r"|hfer_blocks\.\d+\.(fc|conv|last_fc)"
        r"|hf_blocks\.\d+\.(attn\.(q|kv|project_out)|ffn\.project_(in|out)))"
        r"|layers\.\d+\.conv"
        r"|conv_after_body"
    ),
    # SeemoRe: per block the local block's 3x3 / 1x1 convs (conv_1), the 1x1 after its depthwise conv
    # and its proj; the global block's to_qv and proj; both gated FFNs' fn_1 / fn_2; conv_2, which
    # closes the body. Left out: the depthwise convs and the mixture of experts (each expert is
    # already low-rank, down to a few channels, and its gate has as many outputs as experts).
    "seemore": (
        r"body\.\d+\.(local_block\.block\.(conv_1\.[02]|conv\.1|proj)"
        r"|global_block\.block\.(to_qv\.0|proj)"
        r"|(local|global)_block\.ffn\.fn_[12]\.0)"
        r"|conv_2"
    ),
    # DITN: the transformer layers' (ITL) qkv and project_out, the spatial-aware layers' (SAL) 1x1
    # convs (the last of the dilated conv stack, proj_first, proj_last), every layer's conv1 / conv2
    # and FFN project_in / project_out; the conv after the body. Left out: the depthwise convs.
    "ditn": (
        r"UFONE\.\d+\."
        r"(ITLs\.\d+\.attn\.(qkv|project_out)"
        r"|SALs\.\d+\.SDA\.(DConvs\.2|proj_first\.0|proj_last\.0)"
        r"|(ITLs|SALs)\.\d+\.(conv[12]|ffn\.project_(in|out)))"
        r"|conv_after_body"
    ),
    # MoESR: the gated CNN blocks' fc1 / fc2 (3x3 convs), those of each block's multi-scale branch
    # and the conv that brings that branch back up. Left out: the depthwise convs and the branch's
    # down conv (to dim/4 channels: a rank-8 adapter would be half its size).
    "moesr": r"blocks\.\d+\.(blocks\.\d+\.fc[12]|msg\.(gated\.\d+\.fc[12]|up\.0))",
    # DCTLSA: per transformer block the attention's qkv, proj and the 1x1 convs of its local branch,
    # and the MLP's fc1 / fc2; the 1x1 convs fusing the modules' outputs (c, c1..c5); LR_conv, which
    # closes the body. Left out: the local branch's depthwise conv.
    "dctlsa": (
        r"B\d+\.body\.\d+\.transformer_body\.\d+\.blocks\.\d+\."
        r"(attn\.(qkv|proj|local\.pointwise_conv_[01])|mlp\.fc[12])"
        r"|c\d*\.0"
        r"|LR_conv"
    ),
    # SwiftSRGAN: the pointwise (1x1) convs of the residual blocks' depthwise-separable convs and of the
    # conv closing the body. Left out: the depthwise convs, the first conv (pixels) and the upsampler.
    "swiftsrgan": r"(residual\.\d+\.block[12]|convblock)\.cnn\.pointwise",
    # Real-CUGAN (UpCunet 2x / 3x / 4x / 2x fast): the convs inside both U-Nets, the strided down convs
    # and the transposed up-sampling convs (LoRAConvTranspose2d) included. Left out: each U-Net's first
    # and last layer (in 2x and 3x they read and write the pixels; one rule for every variant) and the
    # squeeze-excitation convs (C/8 channels).
    "realcugan": r"unet[12]\.(conv1\.conv\.2|conv[2-4]\.conv\.[02]|conv\d_(down|up)|conv[35])",
    # SCUNet (a blind real-world denoiser, scale 1: the same recipe adapts it to one camera's noise): per
    # Swin-conv block the transformer branch's qkv (embedding_layer), proj (linear) and MLP, the conv
    # branch's two 3x3 convs and the two 1x1 convs that split and merge the branches; the strided down
    # convs and the transposed up convs between the U-Net's stages. Left out: m_head and m_tail (pixels).
    "scunet": (
        r"m_(down[1-3]|body|up[1-3])\.\d+\."
        r"(trans_block\.(msa\.(embedding_layer|linear)|mlp\.[02])|conv1_[12]|conv_block\.[02])"
        r"|m_down[1-3]\.\d+|m_up[1-3]\.0"
    ),
    # NAFNet (denoising and deblurring, scale 1): per block the four 1x1 convs (conv1 / conv3 around the
    # gated depthwise conv, conv4 / conv5 of the FFN); the strided down convs and the 1x1 convs before each
    # pixel shuffle up. Left out: intro and ending (pixels), the depthwise conv2 and the simplified channel
    # attention's conv on globally pooled features (sca).
    "nafnet": r"(encoders\.\d+|decoders\.\d+|middle_blks)\.\d+\.conv[1345]|downs\.\d+|ups\.\d+\.0",
    # MMRealSR (a degradation-aware ESRGAN for real-world x4 SR): the five convs of every residual dense block
    # and conv_body, which closes the trunk (as the esrgan preset). Left out: conv_first (pixels, unshuffled),
    # the upsampling tail (conv_up1 / conv_up2 / conv_hr / conv_last), and the degradation branch: the
    # estimator de_net (it reads the input image and already measures its blur and noise; adapting it would
    # change what the modulation reads), the degree embedding dd_embed and the affine modulation MLPs
    # (am_list), which turn those estimates into per-channel scales and shifts of the trunk.
    "mmrealsr": r"body\.\d+\.rdb[1-3]\.conv[1-5]|conv_body",
    # FBCNN (a blind JPEG-artifact remover, scale 1): the U-Net's residual blocks' two 3x3 convs (encoder stages,
    # body encoder and decoder, the decoder stages' quality-modulated blocks), the strided down convs and the
    # transposed up convs between the stages (or the conv after a pooling, before a pixel shuffle, after a
    # nearest upsampling, in FBCNN's other layouts). Left out: m_head and m_tail (pixels) and the quality-factor
    # branch: the predictor qf_pred (its residual blocks and MLP), the embedding qf_embed and the to_gamma /
    # to_beta MLPs, which set the decoder blocks' scales and shifts from the predicted (or a given) quality.
    # qf_pred reads the body encoder's output, so the adapted encoder changes the quality it predicts; training
    # runs through it.
    "fbcnn": (
        r"(m_down[1-3]|m_body_(en|de)coder|m_up[1-3])\.\d+\.res\.[02]"
        r"|m_down[1-3]\.\d+|m_up[1-3]\.0(\.[01])?"
    ),
}

# spandrel's architecture ids for the presets above, so a preset can be picked from a model.
ARCHITECTURE_PRESETS: dict[str, str] = {
    "SwinIR": "swinir", "HAT": "hat", "ESRGAN": "esrgan", "RCAN": "rcan",
    "Compact": "compact", "DAT": "dat", "Swin2SR": "swin2sr", "DRCT": "drct", "ATD": "atd", "RGT": "rgt",
    "PLKSR": "plksr", "SAFMN": "safmn", "OmniSR": "omnisr", "SPAN": "span", "FDAT": "fdat", "MoSR": "mosr",
    "GRL": "grl", "CRAFT": "craft", "SeemoRe": "seemore", "DITN": "ditn", "MoESR": "moesr", "DCTLSA": "dctlsa",
    "SwiftSRGAN": "swiftsrgan", "RealCUGAN": "realcugan", "SCUNet": "scunet",
    "NAFNet": "nafnet", "MMRealSR": "mmrealsr", "FBCNN": "fbcnn",
}


def preset_pattern(name: str, model: nn.Module | None = None) -> str:
    """The target regex of preset ``name`` (for ``model``, where the preset depends on it); a clear error
    for an unknown one."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown LoRA preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[key]
    if callable(preset):
        if model is None:
            raise ValueError(f"LoRA preset {key!r} depends on the model's configuration: pass the model")
        return preset(model)
    return preset


def preset_for_architecture(architecture_id: str) -> str:
    """The preset of a spandrel architecture id; a clear error naming the alternative where there is none."""
    preset = ARCHITECTURE_PRESETS.get(architecture_id)
    if preset is None:
        raise ValueError(
            f"no LoRA preset for architecture {architecture_id}: pass --targets REGEX ('adaptsr layers --model "
            f"CKPT' lists the layer names; presets exist for {', '.join(sorted(ARCHITECTURE_PRESETS))})"
        )
    return preset
