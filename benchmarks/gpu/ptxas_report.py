"""Compile the package's Triton kernels for real GPUs on any machine, and report ptxas's verdict.

Triton compiles for a named target without a GPU or a driver (its bundled ptxas does the last
step), so register spills, stack frames and shared-memory use of every kernel at the launchers'
own tile choices can be read on the CPU, before a GPU is ever spent on them. Each kernel is
specialised the way Triton's JIT specialises it at run time: integers equal to 1 become
constants, integers divisible by 16 and every pointer carry the divisibility-16 hint; the
integer values come from a representative SR-training shape (SwinIR-M / RRDB sizes).

    python benchmarks/gpu/ptxas_report.py            # markdown table on stdout
    python benchmarks/gpu/ptxas_report.py --check    # exit 1 on a kernel that spills, overflows shared memory
                                                     # or has 16-bit/TF32 products off the tensor cores

--check holds a kernel with a fixed launch configuration to no spills on every architecture; for
an @autotune kernel, whose tuner times every candidate and keeps the fastest, it asks that every
candidate be clean on sm_90 (the card the benchmarks run on) and at least one on every other.

A spill here is a kernel that will run slowly everywhere: the first fused low-rank kernel (before
this check existed) spilled 6.6 KB per thread at its launch configuration and reached 2-12% of
the H100's copy bandwidth. A few words (up to ``MINOR_SPILL_BYTES``) are reported but pass: ptxas
parks them outside the hot loop, and they came and went with unrelated settings (pipeline stages,
tile shape) in the float32 window-attention backward, where kilobytes had been the problem.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

# The kernels must be defined for a real target, not for the interpreter.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adaptsr.kernels import lora_conv2d as conv_kernels  # noqa: E402
from adaptsr.kernels import shifted_window_attention as shifted_kernels  # noqa: E402
from adaptsr.kernels import window_attention as window_kernels  # noqa: E402

# Shared memory per block the architectures allow (opt-in maximum), bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # others: the smallest, 99 KB
DEFAULT_ARCHS = (80, 86, 90)
MINOR_SPILL_BYTES = 64  # 16 words per thread, loads and stores together


@dataclass
class KernelCase:
    """One kernel at one launch configuration, with the run-time integer values it would see."""

    name: str
    kernel: object
    pointers: dict[str, str]  # argument -> Triton pointer type, e.g. "*bf16"
    constexprs: dict
    ints: dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    # for one of several @autotune candidates: the name shared by the candidates of one launch
    autotune_group: str | None = None
    floats: dict[str, float] = field(default_factory=dict)  # float scalars (fp32 arguments)


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):  # unwrap @autotune / @heuristics
        kernel = kernel.fn
    return kernel


def ptxas_path() -> str:
    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    if not found:
        raise FileNotFoundError("Triton's bundled ptxas was not found (triton/backends/nvidia/bin/ptxas)")
    return found[0]


def compile_case(case: KernelCase, arch: int) -> dict:
    """Registers, spill bytes, stack bytes and shared bytes of ``case`` compiled for ``sm_<arch>``."""
    fn = _jit_function(case.kernel)
    constexprs = dict(case.constexprs)
    constexprs.update({name: 1 for name, value in case.ints.items() if value == 1})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in case.pointers:
            signature[name] = case.pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in case.floats:
            signature[name] = "fp32"
        else:
            if name not in case.ints:
                raise KeyError(f"{case.name}: no representative value for integer argument {name!r}")
            signature[name] = "i32"
            if case.ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=case.num_warps, num_stages=case.num_stages),
    )
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        # the flags Triton's own ptxas step uses, plus -v for the resource report
        log = subprocess.run(
            [ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
             ptx, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "shared_bytes": compiled.metadata.shared,
        "tensor_core_ops": len(_TENSOR_CORE_OP.findall(compiled.asm["ptx"])),
    }


# Tensor-core instructions in PTX: mma.sync (Ampere and later) and wgmma (Hopper's warpgroup MMA).
_TENSOR_CORE_OP = re.compile(r"\b(?:mma\.sync|wgmma\.mma_async)\b")


def wants_tensor_cores(case: KernelCase) -> bool:
    """Whether the case's products should run on tensor cores: 16-bit operands, or float32 ones in TF32.
    A dot that falls back to FMAs (a tile edge under 16, an operand upcast by mistake) runs several times
    slower and still compiles cleanly, so only this column shows it."""
    sixteen_bit = any(t in ("*bf16", "*fp16") for t in case.pointers.values())
    return sixteen_bit or case.constexprs.get("INPUT_PRECISION") == "tf32"


# -- the cases: each launcher's tile choices at representative shapes --


def _conv_strides(prefix: str, channels: int, height: int, width: int, channels_last: bool) -> dict[str, int]:
    if channels_last:
        n, c, h, w = channels * height * width, 1, width * channels, channels
    else:
        n, c, h, w = channels * height * width, height * width, width, 1
    return {f"stride_{prefix}n": n, f"stride_{prefix}c": c, f"stride_{prefix}h": h, f"stride_{prefix}w": w}


def lora_conv2d_cases() -> list[KernelCase]:
    """The forward's autotune configs and both backward phases, for the conv and linear benchmark shapes."""
    cases = []
    shapes = [  # (label, batch, channels in = out, height, width, kernel, rank)
        ("conv3x3 64ch 128x128", 16, 64, 128, 128, 3, 8),
        ("conv3x3 180ch 64x64", 16, 180, 64, 64, 3, 16),
        ("linear 180->540 (1x1)", 65536, 180, 1, 1, 1, 8),
    ]
    # float32 twice: TF32 products (convs under torch's default cudnn.allow_tf32) and IEEE ones (linear
    # layers under the default matmul setting, and convs with TF32 switched off); see kernels._precision.
    for dtype, precision in (("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")):
        ptr = f"*{dtype}"
        size = {"bf16": 2, "fp32": 4}[dtype]
        label_dtype = dtype if dtype == "bf16" else f"{dtype} {precision}"
        for label, n, c, h, w, k, rank in shapes:
            c_out = 3 * c if label.startswith("linear") else c
            for channels_last in (True, False) if k > 1 else (True,):
                layout = "nhwc" if channels_last else "nchw"
                m, pad = n * h * w, k // 2
                geometry = dict(STRIDE_H=1, STRIDE_W=1, PAD_H=pad, PAD_W=pad, DIL_H=1, DIL_W=1, KH=k, KW=k)
                x_strides = _conv_strides("x", c, h, w, channels_last)
                tile_set = conv_kernels._tile_set(size, precision)
                for config in (c for c in conv_kernels._fwd_configs() if c.kwargs["TILE_SET"] == tile_set):
                    ints = dict(M=m, H=h, W=w, HO=h, WO=w, C_IN_G=c, C_OUT_G=c_out, R=rank, N_COLS=c_out + rank,
                                **x_strides, **_conv_strides("y", c_out, h, w, channels_last),
                                **_conv_strides("z", rank, h, w, channels_last), **geometry)
                    tiles = "x".join(str(config.kwargs[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_C"))
                    tiles += f" w{config.num_warps} s{config.num_stages}"
                    cases.append(KernelCase(
                        f"lora fwd {label} {layout} {label_dtype} tile {tiles}", conv_kernels._lora_conv2d_fwd_kernel,
                        dict(x_ptr=ptr, w_ptr=ptr, bias_ptr=ptr, y_ptr=ptr, z_ptr=ptr),
                        dict(HAS_BIAS=True, INPUT_PRECISION=precision, UPCAST=False, **config.kwargs), ints,
                        config.num_warps, config.num_stages,
                        autotune_group=f"lora fwd {label} {layout} {label_dtype}",
                    ))
                r_pad = conv_kernels._pow2_block(rank, 1 << 30)
                block_o = conv_kernels._pow2_block(c_out, conv_kernels._MAX_BLOCK_O)
                block_m = conv_kernels._phase1_block_m(block_o, size)
                rows = 4096  # a multiple of every pixel step; its value does not change the code
                cases.append(KernelCase(
                    f"lora grad phase 1 (u, dB) {label} {layout} {label_dtype} tile {block_m}x{block_o} w8",
                    conv_kernels._lowrank_u_db_kernel,
                    dict(dy_ptr=ptr, b_ptr=ptr, z_ptr=ptr, u_ptr=ptr, ws_b_ptr="*fp32"),
                    dict(R_PAD=r_pad, BLOCK_M=block_m, BLOCK_O=block_o, INPUT_PRECISION=precision, UPCAST=False),
                    dict(M=m, HO=h, WO=w, C_OUT_G=c_out, R=rank, ROWS_PER_PROGRAM=rows,
                         **_conv_strides("d", c_out, h, w, channels_last), **_conv_strides("z", rank, h, w, channels_last)),
                    floats=dict(scaling=2.0), num_warps=8,
                ))
                block_m, block_c, warps = conv_kernels._phase2_tiles(c, size)
                cases.append(KernelCase(
                    f"lora grad phase 2 (dA) {label} {layout} {label_dtype} tile {block_m}x{block_c} w{warps}",
                    conv_kernels._lowrank_da_kernel,
                    dict(x_ptr=ptr, u_ptr=ptr, ws_a_ptr="*fp32"),
                    dict(R_PAD=r_pad, BLOCK_M=block_m, BLOCK_C=block_c, INPUT_PRECISION=precision, UPCAST=False),
                    dict(M=m, H=h, W=w, HO=h, WO=w, C_IN_G=c, R=rank, NUM_O_BLOCKS=1, ROWS_PER_PROGRAM=rows,
                         **x_strides, **geometry),
                    floats=dict(scaling=2.0), num_warps=warps,
                ))
    return cases


# The window-attention launchers are run for real, on meta tensors (shapes and strides, no data),
# with each kernel replaced by a recorder: the cases then carry exactly the tiles, warps, window
# groups and strides the launchers choose, and follow them when those choices change.

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_WINDOW_KERNELS = ("_window_attention_fwd_kernel", "_window_attention_bwd_kernel",
                   "_window_attention_bwd_dbias_kernel", "_qkv_window_attention_fwd_kernel")


class _LaunchRecorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch and runs nothing."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


@contextlib.contextmanager
def _recorded_window_launches():
    """Yields the list that every window-attention kernel launch is appended to while inside."""
    launches: list = []
    saved = {name: getattr(window_kernels, name) for name in _WINDOW_KERNELS + ("_check_device",)}
    try:
        for name in _WINDOW_KERNELS:
            setattr(window_kernels, name, _LaunchRecorder(saved[name], launches))
        window_kernels._check_device = lambda name, t: None  # meta tensors are not on CUDA
        yield launches
    finally:
        for name, value in saved.items():
            setattr(window_kernels, name, value)


# tile constexprs as they appear in a case's name ("tile M64 N64 D32": BLOCK_M = 64, ...)
_TILE_KEYS = {"N_PAD": "NPAD", "BLOCK_M": "M", "BLOCK_N": "N", "BLOCK": "B", "BLOCK_C": "C", "D_PAD": "D"}


def _case_from_launch(label: str, kernel, args, kwargs) -> KernelCase:
    """A KernelCase from one recorded launch: tensors become pointers of their dtype, Python ints and
    floats the run-time scalars, constexpr parameters the constants."""
    fn = _jit_function(kernel)
    values = dict(zip(fn.arg_names, args))
    values.update((k, v) for k, v in kwargs.items() if k not in ("num_warps", "num_stages"))
    pointers, ints, floats, constexprs = {}, {}, {}, {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr:
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            pointers[param.name] = _POINTER_TYPES[value.dtype]
        elif isinstance(value, float):
            floats[param.name] = value
        else:
            ints[param.name] = int(value)
    warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
    short = fn.__name__.removeprefix("_").removesuffix("_kernel").replace("window_attention_", "")
    flags = [key.lower() for key in ("FUSED_DBIAS",) if constexprs.get(key)]
    tiles = " ".join(f"{short_key}{constexprs[key]}" for key, short_key in _TILE_KEYS.items() if key in constexprs)
    name = " ".join([label, short, *flags, "tile", tiles, f"w{warps}"])
    return KernelCase(name, kernel, pointers, constexprs, ints, num_warps=warps, num_stages=stages, floats=floats)


def window_attention_cases() -> list[KernelCase]:
    """Every window-attention kernel (forward, backward, dbias, the qkv single pass) as its launchers
    run it on a SwinIR-M training batch (dim 180, 6 heads: head dim 30, padded to 32; 16 images of
    64 x 64 tokens), windows 8 (N = 64, one tile) and 16 (N = 256, tiled; HAT's window, and HAT-M's
    head dim is also 30), with and without the shift mask, bf16 and fp32 (fp16 takes the same tiles
    as bf16), windows stored one after another, with 2.25 times as many keys as queries (HAT's
    overlapping cross-attention) and SPATIAL (the shifted-window map's token rows)."""
    batch, tokens, dim, heads = 16, 64, 180, 6
    d = dim // heads
    meta = dict(device="meta")
    cases, seen = [], set()
    for window in (8, 16):
        n, windows = window * window, (tokens // window) ** 2
        batch_windows = batch * windows
        for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            for shifted in (False, True):
                label = f"window w{window} {dtype_name} {'shifted' if shifted else 'unshifted'}"
                bias = torch.empty(heads, n, n, **meta)
                mask = torch.empty(windows, n, n, **meta) if shifted else None
                scale = d ** -0.5
                with _recorded_window_launches() as launches:
                    # windows one after another: q, k, v are views of the qkv linear's [B_, N, 3C]
                    qkv = torch.empty(batch_windows, n, 3, heads, d, dtype=dtype, **meta)
                    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                    o, lse = window_kernels.window_attention_fwd(q, k, v, bias, mask, scale)
                    for need_dbias in (False, True):
                        window_kernels.window_attention_bwd(o, q, k, v, o, lse, bias, mask, scale, need_dbias)
                    # the single pass: x [B_, N, C], W_qkv [3C, C]
                    x = torch.empty(batch_windows, n, dim, dtype=dtype, **meta)
                    w_qkv, b_qkv = torch.empty(3 * dim, dim, dtype=dtype, **meta), torch.empty(3 * dim, dtype=dtype, **meta)
                    window_kernels.qkv_window_attention_fwd(x, w_qkv, b_qkv, heads, bias, mask, scale)
                    windowed = len(launches)
                    if not shifted:
                        # HAT's overlapping cross-attention: keys from the (1.5 w)^2 window around the queries
                        n_keys = (window * 3 // 2) ** 2
                        kv = torch.empty(batch_windows, n_keys, 2, heads, d, dtype=dtype, **meta)
                        k_ov, v_ov = kv.permute(2, 0, 3, 1, 4).unbind(0)
                        bias_ov = torch.empty(heads, n, n_keys, **meta)
                        o, lse = window_kernels.window_attention_fwd(q, k_ov, v_ov, bias_ov, None, scale)
                        window_kernels.window_attention_bwd(o, q, k_ov, v_ov, o, lse, bias_ov, None, scale, True)
                    overlapped = len(launches)
                    # SPATIAL: the shifted-window block on the [B, H, W, 3C] map
                    qkv_map = torch.empty(batch, tokens, tokens, 3 * dim, dtype=dtype, **meta)
                    shift = window // 2 if shifted else 0
                    out, lse = shifted_kernels.shifted_window_attention_fwd(qkv_map, bias, mask, scale, window, shift,
                                                                             heads)
                    for need_dbias in (False, True):
                        shifted_kernels.shifted_window_attention_bwd(out, qkv_map, out, lse, bias, mask, scale, window,
                                                                     shift, heads, need_dbias)
                for i, (kernel, args, kwargs) in enumerate(launches):
                    layout = "windowed" if i < windowed else "overlap" if i < overlapped else "spatial"
                    case = _case_from_launch(f"{label} {layout}", kernel, args, kwargs)
                    key = (case.name, tuple(sorted(case.ints.items())), tuple(sorted(case.pointers.items())))
                    if key not in seen:  # need_dbias=False and True launch the same tiled backward kernel
                        seen.add(key)
                        cases.append(case)
    return cases


def all_cases() -> list[KernelCase]:
    return lora_conv2d_cases() + window_attention_cases()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on any spill, shared-memory overflow or 16-bit/TF32 kernel without tensor cores")
    parser.add_argument("--archs", default=",".join(map(str, DEFAULT_ARCHS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("-k", default="", help="only the cases whose name contains this text")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    print(f"Triton {triton.__version__}; ptxas {ptxas_path()}")
    print()
    print("| kernel | sm | registers | spill bytes | stack bytes | shared KB | tensor-core ops | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    failures = 0
    clean_candidates: dict[tuple[str, int], int] = {}  # (autotune group, arch) -> clean candidates
    for case in (c for c in all_cases() if args.k in c.name):
        for arch in archs:
            r = compile_case(case, arch)
            problems = []
            if r["spill_bytes"] > MINOR_SPILL_BYTES:
                problems.append("spills")
            if r["shared_bytes"] > SHARED_LIMIT.get(arch, 99 * 1024):
                problems.append("shared memory over the limit")
            if wants_tensor_cores(case) and not r["tensor_core_ops"]:
                problems.append("no tensor-core instruction")
            verdict = ", ".join(problems) or ("ok (minor spill)" if r["spill_bytes"] else "ok")
            if case.autotune_group is not None:
                key = (case.autotune_group, arch)
                clean_candidates[key] = clean_candidates.get(key, 0) + (not problems)
                if problems and arch != 90:
                    verdict += " (an autotune candidate: allowed off sm_90)"
                    problems = []
            failures += bool(problems)
            print(f"| {case.name} | {arch} | {r['registers']} | {r['spill_bytes']} | {r['stack_bytes']} | "
                  f"{r['shared_bytes'] / 1024:.0f} | {r['tensor_core_ops']} | {verdict} |", flush=True)
    for (group, arch), clean in clean_candidates.items():
        if not clean:
            print(f"{group}: no autotune candidate compiles cleanly for sm_{arch}", file=sys.stderr)
            failures += 1
    if failures:
        print(f"\n{failures} kernel configuration(s) spill, overflow shared memory or miss the tensor cores",
              file=sys.stderr)
    return 1 if failures and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
