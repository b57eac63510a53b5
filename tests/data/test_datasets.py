"""Image files and datasets on real image files (scikit-image photos, downsized) and broken ones."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from skimage import data as skdata

from adaptsr.data.datasets import CachedValidationSet, HRFolderDataset, PairedFolderDataset
from adaptsr.data.images import (
    image_bit_depth,
    image_is_grey,
    image_size,
    list_images,
    read_image,
    write_image,
    write_png,
)


def _photo(name: str, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A scikit-image photo resized to ``size`` (width, height): uint8 [H, W, 3] (or [H, W] for grey)."""
    return np.asarray(Image.fromarray(getattr(skdata, name)()).resize(size, Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return _photo("astronaut")


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [_photo("astronaut"), _photo("coffee"), _photo("chelsea")]


def _save(arr: np.ndarray, path, **kwargs) -> os.PathLike:
    Image.fromarray(arr).save(path, **kwargs)
    return path


class CountingDegrade:
    """Box downscale plus Gaussian noise drawn from the generator (so seeds can be told apart)."""

    def __init__(self, sigma: float = 0.05):
        self.sigma = sigma
        self.calls = 0

    def __call__(self, hr: torch.Tensor, scale: int, generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        lr = F.avg_pool2d(hr, scale)
        return (lr + self.sigma * torch.randn(lr.shape, generator=generator)).clamp(0, 1)

    def __repr__(self) -> str:
        return f"CountingDegrade(sigma={self.sigma})"


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(arr.astype(np.float32) / 255.0)
    return t.permute(2, 0, 1) if t.dim() == 3 else t.expand(3, -1, -1)


# -- read_image / write_png / list_images --


def test_png_8bit_round_trip_is_exact(tmp_path, astronaut):
    x = read_image(_save(astronaut, tmp_path / "a.png"))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x, _as_tensor(astronaut))
    write_png(x, tmp_path / "b.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), astronaut)
    assert torch.equal(read_image(tmp_path / "b.png"), x)


@pytest.mark.parametrize(
    "suffix, kwargs, lossless",
    [(".bmp", {}, True), (".tiff", {}, True), (".webp", {"lossless": True}, True), (".jpg", {"quality": 95}, False),
     (".webp", {"quality": 90}, False)],
)
def test_common_formats(tmp_path, astronaut, suffix, kwargs, lossless):
    x = read_image(_save(astronaut, tmp_path / f"a{suffix}", **kwargs))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    err = (x - _as_tensor(astronaut)).abs().mean().item()
    assert err == 0.0 if lossless else err < 0.03


def test_grey_is_replicated(tmp_path):
    grey = np.asarray(Image.fromarray(skdata.camera()).resize((40, 48)))
    x = read_image(_save(grey, tmp_path / "g.png"))
    assert x.shape == (3, 48, 40)
    assert torch.equal(x[0], torch.from_numpy(grey.astype(np.float32) / 255))
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # 1-bit too
    Image.fromarray(grey > 128).save(tmp_path / "bw.png")
    assert set(read_image(tmp_path / "bw.png").unique().tolist()) == {0.0, 1.0}


def test_alpha_is_dropped(tmp_path, astronaut):
    alpha = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)
    rgba = np.dstack([astronaut, alpha])
    assert torch.equal(read_image(_save(rgba, tmp_path / "rgba.png")), _as_tensor(astronaut))
    grey = astronaut[:, :, 1]
    Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]).save(tmp_path / "la.png")
    assert torch.equal(read_image(tmp_path / "la.png"), _as_tensor(grey))


