"""shifted_window_attention: every backend against the float64 eager oracle, and the op inside a
spandrel SwinIR block against the block itself.

Outputs and the gradients of qkv and the bias table, with the tolerance rule of tests/conftest.py:
a backend in dtype d is compared with ``shifted_window_attention_ref`` (roll, window_partition,
window attention, window_reverse, roll back) in float64 and with the reference in d ("plain
torch"). Triton runs through TRITON_INTERPRET=1 without a GPU (set in tests/conftest.py), so the
CPU cases are a few windows of 4 x 4 or 8 x 8 tokens and 1-2 heads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from spandrel.architectures.SwinIR.__arch.SwinIR import SwinTransformerBlock, window_partition, window_reverse

from adaptsr.backend import is_available, set_backend
from adaptsr.ops.shifted_window_attention import shifted_window_attention

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
_FUSED = ("triton", "cuda")


@dataclass(frozen=True)
class Case:
    batch: int
    height: int
    width: int
    heads: int
    head_dim: int
    window: int
    shift: int
    masked: bool = True  # pass spandrel's shift mask (always, when shifted)
    table_grad: bool = True
    seed: int = 0

    @property
    def n(self) -> int:
        return self.window * self.window

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    @property
    def id(self) -> str:
        shift = f"shift{self.shift}" if self.shift else ("unshifted-masked" if self.masked else "unshifted")
        frozen = "" if self.table_grad else "-frozen_table"
        return (f"B{self.batch}-{self.height}x{self.width}-w{self.window}-{shift}-h{self.heads}-d{self.head_dim}"
                f"{frozen}")


CASES = [
    Case(3, 8, 16, 2, 6, 4, 2),  # odd batch, non-square map, window 4, half-window shift
    Case(1, 16, 16, 1, 10, 8, 4, seed=1),  # window 8 (SwinIR's), shifted
    Case(2, 8, 8, 2, 6, 8, 0, masked=False, seed=2),  # window 8 unshifted: the whole map is one window
    Case(1, 8, 12, 1, 5, 4, 0, masked=False, table_grad=False, seed=3),  # unshifted, frozen table, d = 5
    Case(1, 12, 8, 2, 3, 4, 1, seed=4),  # shift 1 (not half a window), odd window rows
    Case(1, 32, 32, 1, 4, 16, 8, seed=8),  # window 16 (HAT's): the tiled kernels
]
GPU_CASES = [
    Case(4, 64, 64, 6, 30, 8, 4, seed=5),  # SwinIR-M block
    Case(3, 32, 48, 6, 30, 16, 8, seed=6),  # HAT-like window 16 (the tiled kernels)
    Case(2, 32, 32, 4, 16, 16, 0, masked=False, seed=7),
]
ALL_CASES = CASES + (GPU_CASES if ON_GPU else [])
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _marks(backend: str, dtype: torch.dtype) -> list:
    marks = []
    if backend in _FUSED:
        marks.append(pytest.mark.skipif(not is_available(backend), reason=f"{backend} backend unavailable"))
    if backend == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        marks.append(pytest.mark.skip(reason="bf16 Triton dots are wrong in the interpreter: GPU only"))
    return marks


def _matrix() -> list:
    """(backend, case, dtype name): the reference in float64 only, the fused backends without float64."""
    params = []
    for backend in ("reference", "torch", "triton", "cuda"):
        for dtype_name, dtype in DTYPES.items():
            if (backend == "reference" and dtype != torch.float64) or (backend in _FUSED and dtype == torch.float64):
                continue
            for case in ALL_CASES:
                marks = _marks(backend, dtype)
                if backend == "triton" and case.window == 16 and dtype != torch.float32 and not ON_GPU:
                    marks.append(pytest.mark.skip(reason="9 s in the interpreter: the tiled path in float32 suffices"))
                params.append(pytest.param(backend, case, dtype_name, id=f"{backend}-{case.id}-{dtype_name}",
                                           marks=marks))
    return params


# -- inputs and the oracle --


def _block(case: Case) -> SwinTransformerBlock:
    """spandrel's block for the case: its relative position index and shift mask are the op's inputs."""
    with torch.random.fork_rng(devices=[]):
        return SwinTransformerBlock(case.channels, (case.height, case.width), case.heads, window_size=case.window,
                                    shift_size=case.shift)


def make_tensors(case: Case, dtype: torch.dtype) -> dict:
    """Fresh random inputs, drawn in float64 and rounded once to ``dtype`` (held in float64)."""
    gen = torch.Generator().manual_seed(case.seed)
    qkv = torch.randn(case.batch, case.height, case.width, 3 * case.channels, generator=gen, dtype=torch.float64)
    dout = torch.randn(case.batch, case.height, case.width, case.channels, generator=gen, dtype=torch.float64)
    table = torch.randn((2 * case.window - 1) ** 2, case.heads, generator=gen, dtype=torch.float64)
    out = {key: t.to(dtype).double() for key, t in (("qkv", qkv), ("dout", dout), ("table", table))}
    block = _block(case)
    assert block.window_size == case.window and block.shift_size == case.shift
    out["index"] = block.attn.relative_position_index
    if case.shift:
        out["mask"] = block.attn_mask.double()
    elif case.masked:
        region = torch.randint(0, 2, ((case.height // case.window) * (case.width // case.window), case.n),
                               generator=gen)
        out["mask"] = torch.where(region[:, :, None] == region[:, None, :], 0.0, -100.0).double()
    else:
        out["mask"] = None
    return out


def run(backend: str, case: Case, tensors: dict, dtype: torch.dtype, *, mask_dtype=None) -> dict:
    """Output and every gradient under ``backend`` (detached, on DEVICE), keyed out, dqkv, dtable."""
    qkv = tensors["qkv"].to(DEVICE, dtype, copy=True).requires_grad_(True)
    table = tensors["table"].to(DEVICE, dtype, copy=True).requires_grad_(case.table_grad)
    mask = tensors["mask"]
    mask = None if mask is None else mask.to(DEVICE, mask_dtype or dtype)
    with set_backend(backend):
        out = shifted_window_attention(qkv, table, tensors["index"].to(DEVICE), mask, case.head_dim**-0.5,
                                       case.window, case.shift, case.heads)
    wrt = {"dqkv": qkv, **({"dtable": table} if case.table_grad else {})}
    grads = torch.autograd.grad(out, list(wrt.values()), tensors["dout"].to(DEVICE, out.dtype))
    return {"out": out.detach(), **{key: g.detach() for key, g in zip(wrt, grads)}}


def _to_windows(x: torch.Tensor, case: Case) -> torch.Tensor:
    """[B, H, W, C] -> [B nW, N, C] the eager way (spandrel's roll and window_partition)."""
    if case.shift:
        x = torch.roll(x, (-case.shift, -case.shift), (1, 2))
    return window_partition(x, case.window).reshape(-1, case.n, x.shape[-1])


def _to_map(windows: torch.Tensor, case: Case) -> torch.Tensor:
    x = window_reverse(windows.reshape(-1, case.window, case.window, windows.shape[-1]), case.window, case.height,
                       case.width)
    return torch.roll(x, (case.shift, case.shift), (1, 2)) if case.shift else x


def magnitudes(case: Case, t: dict) -> dict:
    """The tolerance rule's magnitude, window by window: the sum of the absolute values of the
    terms behind each result (as tests/ops/test_window_attention.py's ``magnitudes``), mapped back
    onto the map. With ``A = |do| |v|^T``: o: P|v|, dv: P^T|do|, dS+ = P (A + rowsum(P A)),
    dq: scale dS+ |k|, dk: scale dS+^T |q|, dtable: dS+ summed over windows and scattered."""
    heads, d, n = case.heads, case.head_dim, case.n
    windows = _to_windows(t["qkv"], case).view(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = windows.unbind(0)
    do = _to_windows(t["dout"], case).view(-1, n, heads, d).transpose(1, 2)
    scale = d**-0.5
    index = t["index"].reshape(-1)
    bias = t["table"][index].view(n, n, heads).permute(2, 0, 1)
    logits = scale * q @ k.transpose(-2, -1) + bias
    if t["mask"] is not None:
        logits = logits + t["mask"].repeat(case.batch, 1, 1).unsqueeze(1)
    p = torch.softmax(logits, dim=-1)
    a = do.abs() @ v.abs().transpose(-2, -1)
    ds_plus = p * (a + (p * a).sum(-1, keepdim=True))
    grads = torch.stack((scale * ds_plus @ k.abs(), scale * ds_plus.transpose(-2, -1) @ q.abs(),
                         p.transpose(-2, -1) @ do.abs()), 2)  # [B_, heads, 3, N, d]

    def merged(x):  # [B_, heads, ..., N, d] -> map
        return _to_map(x.movedim(-2, 1).reshape(x.shape[0], n, -1), case)

    out = {
        "out": merged(p @ v.abs()),
        "dqkv": merged(grads.permute(0, 2, 1, 3, 4)),
        "dtable": torch.zeros_like(t["table"]).index_add_(0, index, ds_plus.sum(0).permute(1, 2, 0).reshape(-1, heads)),
    }
    return {key: value.to(DEVICE) for key, value in out.items()}


# -- every backend against the float64 oracle --


@pytest.mark.parametrize("backend, case, dtype_name", _matrix())
def test_backend_matches_float64_reference(
    backend, case, dtype_name, poisoned_window_attention, check_backend_against_reference
):
    dtype = DTYPES[dtype_name]
    check_backend_against_reference(run, magnitudes, backend, case, make_tensors(case, dtype), dtype)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=_marks("triton", torch.float16))])
