"""A wheel of adaptsr carries the CUDA sources, so an install without the ahead-of-time build can build them just in time.

The wheel is built from a copy of the checkout (so no build/ folder lands in it, and runs beside
other work in the same checkout cannot collide) with ``ADAPTSR_SKIP_CUDA_BUILD=1``, the way a plain
``pip install .`` builds it: pure Python, no compiler. No network: ``--no-index``, no dependencies,
no build isolation (the environment's setuptools builds it). A few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import adaptsr
from adaptsr import _cuda

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
# What setup.py reads to build the package; anything else in the checkout plays no part.
BUILD_INPUTS = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "adaptsr", "csrc")
CSRC_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")


def _pip(*args: str, cwd: Path) -> None:
    env = dict(os.environ, ADAPTSR_SKIP_CUDA_BUILD="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("ADAPTSR_FORCE_CUDA_BUILD", None)
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--no-cache-dir"],
        cwd=cwd, env=env, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, f"pip {args[0]} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def wheel_and_target(tmp_path_factory) -> tuple[Path, Path]:
    """(the built wheel, the folder it is installed into with ``pip install --target``)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    for name in BUILD_INPUTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(src, source / name)
    _pip("wheel", "--no-build-isolation", "--wheel-dir", str(tmp / "dist"), str(source), cwd=tmp)
    (wheel,) = (tmp / "dist").glob("adaptsr-*.whl")
    _pip("install", "--target", str(tmp / "site"), str(wheel), cwd=tmp)
    return wheel, tmp / "site"


def _checkout_csrc_files() -> list[str]:
    """Every C++/CUDA file under csrc/, relative to it (the tree the JIT build needs, headers included)."""
    return sorted(p.relative_to(CSRC).as_posix() for p in CSRC.rglob("*") if p.suffix in CSRC_SUFFIXES)


def test_wheel_holds_the_cuda_sources(wheel_and_target):
    wheel, _ = wheel_and_target
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    translation_units = [Path(s).relative_to(CSRC).as_posix() for s in _cuda.sources(CSRC)]
    assert "bindings.cpp" in translation_units and len(translation_units) > 1
    missing = [f for f in _checkout_csrc_files() if f"adaptsr/_csrc/{f}" not in names]
    assert not missing, f"{wheel.name} lacks these csrc/ files under adaptsr/_csrc/: {missing}"


def test_wheel_holds_the_bundled_models_and_the_type_marker(wheel_and_target):
    wheel, _ = wheel_and_target
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    models = sorted(p.name for p in (Path(adaptsr.__file__).parent / "models").iterdir() if p.suffix != ".py")
    assert models and all(f"adaptsr/models/{name}" in names for name in models), sorted(names)
    assert "adaptsr/py.typed" in names  # PEP 561: type checkers read the package's hints


def test_installed_package_finds_its_own_sources(wheel_and_target):
    """In a fresh interpreter that imports adaptsr from the install folder, _cuda resolves its sources there."""
    _, site = wheel_and_target
    code = (
        "import json, adaptsr, adaptsr._cuda as c; "
        "print(json.dumps({'package': adaptsr.__file__, 'csrc': str(c._CSRC), 'sources': c.sources()}))"
    )
    # The install folder first on the path and a neutral working directory, so neither the
    # checkout nor the editable install of the environment can answer the import.
    env = dict(os.environ, PYTHONPATH=str(site))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=site, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])

    package = site / "adaptsr"
    assert Path(found["package"]).parent == package, f"adaptsr was imported from {found['package']}, not {package}"
    assert Path(found["csrc"]) == package / "_csrc"
    installed = [Path(s) for s in found["sources"]]
    assert [p.relative_to(package / "_csrc").as_posix() for p in installed] == [
        Path(s).relative_to(CSRC).as_posix() for s in _cuda.sources(CSRC)
    ]
    assert all(p.is_file() for p in installed), [str(p) for p in installed if not p.is_file()]
