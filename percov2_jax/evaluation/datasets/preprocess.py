"""How a decoded image becomes the evaluated image (`Preprocess`).

Applied after decoding (`percov2_jax.data.sources.read_image`: RGB, EXIF rotation applied):

* ``"resize"`` (the default for COCO-30k and Kodak, size 512) — PerCo's ``read_png``: a bicubic
  resize of the whole image to ``size x size`` **without cropping**. Images that are not square
  come out with a distorted aspect ratio (a 768x512 Kodak image is squeezed by 2/3 along its long
  side). We keep it because the published PerCo/PerCoV2 numbers (FID, KID, LPIPS, ...) were
  measured on such images.
* ``"center_crop"`` — bicubic resize of the shortest side to ``size`` (aspect ratio kept), then
  the central ``size x size`` square.
* ``"native"`` — the decoded image unchanged.

All resizing is Pillow's ``Image.Resampling.BICUBIC`` on uint8 images.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np
import PIL
from PIL import Image

PREPROCESS_MODES = ("resize", "center_crop", "native")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes the evaluated image (see the module docstring).

    ``mode``: one of `PREPROCESS_MODES`. ``size``: a positive int for ``"resize"`` and
    ``"center_crop"``; ignored (stored as None) for ``"native"``.
    """

    mode: str = "resize"
    size: int | None = 512

    def __post_init__(self):
        if self.mode not in PREPROCESS_MODES:
            raise ValueError(f"preprocess mode must be one of {PREPROCESS_MODES}, got {self.mode!r}")
        if self.mode == "native":
            object.__setattr__(self, "size", None)
            return
        size = self.size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"preprocess mode {self.mode!r} needs a positive integer size, got {size!r}")
        object.__setattr__(self, "size", int(size))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 [size, size, 3] (``resize``, ``center_crop``) or unchanged."""
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3):
            raise ValueError(
                f"expected a uint8 image [H, W, 3], got "
                f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
            )
        if self.mode == "native":
            return image
        if self.mode == "resize":
            return _bicubic(image, self.size, self.size)
        return _center_crop(image, self.size)

    def describe(self) -> dict[str, Any]:
        """JSON-able: mode, size, resampling filter and the Pillow version that resized."""
        out = {"mode": self.mode, "size": self.size}
        if self.mode != "native":
            out.update(resample="bicubic", pillow=PIL.__version__)
        return out


def _bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], Pillow bicubic."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: shortest side to ``size`` (bicubic), central square."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    image = _bicubic(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])