def test_alpha_kept_on_request(tmp_path, astronaut):
    """read_image(alpha=True): RGB then alpha for RGBA, grey + alpha, a palette with a transparent entry and
    16-bit RGBA; plain RGB stays three channels; write_png writes RGBA back exactly."""
    alpha = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)
    rgba = np.dstack([astronaut, alpha])
    x = read_image(_save(rgba, tmp_path / "rgba.png"), alpha=True)
    assert x.shape == (4, 64, 64) and torch.equal(x, _as_tensor(rgba))
    write_png(x, tmp_path / "back.png")
    assert Image.open(tmp_path / "back.png").mode == "RGBA"
    assert torch.equal(read_image(tmp_path / "back.png", alpha=True), x)

    grey = astronaut[:, :, 1]
    Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]).save(tmp_path / "la.png")
    x = read_image(tmp_path / "la.png", alpha=True)
    assert x.shape == (4, 64, 64)
    assert torch.equal(x[:3], _as_tensor(grey)) and torch.equal(x[3], _as_tensor(alpha)[0])

    pal = Image.fromarray(astronaut).quantize(colors=8)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    x = read_image(tmp_path / "p.png", alpha=True)
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGBA"))
    assert x.shape == (4, 64, 64) and torch.equal(x, _as_tensor(expected)) and (x[3] == 0).any()

    assert read_image(_save(astronaut, tmp_path / "rgb.png"), alpha=True).shape == (3, 64, 64)


def test_16bit_alpha_kept_on_request(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rgba = (np.arange(12 * 10 * 4).reshape(12, 10, 4) * 181 + 3).astype(np.uint16)
    assert cv2.imwrite(str(tmp_path / "c16a.png"), rgba[:, :, [2, 1, 0, 3]].copy())
    x = read_image(tmp_path / "c16a.png", alpha=True)
    torch.testing.assert_close(x, torch.from_numpy(rgba.astype(np.float32) / 65535).permute(2, 0, 1), rtol=0, atol=1e-7)


def test_palette(tmp_path, astronaut):
    pal = Image.fromarray(astronaut).quantize(colors=32)
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    expected = np.asarray(pal.convert("RGB"))
    assert torch.equal(read_image(tmp_path / "p.png"), _as_tensor(expected))
    pal.save(tmp_path / "p.gif")  # a palette format outside list_images' set, still readable
    assert torch.equal(read_image(tmp_path / "p.gif"), _as_tensor(expected))


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_16bit_grey_scaled_by_65535(tmp_path, suffix):
    arr = (np.arange(16 * 20).reshape(16, 20) * 199 + 7).astype(np.uint16)  # up to 63,608, low bits set
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(arr).save(path)
    x = read_image(path)
    assert x.shape == (3, 16, 20)
    torch.testing.assert_close(x[0], torch.from_numpy(arr.astype(np.float32) / 65535), rtol=0, atol=1e-7)
    assert torch.equal(x[0], x[2])


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_16bit_colour_keeps_all_bits(tmp_path, suffix):
    cv2 = pytest.importorskip("cv2")
    rgb = (np.arange(12 * 10 * 3).reshape(12, 10, 3) * 181 + 3).astype(np.uint16)
    path = tmp_path / f"c16{suffix}"
    assert cv2.imwrite(str(path), rgb[:, :, ::-1].copy())  # OpenCV writes BGR
    x = read_image(path)
    expected = torch.from_numpy(rgb.astype(np.float32) / 65535).permute(2, 0, 1)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)  # 8-bit truncation would be off by up to 1/255
    rgba = np.dstack([rgb, np.full((12, 10), 1000, np.uint16)])
    assert cv2.imwrite(str(tmp_path / "c16a.png"), rgba[:, :, [2, 1, 0, 3]].copy())
    torch.testing.assert_close(read_image(tmp_path / "c16a.png"), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(tmp_path, orientation):
    arr = np.asarray(Image.fromarray(skdata.coffee()).resize((24, 16)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(arr).save(path, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    x = read_image(path)
    assert torch.equal(x, _as_tensor(expected))
    assert image_size(path) == tuple(x.shape[-2:])


def _broken_files(tmp_path, astronaut) -> dict[str, os.PathLike]:
    rng = np.random.default_rng(0)
    (tmp_path / "noise.png").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image\n")
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return {p: tmp_path / p for p in ("noise.png", "empty.png", "text.jpg", "truncated.png", "truncated.jpg")}


@pytest.mark.parametrize("name", ["noise.png", "empty.png", "text.jpg", "truncated.png", "truncated.jpg"])
def test_broken_files_raise_value_error_naming_the_file(tmp_path, astronaut, name):
    path = _broken_files(tmp_path, astronaut)[name]
    with pytest.raises(ValueError, match=name) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="folder"):
        read_image(tmp_path)


def test_write_png_clamps_rounds_and_is_atomic(tmp_path):
    x = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 1.0, 1.5]).reshape(1, 1, 7).expand(3, 1, 7)
    write_png(x[None], tmp_path / "out" / "x.png")  # [1, 3, H, W] and a new folder
    got = np.asarray(Image.open(tmp_path / "out" / "x.png"))
    assert got[0, :, 0].tolist() == [0, 0, 0, 1, 128, 255, 255]
    assert os.listdir(tmp_path / "out") == ["x.png"]  # no temporary file left
    write_png(torch.full((5, 6), 0.25), tmp_path / "grey.png")
    assert read_image(tmp_path / "grey.png").shape == (3, 5, 6)
    with pytest.raises(ValueError, match="NaN"):
        write_png(torch.full((3, 2, 2), float("nan")), tmp_path / "nan.png")
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\)"):
        write_png(torch.zeros(2, 3, 4, 4), tmp_path / "bad.png")
    assert not (tmp_path / "nan.png").exists() and not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_write_png_in_16_bits_round_trips(tmp_path, channels):
    rng = np.random.default_rng(channels)
    levels = rng.integers(0, 65536, (channels, 9, 7)).astype(np.float64)
    levels[:, 0, :2] = [0, 65535]  # both ends
    image = torch.from_numpy(levels / 65535).float()
    write_png(image, tmp_path / "x16.png", bits=16)
    assert image_bit_depth(tmp_path / "x16.png") == 16
    got = read_image(tmp_path / "x16.png", alpha=True)
    expected = image[[0, 0, 0, 1][: 3 if channels == 1 else 4]] if channels < 3 else image  # grey to RGB(A)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)  # every level back: 8 bits would be off by 1/255
    assert os.listdir(tmp_path) == ["x16.png"]
    with pytest.raises(ValueError, match="8 or 16, got 12"):
        write_png(image, tmp_path / "x12.png", bits=12)


