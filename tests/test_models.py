"""LoRA on whole spandrel SR models: presets, training, merge / unmerge / unload, save and reload.

Each architecture is built small and random, written to disk and loaded back through
``adaptsr.load_model``, so the base is a model spandrel itself detected; the merged result must
load through spandrel again as the same architecture and scale.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adaptsr
from adaptsr import LoRAConv2d, LoRAConvTranspose2d, LoRALinear
from adaptsr.infer import image_of
from adaptsr.presets import preset_for_architecture

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")


def _swin_blocks(prefix: str, n: int, extra: tuple[str, ...] = ()) -> set[str]:
    parts = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", *extra)
    return {f"{prefix}.blocks.{b}.{p}" for b in range(n) for p in parts}


# arch -> (tiny_sr builder overrides, spandrel architecture id, layers the preset must wrap, layers it must not)
ARCHS = {
    "swinir": (
        {},
        "SwinIR",
        _swin_blocks("layers.0.residual_group", 2) | {"layers.0.conv", "conv_after_body"},
        {"conv_first", "upsample.0"},
    ),
    "hat": (
        {},
        "HAT",
        _swin_blocks("layers.0.residual_group", 2, ("conv_block.cab.0", "conv_block.cab.2"))
        | {f"layers.0.residual_group.overlap_attn.{p}" for p in ("qkv", "proj", "mlp.fc1", "mlp.fc2")}
        | {"layers.0.conv", "conv_after_body"},
        {
            "conv_first",
            "layers.0.residual_group.blocks.0.conv_block.cab.3.attention.1",  # channel attention squeeze
            "layers.0.residual_group.blocks.0.conv_block.cab.3.attention.3",
            "conv_before_upsample.0",
            "upsample.0",
            "conv_last",
        },
    ),
    "esrgan": (
        {"num_filters": 16},
        "ESRGAN",
        {f"model.1.sub.0.RDB{d}.conv{c}.0" for d in (1, 2, 3) for c in range(1, 6)} | {"model.1.sub.1"},
        {"model.0", "model.3", "model.5", "model.7"},
    ),
    "rcan": (
        {},
        "RCAN",
        {f"body.0.body.{b}.body.{c}" for b in (0, 1) for c in (0, 2)} | {"body.0.body.2", "body.1"},
        {"head.0", "body.0.body.0.body.3.conv_du.0", "body.0.body.0.body.3.conv_du.2", "tail.0.0", "tail.1"},
    ),
    # num_conv=3: body.0 reads pixels, body.2/4/6 are the body, body.8 makes the 3 x 2^2 output channels
    "compact": ({}, "Compact", {"body.2", "body.4", "body.6"}, {"body.0", "body.8"}),
    "dat": (
        {},
        "DAT",
        {f"layers.0.blocks.{b}.{p}" for b in (0, 1) for p in ("attn.qkv", "attn.proj", "ffn.fc1", "ffn.fc2")}
        | {"layers.0.conv", "conv_after_body"},
        {
            "conv_first",
            "layers.0.blocks.0.attn.attns.0.pos.pos_proj",  # dynamic position bias (2 coordinates in)
            "layers.0.blocks.0.attn.dwconv.0",
            "layers.0.blocks.0.attn.spatial_interaction.3",  # down to one channel
            "layers.0.blocks.0.ffn.sg.conv",
            "conv_before_upsample.0",
            "upsample.0",
            "conv_last",
        },
    ),
    "swin2sr": (
        {},
        "Swin2SR",
        _swin_blocks("layers.0.residual_group", 2) | {"layers.0.conv", "conv_after_body"},
        {
            "conv_first",
            "layers.0.residual_group.blocks.0.attn.cpb_mlp.0",
            "conv_before_upsample.0",
            "upsample.0",
            "conv_last",
        },
    ),
    "drct": (
        {},
        "DRCT",
        {f"layers.0.swin{b}.{p}" for b in range(1, 6) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
        | {f"layers.0.adjust{b}" for b in range(1, 6)}
        | {"conv_after_body"},
        {"conv_first", "conv_before_upsample.0", "upsample.0", "conv_last"},
    ),
    "atd": (
        {},
        "ATD",
        {
            f"layers.0.residual_group.layers.{b}.{p}"
            for b in (0, 1)
            for p in ("wqkv", "attn_win.proj", "attn_atd.wv", "attn_aca.proj", "convffn.fc1", "convffn.fc2")
        }
        | {"layers.0.conv", "conv_after_body"},
        {
            "conv_first",
            "layers.0.residual_group.layers.0.attn_atd.wq",  # down to reducted_dim channels
            "layers.0.residual_group.layers.0.attn_atd.wk",
            "layers.0.residual_group.layers.0.convffn.dwconv.depthwise_conv.0",
            "upsample.0",
        },
    ),
    "rgt": (
        {},
        "RGT",
        {f"layers.0.blocks.0.{p}" for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
        | {f"layers.0.blocks.1.attn.{p}" for p in ("q", "k", "v", "conv", "proj")}
        | {"layers.0.blocks.1.mlp.fc1", "layers.0.blocks.1.mlp.fc2", "layers.0.conv", "conv_after_body"},
        {
            "conv_first",
            "layers.0.blocks.0.attn.get_v",  # depthwise
            "layers.0.blocks.0.attn.attns.0.pos.pos_proj",  # dynamic position bias (2 coordinates in)
            "layers.0.blocks.0.mlp.sg.conv",
            "layers.0.blocks.1.attn.reduction1",
            "layers.0.blocks.1.attn.dwconv",
            "layers.0.blocks.1.attn.cpe",
            "conv_before_upsample.0",
            "upsample.0",
            "conv_last",
        },
    ),
    "plksr": (
        {},
        "PLKSR",
        {f"feats.{b}.{p}" for b in (1, 2) for p in ("channe_mixer.0", "channe_mixer.2", "attn.f.0", "refine")},
        {"feats.0", "feats.1.lk.conv", "feats.2.lk.conv", "feats.3"},
    ),
    # RealPLKSR is spandrel's PLKSR architecture too (the plksr preset); the channel mixer is spelt right
    "realplksr": (
        {},
        "PLKSR",
        {f"feats.{b}.{p}" for b in (1, 2) for p in ("channel_mixer.0", "channel_mixer.2", "attn.f.0", "refine")},
        {"feats.0", "feats.1.lk.conv", "feats.2.lk.conv", "feats.4"},
    ),
    "safmn": (
        {},
        "SAFMN",
        {f"feats.{b}.{p}" for b in (0, 1) for p in ("safm.aggr", "ccm.ccm.0", "ccm.ccm.2")},
        {"to_feat", "feats.0.safm.mfr.0", "to_img.0"},
    ),
    "span": (
        {},
        "SPAN",
        {f"{conv}.{p}" for conv in [f"block_{b}.c{c}_r" for b in range(1, 7) for c in (1, 2, 3)] + ["conv_2"]
         for p in ("sk", "conv.0", "conv.1", "conv.2")}
        | {"conv_cat"},
        {"conv_1.sk", "conv_1.conv.1", "conv_1.eval_conv", "block_1.c1_r.eval_conv", "conv_2.eval_conv", "upsampler.0"},
    ),
    # depth_per_group=2: blocks 0-3, spatial-window and channel attention alternately
    "fdat": (
        {},
        "FDAT",
        {f"groups.0.blocks.{b}.{p}" for b in range(4) for p in ("attn.qkv", "attn.proj", "ffn.fc1", "ffn.fc2")}
        | {"groups.0.conv", "conv_after"},
        {
            "conv_first",
            "groups.0.blocks.0.conv.0",  # depthwise
            "groups.0.blocks.0.inter.sg.0",  # down to one channel
            "groups.0.blocks.0.ffn.smix",
            "upsampler.1",
        },
    ),
    # n_block=2: gblocks.0 reads the pixels, gblocks.1-2 are gated CNN blocks, gblocks.3/5/7 close the body
    "mosr": (
        {},
        "MoSR",
        {"gblocks.1.fc1", "gblocks.1.fc2", "gblocks.2.fc1", "gblocks.2.fc2", "gblocks.3", "gblocks.5", "gblocks.7"},
        {"gblocks.0", "gblocks.1.conv", "shortcut.block.0", "shortcut.block.2", "shortcut.conv11", "upsampler.0"},
    ),
    "omnisr": (
        {},
        "OmniSR",
        {
            f"residual_layer.0.residual_layer.0.layer.{layer}.fn.{p}"
            for layer, parts in {
                0: ("0", "5"),  # MBConv expand / project
                2: ("to_qkv", "to_out.0"),  # window attention
                5: ("qkv", "project_out"),  # channel attention
                8: ("to_qkv", "to_out.0"),  # grid attention
                11: ("qkv", "project_out"),
            }.items()
            for p in parts
        }
        | {f"residual_layer.0.residual_layer.0.layer.{layer}.fn.{p}" for layer in (4, 6, 10, 12)
           for p in ("project_in", "project_out")}  # gated FFNs
        | {"residual_layer.0.residual_layer.1", "output"},
        {
            "input",
            "residual_layer.0.residual_layer.0.layer.0.fn.2",  # depthwise
            "residual_layer.0.residual_layer.0.layer.0.fn.4.gate.1",  # squeeze-excitation
            "residual_layer.0.residual_layer.0.layer.4.fn.dwconv",
            "residual_layer.0.residual_layer.0.layer.5.fn.qkv_dwconv",
            "residual_layer.0.esa.conv1",
            "residual_layer.0.esa.conv2",
            "up.0",
        },
    ),
    "grl": (
        {},
        "GRL",
        {f"layers.0.blocks.{b}.{p}" for b in (0, 1)
         for p in ("attn.qkv.body", "attn.anchor.body.0.reduction", "attn.proj", "mlp.fc1", "mlp.fc2",
                   "conv.cab.0", "conv.cab.2")}
        | {"layers.0.conv", "conv_after_body"},
        {
            "conv_first",
            "layers.0.blocks.0.conv.cab.3.attention.1",  # channel attention squeeze
            "layers.0.blocks.0.attn.window_attn.attn_transform.cpb_mlp.0",  # 2 coordinates in
            "layers.0.blocks.0.attn.stripe_attn.attn_transform1.cpb_mlp.2",
            "conv_before_upsample.0",
            "upsample.up.0",
            "conv_last",
        },
    ),
    "grl_separable": (
        {},
        "GRL",
        {f"layers.0.blocks.{b}.{p}" for b in (0, 1)
         for p in ("attn.qkv.body.1", "attn.anchor.body.0", "attn.proj", "mlp.fc1", "mlp.fc2")}
        | {"layers.0.conv", "conv_after_body"},
        {"conv_first", "layers.0.blocks.0.attn.qkv.body.0"},  # depthwise
    ),
    "craft": (
        {},
        "CRAFT",
        {f"layers.0.residual_group.srwa_blocks.{b}.{p}" for b in range(4)
         for p in ("qkv", "proj", "mlp.fc1", "mlp.fc2")}
        | {f"layers.0.residual_group.hfer_blocks.{b}.{p}" for b in (0, 1) for p in ("fc", "conv", "last_fc")}
        | {f"layers.0.residual_group.hf_blocks.{b}.{p}" for b in (0, 1)
           for p in ("attn.q", "attn.kv", "attn.project_out", "ffn.project_in", "ffn.project_out")}
        | {"layers.0.conv", "conv_after_body"},
        {
            "conv_first",
            "layers.0.residual_group.srwa_blocks.0.get_v",  # depthwise
            "layers.0.residual_group.srwa_blocks.0.attns.0.pos.pos_proj",
            "layers.0.residual_group.hf_blocks.0.attn.q_dwconv",
            "layers.0.residual_group.hf_blocks.0.attn.kv_dwconv",
            "layers.0.residual_group.hf_blocks.0.ffn.dwconv",
            "upsample.0",
        },
    ),
    "seemore": (
        {},
        "SeemoRe",
        {f"body.{b}.local_block.block.{p}" for b in (0, 1) for p in ("conv_1.0", "conv_1.2", "conv.1", "proj")}
        | {f"body.{b}.global_block.block.{p}" for b in (0, 1) for p in ("to_qv.0", "proj")}
        | {f"body.{b}.{block}.ffn.{p}" for b in (0, 1) for block in ("local_block", "global_block")
           for p in ("fn_1.0", "fn_2.0")}
        | {"conv_2"},
        {
            "conv_1",
            "body.0.local_block.block.agg_conv.0",  # depthwise
            "body.0.local_block.block.conv.0",
            "body.0.local_block.block.moe_layer.experts.0.conv_1",  # an expert: down to 2 channels
            "body.0.local_block.block.moe_layer.gate.body.2",
            "body.0.local_block.ffn.gate",
            "body.0.global_block.block.attn.conv.0",
            "upsampler.0",
        },
    ),
    "ditn": (
        {},
        "DITN",
        {f"UFONE.0.ITLs.0.{p}" for p in ("attn.qkv", "attn.project_out", "conv1", "conv2", "ffn.project_in",
                                         "ffn.project_out")}
        | {f"UFONE.0.SALs.0.{p}" for p in ("SDA.DConvs.2", "SDA.proj_first.0", "SDA.proj_last.0", "conv1", "conv2",
                                           "ffn.project_in", "ffn.project_out")}
        | {"conv_after_body"},
        {"sft", "UFONE.0.ITLs.0.ffn.dwconv", "UFONE.0.SALs.0.SDA.DConvs.0", "UFONE.0.SALs.0.SDA.DConvs.1",
         "upsample.0"},
    ),
    "moesr": (
        {},
        "MoESR",
        {f"blocks.{b}.blocks.{i}.fc{f}" for b in (0, 1) for i in (0, 1) for f in (1, 2)}
        | {f"blocks.{b}.msg.gated.{i}.fc{f}" for b in (0, 1) for i in range(3) for f in (1, 2)}
        | {"blocks.0.msg.up.0", "blocks.1.msg.up.0"},
        {"in_to_dim", "blocks.0.blocks.0.conv.dwconv_hw", "blocks.0.msg.down.0", "upscale.0"},
    ),
    "dctlsa": (
        {},
        "DCTLSA",
        {f"B{m}.body.{i}.transformer_body.0.blocks.{b}.{p}" for m in range(1, 7) for i in (0, 1) for b in (0, 1)
         for p in ("attn.qkv", "attn.proj", "attn.local.pointwise_conv_0", "attn.local.pointwise_conv_1", "mlp.fc1",
                   "mlp.fc2")}
        | {"c.0", "c1.0", "c2.0", "c3.0", "c4.0", "c5.0", "LR_conv"},
        {"fea_conv", "B1.body.0.transformer_body.0.blocks.0.attn.local.depthwise_conv", "upsampler.0"},
    ),
    "swiftsrgan": (
        {},
        "SwiftSRGAN",
        {f"residual.{r}.block{b}.cnn.pointwise" for r in (0, 1) for b in (1, 2)} | {"convblock.cnn.pointwise"},
        {
            "initial.cnn.depthwise",
            "initial.cnn.pointwise",
            "residual.0.block1.cnn.depthwise",
            "convblock.cnn.depthwise",
            "upsampler.0.conv.pointwise",
            "final_conv.pointwise",
        },
    ),
    "scunet": (
        {},
        "SCUNet",
        # down stages: the block, then the strided conv; up stages: the transposed conv, then the block
        {f"m_{stage}.{p}" for stage in ("down1.0", "down2.0", "down3.0", "body.0", "up3.1", "up2.1", "up1.1")
         for p in ("trans_block.msa.embedding_layer", "trans_block.msa.linear", "trans_block.mlp.0",
                   "trans_block.mlp.2", "conv1_1", "conv1_2", "conv_block.0", "conv_block.2")}
        | {"m_down1.1", "m_down2.1", "m_down3.1", "m_up3.0", "m_up2.0", "m_up1.0"},
        {"m_head.0", "m_tail.0"},
    ),
    "nafnet": (
        {},
        "NAFNet",
        {f"{block}.{c}" for block in ("encoders.0.0", "encoders.1.0", "middle_blks.0", "decoders.0.0", "decoders.1.0")
         for c in ("conv1", "conv3", "conv4", "conv5")}
        | {"downs.0", "downs.1", "ups.0.0", "ups.1.0"},
        {"intro", "ending", "encoders.0.0.conv2", "encoders.0.0.sca.1"},  # pixels; depthwise; pooled attention
    ),
    "realcugan": (
        {},
        "RealCUGAN",
        {f"unet1.{p}" for p in ("conv1.conv.2", "conv1_down", "conv2.conv.0", "conv2.conv.2", "conv2_up", "conv3")}
        | {f"unet2.{p}" for p in ("conv1.conv.2", "conv1_down", "conv2.conv.0", "conv2.conv.2", "conv2_down",
                                  "conv3.conv.0", "conv3.conv.2", "conv3_up", "conv4.conv.0", "conv4.conv.2",
                                  "conv4_up", "conv5")},
        {
            "unet1.conv1.conv.0",  # reads the pixels
            "unet2.conv1.conv.0",
            "unet2.conv_bottom",  # writes them
            "unet1.conv_bottom",  # a transposed conv that writes them
            "unet1.conv2.seblock.conv1",  # squeeze-excitation
            "unet2.conv3.seblock.conv2",
        },
    ),
    "mmrealsr": (
        {},
        "MMRealSR",
        {f"body.{b}.rdb{d}.conv{c}" for b in (0, 1) for d in (1, 2, 3) for c in range(1, 6)} | {"conv_body"},
        {
            "conv_first",  # reads the pixels
            "conv_up1", "conv_up2", "conv_hr", "conv_last",  # the upsampling tail
            "de_net.conv_first.0", "de_net.body.0.0.conv1", "de_net.body.1.1", "de_net.fc_degree.0.0",  # estimator
            "dd_embed.0",  # degree embedding
            "am_list.0.fc.0", "am_list.1.fc.4",  # affine modulation MLPs
        },
    ),
    "fbcnn": (
        {},
        "FBCNN",
        {f"{stage}.{b}.res.{c}" for stage in ("m_down1", "m_down2", "m_down3", "m_body_encoder", "m_body_decoder")
         for b in (0, 1) for c in (0, 2)}
        | {f"m_up{u}.{b}.res.{c}" for u in (1, 2, 3) for b in (1, 2) for c in (0, 2)}
        | {"m_down1.2", "m_down2.2", "m_down3.2", "m_up3.0", "m_up2.0", "m_up1.0"},  # strided and transposed convs
        {
            "m_head", "m_tail",  # pixels
            "qf_pred.0.res.0", "qf_pred.4", "qf_pred.8",  # quality-factor predictor
            "qf_embed.0", "qf_embed.4",  # its embedding
            "to_gamma_3.0", "to_beta_1.0",  # the decoder's modulation
        },
    ),
}
# the preset of each entry of ARCHS, where its name is not one
PRESET_OF = {"realplksr": "plksr", "grl_separable": "grl"}

SCALE = 2  # every model here upscales x2 but the denoisers and MMRealSR (x4 only, see conftest)
SCALE_OF = {"scunet": 1, "nafnet": 1, "fbcnn": 1, "mmrealsr": 4}


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def preset(arch) -> str:
    return PRESET_OF.get(arch, arch)


@pytest.fixture
def base(arch, tmp_path, tiny_sr):
    """spandrel's descriptor of a small random-init model of ``arch``, loaded from disk."""
    path = tmp_path / f"{arch}_base.safetensors"
    adaptsr.save_model(getattr(tiny_sr, arch)(**ARCHS[arch][0]), path)
    descriptor = adaptsr.load_model(path)
    assert descriptor.architecture.id == ARCHS[arch][1]
    assert descriptor.scale == SCALE_OF.get(arch, SCALE)
    return descriptor


