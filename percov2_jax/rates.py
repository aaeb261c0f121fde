"""Bit-rate configurations: the hyper-latent grid and codebook size of each operating point.

A rate is named by its *uniform* hyper-latent bit-rate (log2 V bits per token, no entropy
model). ``hyper_side`` is the side of the token grid for a 512x512 image; one token covers
``512 / hyper_side`` pixels on each side whatever the image size, so a 768x512 Kodak image
at the 8x8 rate has a 12x8 grid. Adding a rate means adding one row to ``RATES``.

Sources (docs/method.md §2.1, §2.3): the seven PerCo rows are PerCo (SD)'s ``rate_cfg``
(PerCo Table 2) [verified]; the two PerCoV2 regimes are inferences [not stated by the paper]:
"ultra-low" = 8x8 tokens, V=256 and "extreme" = 32x32 tokens, V=256.
"""

from __future__ import annotations

import dataclasses
import math

IMAGE_MULTIPLE = 64  # every image side must be a multiple of this (the coarsest token covers 64 px)
LATENT_DOWNSAMPLE = 8  # SD3 VAE: pixels per latent cell along each side


@dataclasses.dataclass(frozen=True)
class BitRate:
    """One operating point: ``hyper_side`` x ``hyper_side`` tokens at 512x512, ``codebook_size`` codes."""

    name: str
    hyper_side: int
    codebook_size: int
    note: str = ""

    @property
    def pixels_per_token(self) -> int:
        """Side, in pixels, of the square each token covers (64 for the 8x8 rate)."""
        return 512 // self.hyper_side

    @property
    def latent_cells_per_token(self) -> int:
        """Side, in SD3 latent cells, of one token (the hyper-encoder's downsampling factor)."""
        return self.pixels_per_token // LATENT_DOWNSAMPLE

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.codebook_size)

    @property
    def uniform_bpp(self) -> float:
        """Bits per pixel of the token map under uniform coding (resolution independent)."""
        return self.bits_per_token / self.pixels_per_token**2

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` of the token map for an ``height`` x ``width`` image."""
        check_image_size(height, width)
        return height // self.pixels_per_token, width // self.pixels_per_token


RATES: dict[str, BitRate] = {
    r.name: r
    for r in (
        BitRate("0.1250", 64, 256, "PerCo Table 2; PerCo (SD) released checkpoint"),
        BitRate("0.0937", 64, 64, "PerCo Table 2"),
        BitRate("0.0507", 32, 8192, "PerCo Table 2 (PerCo (SD) code says 8196, a typo)"),
        BitRate("0.0313", 32, 256, "PerCo Table 2; PerCo (SD) released checkpoint"),
        BitRate("0.0098", 16, 1024, "PerCo Table 2"),
        BitRate("0.0024", 8, 1024, "PerCo Table 2"),
        BitRate("0.0019", 8, 256, "PerCo Table 2; PerCo (SD) released checkpoint"),
        BitRate("ultra-low", 8, 256, "PerCoV2 regime; (8, 256) inferred from the flowchart and Fig. 2, not stated"),
        BitRate("extreme", 32, 256, "PerCoV2 regime; (32, 256) inferred, not stated"),
    )
}


def get_rate(name: str) -> BitRate:
    """The named rate; raises ``ValueError`` listing the known names otherwise."""
    try:
        return RATES[name]
    except KeyError:
        raise ValueError(f"unknown bit-rate {name!r}; known rates: {', '.join(RATES)}") from None


def check_image_size(height: int, width: int) -> None:
    """Raise ``ValueError`` unless both sides are positive multiples of 64."""
    for label, side in (("height", height), ("width", width)):
        if not isinstance(side, int) or side <= 0 or side % IMAGE_MULTIPLE:
            raise ValueError(
                f"image {label} {side!r} is not a positive multiple of {IMAGE_MULTIPLE}: PerCoV2 token grids need "
                f"sides divisible by {IMAGE_MULTIPLE} (resize or crop first, e.g. 512x512 or 768x512)"
            )
