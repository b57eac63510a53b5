"""inject_lora's target selection, per-layer ranks and errors; load_model / save_model's errors and atomic writes.

PEFT is the referee for target matching, rank_pattern / alpha_pattern and the LoRA numerics.
"""

from __future__ import annotations

import copy
import os
import random
import re
import warnings

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from torch import nn

import adaptsr
import adaptsr.io
import adaptsr.presets
from adaptsr import LoRAConv2d, LoRALinear
from adaptsr.presets import PRESETS

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

# body.0.body.{0,1} are RCABs (containers); their convs are .body.0 and .body.2, the channel
# attention's 1x1 convs .body.3.conv_du.0 / .2; body.0.body.2 and body.1 are plain convs.
RCAN_CONVS = [
    "head.0",
    "body.0.body.0.body.0",
    "body.0.body.0.body.2",
    "body.0.body.0.body.3.conv_du.0",
    "body.0.body.0.body.3.conv_du.2",
    "body.0.body.1.body.0",
    "body.0.body.1.body.2",
    "body.0.body.1.body.3.conv_du.0",
    "body.0.body.1.body.3.conv_du.2",
    "body.0.body.2",
    "body.1",
    "tail.0.0",
    "tail.1",
]


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x.clone())  # RCAN's forward writes into its input


def _wrapped(model: nn.Module) -> list[str]:
    return [name for name, _ in adaptsr.lora_layers(model)]


def _peft_wrapped(model: nn.Module, config: LoraConfig) -> dict[str, PeftLoraLayer]:
    peft_model = inject_adapter_in_model(config, copy.deepcopy(model))
    return {name: m for name, m in peft_model.named_modules() if isinstance(m, PeftLoraLayer)}


def test_rcan_layer_names_are_as_assumed(tiny_sr):
    names = [n for n, m in tiny_sr.rcan().named_modules() if type(m) is nn.Conv2d]
    assert names == RCAN_CONVS


# -- targets --


def test_targets_regex_is_matched_in_full(tiny_sr):
    model = tiny_sr.rcan()
    summary = adaptsr.inject_lora(model, targets=r"body\.0\.body\.\d+\.body\.0|body\.1", rank=2)
    # "body\.1" does not match inside "body.0.body.1.body.0": a regex must match the whole name.
    assert _wrapped(model) == ["body.0.body.0.body.0", "body.0.body.1.body.0", "body.1"]
    assert summary.layers == dict.fromkeys(_wrapped(model), 2)
    assert all(isinstance(m, LoRAConv2d) for _, m in adaptsr.lora_layers(model))


def test_targets_list_matches_names_and_dotted_suffixes(tiny_sr):
    model = tiny_sr.rcan()
    adaptsr.inject_lora(model, targets=["head.0", "conv_du.2", "body.2"], rank=2)
    assert _wrapped(model) == [
        "head.0",
        "body.0.body.0.body.2",
        "body.0.body.0.body.3.conv_du.2",
        "body.0.body.1.body.2",
        "body.0.body.1.body.3.conv_du.2",
        "body.0.body.2",
    ]


def test_targets_list_suffix_must_start_at_a_dot(tiny_sr):
    with pytest.raises(ValueError, match=r"matched no Conv2d, ConvTranspose2d or Linear layer"):
        adaptsr.inject_lora(tiny_sr.rcan(), targets=["ody.1", "ail.1"], rank=2)


def test_preset_and_targets_are_combined(tiny_sr):
    model = tiny_sr.rcan()
    adaptsr.inject_lora(model, preset="rcan", targets=["head.0"], rank=2)
    assert "head.0" in _wrapped(model) and "body.1" in _wrapped(model)
    assert "tail.1" not in _wrapped(model)


def test_preset_name_is_case_insensitive(tiny_sr):
    model = tiny_sr.rcan()
    adaptsr.inject_lora(model, preset=" RCAN ", rank=2)
    assert _wrapped(model)