# spandrel's SeemoRe picks its experts for the whole batch from the first image in eval mode, and fails
# on batches of more than one image there (training mode mixes them per image)
EVAL_BATCH = {"seemore": 1}


@pytest.fixture
def eval_batch(arch) -> int:
    return EVAL_BATCH.get(arch, 2)


@pytest.fixture
def lr_size(base) -> int:
    """The input side the tests use: 16 pixels, or the least the model takes above that (Real-CUGAN: 32)."""
    needs = base.size_requirements
    size = max(16, needs.minimum)
    return -(-size // needs.multiple_of) * needs.multiple_of


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode output image (MMRealSR and FBCNN return it with their degradation estimate, as adaptsr takes it);
    a clone of the input because RCAN's forward writes into it."""
    model.eval()
    with torch.no_grad():
        return image_of(model(x.clone()))


def _lr_batch(n: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_save_and_load_keep_the_model(arch, tiny_sr, lr_size, eval_batch, tmp_path):
    """What ``save_model`` writes, spandrel loads as the same function: the configuration it detects from the
    tensors is the built one (a GRL saved without its attention tables loaded with a guessed window size)."""
    built = getattr(tiny_sr, arch)(**ARCHS[arch][0])
    adaptsr.save_model(built, tmp_path / "model.safetensors")
    loaded = adaptsr.load_model(tmp_path / "model.safetensors")
    x = _lr_batch(eval_batch, lr_size, seed=6)
    _assert_close(_run(loaded.model, x), _run(built, x))


# -- the presets --


def test_preset_wraps_exactly_the_body_layers(arch, preset, base):
    model = copy.deepcopy(base.model)
    wrappers = {nn.Conv2d: LoRAConv2d, nn.Linear: LoRALinear, nn.ConvTranspose2d: LoRAConvTranspose2d}
    plain = {name: type(m) for name, m in model.named_modules() if type(m) in wrappers}
    _, _, wanted, skipped = ARCHS[arch]
    assert wanted <= plain.keys() and skipped <= plain.keys()  # the expectations name real layers

    summary = adaptsr.inject_lora(model, preset=preset, rank=4)

    assert set(summary.layers) == wanted
    assert set(summary.layers.values()) == {4}
    wrapped = dict(adaptsr.lora_layers(model))
    assert set(wrapped) == wanted
    for name in wanted:
        expected_type = wrappers[plain[name]]
        assert type(wrapped[name]) is expected_type, name
        assert type(wrapped[name].base_layer) is plain[name]
    for name in skipped:
        assert type(model.get_submodule(name)) is plain[name], f"{name} should stay a plain layer"
    if arch in ("swinir", "hat", "drct"):  # the Swin presets cover attention, MLP and convolutions
        kinds = {name.split(".")[-1] for name, m in wrapped.items() if isinstance(m, LoRALinear)}
        assert {"qkv", "proj", "fc1", "fc2"} <= kinds
        assert any(isinstance(m, LoRAConv2d) for m in wrapped.values())


def test_the_architecture_picks_its_preset(preset, base):
    """What ``adaptsr adapt`` does without --preset: the preset of the architecture spandrel detects."""
    assert preset_for_architecture(base.architecture.id) == preset


def test_summary_counts_and_only_adapters_train(arch, preset, base):
    model = copy.deepcopy(base.model)
    base_params = sum(p.numel() for p in model.parameters())

    summary = adaptsr.inject_lora(base, preset=preset, rank=4)  # the descriptor works as well as its module

    model = base.model
    lora_params = [p for _, m in adaptsr.lora_layers(model) for p in (m.lora_A, m.lora_B)]
    assert len(lora_params) == 2 * len(summary.layers)
    assert summary.trainable_params == sum(p.numel() for p in lora_params) > 0
    assert summary.total_params == base_params + summary.trainable_params
    assert 0.0 < summary.trainable_share < 1.0
    assert summary.trainable_share == pytest.approx(summary.trainable_params / summary.total_params)
    assert f"{len(summary.layers)} layers" in str(summary)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    assert len(trainable) == len(lora_params)


def test_output_equals_base_at_init(arch, preset, base, lr_size, eval_batch):
    x = _lr_batch(eval_batch, lr_size)
    expected = _run(base.model, x)

    model = copy.deepcopy(base.model)
    adaptsr.inject_lora(model, preset=preset, rank=4)
    _assert_close(_run(model, x), expected)

    # With a non-zero B the same comparison fails: the check above is not vacuous.
    perturbed = copy.deepcopy(base.model)
    adaptsr.inject_lora(perturbed, preset=preset, rank=4, init_lora_weights=False)
    assert _max_diff(_run(perturbed, x), expected) > 1e-3


# -- train, merge, save, load --


def _train(model: nn.Module, size: int, scale: int, steps: int = 6) -> list[float]:
    torch.manual_seed(2)
    lr_img = torch.rand(2, 3, size, size)
    hr_img = torch.rand(2, 3, size * scale, size * scale)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.l1_loss(image_of(model(lr_img.clone())), hr_img)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_train_merge_save_and_reload_through_spandrel(arch, preset, base, lr_size, eval_batch, tmp_path):
    x = _lr_batch(eval_batch, lr_size, seed=3)
    base_out = _run(base.model, x)
    base_keys = list(base.model.state_dict())
    base_weights = {k: v.clone() for k, v in base.model.state_dict().items()}

    model = copy.deepcopy(base.model)
    adaptsr.inject_lora(model, preset=preset, rank=4)
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    losses = _train(model, lr_size, base.scale)

    assert losses[-1] < losses[0], losses
    for name, layer in adaptsr.lora_layers(model):
        assert layer.lora_B.abs().max() > 0, f"{name}: B is still zero after training"
    for key, value in model.state_dict().items():  # the frozen weights did not move
        if "lora_" not in key:
            assert torch.equal(value, frozen_before[key]), key
    lora_out = _run(model, x)
    assert _max_diff(lora_out, base_out) > 1e-4

    # save_model merges a copy: the LoRA model passed in keeps its adapters.
    adaptsr.save_model(model, tmp_path / "from_lora.pth")
    assert len(dict(adaptsr.lora_layers(model))) == len(ARCHS[arch][2])

    merged = adaptsr.merge_lora(model)
    assert merged is model
    assert not list(adaptsr.lora_layers(merged))
    assert list(merged.state_dict()) == base_keys
    assert all(p.requires_grad is False for p in merged.parameters())
    for key in base_keys:
        assert merged.state_dict()[key].shape == base_weights[key].shape
    merged_out = _run(merged, x)
    _assert_close(merged_out, lora_out)

    for file_name in ("merged.safetensors", "merged.pth", "from_lora.pth"):
        path = tmp_path / file_name
        if not path.exists():
            adaptsr.save_model(merged, path)
        loaded = adaptsr.load_model(path)
        assert loaded.architecture.id == base.architecture.id, file_name
        assert loaded.scale == base.scale == SCALE_OF.get(arch, SCALE)
        assert type(loaded.model) is type(base.model)
        assert list(loaded.model.state_dict()) == base_keys
        loaded_out = _run(loaded.model, x)
        _assert_close(loaded_out, lora_out)
        assert _max_diff(loaded_out, base_out) > 1e-4, f"{file_name} is the base model again"


def test_merge_unmerge_unload_agree(arch, preset, base, lr_size, eval_batch):
    """unmerged == merged == unmerged again == unloaded, with non-zero B; all differ from the base."""
    x = _lr_batch(eval_batch, lr_size, seed=4)
    base_out = _run(base.model, x)
    model = copy.deepcopy(base.model)
    torch.manual_seed(5)
    adaptsr.inject_lora(model, preset=preset, rank=4, init_lora_weights=False)
    wrapped_keys = list(model.state_dict())
    base_weights = {name: layer.base_layer.weight.clone() for name, layer in adaptsr.lora_layers(model)}

    unmerged = _run(model, x)
    assert _max_diff(unmerged, base_out) > 1e-3

    adaptsr.merge_lora(model, unload=False)
    layers = dict(adaptsr.lora_layers(model))
    assert layers and all(layer.merged for layer in layers.values())
    assert list(model.state_dict()) == wrapped_keys
    assert any(not torch.equal(layers[n].base_layer.weight, w) for n, w in base_weights.items())
    merged = _run(model, x)
    _assert_close(merged, unmerged)
    adaptsr.merge_lora(model, unload=False)  # merging twice is a no-op
    _assert_close(_run(model, x), unmerged)

    adaptsr.unmerge_lora(model)
    assert not any(layer.merged for _, layer in adaptsr.lora_layers(model))
    for name, layer in adaptsr.lora_layers(model):
        assert torch.equal(layer.base_layer.weight, base_weights[name]), name  # bit for bit: the base hash holds
    _assert_close(_run(model, x), unmerged)

    adaptsr.merge_lora(model, unload=False)  # unload from the merged state too
    adaptsr.merge_lora(model)
    assert not list(adaptsr.lora_layers(model))
    assert list(model.state_dict()) == list(base.model.state_dict())
    unloaded = _run(model, x)
    _assert_close(unloaded, unmerged)
    assert _max_diff(unloaded, base_out) > 1e-3


def test_merged_file_keeps_the_base_files_layout(arch, preset, base, lr_size, eval_batch, tmp_path):
    """save_model(like=base file) on every architecture: a BasicSR-wrapped base (``params_ema``) gives a merged
    file in the same wrapper with the same keys, in which only the adapted layers' weights moved, and which
    spandrel opens as the adapted model."""
    source = tmp_path / f"{arch}_base.safetensors"
    wrapped = tmp_path / f"{arch}_basicsr.pth"
    torch.save({"params_ema": load_file(str(source))}, wrapped)
    model = adaptsr.load_model(wrapped)
    torch.manual_seed(5)
    adaptsr.inject_lora(model, preset=preset, rank=4, init_lora_weights=False)
    x = _lr_batch(eval_batch, lr_size, seed=4)
    expected = _run(model.model, x)
    merged_state = adaptsr.merge_lora(copy.deepcopy(model.model)).state_dict()
    changed = {k for k, v in base.model.state_dict().items() if not torch.equal(merged_state[k], v)}

    assert adaptsr.save_model(model, tmp_path / "merged.pth", like=wrapped) == []
    stored, written = torch.load(wrapped, weights_only=True), torch.load(tmp_path / "merged.pth", weights_only=True)
    assert list(written) == ["params_ema"] and list(written["params_ema"]) == list(stored["params_ema"])
    moved = {k for k, v in written["params_ema"].items() if not torch.equal(v, stored["params_ema"][k])}
    assert moved and moved == changed  # the adapted weights (and SPAN's refolded inference convs), nothing else
    _assert_close(_run(adaptsr.load_model(tmp_path / "merged.pth").model, x), expected)


def _structure(model: nn.Module) -> list[tuple]:
    """Each module's name, class, instance-level forward (a switched attention's) and hook counts."""
    return [(name, type(m), "forward" in m.__dict__, len(m._forward_pre_hooks), len(m._forward_hooks))
            for name, m in model.named_modules()]


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_unload_gives_the_base_back(arch, preset, base, lr_size, eval_batch, tmp_path, merged):
    """unload_lora drops trained, non-zero adapters (merged ones taken back out first): the base's modules,
    forwards, hooks, state dict and output, and another adapter loads into it as into a fresh base."""
    x = _lr_batch(eval_batch, lr_size, seed=4)
    base_out = _run(base.model, x)  # an eval forward first: SPAN refolds its inference convs in it
    base_state = {key: value.clone() for key, value in base.model.state_dict().items()}
    model = copy.deepcopy(base.model)
    torch.manual_seed(5)
    adaptsr.inject_lora(model, preset=preset, rank=4, init_lora_weights=False)
    adapted_out = _run(model, x)
    assert _max_diff(adapted_out, base_out) > 1e-3
    adaptsr.save_adapter(model, tmp_path / "adapter")
    if merged:
        adaptsr.merge_lora(model, unload=False)

    assert adaptsr.unload_lora(model) is model
    assert not list(adaptsr.lora_layers(model))
    assert _structure(model) == _structure(base.model)
    assert list(model.state_dict()) == list(base_state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    assert not any(p.requires_grad for p in model.parameters())
    _assert_close(_run(model, x), base_out)
    with pytest.raises(ValueError, match="no LoRA adapters to unload"):
        adaptsr.unload_lora(model)

    adaptsr.load_adapter(model, tmp_path / "adapter")
    _assert_close(_run(model, x), adapted_out)
