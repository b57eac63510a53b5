"""window_attention: every backend against the float64 eager oracle, and the oracle against spandrel.

Outputs and the gradients of q, k, v and the bias table, with the tolerance rule of
tests/conftest.py: a backend in dtype d is compared with ``window_attention_ref`` in float64 and
with the reference backend in d ("plain torch"). The torch backend has two paths (a matmul
autograd Function on the CPU, scaled_dot_product_attention elsewhere); both run here on any
device by forcing the choice. Triton runs through TRITON_INTERPRET=1 without a GPU (set in
tests/conftest.py), so its cases are a few windows and 1-2 heads.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import warnings
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptsr.backend import is_available, set_backend
from adaptsr.ops import window_attention, window_attention_ref

# the module, not the function of the same name that adaptsr.ops re-exports
attention_op = importlib.import_module("adaptsr.ops.window_attention")

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}

# (backend name, torch path forced: "matmul" / "matmul-padded" (head dim zero-padded to a multiple of 8,
# what AVX2 CPUs run) / "sdpa" / None)
BACKENDS = {
    "reference": ("reference", None),
    "torch-matmul": ("torch", "matmul"),
    "torch-matmul-padded": ("torch", "matmul-padded"),
    "torch-sdpa": ("torch", "sdpa"),
    "triton": ("triton", None),
    "cuda": ("cuda", None),
}
_FUSED = ("triton", "cuda")


def _backend_marks(name: str) -> list:
    backend = BACKENDS[name][0]
    if backend in _FUSED:
        return [pytest.mark.skipif(not is_available(backend), reason=f"{backend} backend unavailable")]
    return []


def _backend_param(name: str):
    return pytest.param(name, id=name, marks=_backend_marks(name))


# -- cases --


@dataclass(frozen=True)
class Case:
    batch_windows: int
    heads: int
    window: int
    head_dim: int
    num_masks: int  # 0: no shift mask
    table_grad: bool = True
    layout: str = "module"  # "module": q, k, v are views of one [B_, N, 3, heads, d] tensor; "contiguous"
    flat_index: bool = False
    seed: int = 0
    # keys from kv_window x kv_window windows (HAT's overlapping cross-attention), a random index into
    # the table, negative entries counting from its end as HAT's do; None: Swin's square windows and
    # relative position index
    kv_window: int | None = None

    @property
    def n(self) -> int:
        return self.window * self.window

    @property
    def n_keys(self) -> int:
        return self.n if self.kv_window is None else self.kv_window * self.kv_window

    @property
    def id(self) -> str:
        mask = f"nW{self.num_masks}" if self.num_masks else "unshifted"
        extra = ("" if self.table_grad else "-frozen_table") + ("-flat_index" if self.flat_index else "")
        window = f"w{self.window}" if self.kv_window is None else f"w{self.window}-kv{self.kv_window}"
        return f"B{self.batch_windows}-h{self.heads}-{window}-d{self.head_dim}-{mask}-{self.layout}{extra}"


# Small enough for Triton's interpreter; every one also runs on the other backends.
CASES = [
    Case(6, 2, 8, 30, 3),  # window 8, SwinIR-M head dim, shifted, odd window count per image
    Case(5, 1, 8, 30, 0, layout="contiguous"),  # unshifted, odd number of windows
    Case(4, 2, 8, 12, 2, table_grad=False, flat_index=True),  # the bundled model's head dim, frozen table
    Case(9, 3, 4, 7, 9, seed=1),  # window 4, one mask per window, d = 7
    Case(3, 1, 7, 20, 3, seed=2),  # window 7 (49 tokens, not a power of two)
    Case(3, 2, 2, 3, 1, layout="contiguous", seed=3),  # 4 tokens, d = 3, one mask shared by every window
    Case(2, 1, 16, 20, 2, seed=4),  # window 16 (256 tokens), kept small in batch
    # more keys than queries (HAT's OCAB, window 4 and 8 at overlap ratio 0.5): one backward tile, and
    # 2 query x 5 key tiles
    Case(5, 2, 4, 12, 0, layout="contiguous", kv_window=6, seed=5),
    Case(3, 1, 8, 30, 0, kv_window=12, seed=6),
    Case(3, 2, 6, 5, 3, flat_index=True, kv_window=4, seed=7),  # fewer keys than queries, with a mask
]
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _matrix() -> list:
    """pytest.param(name, case, dtype name) for every backend in every dtype it takes.

    The reference runs in float64 only (in dtype d it is the "plain torch" of the tolerance rule
    itself); the fused kernels take float32/float16/bfloat16, and bf16 Triton only on a GPU (the
    interpreter's bf16 dots are wrong, DESIGN.md section 5).
    """
    def takes(backend: str, dtype: torch.dtype) -> bool:
        if backend == "reference":
            return dtype == torch.float64
        return dtype != torch.float64 or backend not in _FUSED

    params = []
    for name, (backend, _) in BACKENDS.items():
        for dtype_name, dtype in DTYPES.items():
            if not takes(backend, dtype):
                continue
            marks = _backend_marks(name)
            if backend == "triton" and dtype == torch.bfloat16 and not ON_GPU:
                marks.append(pytest.mark.skip(reason="bf16 Triton dots are wrong in the interpreter: GPU only"))
            for case in CASES:
                params.append(pytest.param(name, case, dtype_name, id=f"{name}-{case.id}-{dtype_name}", marks=marks))
    return params


def relative_position_index(window: int) -> torch.Tensor:
    """Swin's relative position index ``[N, N]`` (as spandrel's SwinIR computes it)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def shift_mask(num_masks: int, n: int, gen: torch.Generator, n_keys: int | None = None) -> torch.Tensor:
    """A Swin-like shift mask: 0 between tokens of the same region, -100 across (the diagonal is 0);
    with ``n_keys``, ``[nW, n, n_keys]`` and every query row keeps key 0 unmasked."""
    region = torch.randint(0, 3, (num_masks, n), generator=gen)
    if n_keys is None or n_keys == n:
        return torch.where(region[:, :, None] == region[:, None, :], 0.0, -100.0).to(torch.float64)
    key_region = torch.randint(0, 3, (num_masks, n_keys), generator=gen)
    mask = torch.where(region[:, :, None] == key_region[:, None, :], 0.0, -100.0)
    mask[:, :, 0] = 0.0  # (a row masked everywhere would only measure the rounding of its -100s)
    return mask.to(torch.float64)


