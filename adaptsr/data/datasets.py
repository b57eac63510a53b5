"""Datasets for adaptation: HR images degraded online, real LR/HR pairs, a cached validation set.

Every dataset returns ``(lr, hr)``: float32 tensors [3, h, w] and [3, h * scale, w * scale] in
[0, 1]. Randomness is deterministic: item ``index`` of epoch ``epoch`` draws from a generator
seeded by ``(seed, epoch, index)`` only, so a run is reproducible, resumable mid-epoch (call
``set_epoch``), and the same in every DataLoader worker and every distributed rank.

The degradation is a callable passed in (see :data:`Degrade`), not imported, so any degradation
model (``adaptsr.data.degradations``, bicubic, a camera profile) plugs in.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, get_worker_info

from adaptsr.data.images import IMAGE_EXTENSIONS, image_size, list_images, read_image, write_png

__all__ = ["CachedValidationSet", "Degrade", "HRFolderDataset", "PairedFolderDataset", "item_generator"]

#: ``degrade(hr, scale, generator) -> lr``: hr [B, 3, H, W] in [0, 1] -> lr [B, 3, H/scale, W/scale],
#: drawing all its randomness from ``generator`` (a CPU torch.Generator).
Degrade = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _mix(*values: object) -> int:
    """A 63-bit seed from any values, the same in every process and on every platform."""
    digest = hashlib.blake2b("\x1f".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator item ``index`` of epoch ``epoch`` draws its randomness from."""
    return torch.Generator().manual_seed(_mix("item", seed, epoch, index))


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


def _augment(tensors: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """The same random horizontal flip, vertical flip and transpose (together: the 8 dihedral
    transforms, i.e. flips and 90-degree rotations) applied to every tensor [C, H, W]."""
    hflip, vflip, transpose = (bool(b) for b in torch.randint(0, 2, (3,), generator=generator))
    out = []
    for t in tensors:
        if hflip:
            t = t.flip(-1)
        if vflip:
            t = t.flip(-2)
        if transpose:
            t = t.transpose(-2, -1)
        out.append(t.contiguous())
    return out


def _random_offset(size: int, patch: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, size - patch + 1, (1,), generator=generator))


