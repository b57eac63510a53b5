"""lora_conv_transpose2d: the merged form against the float64 two-path oracle, forward and every gradient, over
nn.ConvTranspose2d's options; the update's block structure against a loop over its definition."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from adaptsr.backend import is_available, set_backend
from adaptsr.ops import conv_transpose_delta_weight, lora_conv_transpose2d


@dataclass(frozen=True)
class Case:
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    output_padding: tuple[int, int] = (0, 0)
    groups: int = 1
    dilation: tuple[int, int] = (1, 1)
    bias: bool = True
    rank: int = 2
    size: tuple[int, int] = (5, 6)
    batch: int = 2

    @property
    def options(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "output_padding": self.output_padding,
                "groups": self.groups, "dilation": self.dilation}


CASES = {
    "plain-3x3": Case(4, 6, (3, 3), padding=(1, 1)),
    # Real-CUGAN's up-sampling: kernel 2, stride 2
    "upsample-2x2-stride2": Case(5, 5, (2, 2), stride=(2, 2), rank=3),
    "4x4-stride2-pad1": Case(3, 7, (4, 4), stride=(2, 2), padding=(1, 1), bias=False, size=(4, 3)),
    "output-padding": Case(4, 4, (3, 3), stride=(3, 2), padding=(1, 0), output_padding=(2, 1), rank=1),
    "dilated-rect": Case(3, 5, (3, 2), dilation=(2, 3), padding=(2, 1), size=(6, 4)),
    "groups-2": Case(6, 4, (3, 3), stride=(2, 2), groups=2, padding=(1, 1), output_padding=(1, 1), rank=2),
    "groups-3-odd": Case(9, 6, (2, 3), stride=(1, 2), groups=3, dilation=(2, 1), bias=False, rank=1, size=(3, 5),
                         batch=3),
}


def _tensors(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    kh, kw = case.kernel
    out_per_group = case.out_channels // case.groups

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    return {
        "x": randn(case.batch, case.in_channels, *case.size),
        "weight": randn(case.in_channels, out_per_group, kh, kw, std=0.3),
        "bias": randn(case.out_channels) if case.bias else None,
        "lora_A": randn(case.in_channels, case.rank, kh, kw, std=0.4),
        "lora_B": randn(case.out_channels, case.rank, 1, 1, std=0.4),
    }


def run(backend: str, case: Case, tensors: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The output and the gradients of sum(y * dy) for every input, the op run under ``backend`` in ``dtype``."""
    inputs = {k: v.to(dtype).requires_grad_(True) for k, v in tensors.items() if v is not None}
    with set_backend(backend):
        y = lora_conv_transpose2d(inputs["x"], inputs["weight"], inputs.get("bias"), inputs["lora_A"],
                                  inputs["lora_B"], 0.7, **case.options)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    if tensors["x"].min() >= 0:  # the magnitude run: |dy| too
        dy = dy.abs()
    names = list(inputs)
    grads = torch.autograd.grad(y, [inputs[n] for n in names], dy.to(dtype))
    return {"y": y.detach(), **{f"d{n}": g for n, g in zip(names, grads)}}


def magnitudes(case: Case, tensors: dict) -> dict[str, torch.Tensor]:
    return run("reference", case, {k: (v.abs() if v is not None else None) for k, v in tensors.items()}, torch.float64)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
# triton and cuda have no kernels of their own for this op: under them it runs the merged form too
@pytest.mark.parametrize(
    "backend",
    ["torch", "auto"] + [pytest.param(name, marks=pytest.mark.skipif(not is_available(name), reason=f"no {name}"))
                         for name in ("triton", "cuda")],
)
def test_merged_form_matches_the_two_path_oracle(check_backend_against_reference, name, dtype, backend):
    case = CASES[name]
    check_backend_against_reference(run, magnitudes, backend, case, _tensors(case), dtype)


@pytest.mark.parametrize("name", sorted(CASES))
def test_delta_weight_is_its_definition(name):
    """DeltaW[i, o] = sum_k A[i, k] B[c(i) out/g + o, k], written out as loops: the group structure included."""
    case = CASES[name]
    t = _tensors(case, seed=3)
    a, b = t["lora_A"], t["lora_B"][:, :, 0, 0]
    in_per_group, out_per_group = case.in_channels // case.groups, case.out_channels // case.groups
    expected = torch.zeros(case.in_channels, out_per_group, *case.kernel, dtype=torch.float64)
    for i in range(case.in_channels):
        group = i // in_per_group
        for o in range(out_per_group):
            for k in range(case.rank):
                expected[i, o] += a[i, k] * b[group * out_per_group + o, k]
    torch.testing.assert_close(conv_transpose_delta_weight(t["lora_A"], t["lora_B"], case.groups), expected,
                               rtol=1e-12, atol=1e-12)


def test_two_path_oracle_is_the_dense_update():
    """The oracle itself: base + s * (conv_transpose with DeltaW), in float64, on a grouped strided case."""
    case = CASES["groups-2"]
    t = _tensors(case, seed=5)
    with set_backend("reference"):
        y = lora_conv_transpose2d(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.7, **case.options)
    delta = conv_transpose_delta_weight(t["lora_A"], t["lora_B"], case.groups)
    dense = F.conv_transpose2d(t["x"], t["weight"] + 0.7 * delta, t["bias"], **case.options)
    torch.testing.assert_close(y, dense, rtol=1e-10, atol=1e-10)
    base = F.conv_transpose2d(t["x"], t["weight"], t["bias"], **case.options)
    assert (y - base).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.zeros(2, 5, 4, 4)}, r"x of shape \(2, 5, 4, 4\) has 5 channels but the weight \(4, 6, 3, 3\)"),
        ({"lora_A": torch.zeros(2, 4, 3, 3)}, r"lora_A must have shape \[4, r, 3, 3\]"),
        ({"lora_B": torch.zeros(6, 3, 1, 1)}, r"lora_B must have shape \[6, 2, 1, 1\]"),
        ({"bias": torch.zeros(4)}, r"bias must have shape \[6\]"),
    ],
)
def test_shape_errors_name_the_tensor(change, message):
    t = {**{k: (v.float() if v is not None else None) for k, v in _tensors(CASES["plain-3x3"]).items()}, **change}
    with pytest.raises(ValueError, match=message):
        lora_conv_transpose2d(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0, padding=1)
