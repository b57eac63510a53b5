"""Reading and writing image files as float tensors: [3, H, W], float32, values in [0, 1].

Conventions (the same for every dataset in :mod:`adaptsr.data.datasets`):

- Any format Pillow opens (png, jpg, bmp, tiff, webp, ...); the first frame of a multi-frame file.
- Grey images are replicated to three channels; palette, CMYK, YCbCr, ... are converted to RGB.
- An alpha channel is dropped (the colour channels are kept as stored, not composited on a
  background): SR models work on RGB, and compositing would invent pixel values the HR/LR pair
  does not share. ``read_image(path, alpha=True)`` keeps it as a fourth channel instead (what
  ``adaptsr upscale`` uses, so transparent images stay transparent).
- 16-bit images (grey, RGB, RGBA; PNG or TIFF) are scaled by 1/65535, 8-bit ones by 1/255. Pillow
  silently reduces 16-bit colour images to 8 bits, so those are decoded with OpenCV (installed
  with pyiqa), which keeps every bit.
- The EXIF orientation tag is applied, so the tensor is upright the way image viewers show it.
- A missing file raises FileNotFoundError; an empty, truncated, corrupt or non-image file raises
  ValueError naming the file and the reason.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from adaptsr.io import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "image_bit_depth",
    "image_is_grey",
    "image_size",
    "list_images",
    "read_image",
    "write_image",
    "write_png",
]

#: The formats :func:`write_image` writes, by file extension.
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}

#: File extensions (lower case) that :func:`list_images` picks up.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

_EXIF_ORIENTATION = 0x0112
# Pillow reduces these raw modes to 8-bit RGB(A)/LA: decode them with OpenCV instead.
_HIGH_DEPTH_COLOUR_MODES = ("RGB", "RGBA", "LA", "PA")
_GREY_MODES = ("1", "L", "LA", "La", "I", "F")


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    if path.is_dir():
        raise ValueError(f"image {path} is a folder, not an image file")
    try:
        if path.stat().st_size == 0:
            raise ValueError(f"image {path} is empty (0 bytes)")
        return Image.open(path)
    except UnidentifiedImageError as err:
        raise ValueError(f"image {path} is not an image Pillow can read (unknown or corrupt format)") from err
    except OSError as err:
        raise ValueError(f"image {path} could not be read ({type(err).__name__}: {err})") from err


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 to 8), without decoding the pixels."""
    try:
        if img.format == "PNG":
            # Pillow's getexif() decodes a whole PNG to look for an eXIf chunk after the pixels;
            # the chunk belongs before them (that is where Pillow and cameras write it).
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file as :func:`read_image` returns it, from the header only."""
    path = Path(path)
    with _open(path) as img:
        width, height = img.size
        if _orientation(img) in (5, 6, 7, 8):  # the orientations that swap the axes
            width, height = height, width
    if width <= 0 or height <= 0:
        raise ValueError(f"image {path} has no pixels (size {width}x{height})")
    return height, width


def image_bit_depth(path: str | os.PathLike) -> int:
    """16 for a file whose channels hold more than 8 bits (16-bit grey or colour, integer or float TIFF), else 8;
    from the header only. What ``adaptsr upscale`` writes its result in."""
    path = Path(path)
    with _open(path) as img:
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            return 16
        return 16 if img.mode in _HIGH_DEPTH_COLOUR_MODES and ";16" in _raw_mode(img) else 8


def image_is_grey(path: str | os.PathLike) -> bool:
    """Whether the file stores grey pixels (bilevel, grey or grey + alpha, any depth), from the header only.
    ``adaptsr upscale`` writes such inputs back as grey; a palette image counts as colour."""
    path = Path(path)
    with _open(path) as img:
        return img.mode in _GREY_MODES or img.mode.startswith("I;16")


def _raw_mode(img: Image.Image) -> str:
    tile = getattr(img, "tile", None) or []
    if not tile:
        return ""
    args = tile[0][3] if not hasattr(tile[0], "args") else tile[0].args
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


def _decode_high_depth(path: Path) -> np.ndarray | None:
    """16-bit colour pixels as uint16 [H, W, C] in RGB(A) order, or None when OpenCV is missing."""
    try:
        import cv2
    except ImportError:
        return None
    data = np.fromfile(path, dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"image {path} could not be decoded (corrupt or truncated 16-bit image)")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]  # BGR -> RGB
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, [2, 1, 0, 3]]  # BGRA -> RGBA
    return np.ascontiguousarray(arr)


def _pixels(img: Image.Image, path: Path, high_depth: bool, alpha: bool) -> tuple[np.ndarray, float]:
    """The decoded pixels as an array [H, W] or [H, W, C] and the value that means white.

    ``high_depth``: the file stores 16-bit colour, which Pillow reduced to 8 bits. ``alpha``: keep
    an alpha channel (grey + alpha or RGBA) where the image has one.
    """
    if high_depth:
        arr = _decode_high_depth(path)
        if arr is not None and arr.dtype == np.uint16:
            return arr, 65535.0
        if arr is None:
            warnings.warn(f"{path}: 16-bit colour image read as 8-bit (install opencv-python to keep 16 bits)",
                          stacklevel=3)
    mode = img.mode
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32), 65535.0
    if mode == "I":  # 32-bit integer: what older Pillow versions give for 16-bit grey files
        return np.asarray(img).astype(np.float64), 65535.0
    if mode == "F":  # floating-point TIFF: taken as already in [0, 1]
        return np.asarray(img, dtype=np.float32), 1.0
    if mode in ("L", "RGB"):
        return np.asarray(img), 255.0
    if mode in ("LA", "La"):
        grey_alpha = np.asarray(img.convert("LA"))
        return (grey_alpha if alpha else grey_alpha[:, :, 0]), 255.0
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(img.convert("RGBA"))
        return (rgba if alpha else rgba[:, :, :3]), 255.0
    if mode == "1":
        return np.asarray(img.convert("L")), 255.0
    if alpha and (mode == "PA" or "transparency" in img.info):  # a palette with transparent entries
        return np.asarray(img.convert("RGBA")), 255.0
    # P, PA, CMYK, YCbCr, LAB, HSV, ...: Pillow's conversion (alpha in a palette is dropped too)
    return np.asarray(img.convert("RGB")), 255.0


def _apply_orientation(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Pillow's ``ImageOps.exif_transpose`` on a [C, H, W] tensor."""
    h, w = -2, -1
    if orientation == 2:
        return x.flip(w)
    if orientation == 3:
        return x.flip(h).flip(w)
    if orientation == 4:
        return x.flip(h)
    if orientation == 5:
        return x.transpose(h, w)
    if orientation == 6:
        return torch.rot90(x, -1, dims=(h, w))
    if orientation == 7:
        return x.transpose(h, w).flip(h).flip(w)
    if orientation == 8:
        return torch.rot90(x, 1, dims=(h, w))
    return x