@pytest.mark.parametrize(
    "targets",
    [
        r"body\.0\.body\.\d\.body\.[02]|head\.0|.*conv_du\.0",
        ["body.0.body.2", "conv_du.2", "tail.1", "head.0"],
        r".*\.body\.2",
    ],
    ids=["regex", "list", "regex-suffix"],
)
def test_targets_select_what_peft_selects(targets, tiny_sr):
    model = tiny_sr.rcan()
    adaptsr.inject_lora(model, targets=targets, rank=1)
    assert _wrapped(model) == list(_peft_wrapped(tiny_sr.rcan(), LoraConfig(r=1, target_modules=targets)))


# -- per-layer ranks and alphas --

RANK_PATTERN = {r"body\.0\.body\.1\.body\.0": 3, "body.0": 2, r"conv_du\.\d": 1}  # the first matching key wins
ALPHA_PATTERN = {"body.1": 3, "head.0": 0.5}
PATTERN_TARGETS = r"body\.0\.body\.\d\.body\.[02]|body\.0\.body\.2|body\.1|head\.0|.*conv_du\.[02]"


def test_rank_and_alpha_patterns(tiny_sr):
    model = tiny_sr.rcan()
    summary = adaptsr.inject_lora(
        model, targets=PATTERN_TARGETS, rank=4, alpha=8, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN
    )
    expected = {  # name -> (rank, alpha)
        "head.0": (4, 0.5),
        "body.0.body.0.body.0": (2, 8),
        "body.0.body.0.body.2": (4, 8),
        "body.0.body.0.body.3.conv_du.0": (1, 8),
        "body.0.body.0.body.3.conv_du.2": (1, 8),
        "body.0.body.1.body.0": (3, 8),
        "body.0.body.1.body.2": (4, 8),
        "body.0.body.1.body.3.conv_du.0": (1, 8),
        "body.0.body.1.body.3.conv_du.2": (1, 8),
        "body.0.body.2": (4, 8),
        "body.1": (4, 3),
    }
    layers = dict(adaptsr.lora_layers(model))
    assert summary.layers == {name: rank for name, (rank, _) in expected.items()}
    for name, (rank, alpha) in expected.items():
        layer = layers[name]
        assert (layer.rank, layer.alpha) == (rank, alpha), name
        assert layer.scaling == pytest.approx(alpha / rank)
        assert layer.lora_A.shape[0] == rank and layer.lora_B.shape[1] == rank
    assert summary.trainable_params == sum(m.lora_A.numel() + m.lora_B.numel() for m in layers.values())


def test_alpha_defaults_to_the_layer_rank(tiny_sr):
    model = tiny_sr.rcan()
    adaptsr.inject_lora(model, targets=["body.1", "head.0"], rank=4, rank_pattern={"body.1": 2})
    layers = dict(adaptsr.lora_layers(model))
    assert (layers["body.1"].rank, layers["body.1"].scaling) == (2, 1.0)
    assert (layers["head.0"].rank, layers["head.0"].scaling) == (4, 1.0)


def test_rank_and_alpha_patterns_agree_with_peft(tiny_sr):
    model = tiny_sr.rcan()
    adaptsr.inject_lora(
        model, targets=PATTERN_TARGETS, rank=4, alpha=8, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN
    )
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=PATTERN_TARGETS, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN
    )
    peft_layers = _peft_wrapped(tiny_sr.rcan(), config)
    ours = dict(adaptsr.lora_layers(model))
    assert list(ours) == list(peft_layers)
    for name, layer in ours.items():
        assert layer.rank == peft_layers[name].r["default"], name
        assert layer.scaling == pytest.approx(peft_layers[name].scaling["default"]), name


