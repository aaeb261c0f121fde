"""Real photographs that ship inside installed Python packages, with our captions.

For smoke training, demos and tests without any download: scikit-image (``skimage/data``),
scikit-learn (``load_sample_images``: china, flower) and matplotlib (``sample_data``:
grace_hopper) carry a few photographs in their wheels. The catalogue, with one short caption per
photo, is ``builtin_photos.json`` next to this module. The files are read straight from the
package directories (found with ``importlib.util.find_spec``, without importing the packages);
only files present on disk are used, so scikit-image's download-on-demand images never are.

  source = BuiltinPhotos()             # colour photos: up to 9 (6 with scikit-image alone)
  source[0] -> {"image": uint8 [H, W, 3], "caption": "a smiling astronaut ...", "id": "skimage/astronaut"}
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
from collections.abc import Sequence
from typing import Any

from percov2_jax.data.sources import read_image

CATALOGUE = pathlib.Path(__file__).with_name("builtin_photos.json")
# import name -> PyPI distribution
PACKAGES = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


@functools.cache
def catalogue() -> tuple[dict, ...]:
    """Every catalogued photo: dicts with id, package, file, size [H, W], color, caption."""
    with open(CATALOGUE, encoding="utf-8") as f:
        return tuple(json.load(f)["photos"])


def _package_dir(package: str) -> pathlib.Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def available_photos(include_grayscale: bool = False, packages: Sequence[str] | None = None) -> list[dict]:
    """The catalogue entries whose files are on disk, each with an added ``path``."""
    packages = tuple(PACKAGES) if packages is None else tuple(packages)
    unknown = sorted(set(packages) - set(PACKAGES))
    if unknown:
        raise ValueError(f"unknown packages {unknown}; photos come from {sorted(PACKAGES)}")
    found, roots = [], {p: _package_dir(p) for p in packages}
    for entry in catalogue():
        root = roots.get(entry["package"])
        if root is None or not (include_grayscale or entry["color"]):
            continue
        path = root / entry["file"]
        if path.is_file():
            found.append({**entry, "path": str(path)})
    return found


class BuiltinPhotos:
    """The catalogued photographs available offline, as a random-access source.

    Args:
      include_grayscale: also the grayscale photographs (camera, coins, moon and three textures),
        replicated to RGB. Default: colour photographs only.
      packages: restrict to these import names (``"skimage"``, ``"sklearn"``, ``"matplotlib"``).
    Raises:
      RuntimeError naming the packages to install when none of the photos is on disk.
    """

    def __init__(self, include_grayscale: bool = False, packages: Sequence[str] | None = None):
        self.entries = available_photos(include_grayscale, packages)
        if not self.entries:
            wanted = ({p: PACKAGES[p] for p in packages} if packages else None) or PACKAGES
            raise RuntimeError(
                "no built-in photographs found: they ship inside the packages "
                + ", ".join(f"{dist} (import {name})" for name, dist in wanted.items())
                + "; install at least one, e.g. `pip install scikit-image`."
            )
        self.ids = [e["id"] for e in self.entries]
        self.captions = [e["caption"] for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[int(index)]
        return {"image": read_image(entry["path"]), "caption": entry["caption"], "id": entry["id"]}

    def __repr__(self) -> str:
        return f"BuiltinPhotos({len(self)} photos: {', '.join(self.ids)})"
