"""Evaluation datasets: a fixed, ordered list of named images, read one at a time by index.

Every dataset is an `EvalDataset` (`eval_dataset`): ``ids`` (the item names in evaluation order,
known without decoding any image) and ``load(index)`` -> ``{"id", "image", "original_size",
"captions", "caption", "score_caption", "score_caption_is_conditioning"}``.

Datasets:

* ``coco30k`` (`coco30k_dataset`, module `coco30k`) — MSCOCO-30k as PerCo and PerCoV2 define it:
  the 30,000 COCO-2017 *train* images named in PerCo's ``res/doc/coco_names.txt``
  (github.com/Nikolai10/PerCo; `fetch_coco30k_list` downloads and caches it), read from the
  ``train2017`` folder, with all ground-truth captions of ``captions_train2017.json`` (5 or so
  per image, in annotation order).
* ``kodak`` (`kodak_dataset`, module `folders`) — the 24 Kodak images ``kodim01.png`` ..
  ``kodim24.png`` (768x512 landscape or 512x768 portrait); no captions unless a caption file is
  given.
* ``folder`` (`folder_dataset`, module `folders`) — any image folder (files ending in
  `percov2_jax.data.sources.IMAGE_EXTENSIONS`), or a listed subset of it (`image_lists`), with
  optional captions (`caption_tables`: a mapping, a COCO annotations file, or a TSV/JSONL file
  for `percov2_jax.captions.load_captions`).
* ``tfds`` (`tfds_dataset`, module `data_sources`) — a split of an ``array_record`` TFDS dataset
  (`percov2_jax.data.sources.TfdsSource`).
* ``builtin`` (`builtin_dataset`, module `data_sources`) — the photographs shipped inside
  installed packages (`percov2_jax.data.builtin.BuiltinPhotos`), for demos and tests.

Image folders, image lists, caption and annotation files and TFDS directories may be local paths
or ``gs://`` URLs (`percov2_jax.storage`); the COCO-30k list cache stays local.

Preprocessing (`Preprocess`, module `preprocess`): ``"resize"`` (PerCo's bicubic resize to
``size x size`` without cropping; the default for COCO-30k and Kodak at 512), ``"center_crop"``
or ``"native"``. Which caption conditions the decoder and which one the CLIP score uses:
`select_captions` (module `eval_dataset`), from the ``conditioning`` mode "gt", "none" or "file".

Missing and corrupt images: an item listed but absent (a name of a list file, Kodak or COCO-30k
name not on disk, or a listed TFDS id not in the split) stays in ``ids`` and raises
`MissingImageError` (a FileNotFoundError) naming it from ``load``; an undecodable file raises
`ImageDecodeError` naming it. Nothing is dropped silently: the runner records and counts those
items. `EvalDataset.missing_ids` lists absent items up front without decoding anything.
"""

from percov2_jax.captions.sources import read_coco_captions
from percov2_jax.data.sources import ImageDecodeError, list_images
from percov2_jax.evaluation.datasets.coco30k import (
    COCO30K_LIST_FILE,
    COCO30K_LIST_URLS,
    COCO30K_SIZE,
    DOWNLOAD_TIMEOUT_S,
    coco30k_dataset,
    fetch_coco30k_list,
    validate_coco30k_list,
)
from percov2_jax.evaluation.datasets.data_sources import builtin_dataset, tfds_dataset
from percov2_jax.evaluation.datasets.eval_dataset import (
    CONDITIONING_MODES,
    EvalDataset,
    MissingCaptionError,
    MissingImageError,
    select_captions,
)
from percov2_jax.evaluation.datasets.folders import KODAK_IDS, folder_dataset, kodak_dataset
from percov2_jax.evaluation.datasets.image_lists import read_image_list
from percov2_jax.evaluation.datasets.preprocess import PREPROCESS_MODES, Preprocess

__all__ = [
    "COCO30K_LIST_FILE",
    "COCO30K_LIST_URLS",
    "COCO30K_SIZE",
    "CONDITIONING_MODES",
    "DOWNLOAD_TIMEOUT_S",
    "KODAK_IDS",
    "PREPROCESS_MODES",
    "EvalDataset",
    "ImageDecodeError",
    "MissingCaptionError",
    "MissingImageError",
    "Preprocess",
    "builtin_dataset",
    "coco30k_dataset",
    "fetch_coco30k_list",
    "folder_dataset",
    "kodak_dataset",
    "list_images",
    "read_coco_captions",
    "read_image_list",
    "select_captions",
    "tfds_dataset",
    "validate_coco30k_list",
]