@pytest.mark.parametrize("which", ["rcan", "swinir"])
def test_outputs_match_peft_with_the_same_adapter_weights(which, tiny_sr):
    """Same A, B (non-zero) in our layers and PEFT's: the whole model's outputs agree."""
    build = getattr(tiny_sr, which)
    targets = PATTERN_TARGETS if which == "rcan" else PRESETS["swinir"]
    kwargs = {"rank_pattern": RANK_PATTERN, "alpha_pattern": ALPHA_PATTERN} if which == "rcan" else {}
    model = build()
    torch.manual_seed(1)
    adaptsr.inject_lora(model, targets=targets, rank=4, alpha=8, init_lora_weights=False, **kwargs)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)
    peft_model = inject_adapter_in_model(config, build())
    peft_layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, PeftLoraLayer)}
    ours = dict(adaptsr.lora_layers(model))
    assert set(ours) == set(peft_layers)
    assert any(isinstance(m, LoRALinear) for m in ours.values()) == (which == "swinir")
    with torch.no_grad():
        for name, layer in ours.items():
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out, peft_out, base_out = _run(model, x), _run(peft_model, x), _run(build(), x)
    assert (out - base_out).abs().max() > 1e-3
    torch.testing.assert_close(out, peft_out, rtol=1e-4, atol=1e-5)

    # our adapter strength is PEFT's scale_layer
    adaptsr.set_adapter_strength(model, 0.3)
    for layer in peft_layers.values():
        layer.scale_layer(0.3)
    scaled = _run(model, x)
    assert (scaled - out).abs().max() > 1e-4
    torch.testing.assert_close(scaled, _run(peft_model, x), rtol=1e-4, atol=1e-5)


# -- errors --


def test_unknown_preset_lists_the_available_ones(tiny_sr):
    available = ", ".join(sorted(adaptsr.PRESETS))
    assert available.startswith("atd, compact, craft, dat, dctlsa, ditn, drct, esrgan, fbcnn, fdat, grl, hat, mmrealsr")
    with pytest.raises(ValueError, match=rf"unknown LoRA preset .edsr.*{available}"):
        adaptsr.inject_lora(tiny_sr.rcan(), preset="edsr")


def test_neither_preset_nor_targets(tiny_sr):
    with pytest.raises(ValueError, match=r"needs a preset or targets"):
        adaptsr.inject_lora(tiny_sr.rcan(), rank=4)


@pytest.mark.parametrize("targets", [r"conv_first|attn\.qkv", ["qkv", "fc1"], r"body\.0", ["body"]])
def test_targets_matching_nothing_say_so_and_show_layer_names(targets, tiny_sr):
    model = tiny_sr.rcan()
    with pytest.raises(ValueError, match=r"matched no Conv2d, ConvTranspose2d or Linear layer of RCAN") as info:
        adaptsr.inject_lora(model, targets=targets)
    assert "head.0" in str(info.value) and "body.0.body.0.body.0" in str(info.value)
    assert repr(targets) in str(info.value)
    assert not _wrapped(model)


def test_preset_for_another_architecture_matches_nothing(tiny_sr):
    with pytest.raises(ValueError,
                       match=r"'swinir' matched no Conv2d, ConvTranspose2d or Linear layer of RCAN.*head\.0"):
        adaptsr.inject_lora(tiny_sr.rcan(), preset="swinir")


def test_rank_too_large_names_the_layer(tiny_sr):
    # 16 -> 16 channel 3x3 convs allow rank <= 16; the first targeted layer fails.
    message = r"layer 'body\.0\.body\.0\.body\.0'.*rank 17 is larger than this layer allows \(16\)"
    with pytest.raises(ValueError, match=message):
        adaptsr.inject_lora(tiny_sr.rcan(), preset="rcan", rank=17)


def test_rank_too_large_for_a_linear_layer_names_it():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"layer '1'.*rank 4 is larger than this layer allows \(3\)"):
        adaptsr.inject_lora(model, targets=["0", "1"], rank=4)


def test_a_failed_injection_leaves_the_model_untouched(tiny_sr):
    """A bad layer late in the list must not leave earlier layers wrapped or the model frozen."""
    model = tiny_sr.rcan()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layer 'body\.1'.*rank 40 is larger"):
        adaptsr.inject_lora(model, preset="rcan", rank=4, rank_pattern={"body.1": 40})
    assert not _wrapped(model)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    adaptsr.inject_lora(model, preset="rcan", rank=4)  # and a corrected call then works
    assert len(_wrapped(model)) == 6


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_must_be_a_positive_integer(rank):
    with pytest.raises(ValueError, match=r"positive integer"):
        adaptsr.inject_lora(nn.Sequential(nn.Linear(8, 8)), targets=["0"], rank=rank)


