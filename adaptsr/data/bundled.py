"""The bundled HR photos: scikit-image's real photos, split into a fixed train and held-out set.

scikit-image ships them inside its wheel, so nothing is downloaded. The split (fixed; the demo,
the base models and the study all use it):

- train: rocket, hubble_deep_field, immunohistochemistry, retina, stereo_motorcycle (left and
  right views), colorwheel;
- held out: astronaut, coffee, chelsea (portrait, still life, animal fur: the textures a
  degradation hurts most, never seen in training).
"""

from __future__ import annotations

from pathlib import Path

import torch

TRAIN = ("rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left", "motorcycle_right",
         "colorwheel")
HELD_OUT = ("astronaut", "coffee", "chelsea")


def load_photo(name: str) -> torch.Tensor:
    """One bundled photo as float32 [3, H, W] in [0, 1]."""
    from skimage import data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        array = left if name == "motorcycle_left" else right
    elif name in TRAIN or name in HELD_OUT:
        array = getattr(data, name)()
    else:
        raise ValueError(f"no bundled photo {name!r}; the photos are {', '.join(TRAIN + HELD_OUT)}")
    return torch.from_numpy(array[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def write_photos(names: tuple[str, ...], folder: str | Path) -> Path:
    """Write the named photos as PNG files into ``folder`` (for the folder datasets); returns it."""
    from adaptsr.data.images import write_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            write_png(load_photo(name), path)
    return folder
