"""The fused Triton window-attention kernels against float64 eager math.

Kernel level: ``window_attention_fwd/bwd`` and the single-pass ``qkv_window_attention_fwd/bwd``
of ``adaptsr.kernels.window_attention``, checked with the tolerance rule of tests/conftest.py
(error <= 2 x plain torch's error in the same dtype + atol[d] x magnitude). The oracle is
``softmax(q k^T * scale + bias + mask[b % nW]) v`` evaluated in float64, its gradients by
torch autograd in float64.

Without a GPU these run through TRITON_INTERPRET=1 (set in tests/conftest.py) on a handful of
windows and 1-2 heads; on a GPU the same tests also run at SwinIR/HAT training sizes.
"""

from __future__ import annotations

import pytest
import torch

from adaptsr.backend import is_available

pytestmark = pytest.mark.skipif(not is_available("triton"), reason="triton backend unavailable")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

# (N tokens, head dim d, windows B_, mask windows nW (0: no mask), heads, relative-position bias)
SMALL_CASES = [
    (64, 30, 3, 3, 2, True),  # window 8, SwinIR-M head dim 180/6, shifted windows, bias: the common case
    (64, 16, 5, 0, 1, True),  # odd window count, no shift mask
    (64, 24, 3, 1, 1, False),  # mask shared by every window (nW = 1), no bias
    (64, 30, 1, 0, 1, False),  # plain attention, one window
    (49, 24, 3, 3, 1, True),  # window 7 (Swin's default): ragged tiles
    (16, 30, 4, 2, 2, True),  # window 4: one tile, the backward's fused single pass (dq and dbias with dk, dv)
    (25, 16, 3, 3, 1, True),  # window 5: a ragged single tile
    (100, 16, 2, 2, 1, True),  # window 10: ragged tiles on the tiled path
    (256, 30, 1, 1, 1, True),  # window 16 (HAT): the tiled path
]
GPU_CASES = [
    (64, 30, 32, 16, 6, True),  # SwinIR-M block: 32 windows, 6 heads
    (64, 30, 96, 0, 6, False),
    (64, 32, 515, 5, 6, True),  # many windows: several window groups in the dbias reduction
    (256, 30, 32, 8, 6, True),  # HAT window 16
    (256, 16, 33, 3, 4, True),
    (144, 48, 12, 4, 2, True),  # window 12, d = 48
]
CASES = SMALL_CASES + (GPU_CASES if ON_GPU else [])

# (N, d, heads, windows B_, nW (0: no mask), relative-position bias, qkv bias)
QKV_SMALL_CASES = [
    (64, 30, 2, 3, 3, True, True),
    (64, 16, 1, 2, 0, False, False),
    (49, 24, 2, 3, 1, True, True),
    (256, 24, 1, 1, 1, True, True),
]
QKV_GPU_CASES = [
    (64, 30, 6, 32, 16, True, True),
    (256, 30, 6, 16, 4, True, True),
    (64, 32, 4, 65, 5, False, True),
]
QKV_CASES = QKV_SMALL_CASES + (QKV_GPU_CASES if ON_GPU else [])


def _dtypes():
    # The interpreter's bf16 dots are wrong (DESIGN.md section 5): bf16 only on a GPU.
    return [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]


def _case_id(case) -> str:
    n, d, windows, nw, heads, bias = case
    return f"N{n}-d{d}-B{windows}-nW{nw}-h{heads}" + ("-bias" if bias else "")


def _qkv_case_id(case) -> str:
    n, d, heads, windows, nw, bias, qkv_bias = case
    return f"N{n}-d{d}-h{heads}-B{windows}-nW{nw}" + ("-bias" if bias else "") + ("-qkvb" if qkv_bias else "")


# -- inputs and the eager math --