def test_injecting_twice_is_refused(tiny_sr):
    model = tiny_sr.rcan()
    adaptsr.inject_lora(model, preset="rcan", rank=2)
    with pytest.raises(ValueError, match=r"already has LoRA adapters \(e\.g\. on 'body\.0\.body\.0\.body\.0'\)"):
        adaptsr.inject_lora(model, targets=["head.0"], rank=2)
    adaptsr.merge_lora(model)
    adaptsr.inject_lora(model, targets=["head.0"], rank=2)  # after unloading it is allowed again
    assert _wrapped(model) == ["head.0"]


def test_inject_rejects_something_that_is_not_a_model():
    with pytest.raises(TypeError, match=r"expected an nn\.Module or a spandrel model descriptor, got dict"):
        adaptsr.inject_lora({"weight": torch.zeros(1)}, preset="rcan")


# -- load_model errors --


@pytest.fixture
def rcan_file(tmp_path, tiny_sr):
    path = tmp_path / "rcan.safetensors"
    adaptsr.save_model(tiny_sr.rcan(), path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_missing_file(tmp_path, suffix):
    path = tmp_path / f"missing{suffix}"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        adaptsr.load_model(path)


# Seeds 195, 273 and 304 make bytes on which torch.load raises UnicodeDecodeError (a ValueError).
CORRUPT = {f"random{seed}": random.Random(seed).randbytes(64) for seed in (0, 1, 195, 273, 304)}
CORRUPT["empty"] = b""
CORRUPT["random4k"] = random.Random(7).randbytes(4096)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("content", sorted(CORRUPT))
def test_load_corrupt_file_names_it(tmp_path, suffix, content):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(CORRUPT[content])
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))} could not be read"):
        adaptsr.load_model(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_truncated_checkpoint(tmp_path, suffix, tiny_sr):
    good = tmp_path / f"good{suffix}"
    adaptsr.save_model(tiny_sr.rcan(), good)
    path = tmp_path / f"truncated{suffix}"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))} could not be read"):
        adaptsr.load_model(path)


@pytest.mark.parametrize(
    "obj,kind", [([torch.zeros(2)], "list"), (torch.zeros(2), "Tensor"), (3, "int")], ids=["list", "tensor", "int"]
)
def test_load_file_holding_no_state_dict(tmp_path, obj, kind):
    path = tmp_path / "thing.pth"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))} holds a {kind}, not a state dict"):
        adaptsr.load_model(path)