def test_write_png_grey_with_alpha(tmp_path):
    image = torch.rand(2, 5, 6)
    write_png(image, tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    torch.testing.assert_close(read_image(tmp_path / "la.png", alpha=True), image[[0, 0, 0, 1]], rtol=0, atol=0.5 / 255)


def test_write_image_in_lossy_formats(tmp_path, astronaut):
    """JPEG and WebP at a quality: the photo back within what the codec loses; WebP at 100 losslessly."""
    photo = torch.from_numpy(astronaut.copy()).permute(2, 0, 1).float() / 255  # 64x64: detail in every pixel
    for name, quality, worst_mean in (("a.jpg", 95, 6 / 255), ("a.webp", 90, 7 / 255), ("low.jpg", 10, 30 / 255)):
        write_image(photo, tmp_path / name, quality=quality)
        error = (read_image(tmp_path / name) - photo).abs().mean().item()
        assert 0 < error < worst_mean, name
    low, high = (read_image(tmp_path / name) - photo for name in ("low.jpg", "a.jpg"))
    assert low.abs().mean() > high.abs().mean()
    write_image(photo, tmp_path / "exact.webp", quality=100)
    torch.testing.assert_close(read_image(tmp_path / "exact.webp"), photo, rtol=0, atol=0)
    write_image(photo.mean(0), tmp_path / "grey.jpg")
    assert Image.open(tmp_path / "grey.jpg").mode == "L"
    write_image(torch.rand(4, 8, 8), tmp_path / "rgba.webp")
    assert Image.open(tmp_path / "rgba.webp").mode == "RGBA"
    with pytest.raises(ValueError, match=r"rgba\.jpg: JPEG holds no transparency"):
        write_image(torch.rand(4, 8, 8), tmp_path / "rgba.jpg")
    with pytest.raises(ValueError, match=r"x\.gif: use one of"):
        write_image(photo, tmp_path / "x.gif")
    with pytest.raises(ValueError, match="quality must be in 1-100, got 0"):
        write_image(photo, tmp_path / "q.jpg", quality=0)
    assert not any(p.name in ("rgba.jpg", "x.gif", "q.jpg") for p in tmp_path.iterdir())


def test_image_is_grey(tmp_path, astronaut):
    assert not image_is_grey(_save(astronaut, tmp_path / "a.png"))
    assert not image_is_grey(_save(astronaut, tmp_path / "a.jpg"))
    rgb = Image.fromarray(np.full((4, 5, 3), 9, np.uint8))
    for mode in ("1", "L", "LA", "P", "RGBA"):
        rgb.convert(mode).save(tmp_path / f"{mode}.png")
        assert image_is_grey(tmp_path / f"{mode}.png") == (mode in ("1", "L", "LA")), mode
    rgb.convert("L").save(tmp_path / "L.jpg")
    assert image_is_grey(tmp_path / "L.jpg")
    Image.fromarray(np.full((4, 5), 40000, np.uint16)).save(tmp_path / "g16.tiff")
    assert image_is_grey(tmp_path / "g16.tiff")
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.png"):
        image_is_grey(tmp_path / "junk.png")


def test_image_bit_depth(tmp_path, astronaut):
    assert image_bit_depth(_save(astronaut, tmp_path / "a.png")) == 8
    assert image_bit_depth(_save(astronaut, tmp_path / "a.jpg")) == 8
    for suffix in (".png", ".tiff"):
        Image.fromarray(np.full((4, 5), 40000, np.uint16)).save(tmp_path / f"g16{suffix}")
        assert image_bit_depth(tmp_path / f"g16{suffix}") == 16
    cv2 = pytest.importorskip("cv2")
    assert cv2.imwrite(str(tmp_path / "c16.png"), np.full((4, 5, 3), 40000, np.uint16))
    assert image_bit_depth(tmp_path / "c16.png") == 16
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.png"):
        image_bit_depth(tmp_path / "junk.png")


def test_list_images(tmp_path, astronaut):
    for name in ("b.png", "a.JPG", "c.tiff", "d.webp", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.tiff", "d.webp"]
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        list_images(tmp_path / "missing_dir")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        list_images(tmp_path / "empty_dir")


# -- HRFolderDataset --


@pytest.fixture
def hr_folder(tmp_path, photos):
    folder = tmp_path / "hr"
    folder.mkdir()
    for i, arr in enumerate(photos):
        _save(arr, folder / f"img{i}.png")
    return folder


def _is_window(hr: torch.Tensor, img: torch.Tensor) -> bool:
    """Whether ``hr`` equals some window of ``img`` under one of the 8 flips/rotations."""
    p = hr.shape[-1]
    windows = img.unfold(1, p, 1).unfold(2, p, 1)  # [3, nh, nw, p, p]
    for t in (hr, hr.flip(-1), hr.flip(-2), hr.flip(-1).flip(-2)):
        for u in (t, t.transpose(-2, -1)):
            if (windows == u[:, None, None]).all(-1).all(-1).all(0).any():
                return True
    return False


def test_hr_folder_shapes_and_crops(hr_folder):
    degrade = CountingDegrade()
    ds = HRFolderDataset(hr_folder, scale=4, lr_patch=8, degrade=degrade, seed=0, augment=False)
    assert len(ds) == 3
    images = [read_image(p) for p in ds.paths]
    for i in range(len(ds)):
        lr, hr = ds[i]
        assert lr.shape == (3, 8, 8) and hr.shape == (3, 32, 32)
        assert lr.dtype == hr.dtype == torch.float32
        assert _is_window(hr, images[i])
        # the degradation ran on this crop, with noise from the item's generator
        assert 0.001 < (lr - F.avg_pool2d(hr[None], 4)[0]).abs().mean() < 0.1
    assert degrade.calls == 3
    with pytest.raises(IndexError):
        ds[3]
    batch_lr, batch_hr = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch_lr.shape == (3, 3, 8, 8) and batch_hr.shape == (3, 3, 32, 32)


def test_hr_folder_deterministic_and_resumable(hr_folder):
    def items(ds):
        return [ds[i] for i in range(len(ds))]

    def same(a, b):
        return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))

    def make(seed):
        return HRFolderDataset(hr_folder, 2, 8, CountingDegrade(), seed=seed, samples_per_epoch=6)

    ds = make(7)
    epoch0 = items(ds)
    assert same(epoch0, items(make(7)))  # same seed, fresh dataset: same crops, flips and noise
    assert not same(epoch0, items(make(8)))
    ds.set_epoch(1)
    epoch1 = items(ds)
    assert not any(torch.equal(a[1], b[1]) for a, b in zip(epoch0, epoch1))  # new crops every epoch
    resumed = make(7)
    resumed.set_epoch(1)
    assert torch.equal(resumed[4][0], epoch1[4][0])  # one item alone, out of order: the same
    ds.set_epoch(0)
    assert same(epoch0, items(ds))
    # item i crops image i % 3: indices 0 and 3 crop the same image differently
    assert not torch.equal(epoch0[0][1], epoch0[3][1])
    # augmentation: over many items some crops come out flipped/rotated, all still windows
    images = [read_image(p) for p in ds.paths]
    plain = HRFolderDataset(hr_folder, 2, 8, CountingDegrade(), seed=7, augment=False, samples_per_epoch=6)
    assert all(_is_window(hr, images[i % 3]) for i, (_, hr) in enumerate(epoch0))
    assert not same(epoch0, items(plain))


