r"""Swin window attention: softmax(q k^T * scale + relative-position bias + shift mask) v.

Shapes: ``q, k, v: [B_, heads, N, d]`` with ``B_`` = batch x windows and ``N`` = tokens per window
(64 for 8 x 8 windows, 256 for 16 x 16); the bias table ``[T, heads]`` (``T = (2w-1)^2``) is
gathered by ``index: [N, N]`` (or its ``N*N`` flattening); the shift mask ``[nW, N, N]`` (0 / -100
in Swin's shifted windows) or None, window ``b`` using ``mask[b mod nW]``.

Keys may come from larger windows than the queries (HAT's overlapping cross-attention: 16 x 16
queries attend to the 24 x 24 keys around them): k, v ``[B_, heads, N_k, d]``, index ``[N, N_k]``,
mask ``[nW, N, N_k]``; everything below holds with j running over the N_k keys.

Forward (window ``b``, head ``h``, ``w = b mod nW``)::

    bias[h, i, j] = table[index[i, j], h]
    S  = scale q k^T + bias[h] + mask[w]                  (N x N logits)
    P  = softmax(S) along each row,    lse_i = log sum_j exp(S_ij)
    o  = P v

Backward (``do = dL/do``)::

    dv = P^T do
    dP = do v^T
    dS = P * (dP - D),    D_i = sum_j P_ij dP_ij = sum_c do_ic o_ic
    dq = scale dS k
    dk = scale dS^T q
    dbias[h]     = sum_b dS[b, h]                          (over every window)
    dtable[t, h] = sum over (i, j) with index[i, j] = t of dbias[h, i, j]
    the mask is a constant: it gets no gradient.

Backends:

- reference: ``window_attention_ref``, the eager form of spandrel's SwinIR ``WindowAttention``.
- torch: the bias and the mask folded into one additive mask ``[nW, heads, N, N]`` built once per
  call. On the CPU a hand-written autograd Function (two batched matmuls and a softmax, saving
  P) with the windows folded into the head axis, so that mask broadcasts over the batch without
  copies, the head dim padded to a multiple of 8 on AVX2 CPUs, and the shift mask's -100 entries
  taken as -inf (``_hard_mask``: no subnormal probabilities); elsewhere
  ``F.scaled_dot_product_attention`` with the same folded layout. See ``_sdpa_wins`` for what was
  measured.
- triton / cuda: fused kernels (``adaptsr.kernels.window_attention`` / ``adaptsr._cuda``) that
  never write P to memory. The cuda kernels take more than 256 keys per window (HAT's 576) on tensor cores
  only, with a frozen bias table; their host checks say so otherwise.

Every backend but the reference takes the table's gradient from ``dbias`` through the gather in
torch, summed in a fixed order (``_GatherBias``): the same bits on every run.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from adaptsr.backend import resolve

__all__ = ["window_attention", "window_attention_ref"]

# On the CPU, batched matmuls with a head dim that is not a multiple of the SIMD width ran on the
# BLAS's slow edge path on a 2-core AMD EPYC (AVX2): [192, 64, 64] x [192, 64, 30] took 1.0 ms and the
# same with 32 columns 0.65 ms, so zero-padding the head dim to a multiple of 8 (one copy of q, k, v,
# small next to the N x N logits) won back more than it cost. On a 2-core Intel Xeon (AVX512) it does
# not: SwinIR-M's core (32 windows, 6 heads, d = 30, fwd + bwd, one thread, CPU time) took 7.5 ms
# padded and 7.2 unpadded (shifted 8.9 / 8.9; HAT's 256-token windows 32.8 / 32.6), and where k and v
# need no copy otherwise (HAT's overlapping cross-attention on one image) the padding adds two. So the CPUs whose
# widest vector unit is AVX2 pad, the others do not.
_CPU_HEAD_DIM_MULTIPLE = 8
_CPU_PADS_HEAD_DIM = torch.backends.cpu.get_cpu_capability() == "AVX2"


def window_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The oracle: spandrel's eager SwinIR ``WindowAttention`` core (HAT's ``OCAB`` for N_k != N), in q's dtype."""
    batch_windows, heads, n, _ = q.shape
    n_keys = k.shape[2]
    bias = bias_table[index.reshape(-1)].view(n, n_keys, heads).permute(2, 0, 1)
    attn = (q * scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        num_masks = mask.shape[0]
        attn = attn.view(batch_windows // num_masks, num_masks, heads, n, n_keys) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(batch_windows, heads, n, n_keys)
    return torch.softmax(attn, dim=-1) @ v


# -- host helpers --


def _check_inputs(q, k, v, bias_table, index, mask) -> None:
    """A ValueError that names the shapes when the arguments do not fit together."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"window_attention: {name} must be a [B_, heads, N, d] tensor, got {got}")
    if not (k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3]):
        raise ValueError(
            f"window_attention: q must be [B_, heads, N, d] and k, v one shape [B_, heads, N_k, d], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not q.is_floating_point() or not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"window_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    batch_windows, heads, n, _ = q.shape
    n_keys = k.shape[2]
    if bias_table.dim() != 2 or bias_table.shape[1] != heads:
        raise ValueError(
            f"window_attention: bias_table must be [(2w-1)^2, heads] with heads = {heads} (from q "
            f"{tuple(q.shape)}), got {tuple(bias_table.shape)}"
        )
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"window_attention: index must be an integer tensor, got {index.dtype}")
    square = (n, n_keys)
    if index.numel() != n * n_keys or index.dim() not in (1, 2) or (index.dim() == 2 and tuple(index.shape) != square):
        tokens = f"N = {n} tokens per window" if n == n_keys else f"N = {n} queries and N_k = {n_keys} keys per window"
        raise ValueError(
            f"window_attention: index must be [N, N_k] = {square} or flat [{n * n_keys}] for {tokens} "
            f"(q {tuple(q.shape)}, k {tuple(k.shape)}), got {tuple(index.shape)}"
        )
    if mask is not None:
        if mask.dim() != 3 or tuple(mask.shape[1:]) != square or mask.shape[0] == 0:
            raise ValueError(
                f"window_attention: mask must be [nW, N, N_k] with (N, N_k) = {square} (q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}), got {tuple(mask.shape)}"
            )
        if batch_windows % mask.shape[0] != 0:
            raise ValueError(
                f"window_attention: the number of windows B_ = {batch_windows} (q {tuple(q.shape)}) is not a "
                f"multiple of the mask's nW = {mask.shape[0]} (mask {tuple(mask.shape)}); window b uses mask[b % nW]"
            )
    devices = {t.device for t in (q, k, v, bias_table, index) + (() if mask is None else (mask,))}
    if len(devices) > 1:
        raise ValueError(f"window_attention: all tensors must be on one device, got {sorted(map(str, devices))}")


class _GatherBias(torch.autograd.Function):
    """``bias[h, i, j] = table[index[i, j], h]`` (contiguous ``[heads, N, N_k]``); the backward sums
    dbias into the table in a fixed order, in at least float32.

    Plain autograd of the indexing accumulates with ``index_put_``, which on a multi-threaded CPU
    may add with parallel atomics (a run-to-run different sum for 16 x 16 windows).
    """

    @staticmethod
    def forward(ctx, table, index, n, n_keys):
        ctx.save_for_backward(index)
        ctx.table_shape, ctx.table_dtype = table.shape, table.dtype
        return table[index].view(n, n_keys, table.shape[1]).permute(2, 0, 1).contiguous()

    @staticmethod
    def backward(ctx, dbias):
        (index,) = ctx.saved_tensors
        heads = dbias.shape[0]
        grad = dbias.permute(1, 2, 0).reshape(-1, heads).to(torch.promote_types(ctx.table_dtype, torch.float32))
        dtable = grad.new_zeros(ctx.table_shape)
        if grad.device.type == "cpu":
            # serial over the index on the CPU, so each entry adds its terms in index order
            dtable.scatter_add_(0, index[:, None].expand_as(grad), grad)
        else:
            # on CUDA index_put_ accumulates after sorting the indices (scatter_add_ uses atomics)
            dtable.index_put_((index,), grad, accumulate=True)
        return dtable.to(ctx.table_dtype), None, None, None


def _gather_bias(bias_table: torch.Tensor, index: torch.Tensor, n: int, n_keys: int | None = None) -> torch.Tensor:
    """``bias[h, i, j] = table[index[i, j], h]``, contiguous ``[heads, N, N_k]`` (N_k = N unless given);
    gradients reach the table. Negative entries count from the table's end, as in torch indexing: HAT's
    overlapping cross-attention index holds some (its offsets are shifted by too little), and spandrel's
    eager form reads the table that way."""
    index = index.reshape(-1).long()
    index = torch.where(index < 0, index + bias_table.shape[0], index)  # the backward's scatter takes no negatives
    return _GatherBias.apply(bias_table, index, n, n if n_keys is None else n_keys)


def _additive_mask(bias: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """bias + mask as one contiguous ``[G, heads, N, N_k]`` in ``dtype``: G = nW, or 1 without a mask."""
    bias = bias.to(dtype).contiguous()
    if mask is None:
        return bias.unsqueeze(0)
    # (a no-op unless the sum came out in another memory layout)
    return (bias.unsqueeze(0) + mask.to(dtype).unsqueeze(1)).contiguous()


def _fold_windows(t: torch.Tensor, groups: int, padded_dim: int, scale: float = 1.0) -> torch.Tensor:
    """``[B_, heads, N, d]`` -> contiguous ``[B_/G, G*heads, N, padded_dim]``, times ``scale``, zero-padded.

    With window ``b = G m + w`` at batch index ``m`` and head-group ``w``, a ``[1, G*heads, N, N_k]``
    mask broadcasts over the batch: each window meets its own ``mask[w]`` with no expanded copy.
    """
    batch_windows, heads, n, d = t.shape
    shape = (batch_windows // groups, groups * heads, n, padded_dim)
    if padded_dim == d and scale == 1.0 and t.is_contiguous():
        return t.view(shape)
    out = t.new_empty(shape)
    flat = out.view(batch_windows, heads, n, padded_dim)
    if padded_dim > d:
        flat[..., d:].zero_()
    flat[..., :d].copy_(t)
    if scale != 1.0:
        # in place on the view, not torch.mul(out=the view): torch.compile breaks its graph at an out= that
        # is not contiguous
        flat[..., :d].mul_(scale)
    return out


def _unfold_windows(t: torch.Tensor, batch_windows: int, heads: int, d: int) -> torch.Tensor:
    """The inverse of ``_fold_windows`` (a view: the padding columns are sliced off)."""
    out = t.view(batch_windows, heads, t.shape[-2], t.shape[-1])
    return out if t.shape[-1] == d else out[..., :d]


def _padded_head_dim(d: int, device: torch.device) -> int:
    if device.type != "cpu" or not _CPU_PADS_HEAD_DIM:
        return d
    return -(-d // _CPU_HEAD_DIM_MULTIPLE) * _CPU_HEAD_DIM_MULTIPLE


def _sdpa_wins(device: torch.device) -> bool:
    """Whether the torch backend uses ``F.scaled_dot_product_attention`` on ``device``.

    Measured on a 2-core AMD EPYC (AVX2) shared with other jobs: one thread, CPU time, medians of
    75 interleaved steps; forward + backward of the core at the SwinIR-M shape (32 windows, 6
    heads, 64 tokens, head dim 30; q, k, v the module's strided views), unshifted / shifted:
    spandrel's eager form 10.9 / 12.6 ms; SDPA with the folded mask 11.6 / 12.9 (its CPU flash
    backward recomputes the logits: slower than two matmuls at 64 tokens); ``_MatmulWindowAttention``
    9.2 / 10.1 (10.4 / 11.1 without the head-dim padding). Head dim 12: eager 3.7 / 5.1, SDPA
    4.2 / 5.1, matmul 3.4 / 4.2. On a GPU SDPA's fused kernels keep P out of memory, which the
    matmul form cannot.
    """
    return device.type != "cpu"


# -- the torch backend --


# Mask entries at or below this become -inf on the CPU (Swin's shift mask holds 0 and -100).
_HARD_MASK_BELOW = -75.0


def _hard_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The shift mask with its entries of -75 or less made -inf, for the CPU path in float32 / bfloat16
    (unchanged for other dtypes, and in the rows that would keep no finite entry).

    Swin's -100 makes P_ij = e^-100 = 3.8e-44 across regions: a float32 subnormal, and on the CPU every
    operation on one takes a microcode assist. Measured on an Intel Xeon (AVX512), one thread: a
    [192, 64, 64] x [192, 64, 32] matmul took 0.70 ms with normal P, 0.44 with those entries zero and
    33 ms with them subnormal; SwinIR-M's shifted window attention (fwd + bwd) ran 4.8x slower than the
    unshifted one. With -inf those probabilities are exactly zero (what e^-100 rounds to in float32 short
    of the subnormals), and so are their terms of the backward. Done on the small [nW, N, N_k] mask: the
    alternatives measured on the [B_, heads, N, N_k] logits cost more than they saved in inference
    (masking the logits below their row maximum - 75: three more passes, 31 ms of the bundled SwinIR's
    forward at 128 x 128 pixels) or moved the subnormals into the backward (raising them to that floor).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        return mask
    far = mask <= _HARD_MASK_BELOW
    # no branch on the values: torch.compile traces it whole
    return mask.masked_fill(far & ~far.all(dim=-1, keepdim=True), float("-inf"))


class _MatmulWindowAttention(torch.autograd.Function):
    """softmax(scale q k^T + mask) v with batched matmuls; saves the padded q, k, v and P.

    ``mask``: the additive ``[G, heads, N, N_k]`` (bias + shift mask) in q's dtype; window b uses
    ``mask[b % G]``. Its gradient (``sum_b dS``) is returned only when it requires grad.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        batch_windows, heads, n, d = q.shape
        groups, n_keys = mask.shape[0], k.shape[2]
        padded = _padded_head_dim(d, q.device)
        # The scale goes into the copy of q (d columns) rather than onto the N x N logits.
        qs = _fold_windows(q, groups, padded, scale)
        kf = _fold_windows(k, groups, padded)
        vf = _fold_windows(v, groups, padded)
        logits = torch.matmul(qs, kf.transpose(-2, -1))
        logits += mask.view(1, groups * heads, n, n_keys)
        p = torch.softmax(logits, dim=-1)
        del logits
        o = torch.matmul(p, vf)
        ctx.save_for_backward(qs, kf, vf, p)
        ctx.scale, ctx.shape = scale, (batch_windows, heads, n, d)
        return _unfold_windows(o, batch_windows, heads, d)

    @staticmethod
    def backward(ctx, do):
        qs, kf, vf, p = ctx.saved_tensors
        batch_windows, heads, n, d = ctx.shape
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        groups = p.shape[1] // heads
        do_f = _fold_windows(do, groups, vf.shape[-1])
        dq = dk = dv = dmask = None
        if need_v:
            dv = _unfold_windows(torch.matmul(p.transpose(-2, -1), do_f), batch_windows, heads, d)
        if not (need_q or need_k or need_mask):
            return dq, dk, dv, dmask, None
        # dS = P * (dP - rowsum(P * dP)), dP = do v^T
        ds = torch._softmax_backward_data(torch.matmul(do_f, vf.transpose(-2, -1)), p, -1, p.dtype)
        if need_q:
            dq = _unfold_windows(torch.matmul(ds, kf).mul_(ctx.scale), batch_windows, heads, d)
        if need_k:
            # qs already carries the scale: dk = scale dS^T q = dS^T qs
            dk = _unfold_windows(torch.matmul(ds.transpose(-2, -1), qs), batch_windows, heads, d)
        if need_mask:
            dmask = ds.sum(0).view(groups, heads, n, kf.shape[2])
        return dq, dk, dv, dmask, None


def _sdpa_window_attention(q, k, v, mask, scale):
    """``F.scaled_dot_product_attention`` with the windows folded into heads (see ``_fold_windows``)."""
    batch_windows, heads, n, d = q.shape
    groups, n_keys = mask.shape[0], k.shape[2]
    folded = [t.reshape(batch_windows // groups, groups * heads, t.shape[2], d) for t in (q, k, v)]
    o = F.scaled_dot_product_attention(*folded, attn_mask=mask.view(1, groups * heads, n, n_keys), scale=scale)
    return o.view(batch_windows, heads, n, d)


def _torch_window_attention(q, k, v, bias, mask, scale):
    if _sdpa_wins(q.device):
        return _sdpa_window_attention(q, k, v, _additive_mask(bias, mask, q.dtype), scale)
    if mask is not None:
        mask = _hard_mask(mask, q.dtype)
    return _MatmulWindowAttention.apply(q, k, v, _additive_mask(bias, mask, q.dtype), scale)


# -- the fused backends (triton, cuda) --


def _fused_takes(
    backend: str, dtype: torch.dtype, n: int, head_dim: int, n_keys: int | None = None, need_dbias: bool = True
) -> bool:
    """Whether ``backend``'s kernels take windows of ``n`` queries (and ``n_keys`` keys, default ``n``), heads
    of ``head_dim``, in ``dtype``, with (``need_dbias``) or without the bias table's gradient: where they do
    not, "auto" runs the torch path (``resolve``'s ``takes``)."""
    n_keys = n if n_keys is None else n_keys
    if backend == "triton":
        from adaptsr.kernels.window_attention import window_attention_takes

        return window_attention_takes(dtype, n, head_dim, n_keys)
    if backend == "cuda":
        from adaptsr._cuda import window_attention_takes

        return window_attention_takes(dtype, n, head_dim, n_keys, need_dbias)
    return True


def _kernel_launchers(backend: str):
    """``(window_attention_fwd, window_attention_bwd)`` of the backend, imported on first use.

    The Triton module must be imported after ``TRITON_INTERPRET`` is set (DESIGN.md section 5),
    and the CUDA extension is built separately: neither is imported with this module.
    """
    if backend == "triton":
        from adaptsr.kernels.window_attention import window_attention_bwd, window_attention_fwd
    else:
        from adaptsr._cuda import window_attention_bwd, window_attention_fwd
    return window_attention_fwd, window_attention_bwd


class _FusedWindowAttention(torch.autograd.Function):
    """The kernels' forward (o, lse) and backward (dq, dk, dv, dbias); P never reaches memory.

    ``bias``: float32 contiguous ``[heads, N, N_k]``; ``mask``: float32 ``[nW, N, N_k]`` or None.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, backend):
        fwd, _ = _kernel_launchers(backend)
        o, lse = fwd(q, k, v, bias, mask, scale)
        ctx.save_for_backward(q, k, v, o, lse, bias, mask)
        ctx.scale, ctx.backend = scale, backend
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, bias, mask = ctx.saved_tensors
        _, bwd = _kernel_launchers(ctx.backend)
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        dq, dk, dv, dbias = bwd(do, q, k, v, o, lse, bias, mask, ctx.scale, need_bias)
        return (
            dq if need_q else None,
            dk if need_k else None,
            dv if need_v else None,
            dbias if need_bias else None,
            None,
            None,
            None,
        )


def _fused_window_attention(q, k, v, bias, mask, scale, backend):
    # The kernels take the gathered bias as float32 [heads, N, N_k]; autograd carries their dbias
    # back through this cast and the gather to the table.
    bias32 = bias.to(torch.float32).contiguous()
    mask32 = None if mask is None else mask.to(torch.float32)
    return _FusedWindowAttention.apply(q, k, v, bias32, mask32, scale, backend)


# -- functional entry point --


def _autocast_qkv(q, k, v):
    """Under torch.autocast: q, k, v cast to autocast's dtype (float64 stays), and a context that
    turns autocast off for the op itself; otherwise the tensors as they are and a null context."""
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return (q, k, v), contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)
    cast = tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in (q, k, v))
    return cast, torch.autocast(device_type, enabled=False)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias_table[index] + mask[b % nW]) v`` on the selected backend.

    q ``[B_, heads, N, d]``; k, v ``[B_, heads, N_k, d]`` (N_k = N for Swin's windows; more keys than
    queries for HAT's overlapping cross-attention); bias_table ``[T, heads]``; index ``[N, N_k]`` (or
    flat); mask ``[nW, N, N_k]`` or None. Returns ``[B_, heads, N, d]`` in q's dtype (autocast's
    dtype under autocast). Gradients reach q, k, v and the table; the mask is a constant.
    """
    _check_inputs(q, k, v, bias_table, index, mask)
    if mask is not None:
        mask = mask.detach()
    scale = float(scale)
    n, n_keys, head_dim = q.shape[2], k.shape[2], q.shape[3]
    need_dbias = bias_table.requires_grad and torch.is_grad_enabled()
    backend = resolve(
        q.device, "window_attention", lambda name: _fused_takes(name, q.dtype, n, head_dim, n_keys, need_dbias),
        call=(window_attention, (q, k, v, bias_table, index, mask, scale)),
    )
    if backend == "reference":
        return window_attention_ref(q, k, v, bias_table, index, mask, scale)
    if backend not in ("torch", "triton", "cuda"):
        raise NotImplementedError(f"window_attention has no {backend!r} backend")
    (q, k, v), no_autocast = _autocast_qkv(q, k, v)
    with no_autocast:
        bias = _gather_bias(bias_table, index, n, n_keys)
        if backend == "torch":
            return _torch_window_attention(q, k, v, bias, mask, scale)
        return _fused_window_attention(q, k, v, bias, mask, scale, backend)