def test_float32_mask_with_half_activations(backend, check_backend_against_reference):
    """SwinIR keeps its shift mask as a float32 buffer whatever the activations' dtype."""
    case = CASES[0]
    tensors = make_tensors(case, torch.float16)
    check_backend_against_reference(run, magnitudes, backend, case, tensors, torch.float16, mask_dtype=torch.float32)


# -- a whole spandrel block through the op --


def _block_through_op(block: SwinTransformerBlock, x: torch.Tensor, x_size) -> torch.Tensor:
    """spandrel's SwinTransformerBlock.forward with the roll / partition / reverse / roll back and
    the attention core replaced by one shifted_window_attention call."""
    height, width = x_size
    batch, _, channels = x.shape
    attn = block.attn
    qkv = attn.qkv(block.norm1(x).view(batch, height, width, channels))
    out = shifted_window_attention(qkv, attn.relative_position_bias_table, attn.relative_position_index,
                                   block.attn_mask, attn.scale, block.window_size, block.shift_size, attn.num_heads)
    x = x + attn.proj(out).view(batch, height * width, channels)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("shift", [0, 2], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=_marks("triton", torch.float32))])
def test_spandrel_block_through_the_op(backend, shift, assert_close):
    """Output and every parameter's and the input's gradient of a tiny SwinIR block."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(0)
    block = SwinTransformerBlock(12, (8, 12), 2, window_size=4, shift_size=shift).to(DEVICE, dtype)
    with torch.no_grad():  # spandrel initialises the table near zero: make the bias matter
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(3, 8 * 12, 12, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 8 * 12, 12, device=DEVICE, dtype=dtype)
    params = [x, *block.parameters()]
    expected = block(x, (8, 12))
    expected_grads = torch.autograd.grad(expected, params, grad)
    with set_backend(backend):
        got = _block_through_op(block, x, (8, 12))
    got_grads = torch.autograd.grad(got, params, grad)
    assert_close(got, expected, "block output")
    names = ["x"] + [name for name, _ in block.named_parameters()]
    for name, a, b in zip(names, got_grads, expected_grads):
        assert_close(a, b, f"d{name}")


# -- what runs where; determinism; the mask is a constant --


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


@pytest.mark.parametrize(
    "backend, function",
    [("torch", "_PermuteTokensBackward"),
     pytest.param("triton", "_FusedShiftedWindowAttentionBackward", marks=_marks("triton", torch.float32))],
)
def test_backend_runs_its_path_without_rolls(backend, function):
    case = CASES[0]
    t = make_tensors(case, torch.float32)
    qkv = t["qkv"].to(DEVICE, torch.float32).requires_grad_()
    with set_backend(backend):
        out = shifted_window_attention(qkv, t["table"].to(DEVICE, torch.float32), t["index"].to(DEVICE),
                                       t["mask"].to(DEVICE, torch.float32), 0.3, case.window, case.shift, case.heads)
    names = _grad_fn_names(out)
    assert function in names
    assert not any("Roll" in name for name in names), names


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=_marks("triton", torch.float32))])
def test_gradients_are_deterministic(backend):
    case = CASES[1]
    tensors = make_tensors(case, torch.float32)
    first = run(backend, case, tensors, torch.float32)
    again = run(backend, case, tensors, torch.float32)
    for key in first:
        assert torch.equal(first[key], again[key]), key


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=_marks("triton", torch.float32))])
def test_mask_is_a_constant(backend):
    case = CASES[0]
    t = make_tensors(case, torch.float32)
    mask = t["mask"].to(DEVICE, torch.float32, copy=True).requires_grad_()
    qkv = t["qkv"].to(DEVICE, torch.float32).requires_grad_()
    with set_backend(backend):
        out = shifted_window_attention(qkv, t["table"].to(DEVICE, torch.float32), t["index"].to(DEVICE), mask, 0.5,
                                       case.window, case.shift, case.heads)
    assert torch.autograd.grad(out.sum(), mask, allow_unused=True)[0] is None


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_torch_backend_under_autocast(amp_dtype, assert_close_to_reference):
    """float32 qkv and table under AMP: the op runs in autocast's dtype, the gradients come back float32."""
    case = CASES[0]
    t = make_tensors(case, amp_dtype)  # values exact in amp_dtype: autocast's casts are exact
    ref64 = run("reference", case, t, torch.float64)
    plain = run("reference", case, t, amp_dtype)
    magnitude = magnitudes(case, t)
    with torch.autocast(DEVICE.type, dtype=amp_dtype):
        got = run("torch", case, t, torch.float32)
    assert got["out"].dtype == amp_dtype and got["dqkv"].dtype == got["dtable"].dtype == torch.float32
    for key, value in got.items():
        assert_close_to_reference(value, ref64[key], plain[key].to(value.dtype), f"autocast {key}", dtype=amp_dtype,
                                  magnitude=magnitude[key])