def _apply_degrade(degrade: Degrade, hr: torch.Tensor, scale: int, generator: torch.Generator) -> torch.Tensor:
    """``degrade(hr[None], scale, generator)[0]``, checking the shape it returns."""
    lr = degrade(hr[None], scale, generator)
    expected = (1, hr.shape[0], hr.shape[1] // scale, hr.shape[2] // scale)
    if not isinstance(lr, torch.Tensor) or tuple(lr.shape) != expected:
        got = tuple(lr.shape) if isinstance(lr, torch.Tensor) else type(lr).__name__
        raise ValueError(f"degradation {degrade!r} returned {got} for HR {tuple(hr[None].shape)} at scale {scale}; "
                         f"expected {expected}")
    return lr[0].to(device="cpu", dtype=torch.float32)


# Decoding a photo costs more than cropping and degrading it: the demo's 16 crops a step took 660 ms
# on a 2-core CPU, 390 of them in decoding, and 75 ms with the images in memory.
DEFAULT_CACHE_BYTES = 1 << 30


class _DecodedImages:
    """``read_image`` with the decoded images kept in memory, in the order first read, up to ``budget``
    bytes (float32: 12 per pixel; 0 keeps none), shared out among DataLoader workers, each of which keeps
    its own. Callers must not write into what it returns."""

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._images: dict[Path, torch.Tensor] = {}
        self._bytes = 0

    def __call__(self, path: Path) -> torch.Tensor:
        img = self._images.get(path)
        if img is None:
            img = read_image(path)
            size = img.numel() * img.element_size()
            worker = get_worker_info()
            if self._bytes + size <= self.budget // (worker.num_workers if worker is not None else 1):
                self._images[path] = img
                self._bytes += size
        return img


class HRFolderDataset(Dataset):
    """HR images from a folder, degraded online: random HR crops of ``lr_patch * scale`` pixels,
    random flips / 90-degree rotations (``augment``), then ``degrade``; items are ``(lr, hr)``.

    ``samples_per_epoch``: the length of an epoch (default: one crop per image); item ``i`` crops
    image ``i % n_images``, so small folders give many different crops per epoch.
    Every image is checked when the dataset is built (header only): one smaller than the crop, or
    one that is not an image, raises ValueError naming the file.

    ``cache_bytes``: decoded images are kept in memory, in the order first read, up to this many
    bytes (float32, 12 per pixel; 0 turns it off); in all, when DataLoader workers each keep a share.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        scale: int,
        lr_patch: int,
        degrade: Degrade,
        seed: int = 0,
        augment: bool = True,
        *,
        samples_per_epoch: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.scale = _check_scale(scale)
        if int(lr_patch) != lr_patch or lr_patch < 1:
            raise ValueError(f"lr_patch must be a positive integer, got {lr_patch!r}")
        if not callable(degrade):
            raise TypeError(f"degrade must be a callable degrade(hr, scale, generator), got {type(degrade).__name__}")
        self.lr_patch = int(lr_patch)
        self.hr_patch = self.lr_patch * self.scale
        self.degrade = degrade
        self.seed = int(seed)
        self.augment = bool(augment)
        self.epoch = 0
        self.paths = list_images(folder)
        for path in self.paths:
            h, w = image_size(path)
            if h < self.hr_patch or w < self.hr_patch:
                raise ValueError(
                    f"image {path} is {w}x{h} pixels, smaller than the {self.hr_patch}x{self.hr_patch} HR crop "
                    f"(lr_patch {self.lr_patch} x scale {self.scale}); remove it or use a smaller lr_patch"
                )
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        self.samples_per_epoch = len(self.paths) if samples_per_epoch is None else int(samples_per_epoch)
        self._read = _DecodedImages(cache_bytes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops, augmentations and degradations ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        generator = item_generator(self.seed, self.epoch, index)
        path = self.paths[index % len(self.paths)]
        img = self._read(path)
        _, h, w = img.shape
        if h < self.hr_patch or w < self.hr_patch:  # the file changed since the dataset was built
            raise ValueError(f"image {path} is {w}x{h} pixels, smaller than the {self.hr_patch}x{self.hr_patch} HR crop")
        top = _random_offset(h, self.hr_patch, generator)
        left = _random_offset(w, self.hr_patch, generator)
        hr = img[:, top : top + self.hr_patch, left : left + self.hr_patch]
        if self.augment:
            (hr,) = _augment([hr], generator)
        hr = hr.clone(memory_format=torch.contiguous_format)  # a copy: the cached image stays as decoded
        lr = _apply_degrade(self.degrade, hr, self.scale, generator)
        return lr, hr

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.paths)} images, scale={self.scale}, lr_patch={self.lr_patch}, "
                f"seed={self.seed}, augment={self.augment}, epoch={self.epoch})")


# RealSR (Cai et al. 2019): Canon_001_HR.png / Canon_001_LR4.png in one folder.
_REALSR_HR = re.compile(r"^(?P<key>.+)_HR$", re.IGNORECASE)
_REALSR_LR = re.compile(r"^(?P<key>.+)_LR(?P<scale>\d+)$", re.IGNORECASE)
# DRealSR (Wei et al. 2020): test_HR/<name>_x1.png and test_LR/<name>_x4.png.
_DREALSR_HR = re.compile(r"^(?P<key>.+)_x1$", re.IGNORECASE)
_DREALSR_LR = re.compile(r"^(?P<key>.+)_x(?P<scale>\d+)$", re.IGNORECASE)


def _root_images(root: Path) -> list[Path]:
    """Images directly in ``root`` and in its immediate subfolders (e.g. DRealSR's test_HR, test_LR)."""
    if not root.is_dir():
        raise FileNotFoundError(f"paired dataset folder {root} does not exist")
    files = []
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        files.extend(
            p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
    return files


def _parallel_key(stem: str, scale: int, is_lr: bool) -> str:
    """The stem two parallel folders are matched on: exact, less a scale tag (``_HR``, ``_x1``;
    ``_LR4``, ``_x4``, ``x4`` as in DIV2K's ``0001x4.png``)."""
    pattern = rf"(_LR{scale}|_x{scale}|x{scale})$" if is_lr else r"(_HR|_x1)$"
    return re.sub(pattern, "", stem, flags=re.IGNORECASE) or stem


def _add(table: dict[str, Path], key: str, path: Path, what: str) -> None:
    if key in table:
        raise ValueError(f"two {what} images for {key!r}: {table[key]} and {path}")
    table[key] = path


class PairedFolderDataset(Dataset):
    """Real LR/HR pairs; items are ``(lr, hr)``.

    Give either two parallel folders (``lr_folder``, ``hr_folder``; files matched by stem, a scale
    tag such as ``_x4`` / ``x4`` / ``_LR4`` on LR names and ``_HR`` / ``_x1`` on HR names ignored),
    or one ``root`` in one of the public benchmarks' layouts:

    - RealSR: ``<name>_HR.png`` with ``<name>_LR<scale>.png`` (LR files of other scales ignored);
    - DRealSR: ``<name>_x1.png`` (HR) with ``<name>_x<scale>.png`` (LR), in ``root`` itself or in
      its subfolders (``test_HR`` / ``test_LR``).

    Every pair is checked when the dataset is built (headers only): an HR without its LR (or an LR
    without its HR) and an LR whose size is not the HR size // scale raise ValueError naming the
    pair and both sizes. An HR whose sides are not multiples of the scale is cropped to
    ``lr_size * scale`` (top-left). With ``lr_patch``, aligned random crops (LR ``lr_patch``, HR
    ``lr_patch * scale``) plus, with ``augment``, random flips / 90-degree rotations; without it,
    whole images (batch them with batch_size=1). Randomness seeded from ``(seed, epoch, index)``.
    ``samples_per_epoch`` (with ``lr_patch``): the length of an epoch (default: one crop per pair); item ``i``
    crops pair ``i % n_pairs``, so a few pairs give many different crops per epoch, as in HRFolderDataset.
    ``cache_bytes``: decoded images are kept in memory up to this many bytes, as in HRFolderDataset.
    """

    def __init__(
        self,
        lr_folder: str | os.PathLike | None = None,
        hr_folder: str | os.PathLike | None = None,
        *,
        root: str | os.PathLike | None = None,
        scale: int,
        lr_patch: int | None = None,
        seed: int = 0,
        augment: bool = True,
        samples_per_epoch: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.scale = _check_scale(scale)
        self._read = _DecodedImages(cache_bytes)
        if lr_patch is not None and (int(lr_patch) != lr_patch or lr_patch < 1):
            raise ValueError(f"lr_patch must be a positive integer or None, got {lr_patch!r}")
        if samples_per_epoch is not None and (samples_per_epoch < 1 or lr_patch is None):
            raise ValueError(f"samples_per_epoch must be positive and needs lr_patch (crops), got {samples_per_epoch}")
        self.lr_patch = None if lr_patch is None else int(lr_patch)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.epoch = 0
        if root is not None:
            if lr_folder is not None or hr_folder is not None:
                raise ValueError("give either root= or lr_folder and hr_folder, not both")
            hr, lr = self._scan_root(Path(root))
            where = f"folder {root}"
        else:
            if lr_folder is None or hr_folder is None:
                raise ValueError("give both lr_folder and hr_folder, or root= for a RealSR / DRealSR folder")
            hr, lr = {}, {}
            for p in list_images(hr_folder):
                _add(hr, _parallel_key(p.stem, self.scale, is_lr=False), p, "HR")
            for p in list_images(lr_folder):
                _add(lr, _parallel_key(p.stem, self.scale, is_lr=True), p, "LR")
            where = f"folders {lr_folder} (LR) and {hr_folder} (HR)"
        self._check_partners(hr, lr, where)
        self.names = sorted(hr)
        self.pairs = [(lr[name], hr[name]) for name in self.names]
        self.lr_sizes = [self._check_sizes(lr_path, hr_path) for lr_path, hr_path in self.pairs]
        self.samples_per_epoch = len(self.pairs) if samples_per_epoch is None else int(samples_per_epoch)

    def _scan_root(self, root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
        hr: dict[str, Path] = {}
        lr: dict[str, Path] = {}
        other_scales: set[int] = set()
        for p in _root_images(root):
            stem = p.stem
            # RealSR names first: "_HR" / "_LR4" cannot be mistaken for DRealSR's "_x1" / "_x4".
            for hr_re, lr_re, convention in ((_REALSR_HR, _REALSR_LR, "RealSR"), (_DREALSR_HR, _DREALSR_LR, "DRealSR")):
                if m := hr_re.match(stem):
                    _add(hr, m["key"], p, f"{convention} HR")
                    break
                if m := lr_re.match(stem):
                    if int(m["scale"]) == self.scale:
                        _add(lr, m["key"], p, f"{convention} LR")
                    else:
                        other_scales.add(int(m["scale"]))
                    break
        if not lr:
            extra = f"; it holds LR images for scales {sorted(other_scales)}" if other_scales else ""
            raise ValueError(
                f"folder {root} holds no LR image for scale {self.scale}: neither RealSR names "
                f"(<name>_HR.png + <name>_LR{self.scale}.png) nor DRealSR names "
                f"(<name>_x1.png + <name>_x{self.scale}.png, possibly in subfolders test_HR/test_LR){extra}"
            )
        return hr, lr

    @staticmethod
    def _check_partners(hr: dict[str, Path], lr: dict[str, Path], where: str) -> None:
        def listing(names: list[str], table: dict[str, Path]) -> str:
            shown = ", ".join(str(table[n]) for n in names[:5])
            return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")

        no_lr = sorted(set(hr) - set(lr))
        no_hr = sorted(set(lr) - set(hr))
        problems = []
        if no_lr:
            problems.append(f"{len(no_lr)} HR image(s) without an LR partner: {listing(no_lr, hr)}")
        if no_hr:
            problems.append(f"{len(no_hr)} LR image(s) without an HR partner: {listing(no_hr, lr)}")
        if problems:
            raise ValueError(f"unpaired images in {where}: " + "; ".join(problems))
        if not hr:
            raise ValueError(f"no LR/HR pair in {where}")

    def _check_sizes(self, lr_path: Path, hr_path: Path) -> tuple[int, int]:
        lh, lw = image_size(lr_path)
        hh, hw = image_size(hr_path)
        if (lh, lw) != (hh // self.scale, hw // self.scale):
            raise ValueError(
                f"pair {lr_path} (LR {lw}x{lh}) / {hr_path} (HR {hw}x{hh}): at scale {self.scale} the LR should be "
                f"{hw // self.scale}x{hh // self.scale}"
                + (" (the LR has the HR's size: upsampled LR images are not supported, use the originals)"
                   if (lh, lw) == (hh, hw) and self.scale > 1 else "")
            )
        if self.lr_patch is not None and (lh < self.lr_patch or lw < self.lr_patch):
            raise ValueError(f"pair {lr_path} / {hr_path}: LR is {lw}x{lh}, smaller than lr_patch {self.lr_patch}")
        return lh, lw

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and augmentations ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        lr_path, hr_path = self.pairs[index % len(self.pairs)]
        lr, hr = self._read(lr_path), self._read(hr_path)
        lh, lw = lr.shape[-2:]
        s = self.scale
        if (lh, lw) != (hr.shape[-2] // s, hr.shape[-1] // s):  # the files changed since the dataset was built
            raise ValueError(f"pair {lr_path} (LR {lw}x{lh}) / {hr_path} (HR {hr.shape[-1]}x{hr.shape[-2]}): "
                             f"sizes do not agree with scale {s}")
        hr = hr[:, : lh * s, : lw * s]
        if self.lr_patch is None:  # copies: the cached images stay as decoded
            return lr.clone(memory_format=torch.contiguous_format), hr.clone(memory_format=torch.contiguous_format)
        p = self.lr_patch
        generator = item_generator(self.seed, self.epoch, index)
        top, left = _random_offset(lh, p, generator), _random_offset(lw, p, generator)
        lr = lr[:, top : top + p, left : left + p]
        hr = hr[:, top * s : (top + p) * s, left * s : (left + p) * s]
        if self.augment:
            lr, hr = _augment([lr, hr], generator)
        return lr.clone(memory_format=torch.contiguous_format), hr.clone(memory_format=torch.contiguous_format)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.pairs)} pairs, scale={self.scale}, lr_patch={self.lr_patch}, "
                f"seed={self.seed}, epoch={self.epoch})")


_CACHE_FORMAT = "adaptsr-lr-cache-v1"


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CachedValidationSet(Dataset):
    """A validation set whose LR images are generated once and cached, so every evaluation of it
    (every run, every rank, every resume) sees the same LR inputs; items are ``(lr, hr)``.

    ``hr``: a folder of HR images or a list of HR tensors [3, H, W] in [0, 1]. Each HR is cropped
    (top-left) to a multiple of ``scale`` and degraded once with a generator seeded from ``seed``
    and the image's content, and the LR is written as an 8-bit PNG in ``cache_dir`` (atomically)
    under a name holding a hash of ``degrade_id``, ``seed``, ``scale`` and the HR's content: a
    changed degradation config (pass its repr or a hash of it as ``degrade_id``), seed or image
    gets new LR files; unchanged ones are read back and ``degrade`` is not called. The LR tensors
    are always the ones read from the PNGs (8-bit), on the first construction too.
    Old cache files are never deleted.
    """

    def __init__(
        self,
        hr: str | os.PathLike | Sequence[torch.Tensor],
        scale: int,
        degrade: Degrade,
        *,
        degrade_id: str,
        cache_dir: str | os.PathLike,
        seed: int = 0,
    ) -> None:
        self.scale = _check_scale(scale)
        if not isinstance(degrade_id, str) or not degrade_id:
            raise ValueError("degrade_id must be a non-empty string identifying the degradation config")
        self.degrade_id = degrade_id
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir)
        self._hr_paths: list[Path] | None = None
        self._hr_tensors: list[torch.Tensor] | None = None
        if isinstance(hr, (str, os.PathLike)):
            self._hr_paths = list_images(hr)
            self.names = [p.stem for p in self._hr_paths]
            digests = [_file_digest(p) for p in self._hr_paths]
        else:
            tensors = list(hr)
            if not tensors:
                raise ValueError("CachedValidationSet: the list of HR tensors is empty")
            for i, t in enumerate(tensors):
                if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != 3:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"HR image {i}: expected a tensor [3, H, W], got {got}")
            self._hr_tensors = [t.detach().to(device="cpu", dtype=torch.float32) for t in tensors]
            self.names = [f"image{i:04d}" for i in range(len(tensors))]
            digests = [_tensor_digest(t) for t in self._hr_tensors]
        self.cache_paths: list[Path] = []
        self.degrade_calls = 0  # how many LR images this construction generated (0: all from the cache)
        for i, digest in enumerate(digests):
            key = hashlib.sha256(
                "\x1f".join([_CACHE_FORMAT, degrade_id, str(self.seed), str(self.scale), digest]).encode()
            ).hexdigest()[:20]
            cache_path = self.cache_dir / f"{self.names[i]}.{key}.png"
            self.cache_paths.append(cache_path)
            hr_img = self._hr(i)
            expected = (hr_img.shape[-2] // self.scale, hr_img.shape[-1] // self.scale)
            if self._cached_ok(cache_path, expected):
                continue
            generator = torch.Generator().manual_seed(_mix("validation", self.seed, digest))
            lr = _apply_degrade(degrade, hr_img, self.scale, generator)
            write_png(lr, cache_path)
            self.degrade_calls += 1

    def _hr(self, index: int) -> torch.Tensor:
        img = read_image(self._hr_paths[index]) if self._hr_paths is not None else self._hr_tensors[index]
        h, w = img.shape[-2:]
        hh, ww = h - h % self.scale, w - w % self.scale
        if hh == 0 or ww == 0:
            where = self._hr_paths[index] if self._hr_paths is not None else f"HR image {index}"
            raise ValueError(f"{where} is {w}x{h} pixels, smaller than the scale {self.scale}")
        return img[:, :hh, :ww].contiguous()

    @staticmethod
    def _cached_ok(path: Path, expected: tuple[int, int]) -> bool:
        """Whether a readable cache file of the right size exists (a corrupt one is regenerated)."""
        if not path.is_file():
            return False
        try:
            return tuple(read_image(path).shape[-2:]) == expected  # decodes it all: catches truncation
        except (ValueError, OSError):
            return False

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        return read_image(self.cache_paths[index]), self._hr(index)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, scale={self.scale}, seed={self.seed}, "
                f"degrade_id={self.degrade_id!r}, cache_dir={str(self.cache_dir)!r})")
