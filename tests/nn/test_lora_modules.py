"""LoRAConv2d / LoRAConvTranspose2d / LoRALinear: init, merge round trips, options, freezing, state dicts, PEFT
equivalence."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

from adaptsr.backend import set_backend
from adaptsr.nn import LoRAConv2d, LoRAConvTranspose2d, LoRALinear

# nn.Conv2d options: groups, every padding mode, dilation, 'same' (odd and even kernels), strides
_CONV_GRID = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=3, out_channels=5, kernel_size=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    dict(in_channels=6, out_channels=3, kernel_size=5, padding="same", dilation=2, groups=3, padding_mode="reflect"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=3, out_channels=4, kernel_size=2, padding="same", padding_mode="replicate"),
    dict(in_channels=4, out_channels=4, kernel_size=(3, 5), stride=2, padding=(1, 2), padding_mode="circular"),
    dict(in_channels=3, out_channels=8, kernel_size=(1, 3), stride=(2, 1), padding="valid", groups=1, bias=False),
]
# nn.ConvTranspose2d options: up-sampling strides, output padding, groups, dilation, rectangular kernels
_CONV_T_GRID = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=5, out_channels=5, kernel_size=2, stride=2),
    dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1, output_padding=1, groups=2, bias=False),
    dict(in_channels=3, out_channels=4, kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=2),
]
_LINEAR_GRID = [dict(in_features=7, out_features=5), dict(in_features=4, out_features=9, bias=False)]
_DTYPES = [torch.float32, torch.float64]


def _conv_id(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("in_channels", "out_channels"))


def _max_rank(base: nn.Module) -> int:
    if isinstance(base, nn.Conv2d):
        return min(base.out_channels, base.weight[0].numel())
    if isinstance(base, nn.ConvTranspose2d):  # weight [in, out/g, kh, kw]
        return min(base.weight.shape[1], base.weight.shape[0] // base.groups * base.weight[0, 0].numel())
    return min(base.in_features, base.out_features)


def _make(kind: str, kwargs: dict, dtype=torch.float64, rank=None, seed=0, **lora_kwargs):
    """(base layer, a LoRA wrapper around a deep copy of it, a matching random input)."""
    torch.manual_seed(seed)
    if kind == "conv":
        base = nn.Conv2d(**kwargs, dtype=dtype)
        x = torch.randn(2, base.in_channels, 9, 8, dtype=dtype)
        wrapper = LoRAConv2d
    elif kind == "convT":
        base = nn.ConvTranspose2d(**kwargs, dtype=dtype)
        x = torch.randn(2, base.in_channels, 5, 6, dtype=dtype)
        wrapper = LoRAConvTranspose2d
    else:
        base = nn.Linear(**kwargs, dtype=dtype)
        x = torch.randn(2, 3, base.in_features, dtype=dtype)
        wrapper = LoRALinear
    rank = {None: min(2, _max_rank(base)), "max": _max_rank(base)}.get(rank, rank)
    layer = wrapper(base_layer=copy.deepcopy(base), rank=rank, **lora_kwargs)
    return base, layer, x


def _merged_ground_truth(base: nn.Module, lora_A, lora_B, scaling: float) -> nn.Module:
    """A plain copy of ``base`` with W + s B A, the product written out independently of the package."""
    dense = copy.deepcopy(base)
    with torch.no_grad():
        if isinstance(base, nn.Conv2d):
            dense.weight += scaling * torch.einsum("ok,kihw->oihw", lora_B[:, :, 0, 0], lora_A)
        elif isinstance(base, nn.ConvTranspose2d):
            # input channel i updates the outputs of its group: B's rows of that group
            in_per_group, out_per_group = base.in_channels // base.groups, base.out_channels // base.groups
            rows = lora_B[:, :, 0, 0].reshape(base.groups, out_per_group, -1)
            rows_of_input = rows[torch.arange(base.in_channels) // in_per_group]
            dense.weight += scaling * torch.einsum("ikhw,iok->iohw", lora_A, rows_of_input)
        else:
            dense.weight += scaling * torch.einsum("ok,ki->oi", lora_B, lora_A)
    return dense


def _assert_differs(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    gap = (a - b).abs().max().item()
    assert gap > 1e-2 * max(1.0, b.abs().max().item()), f"{what}: outputs should differ, max gap {gap:.2e}"


_ALL_LAYERS = (
    [("conv", kw) for kw in _CONV_GRID]
    + [("convT", kw) for kw in _CONV_T_GRID]
    + [("linear", kw) for kw in _LINEAR_GRID]
)
_ALL_IDS = (
    [f"conv[{_conv_id(kw)}]" for kw in _CONV_GRID]
    + [f"convT[{_conv_id(kw)}]" for kw in _CONV_T_GRID]
    + [f"linear[{kw}]" for kw in _LINEAR_GRID]
)


# -- initialisation --


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_default_init_starts_as_the_base_layer(kind, kwargs, init, assert_close):
    base, layer, x = _make(kind, kwargs, init_lora_weights=init)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
    with torch.no_grad():
        assert_close(layer(x), base(x), "output at init")
    # B = 0 but training can start: dB is non-zero
    layer(x).square().sum().backward()
    assert torch.count_nonzero(layer.lora_B.grad) > 0


@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_init_false_gives_non_zero_update(kind, kwargs):
    base, layer, x = _make(kind, kwargs, init_lora_weights=False)
    assert torch.count_nonzero(layer.lora_B) == layer.lora_B.numel()
    with torch.no_grad():
        _assert_differs(layer(x), base(x), "init_lora_weights=False")


def test_gaussian_init_std_follows_rank():
    layer = LoRALinear(base_layer=nn.Linear(512, 512), rank=4, init_lora_weights="gaussian")
    assert layer.lora_A.std().item() == pytest.approx(1 / 4, rel=0.05)


@pytest.mark.parametrize("bad", ["kaiming", "pissa", None])
def test_unknown_init_raises(bad):
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear(base_layer=nn.Linear(4, 4), rank=2, init_lora_weights=bad)


# -- merge round trips --


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_merge_round_trip(kind, kwargs, dtype, backend, assert_close):
    """unmerged == merged == unmerged again == to_dense() == nn layer with W + s B A; merged != base."""
    base, layer, x = _make(kind, kwargs, dtype, rank="max", alpha=3.0, init_lora_weights=False)
    truth = _merged_ground_truth(base, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)
    weight_before = layer.base_layer.weight.detach().clone()
    with set_backend(backend), torch.no_grad():
        y_base = base(x)
        y_unmerged = layer(x)
        assert_close(y_unmerged, truth(x), "unmerged vs nn layer with W + s B A")
        _assert_differs(y_unmerged, y_base, "adapted vs base")

        layer.merge()
        assert layer.merged and "merged=True" in layer.extra_repr()
        assert_close(layer.base_layer.weight, truth.weight, "merged weight")
        assert_close(layer(x), y_unmerged, "merged")
        layer.merge()  # a second merge is a no-op
        assert_close(layer.base_layer.weight, truth.weight, "merged weight after merging twice")
        dense_from_merged = layer.to_dense()
        assert_close(dense_from_merged(x), y_unmerged, "to_dense() of a merged layer")

        layer.unmerge()
        assert not layer.merged
        assert_close(layer.base_layer.weight, weight_before, "weight after unmerge")
        assert_close(layer(x), y_unmerged, "unmerged again")
        layer.unmerge()  # a second unmerge is a no-op
        assert_close(layer.base_layer.weight, weight_before, "weight after unmerging twice")

        dense = layer.to_dense()
        assert_close(dense(x), y_unmerged, "to_dense()")
    assert type(dense) is type(base)  # a plain nn.Conv2d / nn.Linear, nothing of ours left
    assert dense is not layer.base_layer and dense.weight.data_ptr() != layer.base_layer.weight.data_ptr()
    assert dense.state_dict().keys() == base.state_dict().keys()
    # to_dense left the wrapper alone
    assert_close(layer.base_layer.weight, weight_before, "weight after to_dense()")


# -- rank, scaling, wrapping --


@pytest.mark.parametrize(
    "make_base",
    [
        lambda: nn.Conv2d(2, 8, 1),  # limited by in/groups * kh * kw = 2
        lambda: nn.Conv2d(4, 3, 3),  # limited by out = 3
        lambda: nn.Conv2d(4, 8, 1, groups=4),  # limited by in/groups = 1
        lambda: nn.Linear(5, 3),
        lambda: nn.Linear(2, 6),
        lambda: nn.ConvTranspose2d(8, 3, 2, stride=2),  # limited by out/groups = 3
        lambda: nn.ConvTranspose2d(4, 8, 1, groups=4),  # limited by in/groups * kh * kw = 1
    ],
)
def test_rank_larger_than_the_layer_allows_raises(make_base):
    base = make_base()
    wrappers = {nn.Conv2d: LoRAConv2d, nn.ConvTranspose2d: LoRAConvTranspose2d, nn.Linear: LoRALinear}
    wrapper = wrappers[type(base)]
    limit = _max_rank(base)
    wrapper(base_layer=copy.deepcopy(base), rank=limit)  # the largest rank is fine
    with pytest.raises(ValueError, match=re.escape(str(tuple(base.weight.shape)))):
        wrapper(base_layer=base, rank=limit + 1)


@pytest.mark.parametrize("rank", [0, -1, 1.5])
def test_rank_must_be_a_positive_integer(rank):
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(base_layer=nn.Linear(4, 4), rank=rank)


def test_wrong_base_type_raises():
    with pytest.raises(TypeError):
        LoRAConv2d(base_layer=nn.Conv1d(3, 3, 3), rank=1)
    with pytest.raises(TypeError):
        LoRALinear(base_layer=nn.Conv2d(3, 3, 3), rank=1)


@pytest.mark.parametrize("lora_dropout", [-0.1, 1.0])
def test_dropout_out_of_range_raises(lora_dropout):
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(base_layer=nn.Linear(4, 4), rank=2, lora_dropout=lora_dropout)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kind, kwargs", [_ALL_LAYERS[0], _ALL_LAYERS[-1]], ids=[_ALL_IDS[0], _ALL_IDS[-1]])
def test_scaling_and_rslora(kind, kwargs, use_rslora, assert_close):
    rank, alpha = 4, 6.0
    base, layer, x = _make(kind, kwargs, rank=rank, alpha=alpha, use_rslora=use_rslora, init_lora_weights=False)
    expected = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    assert layer.scaling == pytest.approx(expected)
    # the scaling is the one the forward and get_delta_weight use
    truth = _merged_ground_truth(base, layer.lora_A.detach(), layer.lora_B.detach(), expected)
    with torch.no_grad():
        assert_close(layer(x), truth(x), "forward")
        assert_close(layer.get_delta_weight(), truth.weight - base.weight, "get_delta_weight")
    # alpha defaults to the rank: scaling 1 (sqrt(r) with rsLoRA)
    _, default, _ = _make(kind, kwargs, rank=rank, use_rslora=use_rslora)
    assert default.scaling == pytest.approx(math.sqrt(rank) if use_rslora else 1.0)


@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_from_module_equals_constructor(kind, kwargs, assert_close):
    base, layer, x = _make(kind, kwargs, init_lora_weights=False)
    wrapper = type(layer)
    other = wrapper.from_module(copy.deepcopy(base), rank=layer.rank)
    assert type(other) is wrapper and other.rank == layer.rank
    other.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert_close(other(x), layer(x), "from_module")


# -- dropout --


_FIRST_CONV_T = len(_CONV_GRID)


@pytest.mark.parametrize(
    "kind, kwargs",
    [_ALL_LAYERS[i] for i in (0, 3, _FIRST_CONV_T + 2, -1)],
    ids=[_ALL_IDS[i] for i in (0, 3, _FIRST_CONV_T + 2, -1)],
)
def test_dropout_in_train_mode_only(kind, kwargs, assert_close):
    base, layer, x = _make(kind, kwargs, lora_dropout=0.5, init_lora_weights=False)
    plain = copy.deepcopy(layer)
    plain.lora_dropout = 0.0
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    y2 = layer(x)
    _assert_differs(y1, y2, "two dropout draws")
    with torch.no_grad():
        _assert_differs(y1, plain(x), "dropout vs no dropout")
    y1.square().sum().backward()
    assert torch.isfinite(layer.lora_A.grad).all() and torch.count_nonzero(layer.lora_A.grad) > 0
    # dropout acts on the adapter's input only: with B = 0 the train-mode output is the base's
    with torch.no_grad():
        zero_b = copy.deepcopy(layer)
        zero_b.lora_B.zero_()
        assert_close(zero_b(x), base(x), "dropout with B = 0")
    layer.eval()
    with torch.no_grad():
        assert_close(layer(x), plain(x), "eval mode equals no dropout")
        assert_close(layer(x), layer(x), "eval mode is deterministic")


# -- freezing and state dicts --


@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_only_the_adapter_trains(kind, kwargs):
    base, layer, x = _make(kind, kwargs, init_lora_weights=False)
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    layer(x).square().sum().backward()
    assert all(p.grad is None for p in layer.base_layer.parameters())
    assert torch.count_nonzero(layer.lora_A.grad) > 0 and torch.count_nonzero(layer.lora_B.grad) > 0


@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_state_dict_keys(kind, kwargs):
    base, layer, _ = _make(kind, kwargs)
    expected = {"base_layer.weight", "lora_A", "lora_B"} | ({"base_layer.bias"} if base.bias is not None else set())
    assert set(layer.state_dict()) == expected
    if kind == "linear":
        expected_a = (layer.rank, base.in_features)
    elif kind == "convT":
        expected_a = (base.in_channels, layer.rank, *base.weight.shape[2:])
    else:
        expected_a = (layer.rank, *base.weight.shape[1:])
    assert tuple(layer.lora_A.shape) == expected_a
    assert tuple(layer.lora_B.shape) == (
        (base.out_features, layer.rank) if kind == "linear" else (base.out_channels, layer.rank, 1, 1)
    )


# -- model code that reads the weight instead of calling the layer --


@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_reading_the_weight_gives_the_adapted_layer(kind, kwargs, assert_close):
    """spandrel's Swin2SR calls F.linear(x, qkv.weight, ...) and SPAN folds its convs' weights: ``weight`` is
    W + s B A, so such code computes what the layer computes, gradients of the adapter included."""
    base, layer, x = _make(kind, kwargs, init_lora_weights=False)
    expected_weight = _merged_ground_truth(base, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling).weight
    assert_close(layer.weight.detach(), expected_weight, "weight")
    assert layer.bias is layer.base_layer.bias

    def through_weight(inputs):  # what model code does with a layer's weight and bias
        if kind == "conv":
            return layer.base_layer._conv_forward(inputs, layer.weight, layer.bias)
        if kind == "convT":
            b = layer.base_layer
            return nn.functional.conv_transpose2d(inputs, layer.weight, layer.bias, b.stride, b.padding,
                                                  b.output_padding, b.groups, b.dilation)
        return nn.functional.linear(inputs, layer.weight, layer.bias)

    results = {}
    for name, run in (("called", layer), ("read", through_weight)):
        layer.zero_grad(set_to_none=True)
        y = run(x)
        y.backward(torch.ones_like(y))
        results[name] = (y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    for name, a, b in zip(("y", "dA", "dB"), results["read"], results["called"]):
        assert_close(a, b, name)
    assert torch.count_nonzero(results["read"][1]) > 0

    with pytest.raises((AttributeError, KeyError), match="weight"):  # read-only: the frozen one is base_layer.weight
        layer.weight = nn.Parameter(torch.zeros_like(base.weight))
    layer.merge()
    assert layer.weight is layer.base_layer.weight  # merged: the base weight already holds the adapter


# -- backends agree through the module --


@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_backends_agree_through_the_module(kind, kwargs, assert_close):
    _, layer, x = _make(kind, kwargs, init_lora_weights=False)
    results = {}
    for backend in ("reference", "torch"):
        layer.zero_grad(set_to_none=True)
        xb = x.clone().requires_grad_(True)
        with set_backend(backend):
            y = layer(xb)
        y.backward(torch.ones_like(y))
        results[backend] = (y.detach(), xb.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    for name, a, b in zip(("y", "dx", "dA", "dB"), results["torch"], results["reference"]):
        assert_close(a, b, name)


# -- transposed convs: nn.ConvTranspose2d's output_size --


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_conv_transpose_output_size(backend, assert_close):
    """forward(x, output_size) picks the output padding as nn.ConvTranspose2d does, merged or not."""
    base, layer, x = _make("convT", _CONV_T_GRID[2], init_lora_weights=False)
    truth = _merged_ground_truth(base, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)
    size = [2 * x.shape[2], 2 * x.shape[3]]  # output_padding 1 gives these; the layer's own setting is 1 too
    with set_backend(backend), torch.no_grad():
        for output_size in (size, [size[0] - 1, size[1] - 1]):
            y = layer(x, output_size=output_size)
            assert list(y.shape[2:]) == output_size
            assert_close(y, truth(x, output_size=output_size), f"output_size {output_size}")
        layer.merge()
        assert_close(layer(x, [size[0] - 1, size[1]]), truth(x, [size[0] - 1, size[1]]), "merged, output_size")


# -- PEFT, the referee --


class _Tiny(nn.Module):
    """A conv followed by a linear over channels: what PEFT and our wrappers both adapt."""

    def __init__(self, conv_kwargs: dict, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, bias=bias, **conv_kwargs)
        self.proj = nn.Linear(6, 5, bias=bias)

    def forward(self, x):
        return self.proj(self.conv(x).permute(0, 2, 3, 1))


def _peft_and_ours(conv_kwargs, *, bias=True, rank=2, alpha=3.0, use_rslora=False, seed=0):
    """PEFT's LoRA model and ours with PEFT's (non-zero) adapter weights copied in, float64."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = _Tiny(conv_kwargs, bias).double()
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["conv", "proj"], init_lora_weights=False, use_rslora=use_rslora
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    peft_conv, peft_proj = peft_model.base_model.model.conv, peft_model.base_model.model.proj

    ours = copy.deepcopy(model)
    ours.conv = LoRAConv2d(base_layer=ours.conv, rank=rank, alpha=alpha, use_rslora=use_rslora)
    ours.proj = LoRALinear(base_layer=ours.proj, rank=rank, alpha=alpha, use_rslora=use_rslora)
    with torch.no_grad():
        for mine, theirs in ((ours.conv, peft_conv), (ours.proj, peft_proj)):
            assert mine.scaling == pytest.approx(theirs.scaling["default"])
            a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
            assert a.shape == mine.lora_A.shape and b.shape == mine.lora_B.shape  # PEFT's layout is ours
            assert torch.count_nonzero(b) == b.numel()
            mine.lora_A.copy_(a)
            mine.lora_B.copy_(b)
    return model, peft_model, ours


