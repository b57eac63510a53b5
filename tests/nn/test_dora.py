"""DoRA (``use_dora=True``) on LoRAConv2d / LoRAConvTranspose2d / LoRALinear: an independent float64 oracle on every
layer option and backend, PEFT as referee, merge / unmerge / to_dense and strengths, init, dropout, dead channels
and half precisions.

The oracle builds W + s B A entry by entry (loops over output channels and rank), the norms channel by channel, and
runs the base layer's own op on W + S (g (W + s B A) - W) with g = m / ||W + s B A|| (the norm detached), so it
shares no code with the package beyond torch's convolutions.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptsr.backend import _unavailable_reason, is_available, set_backend
from adaptsr.nn import LoRAConv2d, LoRAConvTranspose2d, LoRALinear

# the option grids of test_lora_modules.py: groups, every padding mode, dilation, 'same', strides, no bias
_CONV_GRID = [
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1},
    {"in_channels": 3, "out_channels": 5, "kernel_size": 1, "bias": False},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1, "groups": 2},
    {
        "in_channels": 6,
        "out_channels": 3,
        "kernel_size": 5,
        "padding": "same",
        "dilation": 2,
        "groups": 3,
        "padding_mode": "reflect",
    },
    {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 2, "dilation": 2},
    {"in_channels": 3, "out_channels": 4, "kernel_size": 2, "padding": "same", "padding_mode": "replicate"},
    {
        "in_channels": 4,
        "out_channels": 4,
        "kernel_size": (3, 5),
        "stride": 2,
        "padding": (1, 2),
        "padding_mode": "circular",
    },
    {"in_channels": 3, "out_channels": 8, "kernel_size": (1, 3), "stride": (2, 1), "padding": "valid", "bias": False},
]
# up-sampling strides, output padding, groups (two groups, and four groups of one input channel), dilation
_CONV_T_GRID = [
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1},
    {"in_channels": 5, "out_channels": 5, "kernel_size": 2, "stride": 2},
    {
        "in_channels": 6,
        "out_channels": 4,
        "kernel_size": 3,
        "stride": 2,
        "padding": 1,
        "output_padding": 1,
        "groups": 2,
        "bias": False,
    },
    {"in_channels": 3, "out_channels": 4, "kernel_size": (3, 2), "stride": (1, 2), "padding": (2, 0), "dilation": 2},
    {"in_channels": 4, "out_channels": 8, "kernel_size": 2, "stride": 2, "groups": 4},
]
_LINEAR_GRID = [{"in_features": 7, "out_features": 5}, {"in_features": 4, "out_features": 9, "bias": False}]
_WRAPPERS = {"conv": LoRAConv2d, "convT": LoRAConvTranspose2d, "linear": LoRALinear}
_BASES = {"conv": nn.Conv2d, "convT": nn.ConvTranspose2d, "linear": nn.Linear}
_STRENGTHS = [1.0, 0.4, 0.0, 1.7]


def _conv_id(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("in_channels", "out_channels"))


_ALL_LAYERS = (
    [("conv", kw) for kw in _CONV_GRID]
    + [("convT", kw) for kw in _CONV_T_GRID]
    + [("linear", kw) for kw in _LINEAR_GRID]
)
_ALL_IDS = (
    [f"conv[{_conv_id(kw)}]" for kw in _CONV_GRID]
    + [f"convT[{_conv_id(kw)}]" for kw in _CONV_T_GRID]
    + [f"linear[{_conv_id(kw)}]" for kw in _LINEAR_GRID]
)
_FIRST_CONV_T = len(_CONV_GRID)
_CONV_T_GROUPED = _FIRST_CONV_T + 2


def _max_rank(kind: str, base: nn.Module) -> int:
    if kind == "conv":
        return min(base.out_channels, base.weight[0].numel())
    if kind == "convT":  # weight [in, out/g, kh, kw]
        return min(base.weight.shape[1], base.weight.shape[0] // base.groups * base.weight[0, 0].numel())
    return min(base.in_features, base.out_features)


def _make(kind, kwargs, dtype=torch.float64, *, rank=2, seed=0, perturb=True, **lora_kwargs):
    """(base layer, a DoRA wrapper around a deep copy of it (B non-zero, magnitude times random factors in
    [0.5, 1.5] unless ``perturb`` is False), a matching random input)."""
    torch.manual_seed(seed)
    base = _BASES[kind](**kwargs, dtype=dtype)
    if kind == "conv":
        x = torch.randn(2, base.in_channels, 9, 8, dtype=dtype)
    elif kind == "convT":
        x = torch.randn(2, base.in_channels, 5, 6, dtype=dtype)
    else:
        x = torch.randn(2, 3, base.in_features, dtype=dtype)
    lora_kwargs.setdefault("init_lora_weights", False)
    layer = _WRAPPERS[kind](
        base_layer=copy.deepcopy(base), rank=min(rank, _max_rank(kind, base)), use_dora=True, **lora_kwargs
    )
    if perturb:
        with torch.no_grad():
            magnitude = layer.lora_magnitude_vector
            magnitude.mul_(torch.rand(magnitude.shape, dtype=torch.float64).to(dtype) + 0.5)
    return base, layer, x


def _scaling(layer) -> float:
    return layer.alpha / (math.sqrt(layer.rank) if layer.use_rslora else layer.rank)


# -- the oracle --


def _dense_update(kind: str, lora_A, lora_B, groups: int) -> torch.Tensor:
    """B A in the base weight's layout, written out entry by entry.

    conv: W [out, in/g, kh, kw], A [r, in/g, kh, kw], B [out, r, 1, 1]: output channel o takes sum_k B[o, k] A[k]
    over the inputs of its own group (the weight's layout holds the group structure).
    convT: W [in, out/g, kh, kw], A [in, r, kh, kw]: input channel i (group c = i // (in/g)) reaches output
    o = c out/g + j through sum_k A[i, k] B[o, k].
    linear: W [out, in], A [r, in], B [out, r].
    """
    if kind == "linear":
        rank = lora_A.shape[0]
        return torch.stack([sum(lora_B[o, k] * lora_A[k] for k in range(rank)) for o in range(lora_B.shape[0])])
    if kind == "conv":
        rank = lora_A.shape[0]
        return torch.stack([sum(lora_B[o, k, 0, 0] * lora_A[k] for k in range(rank)) for o in range(lora_B.shape[0])])
    in_channels, rank = lora_A.shape[:2]
    in_per_group, out_per_group = in_channels // groups, lora_B.shape[0] // groups
    rows = []
    for i in range(in_channels):
        first_output = (i // in_per_group) * out_per_group
        rows.append(
            torch.stack(
                [
                    sum(lora_A[i, k] * lora_B[first_output + j, k, 0, 0] for k in range(rank))
                    for j in range(out_per_group)
                ]
            )
        )
    return torch.stack(rows)


def _output_channels(kind: str, weight: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """The weights feeding each output channel, in output-channel order."""
    if kind != "convT":
        return [weight[o] for o in range(weight.shape[0])]
    in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
    return [weight[c * in_per_group : (c + 1) * in_per_group, j] for c in range(groups) for j in range(out_per_group)]


def _channel_norms(kind: str, weight: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.stack([w.pow(2).sum().sqrt() for w in _output_channels(kind, weight, groups)])


def _scale_channels(kind: str, weight: torch.Tensor, factors: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight with every weight feeding output channel o multiplied by factors[o]."""
    if kind != "convT":
        return torch.stack([factors[o] * weight[o] for o in range(weight.shape[0])])
    in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
    return torch.stack(
        [
            torch.stack([factors[(i // in_per_group) * out_per_group + j] * weight[i, j] for j in range(out_per_group)])
            for i in range(weight.shape[0])
        ]
    )


def _apply(kind: str, base: nn.Module, x, weight, bias):
    """The base layer's op with its own options on ``weight`` and ``bias``."""
    if kind == "linear":
        return F.linear(x, weight, bias)
    if kind == "convT":
        return F.conv_transpose2d(
            x, weight, bias, base.stride, base.padding, base.output_padding, base.groups, base.dilation
        )
    if base.padding_mode == "zeros":
        return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation, base.groups)
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return torch.func.functional_call(base, params, (x,))


def _oracle_weight(kind, base, weight, lora_A, lora_B, magnitude, scaling, strength, *, absolute=False):
    """W + S (g (W + s B A) - W), g = m / ||W + s B A|| detached (0 where the norm is 0).

    ``absolute``: the weight of the tolerance rule's magnitude run: g from the signed values, every other term by
    its absolute value, |S| g (|W| + |s| |B| |A|) + |1 - S| |W|.
    """
    groups = getattr(base, "groups", 1)
    signed = weight + scaling * _dense_update(kind, lora_A, lora_B, groups)
    norms = _channel_norms(kind, signed, groups).detach()
    m = magnitude.reshape(-1)
    factors = torch.where(norms > 0, m / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(m))
    if absolute:
        adapted = weight.abs() + abs(scaling) * _dense_update(kind, lora_A.abs(), lora_B.abs(), groups)
        return abs(strength) * _scale_channels(kind, adapted, factors.abs(), groups) + abs(1 - strength) * weight.abs()
    return weight + strength * (_scale_channels(kind, signed, factors, groups) - weight)


_PARAMS = ("lora_A", "lora_B", "lora_magnitude_vector")


def _tensors(layer, x) -> dict[str, torch.Tensor | None]:
    base = layer.base_layer
    out = {"x": x, "weight": base.weight, "bias": base.bias}
    out.update({name: getattr(layer, name) for name in _PARAMS})
    return {k: (v.detach().clone() if v is not None else None) for k, v in out.items()}


def _oracle(kind, base, t, dy, scaling, strength=1.0, *, dtype=torch.float64, absolute=False, weight_grad=False):
    """{"y", "dx", "lora_A", "lora_B", "lora_magnitude_vector"}: the oracle's output and the gradients of
    sum(y dy), in ``dtype`` (float64 for the oracle itself, the layer's dtype for plain torch); with
    ``weight_grad`` the base weight's gradient too, as "weight"."""
    t = {k: (v.to(dtype) if v is not None else None) for k, v in t.items()}
    if absolute:  # W, A, B and m stay signed: the oracle's weight takes their absolute values itself
        t = {k: (v.abs() if v is not None and k in ("x", "bias") else v) for k, v in t.items()}
    leaves = {k: t[k].requires_grad_(True) for k in ("x", *_PARAMS, *(("weight",) if weight_grad else ()))}
    weight = _oracle_weight(
        kind,
        base,
        t["weight"],
        t["lora_A"],
        t["lora_B"],
        t["lora_magnitude_vector"],
        scaling,
        strength,
        absolute=absolute,
    )
    base = copy.deepcopy(base).to(dtype)
    y = _apply(kind, base, leaves["x"], weight, t["bias"])
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(dtype), allow_unused=True)
    out = {"y": y.detach(), "dx": grads[0]}
    names = list(leaves)[1:]
    out.update({name: (g if g is not None else torch.zeros_like(leaves[name])) for name, g in zip(names, grads[1:])})
    return out


def _run_layer(layer, x, dy, *args) -> dict[str, torch.Tensor]:
    """The layer's output and the gradients of sum(y dy) for x and the adapter's parameters (and for the base
    weight, as "weight", where it requires grad)."""
    x = x.detach().clone().requires_grad_(True)
    params = {name: getattr(layer, name) for name in _PARAMS}
    if layer.base_layer.weight.requires_grad:
        params["weight"] = layer.base_layer.weight
    y = layer(x, *args)
    grads = torch.autograd.grad(y, [x, *params.values()], dy.to(y.dtype))
    return {"y": y.detach(), "dx": grads[0], **dict(zip(params, grads[1:]))}


def _dy_for(layer, x, seed=1) -> torch.Tensor:
    with torch.no_grad():
        shape = layer(x).shape
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _assert_differs(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    gap = (a - b).abs().max().item()
    assert gap > 1e-2 * max(1.0, b.abs().max().item()), f"{what}: should differ, max gap {gap:.2e}"


def _assert_all_close(got: dict, expected: dict, assert_close, what: str = "") -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        assert_close(got[key], value.to(got[key].dtype), f"{what}{key}")


# -- 1. the layer against the float64 oracle, every option --


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("strength", [1.0, 0.4])
@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_matches_float64_oracle(kind, kwargs, strength, backend, assert_close):
    base, layer, x = _make(kind, kwargs)
    layer.strength = strength
    dy = _dy_for(layer, x)
    with set_backend(backend):
        got = _run_layer(layer, x, dy)
    expected = _oracle(kind, base, _tensors(layer, x), dy, layer.scaling, strength)
    _assert_all_close(got, expected, assert_close)
    # every term matters: the magnitude is not the norms, the adapter is not the base
    with torch.no_grad():
        _assert_differs(got["y"], base(x), "DoRA vs base")
    assert torch.count_nonzero(got["lora_magnitude_vector"]) == got["lora_magnitude_vector"].numel()
    assert torch.count_nonzero(got["lora_B"]) > 0 and torch.count_nonzero(got["lora_A"]) > 0


@pytest.mark.parametrize(
    "lora_kwargs", [{"rank": 4, "alpha": 6.0, "use_rslora": True}, {"rank": 3, "alpha": 7.5}], ids=["rslora", "alpha"]
)
@pytest.mark.parametrize(
    "kind, kwargs",
    [_ALL_LAYERS[0], _ALL_LAYERS[_CONV_T_GROUPED], _ALL_LAYERS[-2]],
    ids=[_ALL_IDS[0], _ALL_IDS[_CONV_T_GROUPED], _ALL_IDS[-2]],
)
def test_rslora_and_alpha_match_oracle(kind, kwargs, lora_kwargs, assert_close):
    base, layer, x = _make(kind, kwargs, **lora_kwargs)
    rank, alpha = layer.rank, lora_kwargs["alpha"]
    scaling = alpha / math.sqrt(rank) if lora_kwargs.get("use_rslora") else alpha / rank
    assert layer.scaling == pytest.approx(scaling) and scaling != 1.0
    dy = _dy_for(layer, x)
    got = _run_layer(layer, x, dy)
    _assert_all_close(got, _oracle(kind, base, _tensors(layer, x), dy, scaling), assert_close)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "kind, kwargs",
    [_ALL_LAYERS[i] for i in (2, 3, _CONV_T_GROUPED, -1)],
    ids=[_ALL_IDS[i] for i in (2, 3, _CONV_T_GROUPED, -1)],
)
def test_norm_is_a_constant_for_an_unfrozen_base_weight(kind, kwargs, backend, assert_close):
    """The norm ||W + s B A|| is detached from the graph: a base weight a user unfreezes gets the gradient through
    g (W + s B A) with g held constant, as the oracle has it (not through the norm)."""
    base, layer, x = _make(kind, kwargs)
    layer.strength = 0.6
    layer.base_layer.weight.requires_grad_(True)
    dy = _dy_for(layer, x)
    with set_backend(backend):
        got = _run_layer(layer, x, dy)
    expected = _oracle(kind, base, _tensors(layer, x), dy, layer.scaling, 0.6, weight_grad=True)
    _assert_all_close(got, expected, assert_close)


def test_conv_transpose_output_size(assert_close):
    """forward(x, output_size) at a strength other than 1 (the base term takes output_size too), merged or not."""
    kind, kwargs = _ALL_LAYERS[_CONV_T_GROUPED]
    base, layer, x = _make(kind, kwargs)
    layer.strength = 0.4
    size = [2 * x.shape[2] - 1, 2 * x.shape[3]]
    truth = copy.deepcopy(base)
    with torch.no_grad():
        t = _tensors(layer, x)
        truth.weight.copy_(
            _oracle_weight(
                kind, base, t["weight"], t["lora_A"], t["lora_B"], t["lora_magnitude_vector"], layer.scaling, 0.4
            )
        )
        y = layer(x, size)
        assert list(y.shape[2:]) == size
        assert_close(y, truth(x, size), "output_size")
        layer.merge()
        assert_close(layer(x, size), truth(x, size), "merged, output_size")


# -- 2. every backend, float32, against the float64 oracle with the tolerance rule --


_needs_cuda = pytest.mark.skipif(not is_available("cuda"), reason=f"cuda backend: {_unavailable_reason('cuda')}")
_needs_triton = pytest.mark.skipif(not is_available("triton"), reason=f"triton: {_unavailable_reason('triton')}")
_BACKEND_CASES = (
    [
        pytest.param(b, kind, kw, id=f"{b}-{i}")
        for b in ("reference", "torch")
        for (kind, kw), i in zip(_ALL_LAYERS, _ALL_IDS)
    ]
    # the Triton interpreter is slow: a couple of small shapes (the transposed conv has no kernels of its own)
    + [
        pytest.param("triton", *_ALL_LAYERS[i], id=f"triton-{_ALL_IDS[i]}", marks=_needs_triton)
        for i in (2, _CONV_T_GROUPED, len(_ALL_LAYERS) - 2)
    ]
    + [
        pytest.param("cuda", kind, kw, id=f"cuda-{i}", marks=_needs_cuda)
        for (kind, kw), i in zip(_ALL_LAYERS, _ALL_IDS)
    ]
)


def _counted(function, name: str, calls: list):
    def counted(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)

    return counted


@pytest.mark.parametrize("backend, kind, kwargs", _BACKEND_CASES)
def test_backend_float32_matches_float64_oracle(backend, kind, kwargs, monkeypatch, assert_close_to_reference):
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    kernel_calls = []
    if backend == "triton" and kind != "convT":  # the Triton forward and low-rank kernels, counted
        op = "lora_linear" if kind == "linear" else "lora_conv2d"
        monkeypatch.setattr(importlib.import_module(f"adaptsr.ops.{op}"), "_prefer_low_rank", lambda *a, **k: True)
        kernels = importlib.import_module(f"adaptsr.kernels.{op}")
        for entry in (f"{op}_fwd", f"{op}_lowrank_grads"):
            monkeypatch.setattr(kernels, entry, _counted(getattr(kernels, entry), entry, kernel_calls))
    base, layer64, x64 = _make(kind, kwargs, rank=3, seed=3)
    layer = copy.deepcopy(layer64).float()  # values rounded once; the oracle sees the rounded ones
    x = x64.float()
    dy = _dy_for(layer64, x64).float().double()
    t = _tensors(layer, x)
    ref64 = _oracle(kind, base, t, dy, layer.scaling)
    plain = _oracle(kind, base, t, dy, layer.scaling, dtype=torch.float32)
    magnitude = _oracle(kind, base, t, dy.abs(), layer.scaling, absolute=True)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with set_backend(backend):
            got = _run_layer(layer.to(device), x.to(device), dy.to(device))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    if kernel_calls:
        assert sorted(set(kernel_calls)) == sorted(f"{op}_{e}" for e in ("fwd", "lowrank_grads")), kernel_calls
    else:
        assert backend != "triton" or kind == "convT", "the Triton kernels did not run"
    assert got.keys() == ref64.keys()
    for name, value in got.items():
        assert value.dtype == torch.float32, f"{name}: {value.dtype}"
        assert_close_to_reference(value.cpu(), ref64[name], plain[name], f"{backend} {name}", magnitude=magnitude[name])


# -- 3. PEFT, the referee --


def _peft_pair(kind: str, bias: bool, rank: int, alpha: float, use_rslora: bool, seed: int = 0):
    """(our DoRA layer, PEFT's DoRA layer around the same base, with our A, B and (perturbed) magnitude), float64."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    if kind == "conv":
        base = nn.Conv2d(4, 6, 3, padding=1, bias=bias, dtype=torch.float64)
    else:
        base = nn.Linear(7, 5, bias=bias, dtype=torch.float64)
    ours = _WRAPPERS[kind](
        base_layer=copy.deepcopy(base),
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        use_dora=True,
        init_lora_weights=False,
    )
    with torch.no_grad():
        ours.lora_magnitude_vector.mul_(torch.rand(ours.lora_magnitude_vector.shape, dtype=torch.float64) + 0.5)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["0"], use_dora=True, use_rslora=use_rslora, init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), config)
    theirs = model.base_model.model[0]
    assert theirs.scaling["default"] == pytest.approx(ours.scaling)
    with torch.no_grad():
        for mine, their in (
            (ours.lora_A, theirs.lora_A["default"].weight),
            (ours.lora_B, theirs.lora_B["default"].weight),
            (ours.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight),
        ):
            assert mine.shape == their.shape  # PEFT's layout is ours
            their.copy_(mine)
    return base, ours, model, theirs


_PEFT_CASES = [
    ("linear", True, 2, 3.0, False),
    ("linear", False, 4, 4.0, True),
    ("conv", True, 2, 3.0, False),
    ("conv", False, 3, 5.0, True),
    ("conv", True, 1, 1.0, False),
]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("kind, bias, rank, alpha, use_rslora", _PEFT_CASES)
def test_matches_peft(kind, bias, rank, alpha, use_rslora, backend, assert_close):
    base, ours, model, theirs = _peft_pair(kind, bias, rank, alpha, use_rslora)
    torch.manual_seed(5)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64) if kind == "conv" else torch.randn(2, 3, 7, dtype=torch.float64)
    dy = _dy_for(ours, x)
    results = {}
    for name, run, params in (
        (
            "peft",
            model,
            [
                theirs.lora_A["default"].weight,
                theirs.lora_B["default"].weight,
                theirs.lora_magnitude_vector["default"].weight,
            ],
        ),
        ("ours", ours, [getattr(ours, p) for p in _PARAMS]),
    ):
        xr = x.clone().requires_grad_(True)
        with set_backend(backend):
            y = run(xr)
        results[name] = [y.detach(), *torch.autograd.grad(y, [xr, *params], dy)]
    with torch.no_grad():
        _assert_differs(results["peft"][0], base(x), "PEFT DoRA vs base")
    for name, mine, their in zip(("y", "dx", "dA", "dB", "dm"), results["ours"], results["peft"]):
        assert torch.count_nonzero(their) > 0, name
        assert_close(mine, their, name)


@pytest.mark.parametrize("kind, bias, rank, alpha, use_rslora", _PEFT_CASES)
def test_magnitude_init_matches_peft(kind, bias, rank, alpha, use_rslora, assert_close):
    """PEFT's initial magnitude for our A and B is ours: ||W + s B A||, not ||W||."""
    base, ours, _model, theirs = _peft_pair(kind, bias, rank, alpha, use_rslora)
    with torch.no_grad():
        ours.reset_lora_parameters(False)  # fresh A, B and the magnitude init, unperturbed
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    dora = theirs.lora_magnitude_vector["default"]
    dora.update_layer(
        base_layer=theirs.get_base_layer(),
        lora_A=theirs.lora_A["default"].weight,
        lora_B=theirs.lora_B["default"].weight,
        scaling=theirs.scaling["default"],
    )
    assert dora.weight.shape == ours.lora_magnitude_vector.shape
    assert_close(ours.lora_magnitude_vector.detach(), dora.weight.detach(), "magnitude")
    _assert_differs(
        ours.lora_magnitude_vector.detach(),
        _channel_norms(kind, base.weight, 1).view(dora.weight.shape),
        "magnitude vs ||W||",
    )


# -- 4. merge, unmerge, to_dense, strength --


@pytest.mark.parametrize("strength", _STRENGTHS)
@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_merge_round_trip(kind, kwargs, strength, assert_close):
    """unmerged == merged == to_dense() == the oracle's weight; unmerge restores the base weight to 1e-12."""
    base, layer, x = _make(kind, kwargs)
    layer.strength = strength
    weight_before = layer.base_layer.weight.detach().clone()
    t = _tensors(layer, x)
    with torch.no_grad():
        expected_weight = _oracle_weight(
            kind, base, t["weight"], t["lora_A"], t["lora_B"], t["lora_magnitude_vector"], layer.scaling, strength
        )
        y_unmerged = layer(x)
        if strength == 0.0:
            assert_close(y_unmerged, base(x), "strength 0 is the base layer")
        else:
            _assert_differs(y_unmerged, base(x), "adapted vs base")
        assert_close(layer.weight, expected_weight, "weight property")
        assert_close(layer.get_delta_weight(), expected_weight - weight_before, "get_delta_weight")

        layer.merge()
        assert layer.merged
        assert_close(layer.base_layer.weight, expected_weight, "merged weight")
        assert_close(layer(x), y_unmerged, "merged forward")
        assert_close(layer.to_dense()(x), y_unmerged, "to_dense() of a merged layer")
        layer.merge()  # a no-op
        assert_close(layer.base_layer.weight, expected_weight, "merged twice")

        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, weight_before, rtol=0, atol=1e-12)
        assert_close(layer(x), y_unmerged, "unmerged again")
        layer.unmerge()  # a no-op
        torch.testing.assert_close(layer.base_layer.weight, weight_before, rtol=0, atol=1e-12)

        weight_unmerged = layer.base_layer.weight.clone()
        dense = layer.to_dense()
        assert type(dense) is type(base) and dense.state_dict().keys() == base.state_dict().keys()
        assert dense.weight.data_ptr() != layer.base_layer.weight.data_ptr()
        assert_close(dense(x), y_unmerged, "to_dense()")
        assert_close(dense.weight, expected_weight, "to_dense() weight")
    torch.testing.assert_close(layer.base_layer.weight, weight_unmerged, rtol=0, atol=0)  # to_dense left it alone


@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_merged_weight_is_linear_in_strength(kind, kwargs, assert_close):
    base, layer, _x = _make(kind, kwargs)
    dense = {}
    for strength in _STRENGTHS:
        layer.strength = strength
        dense[strength] = layer.to_dense().weight.detach()
    w0, w1 = base.weight.detach(), dense[1.0]
    _assert_differs(w1, w0, "W(1) vs W")
    for strength in _STRENGTHS:
        assert_close(dense[strength], w0 + strength * (w1 - w0), f"W({strength})")


@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_reading_the_weight_gives_the_adapted_layer(kind, kwargs, assert_close):
    """Model code that applies ``layer.weight`` itself computes the layer, gradients of A, B and m included."""
    _base, layer, x = _make(kind, kwargs)
    layer.strength = 0.7
    dy = _dy_for(layer, x)

    def through_weight(inputs):
        return _apply(kind, layer.base_layer, inputs, layer.weight, layer.bias)

    called = _run_layer(layer, x, dy)
    xr = x.clone().requires_grad_(True)
    y = through_weight(xr)
    read = dict(
        zip(
            ("y", "dx", *_PARAMS),
            [y.detach(), *torch.autograd.grad(y, [xr, *(getattr(layer, p) for p in _PARAMS)], dy)],
        )
    )
    _assert_all_close(read, called, assert_close)


# -- 5. init and dropout --


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_default_init_starts_as_the_base_layer(kind, kwargs, init, assert_close):
    base, layer, x = _make(kind, kwargs, init_lora_weights=init, perturb=False)
    assert torch.count_nonzero(layer.lora_B) == 0
    groups = getattr(base, "groups", 1)
    norms = _channel_norms(kind, base.weight.detach(), groups)
    assert layer.lora_magnitude_vector.shape == ((base.out_features,) if kind == "linear" else (1, norms.numel(), 1, 1))
    assert_close(layer.lora_magnitude_vector.detach().reshape(-1), norms, "magnitude = ||W||")
    with torch.no_grad():
        assert_close(layer(x), base(x), "output at init")
    # training can start: B and the magnitude get gradients
    layer(x).square().sum().backward()
    assert torch.count_nonzero(layer.lora_B.grad) > 0 and torch.count_nonzero(layer.lora_magnitude_vector.grad) > 0


@pytest.mark.parametrize("kind, kwargs", _ALL_LAYERS, ids=_ALL_IDS)
def test_fresh_dora_layer_starts_as_the_lora_layer(kind, kwargs, assert_close):
    """With a non-zero B (init False), m = ||W + s B A||: the DoRA layer computes the LoRA layer's function."""
    base, layer, x = _make(kind, kwargs, perturb=False)
    lora = _WRAPPERS[kind](base_layer=copy.deepcopy(base), rank=layer.rank, init_lora_weights=False)
    with torch.no_grad():
        lora.lora_A.copy_(layer.lora_A)
        lora.lora_B.copy_(layer.lora_B)
        groups = getattr(base, "groups", 1)
        t = _tensors(layer, x)
        norms = _channel_norms(
            kind, t["weight"] + layer.scaling * _dense_update(kind, t["lora_A"], t["lora_B"], groups), groups
        )
        assert_close(layer.lora_magnitude_vector.reshape(-1), norms, "magnitude = ||W + s B A||")
        _assert_differs(norms, _channel_norms(kind, t["weight"], groups), "||W + s B A|| vs ||W||")
        assert_close(layer(x), lora(x), "DoRA at init vs LoRA")


@pytest.mark.parametrize(
    "kind, kwargs",
    [_ALL_LAYERS[i] for i in (0, 3, _CONV_T_GROUPED, -1)],
    ids=[_ALL_IDS[i] for i in (0, 3, _CONV_T_GROUPED, -1)],
)
def test_dropout_trains_the_magnitude_and_is_off_in_eval(kind, kwargs, assert_close):
    _base, layer, x = _make(kind, kwargs, lora_dropout=0.5)
    plain = copy.deepcopy(layer)
    plain.lora_dropout = 0.0
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    with torch.no_grad():
        _assert_differs(y, plain(x), "dropout vs no dropout")
    y.square().sum().backward()
    for name in _PARAMS:
        grad = getattr(layer, name).grad
        assert grad is not None and torch.isfinite(grad).all() and torch.count_nonzero(grad) > 0, name
    # dropout acts on the adapter's input only: with x dropped for the adapter, W's term still sees all of x
    with torch.no_grad():
        zero_b = copy.deepcopy(layer)
        zero_b.lora_B.zero_()
        zero_b_plain = copy.deepcopy(plain)
        zero_b_plain.lora_B.zero_()
        assert_close(zero_b(x), zero_b_plain(x), "dropout with B = 0")
    layer.eval()
    with torch.no_grad():
        assert_close(layer(x), plain(x), "eval mode equals no dropout")


# -- 6. a dead output channel --


def _kill_channel(kind: str, layer, channel: int) -> None:
    """Zero the base weights feeding ``channel``, B's row of it, and its magnitude (its ||W + s B A|| is 0)."""
    base = layer.base_layer
    with torch.no_grad():
        if kind == "convT":
            in_per_group, out_per_group = base.weight.shape[0] // base.groups, base.weight.shape[1]
            group, j = divmod(channel, out_per_group)
            base.weight[group * in_per_group : (group + 1) * in_per_group, j] = 0
        else:
            base.weight[channel] = 0
        layer.lora_B[channel] = 0
        layer.lora_magnitude_vector.view(-1)[channel] = 0


@pytest.mark.parametrize("strength", [1.0, 0.4])
@pytest.mark.parametrize(
    "kind, kwargs",
    [_ALL_LAYERS[i] for i in (0, 2, _FIRST_CONV_T, _CONV_T_GROUPED, -2)],
    ids=[_ALL_IDS[i] for i in (0, 2, _FIRST_CONV_T, _CONV_T_GROUPED, -2)],
)
def test_dead_channel_gives_zeros_not_nan(kind, kwargs, strength, assert_close):
    base, layer, x = _make(kind, kwargs)
    channel = 1
    _kill_channel(kind, layer, channel)
    with torch.no_grad():
        base.weight.copy_(layer.base_layer.weight)
        if base.bias is not None:
            base.bias.zero_()
            layer.base_layer.bias.zero_()
    layer.strength = strength
    dy = _dy_for(layer, x)
    for backend in ("reference", "torch"):
        with set_backend(backend):
            got = _run_layer(layer, x, dy)
        for name, value in got.items():
            assert torch.isfinite(value).all(), f"{backend} {name}: NaN/inf"
        out = got["y"].movedim(-1 if kind == "linear" else 1, 0)[channel]
        assert torch.count_nonzero(out) == 0, f"{backend}: the dead channel's output is not zero"
        assert torch.count_nonzero(got["lora_magnitude_vector"].reshape(-1)[channel]) == 0
        assert torch.count_nonzero(got["lora_B"][channel]) == 0
        # the other channels as the oracle has them
        _assert_all_close(
            got, _oracle(kind, base, _tensors(layer, x), dy, layer.scaling, strength), assert_close, f"{backend} "
        )
    # a fresh layer on a dead base channel (init True: B = 0, m = ||W|| = 0)
    fresh = _WRAPPERS[kind](base_layer=copy.deepcopy(layer.base_layer), rank=layer.rank, use_dora=True)
    assert fresh.lora_magnitude_vector.reshape(-1)[channel] == 0
    got = _run_layer(fresh, x, dy)
    assert all(torch.isfinite(v).all() for v in got.values())
    with torch.no_grad():
        assert_close(got["y"], base(x), "fresh layer on a dead channel")
        merged = fresh.to_dense().weight
    assert torch.isfinite(merged).all()


@pytest.mark.parametrize("strength", [1.0, 0.4])
@pytest.mark.parametrize(
    "kind, kwargs",
    [_ALL_LAYERS[0], _ALL_LAYERS[_CONV_T_GROUPED], _ALL_LAYERS[-2]],
    ids=[_ALL_IDS[0], _ALL_IDS[_CONV_T_GROUPED], _ALL_IDS[-2]],
)
def test_dead_channel_merge_round_trip(kind, kwargs, strength, assert_close):
    """merge then unmerge restores the base weight, its zero channel included: at strength 1 the merged row is
    zero, so W cannot be solved back from it (the layer keeps W while merged)."""
    _, layer, x = _make(kind, kwargs)
    _kill_channel(kind, layer, 1)
    layer.strength = strength
    weight_before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert_close(layer(x), y, "merged")
        layer.unmerge()
    assert torch.isfinite(layer.base_layer.weight).all(), "unmerge left NaN/inf in the base weight"
    torch.testing.assert_close(layer.base_layer.weight, weight_before, rtol=0, atol=1e-12)


# -- 7. half precisions --


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "kind, kwargs",
    [_ALL_LAYERS[i] for i in (0, 3, _CONV_T_GROUPED, -1)],
    ids=[_ALL_IDS[i] for i in (0, 3, _CONV_T_GROUPED, -1)],
)
def test_half_precision_layers(kind, kwargs, dtype):
    """bfloat16 / float16 layers (torch backend, CPU) within a few units of the dtype's roundoff of the float64
    oracle on the same (rounded) values, relative to the largest magnitude of each result."""
    base, layer64, x64 = _make(kind, kwargs, seed=4)
    layer, x = copy.deepcopy(layer64).to(dtype), x64.to(dtype)
    dy = _dy_for(layer64, x64).to(dtype).double()
    t = _tensors(layer, x)
    ref64 = _oracle(kind, base, t, dy, layer.scaling)
    magnitude = _oracle(kind, base, t, dy.abs(), layer.scaling, absolute=True)
    with set_backend("torch"):
        got = _run_layer(layer, x, dy)
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    for name, value in got.items():
        assert value.dtype == dtype, name
        assert torch.isfinite(value).all(), f"{name}: NaN/inf"
        err = (value.double() - ref64[name]).abs().max().item()
        scale = max(magnitude[name].abs().max().item(), ref64[name].abs().max().item())
        assert err <= 8 * unit * scale, f"{name} ({dtype}): error {err:.3e} > {8 * unit:.1e} x {scale:.3e}"
