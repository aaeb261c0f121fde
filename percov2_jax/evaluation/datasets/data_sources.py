"""Datasets over the training sources of `percov2_jax.data`: a TFDS ``array_record`` split
(`tfds_dataset`) and the photographs shipped inside installed packages (`builtin_dataset`)."""

from __future__ import annotations

import os

import numpy as np

from percov2_jax.data.sources import name_listing
from percov2_jax.evaluation.datasets.eval_dataset import EvalDataset, MissingImageError
from percov2_jax.evaluation.datasets.image_lists import list_origin, read_image_list, repeated
from percov2_jax.evaluation.datasets.preprocess import Preprocess


def tfds_dataset(
    name_or_dir: str | os.PathLike,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    caption_key: str | None = None,
    id_key: str | None = None,
    image_list=None,
    preprocess: Preprocess = Preprocess("native", None),
    conditioning: str = "gt",
    conditioning_captions=None,
) -> EvalDataset:
    """A split of an ``array_record`` TFDS dataset (arguments as `percov2_jax.data.sources.TfdsSource`).

    Ids: the records' ``id`` feature (``id_key``) — found by reading every record once, without
    decoding images — or ``"{split}:{index}"`` when the dataset has no id feature. With
    ``image_list`` the items are the listed ids in list order; a listed id not in the split
    raises `MissingImageError` on load. Ground truth: ``[caption]`` when the record's caption is
    non-empty, else [].
    """
    from percov2_jax.data.sources import TfdsSource

    source = TfdsSource(
        name_or_dir, split, data_dir=data_dir, image_key=image_key, caption_key=caption_key, id_key=id_key
    )
    record_ids = [source.record_id(i) for i in range(len(source))]  # reads every record once
    twice = repeated(record_ids)
    if twice:
        raise ValueError(f"TFDS dataset {source.name} {split}: record ids are not unique: {name_listing(twice)}")
    if image_list is None:
        ids, records = record_ids, list(range(len(record_ids)))
    else:
        ids = read_image_list(image_list)
        where = {record_id: i for i, record_id in enumerate(record_ids)}
        records = [where.get(i) for i in ids]

    def read(index: int) -> tuple[np.ndarray, list[str]]:
        if records[index] is None:
            raise MissingImageError(f"{ids[index]}: listed but not an id of TFDS dataset {source.name} split {split}")
        record = source[records[index]]
        return record["image"], [record["caption"].strip()] if record["caption"].strip() else []

    info = {
        "tfds": source.name,
        "path": os.fspath(name_or_dir),
        "split": split,
        "image_key": image_key,
        "caption_key": source.caption_key,
        "id_key": source.id_key,
        "image_list": list_origin(image_list),
    }
    return EvalDataset(
        "tfds",
        ids,
        read,
        preprocess=preprocess,
        conditioning=conditioning,
        conditioning_captions=conditioning_captions,
        info=info,
        exists=lambda index: records[index] is not None,
    )


def builtin_dataset(
    preprocess: Preprocess = Preprocess("resize", 128), include_grayscale: bool = False, *, conditioning: str = "gt"
) -> EvalDataset:
    """The built-in photographs (`BuiltinPhotos`; ids like ``"skimage/astronaut"``, one caption each)."""
    from percov2_jax.data.builtin import BuiltinPhotos

    source = BuiltinPhotos(include_grayscale=include_grayscale)

    def read(index: int) -> tuple[np.ndarray, list[str]]:
        record = source[index]
        return record["image"], [record["caption"]] if record["caption"] else []

    return EvalDataset(
        "builtin",
        source.ids,
        read,
        preprocess=preprocess,
        conditioning=conditioning,
        info={"include_grayscale": include_grayscale},
    )