def _forward_backward(model, adapted_layers, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))
    grads = [x.grad]
    for layer in adapted_layers:
        for p in layer:
            grads.append(p.grad)
    return y.detach(), grads


_PEFT_CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=1),
    dict(kernel_size=5, stride=2, padding=2),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)),
    dict(kernel_size=2, padding="same"),
    dict(kernel_size=3, padding="valid"),
]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "rank, alpha, use_rslora, bias", [(1, 1.0, False, True), (2, 3.0, False, False), (4, 8.0, True, True)]
)
@pytest.mark.parametrize("conv_kwargs", _PEFT_CONVS, ids=_conv_id)
def test_matches_peft(conv_kwargs, rank, alpha, use_rslora, bias, backend, assert_close):
    model, peft_model, ours = _peft_and_ours(conv_kwargs, bias=bias, rank=rank, alpha=alpha, use_rslora=use_rslora)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    theirs_conv, theirs_proj = peft_model.base_model.model.conv, peft_model.base_model.model.proj
    y_peft, g_peft = _forward_backward(
        peft_model,
        [
            (theirs_conv.lora_A["default"].weight, theirs_conv.lora_B["default"].weight),
            (theirs_proj.lora_A["default"].weight, theirs_proj.lora_B["default"].weight),
        ],
        x,
    )
    with set_backend(backend):
        y_ours, g_ours = _forward_backward(
            ours, [(ours.conv.lora_A, ours.conv.lora_B), (ours.proj.lora_A, ours.proj.lora_B)], x
        )
    with torch.no_grad():
        _assert_differs(y_peft, model(x), "PEFT adapted vs base")
    assert_close(y_ours, y_peft, "output")
    for name, mine, theirs in zip(("dx", "conv dA", "conv dB", "proj dA", "proj dB"), g_ours, g_peft):
        assert_close(mine, theirs, name)