def test_hr_folder_caches_decoded_images_within_its_budget(hr_folder, monkeypatch):
    from adaptsr.data import datasets

    reads = []
    real_read = datasets.read_image
    monkeypatch.setattr(datasets, "read_image", lambda path: reads.append(path) or real_read(path))

    def degrade_in_place(hr, scale, generator):  # a careless degradation that scribbles on its input
        out = F.avg_pool2d(hr, scale)
        hr.zero_()
        return out

    # HR crops of the whole 64 x 64 photo, unaugmented: the crop is the decoded image itself unless copied
    def make(**kwargs):
        return HRFolderDataset(hr_folder, 2, 32, degrade_in_place, seed=3, augment=False, samples_per_epoch=6, **kwargs)

    uncached = make(cache_bytes=0)
    expected = [uncached[i] for i in range(6)]
    assert len(reads) == 6  # no cache: every item decodes its image
    reads.clear()

    cached = make()
    for _ in range(2):
        got = [cached[i] for i in range(6)]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    assert sorted(reads) == sorted(cached.paths)  # each image decoded once, then served from memory
    reads.clear()

    one_image = 3 * 64 * 64 * 4  # the fixture's photos are 64 x 64: a budget for exactly one
    partial = make(cache_bytes=one_image)
    [partial[i] for i in range(6)]
    assert reads.count(partial.paths[0]) == 1 and reads.count(partial.paths[1]) == 2  # only the first fits