def make_tensors(case: Case, dtype: torch.dtype) -> dict:
    """Fresh random inputs, drawn in float64 and rounded once to ``dtype`` (held in float64)."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = (case.batch_windows, case.heads, case.n, case.head_dim)
    key_shape = (case.batch_windows, case.heads, case.n_keys, case.head_dim)
    q, do = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(key_shape, generator=gen, dtype=torch.float64) for _ in range(2))
    table = torch.randn((2 * case.window - 1) ** 2, case.heads, generator=gen, dtype=torch.float64)
    if case.kv_window is None:
        index = relative_position_index(case.window)
    else:
        index = torch.randint(-table.shape[0], table.shape[0], (case.n, case.n_keys), generator=gen)
    out = {"q": q, "k": k, "v": v, "table": table, "do": do}
    out = {key: t.to(dtype).double() for key, t in out.items()}
    out["index"] = index.reshape(-1) if case.flat_index else index
    out["mask"] = shift_mask(case.num_masks, case.n, gen, case.n_keys) if case.num_masks else None
    return out


@contextlib.contextmanager
def torch_path(path: str | None):
    """Force the torch backend's CPU matmul Function (with or without the head-dim padding) or its
    scaled_dot_product_attention path."""
    if path is None:
        yield
        return
    with mock.patch.object(attention_op, "_sdpa_wins", lambda device: path == "sdpa"), \
            mock.patch.object(attention_op, "_CPU_PADS_HEAD_DIM", path == "matmul-padded"):
        yield


def _qkv(case: Case, tensors: dict, dtype: torch.dtype):
    """q, k, v in ``dtype`` on DEVICE, requiring grad, laid out as the case says."""
    q, k, v = (tensors[key].to(DEVICE, dtype, copy=True) for key in ("q", "k", "v"))
    if case.layout == "contiguous":
        return [t.requires_grad_(True) for t in (q, k, v)]
    if case.n_keys != case.n:
        # what HAT's overlapping cross-attention hands over: q from its own windows, k and v views of one tensor
        q_rows = q.transpose(1, 2).contiguous().requires_grad_(True)
        kv = torch.stack((k, v)).permute(1, 3, 0, 2, 4).contiguous().requires_grad_(True)
        return [q_rows.transpose(1, 2), *kv.permute(2, 0, 3, 1, 4).unbind(0)]
    # what the module hands over: qkv(x).reshape(B_, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    packed = torch.stack((q, k, v)).permute(1, 3, 0, 2, 4).contiguous().requires_grad_(True)
    return list(packed.permute(2, 0, 3, 1, 4).unbind(0))


def run(name: str, case: Case, tensors: dict, dtype: torch.dtype, *, do=None, autocast=None, mask_dtype=None) -> dict:
    """Output and every gradient under backend ``name`` (detached, on DEVICE), keyed o, dq, dk, dv, dtable."""
    backend, path = BACKENDS[name]
    q, k, v = _qkv(case, tensors, dtype)
    table = tensors["table"].to(DEVICE, dtype, copy=True).requires_grad_(case.table_grad)
    mask = tensors["mask"]
    if mask is not None:
        mask = mask.to(DEVICE, mask_dtype or dtype)
    index = tensors["index"].to(DEVICE)
    amp = torch.autocast(DEVICE.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None)
    with set_backend(backend), torch_path(path), amp:
        o = window_attention(q, k, v, table, index, mask, case.head_dim**-0.5)
    out = {"o": o}
    wrt = {"dq": q, "dk": k, "dv": v, **({"dtable": table} if case.table_grad else {})}
    do = tensors["do"] if do is None else do
    grads = torch.autograd.grad(o, list(wrt.values()), do.to(DEVICE, o.dtype))
    out.update(zip(wrt, grads))
    return {key: t.detach() for key, t in out.items()}


def magnitudes(case: Case, t: dict) -> dict:
    """The tolerance rule's magnitude: entry by entry the sum of the absolute values of the terms
    behind each result, in float64.

    The reference on |inputs| is no such bound here: the rows of dS sum to zero, so its terms
    cancel while they stay large. With ``A = |do| |v|^T`` (the terms of dP)::

        o: P |v|            dv: P^T |do|
        dS+ = P (A + rowsum(P A))        dq: scale dS+ |k|        dk: scale dS+^T |q|
        dtable: dS+ summed over windows and scattered like the gradient
    """
    q, k, v, do = (t[key].abs() for key in ("q", "k", "v", "do"))
    batch_windows, heads, n, _ = q.shape
    n_keys = k.shape[2]
    scale = case.head_dim**-0.5
    index = t["index"].reshape(-1) % t["table"].shape[0]
    bias = t["table"][index].view(n, n_keys, heads).permute(2, 0, 1)
    logits = scale * t["q"] @ t["k"].transpose(-2, -1) + bias
    if t["mask"] is not None:
        logits = logits + t["mask"].repeat(batch_windows // t["mask"].shape[0], 1, 1).unsqueeze(1)
    p = torch.softmax(logits, dim=-1)
    a = do @ v.transpose(-2, -1)
    ds_plus = p * (a + (p * a).sum(-1, keepdim=True))
    dbias = ds_plus.sum(0).permute(1, 2, 0).reshape(n * n_keys, heads)
    out = {
        "o": p @ v,
        "dq": scale * ds_plus @ k,
        "dk": scale * ds_plus.transpose(-2, -1) @ q,
        "dv": p.transpose(-2, -1) @ do,
        "dtable": torch.zeros_like(t["table"]).index_add_(0, index, dbias),
    }
    return {key: value.to(DEVICE) for key, value in out.items()}


def reference_runs(case: Case, tensors: dict, dtype: torch.dtype):
    """(float64 oracle, plain torch in ``dtype``, magnitude) for the tolerance rule."""
    ref64 = run("reference", case, tensors, torch.float64)
    plain = run("reference", case, tensors, dtype)
    return ref64, plain, magnitudes(case, tensors)


# -- every backend against the float64 oracle --


@pytest.mark.parametrize("name, case, dtype_name", _matrix())
def test_backend_matches_float64_reference(
    name, case, dtype_name, poisoned_window_attention, check_backend_against_reference
):
    dtype = DTYPES[dtype_name]
    check_backend_against_reference(run, magnitudes, name, case, make_tensors(case, dtype), dtype)


# HAT's own overlapping cross-attention size: 256 queries, 576 keys, table frozen (as in LoRA training)
HAT_OCAB = Case(2, 2, 16, 30, 0, table_grad=False, layout="contiguous", kv_window=24, seed=8)


@pytest.mark.skipif(not ON_GPU, reason="HAT-sized windows: GPU only (the CPU cases above are smaller)")
@pytest.mark.parametrize("name", ["torch-sdpa", _backend_param("triton"), _backend_param("cuda")])
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
def test_hat_overlapping_cross_attention_size(name, dtype_name, poisoned_window_attention,
                                              check_backend_against_reference):
    """576 keys per window: more than the cuda kernels' shared-memory score rows hold, which their tensor-core
    path streams when the table is frozen."""
    dtype = DTYPES[dtype_name]
    check_backend_against_reference(run, magnitudes, name, HAT_OCAB, make_tensors(HAT_OCAB, dtype), dtype)


@pytest.mark.parametrize("name", ["torch-matmul", "torch-sdpa", _backend_param("triton"), _backend_param("cuda")])
def test_float32_mask_with_other_dtypes(name, check_backend_against_reference):
    """SwinIR keeps its shift mask as a float32 buffer whatever the activations' dtype."""
    case = CASES[0]
    for dtype in (torch.float16, torch.float32) if BACKENDS[name][0] in _FUSED else (torch.float64, torch.float16):
        tensors = make_tensors(case, dtype)
        check_backend_against_reference(run, magnitudes, name, case, tensors, dtype, mask_dtype=torch.float32)


