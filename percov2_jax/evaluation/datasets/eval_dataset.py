"""`EvalDataset`: a fixed, ordered list of named items, each loaded by index, and which captions
an item is conditioned on and scored against (`select_captions`).

Captions: ``captions`` are the ground-truth captions (possibly none); ``caption`` conditions the
decoder; ``score_caption`` is the ground-truth caption the CLIP score is computed against.
`select_captions` chooses them from the ``conditioning`` mode:

* ``"gt"`` — condition on ``captions[0]`` and score against ``captions[1]`` when there are at
  least two ground-truth captions (PerCo scores against a ground-truth caption *different* from
  the one used for conditioning, so the score does not reward copying the caption), else against
  ``captions[0]``.
* ``"none"`` — condition on ``""``; score against ``captions[0]``.
* ``"file"`` — condition on the caption of the item in a caption file (e.g. BLIP-2 captions;
  keyed by file name); score against the first ground-truth caption that differs from it, else
  ``captions[0]``.

``score_caption_is_conditioning`` is True when the scored caption is non-empty and equal to the
conditioning caption (its CLIP score is then optimistic). ``score_caption`` is ``""`` when the
item has no ground-truth caption.

Missing and corrupt images: an item listed but absent stays in ``ids`` and raises
`MissingImageError` (a FileNotFoundError) naming it from ``load``; an undecodable file raises
`percov2_jax.data.sources.ImageDecodeError` naming it. Nothing is dropped silently: the runner
records and counts those items. `EvalDataset.missing_ids` lists absent items up front without
decoding anything.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from percov2_jax.captions.sources import image_key, load_captions
from percov2_jax.data.sources import name_listing
from percov2_jax.evaluation.datasets.image_lists import repeated
from percov2_jax.evaluation.datasets.preprocess import Preprocess

CONDITIONING_MODES = ("gt", "none", "file")


class MissingImageError(FileNotFoundError):
    """An item is listed in the dataset but its image is not there; the message names it."""


class MissingCaptionError(LookupError):
    """``conditioning="file"`` and the caption file has no caption for an item; names it."""


def select_captions(
    captions: Sequence[str], conditioning: str, conditioning_caption: str | None = None
) -> tuple[str, str, bool]:
    """(conditioning caption, scored caption, scored caption is the conditioning caption).

    Args:
      captions: the item's ground-truth captions (list[str], possibly empty).
      conditioning: "gt", "none" or "file" (see the module docstring).
      conditioning_caption: str, the caption from the file; required for "file" only.
    Returns:
      (caption: str, score_caption: str, same: bool); score_caption is "" without ground truth.
    """
    captions = list(captions)
    if conditioning == "gt":
        caption = captions[0] if captions else ""
        score = captions[1] if len(captions) >= 2 else caption
    elif conditioning == "none":
        caption, score = "", (captions[0] if captions else "")
    elif conditioning == "file":
        if conditioning_caption is None:
            raise ValueError('conditioning="file" needs the conditioning caption from the caption file')
        caption = conditioning_caption
        different = [c for c in captions if c != caption]
        score = different[0] if different else (captions[0] if captions else "")
    else:
        raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
    return caption, score, bool(score) and score == caption


def _conditioning_table(conditioning: str, conditioning_captions) -> tuple[dict[str, str] | None, str | None]:
    """(file name -> conditioning caption, origin) for ``conditioning="file"``; (None, None) otherwise."""
    if conditioning not in CONDITIONING_MODES:
        raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
    if conditioning != "file":
        if conditioning_captions is not None:
            raise ValueError(f'conditioning_captions is only used with conditioning="file", not {conditioning!r}')
        return None, None
    if conditioning_captions is None:
        raise ValueError('conditioning="file" needs conditioning_captions (a caption file or mapping)')
    if isinstance(conditioning_captions, Mapping):
        return {image_key(k): v.strip() for k, v in conditioning_captions.items()}, "the conditioning mapping"
    return load_captions(conditioning_captions), os.fspath(conditioning_captions)


class EvalDataset:
    """Random access by index over a fixed, ordered list of named items.

    Built by the ``*_dataset`` functions. ``read(index)`` gives the decoded image, uint8
    [H, W, 3], and the item's ground-truth captions (list[str]); it raises `MissingImageError`
    or `ImageDecodeError` naming the item. ``info``: JSON-able facts for `describe` (root,
    list and caption files, ...). ``exists(index)``, if given, tells without decoding whether the
    item's image is there (for `missing_ids`).
    """

    def __init__(
        self,
        name: str,
        ids: Sequence[str],
        read: Callable[[int], tuple[np.ndarray, list[str]]],
        *,
        preprocess: Preprocess,
        conditioning: str = "gt",
        conditioning_captions=None,
        info: Mapping[str, Any] | None = None,
        exists: Callable[[int], bool] | None = None,
    ):
        if not isinstance(preprocess, Preprocess):
            raise TypeError(f"preprocess must be a Preprocess, got {type(preprocess).__name__}")
        twice = repeated(list(ids))
        if twice:
            raise ValueError(f"dataset {name!r}: item names must be unique; repeated: {name_listing(twice)}")
        self.name, self.ids = name, list(ids)
        self.preprocess, self.conditioning = preprocess, conditioning
        self._table, self._table_origin = _conditioning_table(conditioning, conditioning_captions)
        self._read, self._exists, self._info = read, exists, dict(info or {})

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> dict[str, Any]:
        """Item ``index`` -> {"id": str, "image": uint8 [h, w, 3] (preprocessed), "original_size":
        (H, W), "captions": list[str], "caption": str, "score_caption": str,
        "score_caption_is_conditioning": bool}.

        Raises IndexError, `MissingImageError`, `ImageDecodeError`, `MissingCaptionError`.
        """
        index = int(index)
        if not 0 <= index < len(self.ids):
            raise IndexError(f"dataset {self.name!r} has {len(self.ids)} items; no index {index}")
        item_id = self.ids[index]
        file_caption = self._conditioning_caption(item_id)
        image, captions = self._read(index)
        caption, score, same = select_captions(captions, self.conditioning, file_caption)
        return {
            "id": item_id,
            "image": self.preprocess(image),
            "original_size": tuple(image.shape[:2]),
            "captions": list(captions),
            "caption": caption,
            "score_caption": score,
            "score_caption_is_conditioning": same,
        }

    def _conditioning_caption(self, item_id: str) -> str | None:
        if self._table is None:
            return None
        key = image_key(item_id)
        if key not in self._table:
            raise MissingCaptionError(
                f"{item_id}: no conditioning caption for {key!r} in {self._table_origin} ({len(self._table)} captions)"
            )
        return self._table[key]

    def missing_ids(self) -> list[str]:
        """The ids whose image is known to be absent, found without decoding (list[str])."""
        if self._exists is None:
            return []
        return [item_id for index, item_id in enumerate(self.ids) if not self._exists(index)]

    def ids_sha256(self) -> str:
        """sha256 hex digest of ``"\\n".join(ids)`` (UTF-8): the same ids in the same order."""
        return hashlib.sha256("\n".join(self.ids).encode("utf-8")).hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-able: name, number of items, ids digest, preprocess, conditioning and sources."""
        return {
            "name": self.name,
            "num_items": len(self.ids),
            "ids_sha256": self.ids_sha256(),
            "preprocess": self.preprocess.describe(),
            "conditioning": self.conditioning,
            "conditioning_captions": self._table_origin,
            **self._info,
        }

    def __repr__(self) -> str:
        return f"EvalDataset({self.name!r}, {len(self)} items, {self.preprocess}, conditioning={self.conditioning!r})"