class _Payload:
    """Unpickling this would create a file: load_model must refuse to run it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_refuses_to_unpickle_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))} could not be read"):
        adaptsr.load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "state",
    [
        {"conv.weight": torch.zeros(3, 3, 3, 3)},
        {"params": {"conv.weight": torch.zeros(3, 3, 3, 3)}},
        {},
        {1: torch.zeros(2)},  # not even string keys
    ],
    ids=["unknown", "nested-unknown", "empty", "int-keys"],
)
def test_load_state_dict_spandrel_does_not_recognise(tmp_path, state):
    path = tmp_path / "unknown.pth"
    torch.save(state, path)
    message = rf"checkpoint {re.escape(str(path))}: spandrel does not recognise the architecture"
    with pytest.raises(ValueError, match=message):
        adaptsr.load_model(path)


def test_load_unknown_state_dict_from_safetensors(tmp_path):
    path = tmp_path / "unknown.safetensors"
    safetensors.torch.save_file({"conv.weight": torch.zeros(3, 3, 3, 3)}, str(path))
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))}: spandrel does not recognise"):
        adaptsr.load_model(path)


def test_load_unsupported_extension(tmp_path, rcan_file):
    path = tmp_path / "rcan.onnx"
    path.write_bytes(rcan_file.read_bytes())
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))}: unsupported extension '\.onnx'"):
        adaptsr.load_model(path)


def test_load_model_returns_an_eval_descriptor(rcan_file, tiny_sr):
    descriptor = adaptsr.load_model(rcan_file)
    assert (descriptor.architecture.id, descriptor.scale) == ("RCAN", 2)
    assert not descriptor.model.training
    assert list(descriptor.model.state_dict()) == list(tiny_sr.rcan().state_dict())


# -- save_model --


def _save(path, tiny_sr):
    adaptsr.save_model(tiny_sr.rcan(), path)
    return path


def test_save_unsupported_suffix_writes_nothing(tmp_path, tiny_sr):
    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match=rf"cannot save model to {re.escape(str(path))}: use a \.safetensors or \.pth"):
        adaptsr.save_model(tiny_sr.rcan(), path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_leaves_only_the_file(tmp_path, suffix, tiny_sr):
    path = tmp_path / "sub" / "dir" / f"model{suffix}"  # missing folders are created
    descriptor = adaptsr.load_model(_save(tmp_path / f"seed{suffix}", tiny_sr))
    adaptsr.save_model(descriptor, path)  # a descriptor is accepted as well as a module
    adaptsr.save_model(descriptor, path)  # and overwriting works
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert adaptsr.load_model(path).architecture.id == "RCAN"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_saved_file_gets_a_plain_new_file_mode(tmp_path, suffix, tiny_sr):
    """Atomic writing must not leave the checkpoint private (mkstemp / safetensors create 0600 files)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    path = _save(tmp_path / f"model{suffix}", tiny_sr)
    assert oct(os.stat(path).st_mode & 0o777) == oct(os.stat(plain).st_mode & 0o777)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, suffix, error, tiny_sr):
    path = _save(tmp_path / f"model{suffix}", tiny_sr)
    previous = path.read_bytes()
    other = tiny_sr.rcan()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)

    def failing(obj, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"partial garbage")
        raise error("disk full (simulated)")

    if suffix == ".safetensors":
        monkeypatch.setattr(adaptsr.io, "save_file", failing)
    else:
        monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(error, match="disk full"):
        adaptsr.save_model(other, path)
    monkeypatch.undo()

    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert adaptsr.load_model(path).architecture.id == "RCAN"


def test_failed_first_save_leaves_no_file(tmp_path, monkeypatch, tiny_sr):
    def failing(obj, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(adaptsr.io, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        adaptsr.save_model(tiny_sr.rcan(), tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["swinir"])  # spandrel's HAT ignores its use_checkpoint flag
def test_adapters_train_inside_checkpointed_blocks(arch, tiny_sr):
    """spandrel's use_checkpoint=True runs each Swin block under torch's reentrant checkpoint, which gives
    a block's parameters gradients only when its input requires grad; behind the frozen stem it would not.
    Every adapter gets the gradient it gets without checkpointing, and the merged model has no hook left."""
    grads = {}
    for use_checkpoint in (False, True):
        model = getattr(tiny_sr, arch)(use_checkpoint=use_checkpoint)
        adaptsr.inject_lora(model, preset=arch, rank=2, init_lora_weights=False)
        x = torch.rand(1, 3, 16, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch asks checkpoint's callers to choose use_reentrant
            model(x).square().sum().backward()
        assert not x.requires_grad  # the caller's input is left alone
        grads[use_checkpoint] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads[True].values()), [n for n, g in grads[True].items() if g is None][:3]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    adaptsr.merge_lora(model)
    assert not model._forward_pre_hooks and not hasattr(model, "_adaptsr_input_grad_hook")


# -- batch norm in the base: its statistics are frozen too --


def _conv_bn_net() -> nn.Module:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    with torch.no_grad():  # statistics that are not the training batches' own
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def test_batch_norm_statistics_stay_frozen_and_the_adapter_reproduces_the_model(tmp_path):
    """A base model's batch norm neither updates its running statistics nor normalises with the batch's while
    the adapters train (the adapter file carries no statistics), so base + saved adapter, merged, is exactly
    the trained model; after merge_lora the layer is plain again and follows model.train()."""
    model = _conv_bn_net()
    stats = {k: v.clone() for k, v in model[1].state_dict().items()}
    adaptsr.inject_lora(model, targets=["0", "3"], rank=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    x = torch.randn(4, 3, 6, 6) * 3 + 1
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, stats[key]), f"batch norm {key} changed in training"
    train_mode_out = model(x).detach()
    model.eval()
    trained = model(x).detach()
    torch.testing.assert_close(train_mode_out, trained, rtol=0, atol=0)

    adaptsr.save_adapter(model, tmp_path / "adapter")
    reloaded = _conv_bn_net()
    adaptsr.load_adapter(reloaded, tmp_path / "adapter")
    adaptsr.merge_lora(reloaded)
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU) for m in reloaded)
    torch.testing.assert_close(reloaded.eval()(x), trained, rtol=1e-5, atol=1e-6)

    adaptsr.merge_lora(model)
    assert not model[1]._forward_pre_hooks  # the original module again
    model.train()
    model(x)
    assert not torch.equal(model[1].running_mean, stats["running_mean"])  # a plain batch norm updates again