@settings(max_examples=25, **_SETTINGS)
@given(data=st.data())
def test_torch_backend_random_shapes(data, check_backend_against_reference):
    """Random shapes on both torch paths: window 1-9, keys from a window of 1-9 (or the queries' window), any
    head dim, any number of windows per mask."""
    window = data.draw(st.integers(1, 9), label="window")
    kv_window = data.draw(st.one_of(st.none(), st.integers(1, 9)), label="kv_window")
    num_masks = data.draw(st.sampled_from((0, 1, 2, 3, 5)), label="nW")
    case = Case(
        batch_windows=max(num_masks, 1) * data.draw(st.integers(1, 3), label="images"),
        heads=data.draw(st.integers(1, 4), label="heads"),
        window=window,
        head_dim=data.draw(st.integers(1, 40), label="head_dim"),
        num_masks=num_masks,
        table_grad=data.draw(st.booleans(), label="table_grad"),
        layout=data.draw(st.sampled_from(("module", "contiguous")), label="layout"),
        flat_index=data.draw(st.booleans(), label="flat_index"),
        seed=data.draw(st.integers(0, 2**31 - 1), label="seed"),
        kv_window=kv_window,
    )
    dtype = data.draw(st.sampled_from((torch.float64, torch.float32, torch.float16, torch.bfloat16)), label="dtype")
    tensors = make_tensors(case, dtype)
    for name in ("torch-matmul", "torch-matmul-padded", "torch-sdpa"):
        check_backend_against_reference(run, magnitudes, name, case, tensors, dtype)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["torch-matmul", "torch-sdpa"])