def test_hr_folder_errors(tmp_path, hr_folder, astronaut):
    small = np.asarray(Image.fromarray(astronaut).resize((20, 24)))
    _save(small, hr_folder / "small.png")
    with pytest.raises(ValueError, match=r"small\.png is 20x24 pixels"):
        HRFolderDataset(hr_folder, 4, 8, CountingDegrade())
    os.unlink(hr_folder / "small.png")
    (hr_folder / "zz_noise.png").write_bytes(np.random.default_rng(1).integers(0, 256, 999, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="zz_noise.png"):
        HRFolderDataset(hr_folder, 4, 8, CountingDegrade())
    os.unlink(hr_folder / "zz_noise.png")
    ds = HRFolderDataset(hr_folder, 4, 8, lambda hr, scale, g: hr)  # forgets to downscale
    with pytest.raises(ValueError, match=r"expected \(1, 3, 8, 8\)"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="no_such"):
        HRFolderDataset(tmp_path / "no_such", 4, 8, CountingDegrade())


# -- PairedFolderDataset --


def _pair(photo: np.ndarray, scale: int, lr_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(lr, hr) uint8 arrays with hr the nearest-neighbour upscale of lr: aligned crops are exact."""
    lr = np.asarray(Image.fromarray(photo).resize(lr_size))
    return lr, lr.repeat(scale, 0).repeat(scale, 1)


def _check_aligned(lr: torch.Tensor, hr: torch.Tensor, scale: int) -> None:
    assert torch.equal(hr, lr.repeat_interleave(scale, -2).repeat_interleave(scale, -1))


def test_paired_parallel_folders(tmp_path, photos):
    (tmp_path / "lr").mkdir()
    (tmp_path / "hr").mkdir()
    for i, photo in enumerate(photos):
        lr, hr = _pair(photo, 4, (12 + i, 10))
        _save(hr, tmp_path / "hr" / f"{i:04d}.png")
        _save(lr, tmp_path / "lr" / (f"{i:04d}x4.png" if i == 2 else f"{i:04d}.png"))  # DIV2K-style LR name too
    ds = PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=4)
    assert len(ds) == 3 and ds.names == ["0000", "0001", "0002"]
    for i in range(3):
        lr, hr = ds[i]
        assert lr.shape == (3, 10, 12 + i) and hr.shape == (3, 40, 48 + 4 * i)
        _check_aligned(lr, hr, 4)
    crops = PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=4, lr_patch=6, seed=3)
    seen = set()
    for epoch in range(3):
        crops.set_epoch(epoch)
        for i in range(3):
            lr, hr = crops[i]
            assert lr.shape == (3, 6, 6) and hr.shape == (3, 24, 24)
            _check_aligned(lr, hr, 4)  # aligned, also after flips/rotations
            seen.add(lr.numpy().tobytes())
    assert len(seen) == 9  # different crops for different indices and epochs
    again = PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=4, lr_patch=6, seed=3)
    again.set_epoch(2)
    assert torch.equal(again[1][1], crops[1][1])
    # items are copies of the decoded images kept in memory: writing into one changes no later item
    for lr_patch in (None, 10):  # whole images, and crops as large as the LR (the image itself, unaugmented)
        cached = PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=4, lr_patch=lr_patch, augment=False)
        first = [t.clone() for t in cached[0]]
        for t in cached[0]:
            t.zero_()
        assert all(torch.equal(a, b) for a, b in zip(cached[0], first))


def test_paired_epochs_of_more_crops_than_pairs(tmp_path, photos):
    """samples_per_epoch: item i crops pair i mod n, so two pairs fill an epoch of five crops, all different."""
    (tmp_path / "lr").mkdir()
    (tmp_path / "hr").mkdir()
    for i, photo in enumerate(photos[:2]):
        lr, hr = _pair(photo, 2, (16, 16))
        _save(hr, tmp_path / "hr" / f"{i}.png")
        _save(lr, tmp_path / "lr" / f"{i}.png")
    plain = PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=2, lr_patch=8, seed=1)
    longer = PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=2, lr_patch=8, seed=1, samples_per_epoch=5)
    assert len(plain) == 2 and len(longer) == 5 and "2 pairs" in repr(longer)
    pair_of = {i: np.asarray(Image.open(tmp_path / "lr" / f"{i}.png")) for i in range(2)}
    crops = [longer[i] for i in range(5)]
    for i, (lr, hr) in enumerate(crops):
        _check_aligned(lr, hr, 2)
        window = (lr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert _occurs_in(window, pair_of[i % 2]) and not _occurs_in(window, pair_of[1 - i % 2]), i
    assert len({lr.numpy().tobytes() for lr, _ in crops}) == 5
    with pytest.raises(IndexError):
        longer[5]
    with pytest.raises(ValueError, match="samples_per_epoch must be positive and needs lr_patch"):
        PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=2, samples_per_epoch=5)


def _occurs_in(window: np.ndarray, image: np.ndarray) -> bool:
    """Whether ``window`` (any flip or 90-degree turn of it) is a sub-array of ``image``."""
    h, w = window.shape[:2]
    variants = [np.rot90(flipped, k) for flipped in (window, window[:, ::-1]) for k in range(4)]
    for top in range(image.shape[0] - h + 1):
        for left in range(image.shape[1] - w + 1):
            patch = image[top:top + h, left:left + w]
            if any(v.shape == patch.shape and np.array_equal(v, patch) for v in variants):
                return True
    return False


def test_paired_realsr_naming(tmp_path, photos):
    root = tmp_path / "Canon" / "Test" / "4"
    root.mkdir(parents=True)
    for i, photo in enumerate(photos[:2]):
        lr, hr = _pair(photo, 4, (11, 9))
        _save(hr, root / f"Canon_{i:03d}_HR.png")
        _save(lr, root / f"Canon_{i:03d}_LR4.png")
        _save(_pair(photo, 2, (22, 18))[0], root / f"Canon_{i:03d}_LR2.png")  # another scale: ignored at x4
    ds = PairedFolderDataset(root=root, scale=4)
    assert ds.names == ["Canon_000", "Canon_001"]
    assert [p[0].name for p in ds.pairs] == ["Canon_000_LR4.png", "Canon_001_LR4.png"]
    lr, hr = ds[1]
    assert lr.shape == (3, 9, 11) and hr.shape == (3, 36, 44)
    _check_aligned(lr, hr, 4)
    assert len(PairedFolderDataset(root=root, scale=2)) == 2
    with pytest.raises(ValueError, match=r"no LR image for scale 3: .*scales \[2, 4\]"):
        PairedFolderDataset(root=tmp_path / "Canon" / "Test" / "4", scale=3)


def test_paired_drealsr_naming(tmp_path, photos):
    root = tmp_path / "Test_x4"
    (root / "test_HR").mkdir(parents=True)
    (root / "test_LR").mkdir()
    for i, photo in enumerate(photos):
        lr, hr = _pair(photo, 4, (10, 10))
        _save(hr, root / "test_HR" / f"DSC_{i:04d}_x1.png")
        _save(lr, root / "test_LR" / f"DSC_{i:04d}_x4.png")
    ds = PairedFolderDataset(root=root, scale=4, lr_patch=4)
    assert ds.names == ["DSC_0000", "DSC_0001", "DSC_0002"]
    for i in range(3):
        lr, hr = ds[i]
        assert lr.shape == (3, 4, 4) and hr.shape == (3, 16, 16)
        _check_aligned(lr, hr, 4)


def test_paired_errors(tmp_path, photos):
    (tmp_path / "lr").mkdir()
    (tmp_path / "hr").mkdir()
    for i, photo in enumerate(photos):
        lr, hr = _pair(photo, 4, (10, 10))
        _save(hr, tmp_path / "hr" / f"p{i}.png")
        if i != 1:
            _save(lr, tmp_path / "lr" / f"p{i}.png")
    with pytest.raises(ValueError, match=r"HR image\(s\) without an LR partner: .*p1\.png"):
        PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=4)
    _save(_pair(photos[1], 4, (11, 10))[0], tmp_path / "lr" / "p1.png")  # 11x10 LR for a 40x40 HR
    with pytest.raises(ValueError, match=r"p1\.png \(LR 11x10\) / .*p1\.png \(HR 40x40\)"):
        PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=4)
    _save(_pair(photos[1], 4, (10, 10))[0], tmp_path / "lr" / "p1.png")
    _save(_pair(photos[1], 4, (10, 10))[0], tmp_path / "lr" / "orphan.png")
    with pytest.raises(ValueError, match=r"LR image\(s\) without an HR partner: .*orphan\.png"):
        PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=4)
    os.unlink(tmp_path / "lr" / "orphan.png")
    with pytest.raises(ValueError, match="smaller than lr_patch 16"):
        PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=4, lr_patch=16)
    # an HR whose sides are not multiples of the scale is cropped to LR * scale
    _save(np.pad(_pair(photos[0], 4, (10, 10))[1], ((0, 3), (0, 2), (0, 0))), tmp_path / "hr" / "p0.png")
    lr, hr = PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", scale=4)[0]
    assert hr.shape == (3, 40, 40)
    _check_aligned(lr, hr, 4)
    with pytest.raises(ValueError, match="root= or lr_folder"):
        PairedFolderDataset(tmp_path / "lr", tmp_path / "hr", root=tmp_path, scale=4)


# -- CachedValidationSet --


def test_cached_validation_set(tmp_path, photos):
    folder = tmp_path / "val"
    folder.mkdir()
    for i, photo in enumerate(photos):
        _save(np.asarray(Image.fromarray(photo).resize((66, 63))), folder / f"v{i}.png")  # not multiples of 4
    cache = tmp_path / "cache"
    degrade = CountingDegrade()
    first = CachedValidationSet(folder, 4, degrade, degrade_id=repr(degrade), cache_dir=cache, seed=1)
    assert degrade.calls == 3 and first.degrade_calls == 3
    assert sorted(os.listdir(cache)) == sorted(p.name for p in first.cache_paths)  # 3 PNGs, no temp files
    items = [first[i] for i in range(3)]
    for (lr, hr), photo in zip(items, photos):
        assert hr.shape == (3, 60, 64) and lr.shape == (3, 15, 16)
        hr_expected = _as_tensor(np.asarray(Image.fromarray(photo).resize((66, 63))))[:, :60, :64]
        assert torch.equal(hr, hr_expected)
        assert torch.equal(lr, (lr * 255).round() / 255)  # 8-bit, as cached
        assert 0.001 < (lr - F.avg_pool2d(hr[None], 4)[0]).abs().mean() < 0.1

    second = CachedValidationSet(folder, 4, degrade, degrade_id=repr(degrade), cache_dir=cache, seed=1)
    assert degrade.calls == 3 and second.degrade_calls == 0  # read from the cache
    for (lr, hr), (lr2, hr2) in zip(items, (second[i] for i in range(3))):
        assert torch.equal(lr, lr2) and torch.equal(hr, hr2)

    other = CountingDegrade(sigma=0.1)
    third = CachedValidationSet(folder, 4, other, degrade_id=repr(other), cache_dir=cache, seed=1)
    assert other.calls == 3 and not torch.equal(third[0][0], items[0][0])
    reseeded = CachedValidationSet(folder, 4, degrade, degrade_id=repr(degrade), cache_dir=cache, seed=2)
    assert reseeded.degrade_calls == 3 and not torch.equal(reseeded[0][0], items[0][0])

    # a changed image is degraded again, the others come from the cache
    _save(np.asarray(Image.fromarray(photos[0]).resize((66, 63)))[::-1].copy(), folder / "v0.png")
    changed = CachedValidationSet(folder, 4, degrade, degrade_id=repr(degrade), cache_dir=cache, seed=1)
    assert changed.degrade_calls == 1 and torch.equal(changed[2][0], items[2][0])
    # a corrupt cache file is regenerated, giving the same LR as before
    _save(photos[1], folder / "v1.png")
    path = changed.cache_paths[2]
    path.write_bytes(path.read_bytes()[:40])
    repaired = CachedValidationSet(folder, 4, degrade, degrade_id=repr(degrade), cache_dir=cache, seed=1)
    assert torch.equal(repaired[2][0], items[2][0])


def test_cached_validation_set_from_tensors(tmp_path, photos):
    hrs = [_as_tensor(p)[:, :62, :] for p in photos]
    degrade = CountingDegrade()
    ds = CachedValidationSet(hrs, 2, degrade, degrade_id="box+noise", cache_dir=tmp_path / "c")
    assert len(ds) == 3 and degrade.calls == 3
    lr, hr = ds[1]
    assert hr.shape == (3, 62, 64) and lr.shape == (3, 31, 32) and torch.equal(hr, hrs[1])
    again = CachedValidationSet(hrs, 2, degrade, degrade_id="box+noise", cache_dir=tmp_path / "c")
    assert degrade.calls == 3 and torch.equal(again[1][0], lr)
    with pytest.raises(ValueError, match=r"HR image 0: expected a tensor \[3, H, W\]"):
        CachedValidationSet([torch.zeros(1, 8, 8)], 2, degrade, degrade_id="x", cache_dir=tmp_path / "c")
