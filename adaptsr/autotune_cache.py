"""The autotuner's choices kept on disk, so that a second run on the same machine skips the trials.

One JSON file (``ADAPTSR_AUTOTUNE_CACHE``; by default ``$XDG_CACHE_HOME/adaptsr/autotune.json``, that is
``~/.cache/adaptsr/autotune.json``; ``off`` keeps nothing) holds, per machine, each op's choice for each call
signature with the times that made it. A machine is its processor or GPU, the thread count, and the versions
of torch, Triton, CUDA and adaptsr: the same call on other hardware or after an upgrade is timed again,
since a kernel or a library that changed may change the winner. Entries are also keyed on the contenders
raced, so building the CUDA extension later gives its kernels a chance.

The file is a cache, never a source of errors: one that cannot be read or written is warned about once and
left aside, and the run goes on timing as it would without it. Writes are atomic (a crash leaves the old
file); two processes tuning at once may each miss the other's newest entries, which costs a trial later,
not a wrong choice. Delete the file to time everything again.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import threading
import warnings
from importlib import metadata
from pathlib import Path

import torch

__all__ = ["cache_file", "entry_key", "forget", "load", "machine", "store"]

_ENV_VAR = "ADAPTSR_AUTOTUNE_CACHE"
_OFF = ("", "0", "off", "false", "no", "none")
FORMAT = 1

_lock = threading.Lock()
_loaded: dict[Path, dict[str, dict[str, dict]]] = {}  # file -> machine -> entry key -> entry, read once
_warned: set[Path] = set()


def cache_file() -> Path | None:
    """Where choices are kept, or None when ``ADAPTSR_AUTOTUNE_CACHE`` turns the cache off."""
    setting = os.environ.get(_ENV_VAR)
    if setting is None:
        root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(root) / "adaptsr" / "autotune.json"
    if setting.strip().lower() in _OFF:
        return None
    return Path(setting).expanduser()


@functools.lru_cache(maxsize=None)  # facts of the process, read once rather than for every new signature
def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def _processor() -> str:
    """The CPU's model name where Linux says it (``platform.processor()`` is often empty there)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """What a timing depends on besides the call: the hardware that ran it and the software versions."""
    from adaptsr import __version__

    facts = {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "adaptsr": __version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        facts.update(gpu=torch.cuda.get_device_name(index), capability=list(torch.cuda.get_device_capability(index)),
                     cuda=torch.version.cuda)
    else:
        facts.update(cpu=_processor(), threads=torch.get_num_threads())
    return json.dumps(facts, sort_keys=True)


def entry_key(op: str, signature: str, contenders: list[str]) -> str:
    return f"{op} | {signature} | {','.join(contenders)}"


def _warn_once(path: Path, what: str) -> None:
    if path not in _warned:
        _warned.add(path)
        warnings.warn(f"adaptsr autotune: cache {path} {what}; going on without it", RuntimeWarning, stacklevel=4)


def _read(path: Path) -> dict[str, dict[str, dict]] | None:
    """The file's machines and entries: empty for a missing file, None (with a warning) for one that cannot be
    read or is not a cache, which is then left as it is."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as err:
        _warn_once(path, f"could not be read ({err.strerror or err})")
        return None
    try:
        content = json.loads(text)
        machines = content["machines"]
        if content.get("format") != FORMAT or not isinstance(machines, dict):
            raise ValueError(f"format {content.get('format')!r}, expected {FORMAT}")
        return {name: dict(entries) for name, entries in machines.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        _warn_once(path, f"is not an adaptsr autotune cache ({type(err).__name__}: {err})")
        return None


def load(path: Path, machine_name: str, key: str) -> dict | None:
    """The entry kept for ``key`` on ``machine_name``, or None. The file is read once per process."""
    with _lock:
        if path not in _loaded:
            _loaded[path] = _read(path) or {}
        return _loaded[path].get(machine_name, {}).get(key)


def store(path: Path, machine_name: str, key: str, entry: dict) -> None:
    """Add ``entry`` to the file, merged with what other processes wrote to it since it was read; a file that is
    not a cache is not overwritten."""
    from adaptsr.io import atomic_write  # imported here: adaptsr.io brings in spandrel

    with _lock:
        machines = _read(path)
        if machines is None:
            return
        machines.setdefault(machine_name, {})[key] = entry
        _loaded[path] = machines
        text = json.dumps({"format": FORMAT, "machines": machines}, indent=1, sort_keys=True)
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        except OSError as err:
            _warn_once(path, f"could not be written ({err.strerror or err})")


def forget() -> None:
    """Drop what was read from the files (the next lookup reads them again)."""
    with _lock:
        _loaded.clear()
        _warned.clear()