def _shift_mask(nw: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A Swin-like shift mask: tokens in the same region 0, across regions -100 (the diagonal is always 0)."""
    region = torch.randint(0, 4, (nw, n), generator=gen)
    return torch.where(region[:, :, None] == region[:, None, :], 0.0, -100.0).to(torch.float64)


def _make_inputs(case, dtype, seed):
    n, d, windows, nw, heads, has_bias = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(windows, heads, n, d, generator=gen, dtype=torch.float64) for _ in range(4))
    bias = torch.randn(heads, n, n, generator=gen, dtype=torch.float64) if has_bias else None
    mask = _shift_mask(nw, n, gen) if nw else None
    q, k, v, do = (t.to(dtype).to(DEVICE) for t in (q, k, v, do))
    bias = bias.float().to(DEVICE) if bias is not None else None
    mask = mask.float().to(DEVICE) if mask is not None else None
    return q, k, v, do, bias, mask, d**-0.5


def _logits(q, k, bias, mask, scale):
    windows, heads, n, _ = q.shape
    s = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias
    if mask is not None:
        nw = mask.shape[0]
        s = (s.view(windows // nw, nw, heads, n, n) + mask[None, :, None]).view(windows, heads, n, n)
    return s


def _attention(q, k, v, bias, mask, scale):
    """Eager window attention in the dtype of q: (o, lse)."""
    s = _logits(q, k, bias, mask, scale)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def _attention_and_grads(q, k, v, do, bias, mask, scale, dtype):
    """Eager forward and autograd backward in ``dtype`` (bias and mask cast too, as a model in ``dtype`` has them)."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    bias_leaf = bias.detach().to(dtype).requires_grad_(True) if bias is not None else None
    mask_d = mask.to(dtype) if mask is not None else None
    o, lse = _attention(*leaves, bias_leaf, mask_d, scale)
    inputs = leaves + ([bias_leaf] if bias_leaf is not None else [])
    grads = torch.autograd.grad(o, inputs, do.to(dtype))
    dbias = grads[3] if bias is not None else None
    return o.detach(), lse.detach(), grads[0], grads[1], grads[2], dbias


def _magnitudes(q64, k64, v64, do64, o64, bias64, mask64, scale, abs_q, abs_k, abs_v):
    """Scale of the rounding error of each result: the float64 sums of the absolute values of its terms.

    ``abs_q``, ``abs_k``, ``abs_v``: the magnitudes of q, k, v themselves (|q| for inputs; for the
    projected q, k, v of the single-pass variant, |x| |W|^T + |b|).
    """
    p = torch.softmax(_logits(q64, k64, bias64, mask64, scale), -1)
    # dS = P * (dP - D) with dP = do v^T, D = rowsum(do * o): dP and D are rounded (to the input
    # dtype by plain torch, to float32 by the kernels) before the subtraction that may cancel
    ds_mag = p * ((do64 @ v64.transpose(-2, -1)).abs() + (do64 * o64).sum(-1, keepdim=True).abs())
    return {
        "o": p @ abs_v,
        "dq": scale * ds_mag @ abs_k,
        "dk": scale * ds_mag.transpose(-2, -1) @ abs_q,
        "dv": p.transpose(-2, -1) @ do64.abs(),
        "dbias": ds_mag.sum(0),
    }


def _check_all(assert_close_to_reference, got, ref, plain, mags, dtype, names):
    for name in names:
        actual, reference, torch_plain = got[name], ref[name], plain[name]
        if actual.dtype != torch_plain.dtype:
            # lse and dbias are float32 whatever the input dtype: bound by plain torch's error in dtype
            torch_plain = torch_plain.to(actual.dtype)
        assert_close_to_reference(actual, reference, torch_plain, name, dtype=dtype, magnitude=mags.get(name))


# -- the attention core --


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_window_attention_fwd_bwd(case, dtype, poisoned_window_attention, assert_close_to_reference):
    from adaptsr.kernels.window_attention import window_attention_bwd, window_attention_fwd

    q, k, v, do, bias, mask, scale = _make_inputs(case, dtype, seed=hash(case) % 2**31)
    need_dbias = bias is not None
    o, lse = window_attention_fwd(q, k, v, bias, mask, scale)
    assert o.shape == q.shape and o.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    dq, dk, dv, dbias = window_attention_bwd(do, q, k, v, o, lse, bias, mask, scale, need_dbias)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    if need_dbias:
        assert dbias.shape == bias.shape and dbias.dtype == torch.float32
    else:
        assert dbias is None

    names = ["o", "lse", "dq", "dk", "dv"] + (["dbias"] if need_dbias else [])
    as64 = [t.double() if t is not None else None for t in (q, k, v, do, bias, mask)]
    ref = dict(zip(("o", "lse", "dq", "dk", "dv", "dbias"), _attention_and_grads(*as64[:4], *as64[4:], scale,
                                                                                   torch.float64)))
    plain = dict(zip(("o", "lse", "dq", "dk", "dv", "dbias"), _attention_and_grads(q, k, v, do, bias, mask, scale,
                                                                                     dtype)))
    q64, k64, v64, do64, bias64, mask64 = as64
    mags = _magnitudes(q64, k64, v64, do64, ref["o"], bias64, mask64, scale, q64.abs(), k64.abs(), v64.abs())
    got = {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv, "dbias": dbias}
    _check_all(assert_close_to_reference, got, ref, plain, mags, dtype, names)


@pytest.mark.parametrize("case", [SMALL_CASES[0], SMALL_CASES[5]], ids=_case_id)
def test_strided_inputs_and_no_dbias(case):
    """q, k, v as the strided views Swin makes of one qkv buffer, and a transposed do, give the same
    bits as contiguous inputs; need_dbias=False returns None and leaves dq, dk, dv unchanged."""
    from adaptsr.kernels.window_attention import window_attention_bwd, window_attention_fwd

    q, k, v, do, bias, mask, scale = _make_inputs(case, torch.float32, seed=7)
    qkv = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).contiguous()  # [B_, N, 3, heads, d]
    qs, ks, vs = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    spread = torch.zeros(*do.shape[:3], 2 * do.shape[3], device=DEVICE)
    spread[..., ::2] = do
    do_s = spread[..., ::2]  # head-dim stride 2
    assert not qs.is_contiguous() and not do_s.is_contiguous()

    o, lse = window_attention_fwd(q, k, v, bias, mask, scale)
    o_s, lse_s = window_attention_fwd(qs, ks, vs, bias, mask, scale)
    assert torch.equal(o, o_s) and torch.equal(lse, lse_s)
    grads = window_attention_bwd(do, q, k, v, o, lse, bias, mask, scale, True)
    grads_s = window_attention_bwd(do_s, qs, ks, vs, o_s, lse_s, bias, mask, scale, False)
    assert grads_s[3] is None
    for name, a, b in zip(("dq", "dk", "dv"), grads[:3], grads_s[:3]):
        assert torch.equal(a, b), f"{name} differs between contiguous and strided inputs"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