def read_image(path: str | os.PathLike, *, alpha: bool = False) -> torch.Tensor:
    """An image file as a float32 tensor [3, H, W] with values in [0, 1] (see the module docstring).

    ``alpha=True``: [4, H, W] (RGB, then alpha) for an image with an alpha channel, [3, H, W] otherwise.
    """
    path = Path(path)
    with _open(path) as img:
        # the raw mode is only known before decoding (load() clears the tile list)
        high_depth = img.mode in _HIGH_DEPTH_COLOUR_MODES and ";16" in _raw_mode(img)
        orientation = _orientation(img)
        try:
            img.seek(0)
            img.load()  # decodes everything now: a truncated or corrupt file fails here
            arr, white = _pixels(img, path, high_depth, alpha)
        except ValueError as err:
            if str(path) in str(err):
                raise
            raise ValueError(f"image {path} could not be decoded ({err})") from err
        except (OSError, SyntaxError, EOFError) as err:  # what Pillow's decoders raise
            raise ValueError(f"image {path} is truncated or corrupt ({type(err).__name__}: {err})") from err
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 2:  # grey + alpha (from Pillow when asked for, or from OpenCV): grey to RGB
        arr = arr[:, :, [0, 0, 0, 1]] if alpha else arr[:, :, :1]
    elif arr.shape[2] == 4 and not alpha:
        arr = arr[:, :, :3]
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image {path} has no pixels (size {arr.shape[1]}x{arr.shape[0]})")
    x = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32) / np.float32(white))
    x = x.permute(2, 0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    x = _apply_orientation(x, orientation)
    return x.clamp(0.0, 1.0).contiguous()


def _levels(image: torch.Tensor, path: Path, bits: int) -> np.ndarray:
    """``image`` (as :func:`write_png` takes it) checked and rounded to the nearest of the 2**bits levels:
    an int32 array [H, W, C]."""
    x = image.detach()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] not in (1, 2, 3, 4) or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(
            f"cannot write {path}: expected an image tensor [3, H, W], [4, H, W], [2, H, W] or [H, W], "
            f"got {tuple(image.shape)}"
        )
    x = x.to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"cannot write {path}: the image holds NaN or inf values")
    return (x.clamp(0.0, 1.0) * float(2**bits - 1)).round().to(torch.int32).permute(1, 2, 0).numpy()


