"""Build script: the pure-Python package, plus the CUDA extension ``adaptsr._C`` when it can be built.

Metadata lives in pyproject.toml.

The extension (csrc/: the LoRA low-rank gradient pass and Swin window attention) is built ahead
of time only when torch is importable while this script runs, torch is a CUDA build and a CUDA
toolkit (nvcc) is found; otherwise the package installs without it and says why in one line, and
``adaptsr._cuda`` builds it just in time on first use of the "cuda" backend (cached).

Build knobs (environment variables):
    ADAPTSR_FORCE_CUDA_BUILD=1  build adaptsr._C or fail: any reason to skip becomes an error
    ADAPTSR_SKIP_CUDA_BUILD=1   never build it here (pure-Python install; JIT build on first use)
    ADAPTSR_CUDA_ARCHS="8.0;8.6;9.0+PTX"
                                the GPU architectures to compile for (TORCH_CUDA_ARCH_LIST syntax);
                                default: Ampere (8.0, 8.6) and Hopper (9.0, with PTX for newer GPUs)
    MAX_JOBS=N                  parallel compile jobs (ninja); lower it when memory is short
    NVCC_THREADS=N              nvcc --threads: the architectures of one file compiled in parallel
    CUDA_HOME=/usr/local/cuda   the toolkit, when nvcc is not found on PATH or in /usr/local/cuda*

Ahead-of-time build: ``pip install --no-build-isolation .`` (or ``-e .``) in an environment that
already has a CUDA build of torch. A plain ``pip install .`` builds in an isolated environment
without torch, so it skips the extension (fast, no compiler needed). Every wheel carries a copy of
csrc/ as ``adaptsr/_csrc/`` for the just-in-time build; csrc/ stays the one source of truth.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"
CSRC_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")  # the same set MANIFEST.in ships in the sdist


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _cuda_helpers():
    """adaptsr/_cuda.py loaded by path (the package itself may not be importable during the build)."""
    spec = importlib.util.spec_from_file_location("_adaptsr_cuda_build", ROOT / "adaptsr" / "_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension() -> tuple[list, dict, str]:
    """(ext_modules, cmdclass, reason): the extension to build, or no extension and why not."""
    if _flag("ADAPTSR_SKIP_CUDA_BUILD"):
        return [], {}, "ADAPTSR_SKIP_CUDA_BUILD is set"
    try:
        import torch
    except ImportError:
        return [], {}, (
            "torch is not importable at build time (build isolation); "
            "`pip install --no-build-isolation .` builds it ahead of time, else it is built on first use"
        )
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU-only build"
    helpers = _cuda_helpers()
    cuda_home = helpers.find_cuda_home(torch.version.cuda)
    if cuda_home is None:
        return [], {}, "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"

    # torch.utils.cpp_extension reads CUDA_HOME and TORCH_CUDA_ARCH_LIST from the environment.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("ADAPTSR_CUDA_ARCHS") or DEFAULT_ARCHS
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cpp_extension.CUDA_HOME = cuda_home  # in case it was imported (and read the environment) earlier

    csrc = Path("csrc")  # setuptools wants source paths relative to this file
    extension = CUDAExtension(
        name="adaptsr._C",
        sources=helpers.sources(csrc),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": helpers.nvcc_flags()},
    )
    return [extension], {"build_ext": BuildExtension}, ""


class BuildPyWithCsrc(build_py):
    """build_py that also copies csrc/ into the built package as adaptsr/_csrc/ (subfolders kept).

    A wheel built without the extension then still holds its sources, so adaptsr._cuda can build
    it just in time after a plain ``pip install .``; the copy lives only in the build folder.
    """

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install finds csrc/ in the checkout itself
            return
        target = Path(self.build_lib) / "adaptsr" / "_csrc"
        # An earlier build may have left a source since removed from csrc/; the JIT build
        # compiles every .cu it finds there, so start from an empty folder.
        shutil.rmtree(target, ignore_errors=True)
        for src in sorted((ROOT / "csrc").rglob("*")):
            if src.is_file() and src.suffix in CSRC_SUFFIXES:
                dst = target / src.relative_to(ROOT / "csrc")
                self.mkpath(str(dst.parent))
                self.copy_file(str(src), str(dst))


os.chdir(ROOT)
ext_modules, cmdclass, reason = cuda_extension()
cmdclass = {"build_py": BuildPyWithCsrc, **cmdclass}
if reason:
    if _flag("ADAPTSR_FORCE_CUDA_BUILD"):
        sys.exit(f"adaptsr: ADAPTSR_FORCE_CUDA_BUILD is set but the CUDA extension cannot be built: {reason}")
    print(f"adaptsr: installing without the CUDA extension adaptsr._C: {reason}", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