@pytest.mark.parametrize(
    "conv_kwargs, size",
    [
        (dict(kernel_size=3, padding=1, padding_mode="reflect"), 8),
        (dict(kernel_size=3, padding=1, padding_mode="circular"), 8),
        (dict(kernel_size=3, padding=1, dilation=2, stride=3), 9),  # PEFT's lora_A output has the same size
    ],
    ids=["reflect", "circular", "dilation+stride"],
)
def test_peft_mismatch_where_we_match_nn_conv2d(conv_kwargs, size, assert_close):
    """PEFT 0.21's lora_A conv drops padding_mode and dilation, so its adapted conv is not
    conv(x, W + s B A): its own merge changes the function. Ours equals the merged nn.Conv2d."""
    model, peft_model, ours = _peft_and_ours(conv_kwargs)
    x = torch.randn(2, 4, size, size, dtype=torch.float64)
    conv = ours.conv
    truth = _merged_ground_truth(model.conv, conv.lora_A, conv.lora_B, conv.scaling)
    with torch.no_grad():
        y_truth = ours.proj(truth(x).permute(0, 2, 3, 1))  # the linear adapter is not in question
        assert_close(ours(x), y_truth, "ours vs merged nn.Conv2d")
        y_peft = peft_model(x)
        _assert_differs(y_peft, y_truth, "PEFT unmerged vs merged nn.Conv2d")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = peft_model.merge_and_unload()
        assert_close(merged(x), y_truth, "PEFT merged")


def test_peft_dilation_shape_error_where_we_match_nn_conv2d(assert_close):
    """With dilation 2 and 'keep the size' padding, PEFT's adapter output has the wrong size."""
    model, peft_model, ours = _peft_and_ours(dict(kernel_size=3, padding=2, dilation=2))
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(RuntimeError, match="size"):
        peft_model(x)
    truth = _merged_ground_truth(model.conv, ours.conv.lora_A, ours.conv.lora_B, ours.conv.scaling)
    with torch.no_grad():
        assert_close(ours(x), ours.proj(truth(x).permute(0, 2, 3, 1)), "ours vs merged nn.Conv2d")