DETERMINISM_CASES = [(64, 30, 5, 5, 1, True), (100, 16, 3, 1, 1, True)]
if ON_GPU:
    DETERMINISM_CASES += [(64, 30, 2048, 64, 6, True), (256, 30, 256, 16, 6, True)]


@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=_case_id)
def test_dbias_deterministic(case):
    """dbias (a sum over windows) is bitwise the same on every run: no atomics, a fixed reduction order."""
    from adaptsr.kernels import window_attention as wa

    q, k, v, do, bias, mask, scale = _make_inputs(case, torch.float16, seed=11)
    windows, heads, n, _ = q.shape
    tiles = _cdiv(n, wa._tile(n))
    assert _cdiv(windows, wa._windows_per_program(windows, heads, tiles)) > 1, "one window group only"
    o, lse = wa.window_attention_fwd(q, k, v, bias, mask, scale)
    first = wa.window_attention_bwd(do, q, k, v, o, lse, bias, mask, scale, True)
    second = wa.window_attention_bwd(do, q, k, v, o, lse, bias, mask, scale, True)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# -- the single pass: qkv projection inside the kernel --


def _make_qkv_inputs(case, dtype, seed):
    n, d, heads, windows, nw, has_bias, has_qkv_bias = case
    channels = heads * d
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(windows, n, channels, generator=gen, dtype=torch.float64)
    w = torch.randn(3 * channels, channels, generator=gen, dtype=torch.float64) * channels**-0.5
    b = torch.randn(3 * channels, generator=gen, dtype=torch.float64) * 0.5 if has_qkv_bias else None
    do = torch.randn(windows, n, channels, generator=gen, dtype=torch.float64)
    bias = torch.randn(heads, n, n, generator=gen, dtype=torch.float64) if has_bias else None
    mask = _shift_mask(nw, n, gen) if nw else None
    x, w, do = (t.to(dtype).to(DEVICE) for t in (x, w, do))
    b = b.to(dtype).to(DEVICE) if b is not None else None
    bias = bias.float().to(DEVICE) if bias is not None else None
    mask = mask.float().to(DEVICE) if mask is not None else None
    return x, w, b, do, bias, mask, d**-0.5


