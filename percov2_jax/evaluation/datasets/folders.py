"""Datasets of image files under a folder: any folder (`folder_dataset`) and Kodak (`kodak_dataset`);
`file_dataset` is also the base of `percov2_jax.evaluation.datasets.coco30k`.

An item's id is its path relative to the folder; a listed file that is absent stays in ``ids``
and raises `MissingImageError` naming it on load. Folders, image lists and caption files may be
local paths or ``gs://`` URLs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from percov2_jax import storage
from percov2_jax.data.sources import IMAGE_EXTENSIONS, list_images, read_image
from percov2_jax.evaluation.datasets.caption_tables import CaptionTable, caption_table, item_captions
from percov2_jax.evaluation.datasets.eval_dataset import EvalDataset, MissingImageError
from percov2_jax.evaluation.datasets.image_lists import list_origin, read_image_list
from percov2_jax.evaluation.datasets.preprocess import Preprocess

KODAK_IDS = tuple(f"kodim{i:02d}.png" for i in range(1, 25))


def file_dataset(
    name: str,
    root,
    ids: Sequence[str],
    captions: CaptionTable | None,
    *,
    preprocess: Preprocess,
    conditioning: str,
    conditioning_captions,
    info: Mapping[str, Any],
) -> EvalDataset:
    """An EvalDataset over files ``root/id`` (root local or ``gs://``); ``captions``: the ground
    truth, or None for none."""
    root = storage.path(root)
    captions_per_item = [[] for _ in ids] if captions is None else item_captions(ids, captions, root)
    origin = None if captions is None else captions.origin
    paths = [root / i for i in ids]

    def read(index: int) -> tuple[np.ndarray, list[str]]:
        path = paths[index]
        if not path.is_file():
            raise MissingImageError(f"{ids[index]}: listed in dataset {name!r} but there is no file {path}")
        try:
            image = read_image(path, name=os.fspath(path))
        except FileNotFoundError:
            raise MissingImageError(f"{ids[index]}: listed in dataset {name!r} but there is no file {path}") from None
        return image, captions_per_item[index]

    info = {
        "root": os.fspath(root),
        **info,
        "captions": origin,
        "num_captioned": sum(bool(c) for c in captions_per_item),
    }
    return EvalDataset(
        name,
        ids,
        read,
        preprocess=preprocess,
        conditioning=conditioning,
        conditioning_captions=conditioning_captions,
        info=info,
        exists=lambda index: paths[index].is_file(),
    )


def require_dir(root, what: str) -> epath.Path:
    """``root`` (str | PathLike, local or ``gs://``) as a `storage.path`; FileNotFoundError naming
    ``what`` when it is not a directory."""
    root = storage.path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {root} does not exist or is not a directory")
    return root


def folder_dataset(
    root: str | os.PathLike,
    *,
    image_list=None,
    captions=None,
    preprocess: Preprocess = Preprocess("native", None),
    conditioning: str = "gt",
    conditioning_captions=None,
) -> EvalDataset:
    """The images under ``root``, or exactly those of ``image_list``.

    Args:
      root: image folder.
      image_list: None (every image file under root, `list_images` order: names ending in
        `IMAGE_EXTENSIONS`), or a list file / a sequence of names relative to root
        (`read_image_list`); listed names absent on disk stay in ``ids`` and raise
        `MissingImageError` on load.
      captions: ground truth: None; a mapping {relative name: caption or list of captions}; a
        ``.json`` object of the same; a COCO annotations file (all captions per image, matched by
        file name without directories); or a TSV/JSONL file for `load_captions` (one caption).
      preprocess: `Preprocess`; default native.
      conditioning: "gt", "none" or "file"; conditioning_captions: the caption file (or mapping)
        for "file", keyed by file name.
    """
    root = require_dir(root, "image folder")
    if image_list is None:
        ids = list_images(root)
        if not ids:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    else:
        ids = read_image_list(image_list)
    table = None if captions is None else caption_table(captions)
    return file_dataset(
        "folder",
        root,
        ids,
        table,
        preprocess=preprocess,
        conditioning=conditioning,
        conditioning_captions=conditioning_captions,
        info={"image_list": list_origin(image_list)},
    )


def kodak_dataset(
    root: str | os.PathLike,
    *,
    image_list=None,
    captions=None,
    preprocess: Preprocess = Preprocess("resize", 512),
    conditioning: str = "gt",
    conditioning_captions=None,
) -> EvalDataset:
    """Kodak: ``root/kodim01.png`` .. ``kodim24.png`` (or ``image_list``), resized to 512x512 by default.

    No ground-truth captions unless ``captions`` (as in `folder_dataset`) is given; a listed
    image absent from root raises `MissingImageError` on load.
    """
    root = require_dir(root, "Kodak folder")
    ids = list(KODAK_IDS) if image_list is None else read_image_list(image_list)
    table = None if captions is None else caption_table(captions)
    return file_dataset(
        "kodak",
        root,
        ids,
        table,
        preprocess=preprocess,
        conditioning=conditioning,
        conditioning_captions=conditioning_captions,
        info={"image_list": list_origin(image_list)},
    )
