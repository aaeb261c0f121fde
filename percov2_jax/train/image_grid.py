"""Side-by-side views of originals and reconstructions for the training logs."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from percov2_jax import storage

PAD_VALUE = 255  # white gutters between and around the tiles


def to_uint8(images) -> np.ndarray:
    """Float images in [-1, 1] to uint8 [0, 255]: clipped, then rounded to nearest. uint8
    images are returned as they are."""
    if np.asarray(images).dtype == np.uint8:
        return np.asarray(images)
    x = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
    return np.rint(np.clip(x, 0.0, 255.0)).astype(np.uint8)


def reconstruction_grid(originals, reconstructions, *, max_images: int = 8, pad: int = 2) -> np.ndarray:
    """Two rows of tiles: originals on top, their reconstructions below, column by column.

    ``originals`` and ``reconstructions`` are float ``[N, H, W, 3]`` (NHWC) in [-1, 1] (numpy
    or jax; values outside are clipped) or uint8. The first ``min(N, max_images)`` images are used.
    Returns uint8 ``[2·H + 3·pad, n·W + (n + 1)·pad, 3]``, with ``pad`` white pixels around
    and between the tiles. ``H`` and ``W`` need not be equal.
    """
    originals = np.asarray(originals)
    reconstructions = np.asarray(reconstructions)
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {originals.shape} and reconstructions {reconstructions.shape} differ in shape")
    if originals.ndim != 4 or originals.shape[-1] != 3:
        raise ValueError(f"expected NHWC images with 3 channels, got {originals.shape}")
    if max_images < 1 or pad < 0:
        raise ValueError("max_images must be >= 1 and pad >= 0")
    n = min(originals.shape[0], max_images)
    if n == 0:
        raise ValueError("no images to show")
    h, w = originals.shape[1:3]
    grid = np.full((2 * h + 3 * pad, n * w + (n + 1) * pad, 3), PAD_VALUE, np.uint8)
    for row, images in enumerate((originals, reconstructions)):
        top = pad + row * (h + pad)
        tiles = to_uint8(images[:n])
        for i in range(n):
            left = pad + i * (w + pad)
            grid[top : top + h, left : left + w] = tiles[i]
    return grid


def save_png(path: str | os.PathLike, image) -> None:
    """Write uint8 ``[H, W, 3]`` (or ``[H, W]``) to ``path`` (local or ``gs://``) as PNG, atomically
    (`percov2_jax.storage.write_bytes`): a reader never sees a partial file. Parent folders are
    created."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 [H, W(, C)] image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())