@pytest.mark.parametrize("num_conv", [1, 5])
def test_compact_preset_follows_the_configuration(tiny_sr, num_conv):
    """Compact's body is one sequence whose last conv (the pixel-shuffled output) moves with num_conv: the
    preset adapts the convs between the first and the last, whatever their number."""
    model = tiny_sr.compact(num_conv=num_conv)
    adaptsr.inject_lora(model, preset="compact", rank=2)
    assert _wrapped(model) == [f"body.{2 * i}" for i in range(1, num_conv + 1)]
    assert type(model.body[0]) is nn.Conv2d and type(model.body[2 * num_conv + 2]) is nn.Conv2d
    with pytest.raises(ValueError, match="depends on the model's configuration"):
        adaptsr.presets.preset_pattern("compact")


def test_a_model_that_reads_an_adapted_layers_weight_gets_the_adapted_weight(tiny_sr):
    """spandrel's Swin2SR applies attn.qkv as F.linear(x, qkv.weight, ...) without calling the layer. Its
    adapter takes part all the same: the LoRA model computes what the model with W + s B A in place of
    qkv's weight computes, and the adapter gets gradients."""
    model = tiny_sr.swin2sr().double()
    adaptsr.inject_lora(model, targets=r".*attn\.qkv", rank=2, init_lora_weights=False)
    twin = tiny_sr.swin2sr().double()
    for name, layer in adaptsr.lora_layers(model):
        twin.get_submodule(name).weight.data.copy_(layer.to_dense().weight)
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    y = model(x)
    torch.testing.assert_close(y, twin(x))
    assert (y - tiny_sr.swin2sr().double()(x)).abs().max() > 1e-3  # the adapters change the output
    y.sum().backward()
    for name, layer in adaptsr.lora_layers(model):
        assert torch.count_nonzero(layer.lora_A.grad) > 0 and torch.count_nonzero(layer.lora_B.grad) > 0, name


@pytest.mark.parametrize("unload", [True, False], ids=["unload", "keep-modules"])
def test_merging_refolds_spans_inference_convs(tiny_sr, unload):
    """SPAN's Conv3XC folds its training branches into eval_conv at each eval-mode forward; after merging, the
    eval_conv weights (what a checkpoint holds) are already the fold of the merged branches."""
    model = tiny_sr.span().train()
    adaptsr.inject_lora(model, preset="span", rank=2, init_lora_weights=False)
    stale = model.block_1.c1_r.eval_conv.weight.clone()  # as built: SPAN folds only in eval mode
    adaptsr.merge_lora(model, unload=unload)
    convs = [m for m in model.modules() if type(m).__name__ == "Conv3XC"]
    assert convs
    for conv in convs:
        refolded = copy.deepcopy(conv)
        refolded.update_params()
        assert torch.equal(conv.eval_conv.weight, refolded.eval_conv.weight)
        assert torch.equal(conv.eval_conv.bias, refolded.eval_conv.bias)
    assert (model.block_1.c1_r.eval_conv.weight - stale).abs().max() > 1e-3