def test_torch_backend_under_autocast(name, amp_dtype, assert_close_to_reference):
    """AMP: float32 q, k, v and table; the op runs in autocast's dtype, the table's gradient is float32."""
    case = CASES[0]
    tensors = make_tensors(case, amp_dtype)  # values exact in amp_dtype: autocast's casts are exact
    ref64 = run("reference", case, tensors, torch.float64)
    plain = run("reference", case, tensors, torch.float32, autocast=amp_dtype)
    magnitude = magnitudes(case, tensors)
    got = run(name, case, tensors, torch.float32, autocast=amp_dtype)
    assert got["o"].dtype == amp_dtype and got["dtable"].dtype == torch.float32
    assert plain["o"].dtype == got["o"].dtype  # autocast's own eager form ends in a matmul too
    for key, value in got.items():
        assert_close_to_reference(
            value, ref64[key], plain[key], f"{name} {key}", dtype=amp_dtype, magnitude=magnitude[key]
        )


@pytest.mark.parametrize("name", ["torch-matmul", "torch-matmul-padded", "torch-sdpa", "reference"])
def test_float64_agrees_tightly(name, assert_close):
    """In float64 every torch form is the oracle to rounding (the _DIRECT tolerances of conftest)."""
    for case in CASES[:4]:
        tensors = make_tensors(case, torch.float64)
        truth = run("reference", case, tensors, torch.float64)
        got = run(name, case, tensors, torch.float64)
        for key in truth:
            assert_close(got[key], truth[key], f"{name} {case.id} {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hard_mask_zeroes_the_probabilities_across_regions(dtype):
    """On the CPU path Swin's -100 becomes -inf: the e^-100 probabilities, subnormal in float32 (where every
    CPU operation on them is a microcode assist), become exact zeros, and nothing float32 can tell changes."""
    gen = torch.Generator().manual_seed(0)
    mask = shift_mask(2, 64, gen).float()
    mask[1, 0, 5] = -10.0  # a soft entry stays as it is
    hard = attention_op._hard_mask(mask, dtype)
    assert torch.equal(hard == float("-inf"), mask == -100.0) and hard[1, 0, 5] == -10.0
    logits = (torch.randn(4, 2, 64, 64, generator=gen) * 3).to(dtype)
    plain = torch.softmax(logits + mask.to(dtype), dim=-1)
    if dtype == torch.float32:  # (a bfloat16 softmax on the CPU rounds them to zero itself)
        assert ((plain > 0) & (plain < torch.finfo(dtype).tiny)).any()
    p = torch.softmax(logits + hard.to(dtype), dim=-1)
    assert not ((p > 0) & (p < torch.finfo(dtype).tiny)).any()
    torch.testing.assert_close(p, plain, rtol=0, atol=1e-30)


def test_hard_mask_leaves_other_dtypes_and_rows_masked_everywhere_alone():
    mask = torch.tensor([[[0.0, -100.0], [-100.0, 0.0]]])
    for dtype in (torch.float16, torch.float64):
        assert attention_op._hard_mask(mask, dtype) is mask
    one_row_masked_everywhere = torch.tensor([[[0.0, -100.0], [-100.0, -100.0]]])
    hard = attention_op._hard_mask(one_row_masked_everywhere, torch.float32)
    assert hard[0, 0].tolist() == [0.0, float("-inf")] and hard[0, 1].tolist() == [-100.0, -100.0]
    assert attention_op._hard_mask(torch.zeros(1, 2, 2), torch.float32).eq(0).all()


def test_matmul_path_saves_no_subnormal_probabilities():
    """With a shift mask the CPU Function's softmax sees -inf across regions: the P it saves for the backward
    holds exact zeros there, no subnormals."""
    case = CASES[0]
    tensors = make_tensors(case, torch.float32)
    q, k, v = _qkv(case, tensors, torch.float32)
    with set_backend("torch"), torch_path("matmul"):
        o = window_attention(q, k, v, tensors["table"].float(), tensors["index"], tensors["mask"].float(), 0.2)
    p = o.grad_fn.saved_tensors[-1]
    assert p.shape[-2:] == (case.n, case.n)
    assert not ((p > 0) & (p < torch.finfo(p.dtype).tiny)).any() and (p == 0).any()


# -- what runs where --


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


def test_auto_backend_on_cpu_runs_the_matmul_function():
    case = CASES[0]
    tensors = make_tensors(case, torch.float32)
    q, k, v = _qkv(case, tensors, torch.float32)
    table = tensors["table"].float().requires_grad_()
    with set_backend("auto"):
        o = window_attention(q.cpu(), k.cpu(), v.cpu(), table, tensors["index"], tensors["mask"].float(), 0.2)
    assert "_MatmulWindowAttentionBackward" in _grad_fn_names(o)


@pytest.mark.parametrize("name", [_backend_param("triton"), _backend_param("cuda")])
def test_fused_backends_run_their_function(name):
    case = CASES[1]
    tensors = make_tensors(case, torch.float32)
    q, k, v = _qkv(case, tensors, torch.float32)
    with set_backend(name):
        o = window_attention(q, k, v, tensors["table"].float().to(DEVICE), tensors["index"].to(DEVICE), None, 0.3)
    assert "_FusedWindowAttentionBackward" in _grad_fn_names(o)


@pytest.mark.parametrize("wanted", [("v",), ("table",), ("q", "table"), ("k",)], ids="+".join)
@pytest.mark.parametrize("name", ["torch-matmul", "torch-sdpa", _backend_param("triton")])
def test_some_inputs_without_grad(name, wanted, assert_close_to_reference):
    """Only some of q, k, v, table require grad: those get theirs, right."""
    case = CASES[0]
    t = make_tensors(case, torch.float32)
    ref64, plain, magnitude = reference_runs(case, t, torch.float32)
    inputs = {
        key: t[key].to(DEVICE, torch.float32, copy=True).requires_grad_(key in wanted)
        for key in ("q", "k", "v", "table")
    }
    backend, path = BACKENDS[name]
    with set_backend(backend), torch_path(path):
        o = window_attention(inputs["q"], inputs["k"], inputs["v"], inputs["table"], t["index"].to(DEVICE),
                             t["mask"].to(DEVICE, torch.float32), case.head_dim**-0.5)
    grads = torch.autograd.grad(o, [inputs[key] for key in wanted], t["do"].to(DEVICE, torch.float32))
    for key, grad in zip(wanted, grads):
        label = "dtable" if key == "table" else f"d{key}"
        assert_close_to_reference(grad, ref64[label], plain[label], f"{name} {label}", magnitude=magnitude[label])


# -- the gradient of the table: deterministic; the mask gets none --


@pytest.mark.parametrize("name", ["torch-matmul", "torch-sdpa", _backend_param("triton")])
def test_table_gradient_is_deterministic(name):
    """Bitwise the same on every run; on the CPU with two threads and 16 x 16 windows, where the
    table's gradient (6 x 256 x 256 terms) is large enough for torch to parallelise its scatter."""
    fused = BACKENDS[name][0] in _FUSED
    case = CASES[0] if fused else Case(2, 6, 16, 4, 2)
    tensors = make_tensors(case, torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if fused else 2)
    try:
        first = run(name, case, tensors, torch.float32)
        for _ in range(3):
            again = run(name, case, tensors, torch.float32)
            for key in first:
                assert torch.equal(first[key], again[key]), key
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["reference", "torch-matmul", "torch-sdpa", _backend_param("triton")])
def test_mask_is_a_constant(name):
    case = CASES[0]
    tensors = make_tensors(case, torch.float32)
    q, k, v = _qkv(case, tensors, torch.float32)
    mask = tensors["mask"].to(DEVICE, torch.float32, copy=True).requires_grad_()
    backend, path = BACKENDS[name]
    with set_backend(backend), torch_path(path):
        o = window_attention(q, k, v, tensors["table"].to(DEVICE, torch.float32), tensors["index"].to(DEVICE),
                             mask, 0.5)
    assert torch.autograd.grad(o.sum(), mask, allow_unused=True)[0] is None