def _split_heads(qkv, heads):
    windows, n, three_c = qkv.shape
    return qkv.view(windows, n, 3, heads, three_c // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _qkv_attention_and_grads(x, w, b, do, heads, bias, mask, scale, dtype):
    """Swin's eager layer core in ``dtype``: qkv linear, attention, heads concatenated; and its autograd."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, w)]
    b_leaf = b.detach().to(dtype).requires_grad_(True) if b is not None else None
    bias_leaf = bias.detach().to(dtype).requires_grad_(True) if bias is not None else None
    mask_d = mask.to(dtype) if mask is not None else None
    q, k, v = _split_heads(torch.nn.functional.linear(leaves[0], leaves[1], b_leaf), heads)
    o, lse = _attention(q, k, v, bias_leaf, mask_d, scale)
    windows, _, n, _ = o.shape
    o = o.transpose(1, 2).reshape(windows, n, -1)
    inputs = leaves + [t for t in (b_leaf, bias_leaf) if t is not None]
    grads = list(torch.autograd.grad(o, inputs, do.to(dtype)))
    dx, dw = grads[0], grads[1]
    db = grads.pop(2) if b is not None else None
    dbias = grads[2] if bias is not None else None
    return o.detach(), lse.detach(), dx, dw, db, dbias


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("case", QKV_CASES, ids=_qkv_case_id)
def test_qkv_window_attention_fwd_bwd(case, dtype, poisoned_window_attention, assert_close_to_reference):
    from adaptsr.kernels.window_attention import qkv_window_attention_bwd, qkv_window_attention_fwd

    n, d, heads, windows, _, has_bias, _ = case
    x, w, b, do, bias, mask, scale = _make_qkv_inputs(case, dtype, seed=hash(case) % 2**31)
    o, lse = qkv_window_attention_fwd(x, w, b, heads, bias, mask, scale)
    assert o.shape == x.shape and o.dtype == dtype and lse.shape == (windows, heads, n)
    dx, dw, db, dbias = qkv_window_attention_bwd(do, x, w, b, heads, o, lse, bias, mask, scale, has_bias)
    assert dx.shape == x.shape and dw.shape == w.shape and dx.dtype == dw.dtype == dtype
    assert (db is None) == (b is None) and (dbias is None) == (bias is None)

    names = ["o", "lse", "dx", "dw", "db", "dbias"]
    names = [nm for nm in names if not (nm == "db" and b is None) and not (nm == "dbias" and bias is None)]
    keys = ("o", "lse", "dx", "dw", "db", "dbias")
    as64 = [t.double() if t is not None else None for t in (x, w, b, do, bias, mask)]
    x64, w64, b64, do64, bias64, mask64 = as64
    ref = dict(zip(keys, _qkv_attention_and_grads(x64, w64, b64, do64, heads, bias64, mask64, scale, torch.float64)))
    plain = dict(zip(keys, _qkv_attention_and_grads(x, w, b, do, heads, bias, mask, scale, dtype)))

    # magnitudes: q, k, v are themselves sums (|x| |W|^T + |b|); o and dbias through the attention.
    # dx, dw, db are one torch matmul (or sum) over dqkv, as in plain torch: the default |ref| scale.
    q64, k64, v64 = _split_heads(torch.nn.functional.linear(x64, w64, b64), heads)
    abs_b = b64.abs() if b64 is not None else None
    abs_q, abs_k, abs_v = _split_heads(torch.nn.functional.linear(x64.abs(), w64.abs(), abs_b), heads)
    do4 = do64.view(windows, n, heads, d).transpose(1, 2)
    o4 = ref["o"].view(windows, n, heads, d).transpose(1, 2)
    core = _magnitudes(q64, k64, v64, do4, o4, bias64, mask64, scale, abs_q, abs_k, abs_v)
    mags = {"o": core["o"].transpose(1, 2).reshape(windows, n, -1), "dbias": core["dbias"]}
    got = {"o": o, "lse": lse, "dx": dx, "dw": dw, "db": db, "dbias": dbias}
    _check_all(assert_close_to_reference, got, ref, plain, mags, dtype, names)


# -- readable errors --


def test_rejects_bad_inputs():
    from adaptsr.kernels.window_attention import (
        qkv_window_attention_fwd,
        window_attention_bwd,
        window_attention_fwd,
    )

    q = torch.randn(4, 2, 64, 30, device=DEVICE)
    bias = torch.randn(2, 64, 64, device=DEVICE)
    mask = torch.zeros(3, 64, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"k, v one shape \[B_, heads, N_k, d\].*\(4, 2, 32, 30\), \(4, 2, 64, 30\)"):
        window_attention_fwd(q, q[:, :, :32], q, None, None, 1.0)
    with pytest.raises(ValueError, match=r"k, v one shape.*\(4, 2, 64, 16\)"):
        window_attention_fwd(q, q[..., :16], q[..., :16], None, None, 1.0)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        window_attention_fwd(q.double(), q.double(), q.double(), None, None, 1.0)
    with pytest.raises(ValueError, match=r"bias must be float32 \[heads, N, N_k\] = \(2, 64, 64\)"):
        window_attention_fwd(q, q, q, bias[:1], None, 1.0)
    with pytest.raises(ValueError, match=r"bias must be float32 \[heads, N, N_k\] = \(2, 64, 32\)"):
        window_attention_fwd(q, q[:, :, :32], q[:, :, :32], bias, None, 1.0)
    with pytest.raises(ValueError, match="bias must be float32"):
        window_attention_fwd(q, q, q, bias.half(), None, 1.0)
    with pytest.raises(ValueError, match="multiple of the mask's nW = 3"):
        window_attention_fwd(q, q, q, None, mask, 1.0)
    with pytest.raises(ValueError, match="need_dbias=True but no bias"):
        window_attention_bwd(q, q, q, q, q, torch.zeros(4, 2, 64, device=DEVICE), None, None, 1.0, True)
    with pytest.raises(ValueError, match="lse must be"):
        window_attention_bwd(q, q, q, q, q, torch.zeros(4, 2, 64, device=DEVICE, dtype=torch.float16), None, None,
                             1.0, False)
    x = torch.randn(4, 64, 60, device=DEVICE)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        qkv_window_attention_fwd(x, torch.randn(180, 60, device=DEVICE), None, 7, None, None, 1.0)
    with pytest.raises(ValueError, match=r"w_qkv must be \[3C, C\]"):
        qkv_window_attention_fwd(x, torch.randn(60, 60, device=DEVICE), None, 2, None, None, 1.0)
    with pytest.raises(ValueError, match="must share one of"):
        qkv_window_attention_fwd(x, torch.randn(180, 60, device=DEVICE).half(), None, 2, None, None, 1.0)