def write_png(image: torch.Tensor, path: str | os.PathLike, *, bits: int = 8) -> None:
    """Write an image tensor with values in [0, 1] as a PNG of ``bits`` (8 or 16) per channel, atomically.

    ``image``: [3, H, W] or [1, 3, H, W] (RGB), [4, H, W] (RGBA), [2, H, W] (grey + alpha), or [H, W] /
    [1, H, W] (grey); values are clamped to [0, 1] and rounded to the nearest of the 256 (65,536) levels,
    so 8-bit (16-bit) values round-trip exactly through ``read_image``. A 16-bit grey + alpha image is
    written as RGBA with the grey in all three colour channels: OpenCV, which writes the 16-bit PNGs,
    encodes 1, 3 or 4 channels only.
    """
    if bits not in (8, 16):
        raise ValueError(f"cannot write {path}: PNG bits per channel must be 8 or 16, got {bits!r}")
    path = Path(path)
    levels = _levels(image, path, bits)
    if bits == 16:
        if levels.shape[2] == 2:
            levels = levels[:, :, [0, 0, 0, 1]]
        encoded = _png16(levels.astype(np.uint16), path)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(encoded))
        return
    arr = levels.astype(np.uint8)
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def write_image(image: torch.Tensor, path: str | os.PathLike, *, bits: int = 8, quality: int = 95) -> None:
    """Write an image tensor (as :func:`write_png` takes it) in the format of ``path``'s extension, atomically.

    PNG (8 or 16 bits), JPEG or WebP (8 bits, at ``quality`` 1-100; WebP at 100 is lossless). JPEG holds no
    transparency: an image with alpha is refused, naming the file. A 16-bit image written as JPEG or WebP is
    rounded to 8 bits, as those formats store.
    """
    path = Path(path)
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write {path}: use one of {', '.join(sorted(OUTPUT_FORMATS))}")
    if fmt == "PNG":
        write_png(image, path, bits=bits)
        return
    if not 1 <= quality <= 100:
        raise ValueError(f"cannot write {path}: quality must be in 1-100, got {quality}")
    arr = _levels(image, path, 8).astype(np.uint8)
    if fmt == "JPEG" and arr.shape[2] in (2, 4):
        raise ValueError(f"cannot write {path}: JPEG holds no transparency; write PNG or WebP")
    if fmt == "WEBP" and arr.shape[2] == 2:  # WebP stores colour: grey with alpha as RGBA
        arr = arr[:, :, [0, 0, 0, 1]]
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    options = {"quality": quality}
    if fmt == "WEBP":
        options["lossless"] = quality == 100
    atomic_write(path, lambda tmp: pil.save(tmp, format=fmt, **options))


def _png16(arr: np.ndarray, path: Path) -> bytes:
    """A 16-bit PNG of ``arr`` [H, W, C] (grey, RGB or RGBA), encoded by OpenCV: Pillow writes 16-bit grey but
    not 16-bit colour. OpenCV comes with pyiqa; the channels go in its BGR(A) order."""
    import cv2

    if arr.shape[2] == 3:
        arr = arr[:, :, ::-1]
    elif arr.shape[2] == 4:
        arr = arr[:, :, [2, 1, 0, 3]]
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))
    if not ok:
        raise ValueError(f"cannot write {path}: OpenCV could not encode a 16-bit PNG of shape {arr.shape}")
    return encoded.tobytes()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (extensions in ``IMAGE_EXTENSIONS``), sorted by name.

    Hidden files (names starting with '.', e.g. a half-written temporary file) are skipped.
    Raises FileNotFoundError when the folder is missing, ValueError when it holds no image.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} is not a folder")
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"image folder {folder} holds no image file (looked for {exts})")
    return files