def test_reference_matches_hand_written_loop():
    """The oracle against the formula written out window by window (no views, no broadcasting)."""
    case = CASES[3]
    t = make_tensors(case, torch.float64)
    n, scale = case.n, case.head_dim**-0.5
    got = window_attention_ref(t["q"], t["k"], t["v"], t["table"], t["index"], t["mask"], scale)
    for b in range(case.batch_windows):
        for h in range(case.heads):
            bias = torch.stack([torch.stack([t["table"][t["index"][i, j], h] for j in range(n)]) for i in range(n)])
            logits = scale * t["q"][b, h] @ t["k"][b, h].T + bias + t["mask"][b % case.num_masks]
            expected = torch.softmax(logits, dim=-1) @ t["v"][b, h]
            torch.testing.assert_close(got[b, h], expected, rtol=1e-12, atol=1e-12)


# -- errors --


def _valid_args(batch_windows=4, heads=2, window=4, d=6, num_masks=2):
    n = window * window
    return {
        "q": torch.randn(batch_windows, heads, n, d),
        "k": torch.randn(batch_windows, heads, n, d),
        "v": torch.randn(batch_windows, heads, n, d),
        "bias_table": torch.randn((2 * window - 1) ** 2, heads),
        "index": relative_position_index(window),
        "mask": torch.zeros(num_masks, n, n),
        "scale": 0.5,
    }


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "field, bad, message",
    [
        ("mask", torch.zeros(3, 16, 16), r"B_ = 4 .*not a multiple of the mask's nW = 3 \(mask \(3, 16, 16\)\)"),
        ("mask", torch.zeros(2, 16, 9), r"mask must be \[nW, N, N_k\] with \(N, N_k\) = \(16, 16\).*got \(2, 16, 9\)"),
        ("mask", torch.zeros(16, 16), r"mask must be \[nW, N, N_k\].*got \(16, 16\)"),
        ("bias_table", torch.zeros(49, 3), r"bias_table must be \[\(2w-1\)\^2, heads\] with heads = 2.*got \(49, 3\)"),
        ("index", torch.zeros(9, 9, dtype=torch.long), r"index must be \[N, N_k\] = \(16, 16\) or flat \[256\]"),
        ("index", torch.zeros(16, 16), r"index must be an integer tensor, got torch\.float32"),
        ("k", torch.randn(4, 2, 16, 5), r"k, v one shape \[B_, heads, N_k, d\].*\(4, 2, 16, 6\), \(4, 2, 16, 5\)"),
        ("k", torch.randn(4, 2, 36, 6), r"k, v one shape.*\(4, 2, 36, 6\), \(4, 2, 16, 6\)"),
        ("k", torch.randn(2, 2, 16, 6), r"k, v one shape.*\(2, 2, 16, 6\)"),
        ("q", torch.randn(2, 16, 6), r"q must be a \[B_, heads, N, d\] tensor, got \(2, 16, 6\)"),
        ("v", torch.randn(4, 2, 16, 6, dtype=torch.float64), r"one floating dtype.*float32.*float64"),
    ],
    ids=["nW-not-dividing", "mask-N", "mask-2d", "table-heads", "index-shape", "index-float", "k-shape",
         "k-longer-than-v", "k-windows", "q-3d", "v-dtype"],
)
def test_errors_name_the_shapes(backend, field, bad, message):
    args = _valid_args()
    with set_backend(backend):
        assert torch.isfinite(window_attention(**args)).all()  # the valid call runs
        args[field] = bad
        with pytest.raises(ValueError, match=message):
            window_attention(**args)