# -- errors --


def _valid_args(case: Case = CASES[0]) -> dict:
    t = make_tensors(case, torch.float32)
    return {
        "qkv": t["qkv"].float(),
        "bias_table": t["table"].float(),
        "index": t["index"],
        "mask": t["mask"].float(),
        "scale": 0.5,
        "window_size": case.window,
        "shift_size": case.shift,
        "num_heads": case.heads,
    }


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=_marks("triton", torch.float32))])
@pytest.mark.parametrize(
    "field, bad, message",
    [
        ("qkv", torch.randn(3, 10, 16, 36), r"H x W = 10 x 16 .* not a multiple of the window size 4; pad"),
        ("qkv", torch.randn(3, 128, 36), r"qkv must be a \[B, H, W, 3C\] tensor, got \(3, 128, 36\)"),
        ("qkv", torch.randn(3, 8, 16, 35), r"last dim must be 3C with C divisible by num_heads = 2"),
        ("num_heads", 5, r"C divisible by num_heads = 5"),
        ("shift_size", 4, r"shift_size must be in \[0, 4\), got 4"),
        ("window_size", 0, r"window_size must be a positive int"),
        ("mask", torch.zeros(2, 16, 16), r"mask must be \[nW, N, N\] = \(8, 16, 16\).*got \(2, 16, 16\)"),
        ("bias_table", torch.zeros(36, 2), r"bias_table must be \[\(2ws-1\)\^2, heads\] = \(49, 2\), got \(36, 2\)"),
        ("index", torch.zeros(8, 8, dtype=torch.long), r"index must be \[N, N\] = \(16, 16\)"),
    ],
    ids=["H-not-multiple", "qkv-3d", "qkv-channels", "heads", "shift", "window", "mask-nW", "table", "index"],
)
def test_errors_name_the_shapes(backend, field, bad, message):
    args = _valid_args()
    with set_backend(backend):
        assert torch.isfinite(shifted_window_attention(**args)).all()  # the valid call runs
        args[field] = bad
        with pytest.raises(ValueError, match=message):
            shifted_window_attention(**args)


@pytest.mark.skipif(not is_available("triton"), reason="triton backend unavailable")
def test_kernel_launchers_reject_bad_inputs():
    from adaptsr.kernels.shifted_window_attention import shifted_window_attention_bwd, shifted_window_attention_fwd

    qkv = torch.randn(2, 8, 8, 36, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple of the window size 3"):
        shifted_window_attention_fwd(qkv, None, None, 1.0, 3, 0, 2)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        shifted_window_attention_fwd(qkv.double(), None, None, 1.0, 4, 0, 2)
    with pytest.raises(ValueError, match=r"mask must be \[nW, N, N\] = \(4, 16, 16\)"):
        shifted_window_attention_fwd(qkv, None, torch.zeros(2, 16, 16, device=DEVICE), 1.0, 4, 2, 2)
    out, lse = shifted_window_attention_fwd(qkv, None, None, 1.0, 4, 2, 2)
    with pytest.raises(ValueError, match="dout must be"):
        shifted_window_attention_bwd(out[:, :4], qkv, out, lse, None, None, 1.0, 4, 2, 2, False)
    with pytest.raises(ValueError, match="need_dbias=True but no bias"):
        shifted_window_attention_bwd(out, qkv, out, lse, None, None, 1.0, 4, 2, 2, True)