def test_errors_name_both_lengths_when_keys_outnumber_queries():
    args = _valid_args(num_masks=1)
    args["k"], args["v"] = torch.randn(4, 2, 36, 6), torch.randn(4, 2, 36, 6)
    with pytest.raises(ValueError, match=r"index must be \[N, N_k\] = \(16, 36\) or flat \[576\] for N = 16 queries "
                                         r"and N_k = 36 keys per window"):
        window_attention(**args)
    args["index"] = torch.zeros(16, 36, dtype=torch.long)
    with pytest.raises(ValueError, match=r"mask must be \[nW, N, N_k\] with \(N, N_k\) = \(16, 36\)"):
        window_attention(**args)
    args["mask"] = torch.zeros(1, 16, 36)
    assert window_attention(**args).shape == (4, 2, 16, 6)


def test_auto_asks_the_cuda_kernels_with_the_keys_and_whether_the_table_needs_a_gradient():
    """The cuda kernels take more than 256 keys only without dbias: "auto" hands them both facts (the kernels'
    rule itself: tests/test_cuda_extension.py)."""
    asked = []

    def takes(dtype, n, head_dim, n_keys, need_dbias):
        asked.append((n, n_keys, need_dbias))
        return False

    def resolve(device, op, takes_fn, call=None):  # what "auto" does on a GPU: ask the measured choice's kernels
        takes_fn("cuda")
        return "torch"

    args = _valid_args()
    args["k"], args["v"] = torch.randn(4, 2, 36, 6), torch.randn(4, 2, 36, 6)
    args["index"], args["mask"] = torch.zeros(16, 36, dtype=torch.long), None
    cuda_module = importlib.import_module("adaptsr._cuda")
    with mock.patch.object(attention_op, "resolve", resolve), mock.patch.object(cuda_module, "window_attention_takes",
                                                                                  takes):
        args["bias_table"].requires_grad_(True)
        window_attention(**args)
        with torch.no_grad():
            window_attention(**args)
        args["bias_table"].requires_grad_(False)
        window_attention(**args)
    assert asked == [(16, 36, True), (16, 36, False), (16, 36, False)]


def test_error_message_is_readable():
    args = _valid_args(batch_windows=5, num_masks=2)
    with pytest.raises(ValueError) as info:
        window_attention(**args)
    assert re.search(r"window b uses mask\[b % nW\]", str(info.value))
