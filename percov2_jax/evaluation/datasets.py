"""Evaluation datasets: a fixed, ordered list of named images, read one at a time by index.

Every dataset is an `EvalDataset`: ``ids`` (the item names in evaluation order, known without
decoding any image) and ``load(index)`` -> ``{"id", "image", "original_size", "captions",
"caption", "score_caption", "score_caption_is_conditioning"}``.

Datasets:

* ``coco30k`` (`coco30k_dataset`) — MSCOCO-30k as PerCo and PerCoV2 define it: the 30,000
  COCO-2017 *train* images named in PerCo's ``res/doc/coco_names.txt``
  (github.com/Nikolai10/PerCo; `fetch_coco30k_list` downloads and caches it), read from the
  ``train2017`` folder, with all ground-truth captions of ``captions_train2017.json`` (5 or so
  per image, in annotation order).
* ``kodak`` (`kodak_dataset`) — the 24 Kodak images ``kodim01.png`` .. ``kodim24.png``
  (768x512 landscape or 512x768 portrait); no captions unless a caption file is given.
* ``folder`` (`folder_dataset`) — any image folder, or a listed subset of it, with optional
  captions (a mapping, a COCO annotations file, or a TSV/JSONL/COCO file for
  `percov2_jax.captions.load_captions`).
* ``tfds`` (`tfds_dataset`) — a split of an ``array_record`` TFDS dataset
  (`percov2_jax.data.sources.TfdsSource`).
* ``builtin`` (`builtin_dataset`) — the photographs shipped inside installed packages
  (`percov2_jax.data.builtin.BuiltinPhotos`), for demos and tests.

Preprocessing (`Preprocess`), applied after decoding (`percov2_jax.data.sources.read_image`:
RGB, EXIF rotation applied):

* ``"resize"`` (the default for COCO-30k and Kodak, size 512) — PerCo's ``read_png``: a bicubic
  resize of the whole image to ``size x size`` **without cropping**. Images that are not square
  come out with a distorted aspect ratio (a 768x512 Kodak image is squeezed by 2/3 along its long
  side). We keep it because the published PerCo/PerCoV2 numbers (FID, KID, LPIPS, ...) were
  measured on such images.
* ``"center_crop"`` — bicubic resize of the shortest side to ``size`` (aspect ratio kept), then
  the central ``size x size`` square.
* ``"native"`` — the decoded image unchanged.

All resizing is Pillow's ``Image.Resampling.BICUBIC`` on uint8 images.

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

Missing and corrupt images: an item listed but absent (a name of a list file, Kodak or COCO-30k
name not on disk, or a listed TFDS id not in the split) stays in ``ids`` and raises
`MissingImageError` (a FileNotFoundError) naming it from ``load``; an undecodable file raises
`percov2_jax.data.sources.ImageDecodeError` naming it. Nothing is dropped silently: the runner
records and counts those items. `EvalDataset.missing_ids` lists absent items up front without
decoding anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
import pathlib
import re
import urllib.request
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import PIL
from PIL import Image

from percov2_jax.captions.sources import CaptionFileError, image_key, load_captions
from percov2_jax.data.sources import IMAGE_EXTENSIONS, ImageDecodeError, read_image

__all__ = [
    "COCO30K_LIST_FILE", "COCO30K_LIST_URLS", "COCO30K_SIZE", "CONDITIONING_MODES", "KODAK_IDS",
    "PREPROCESS_MODES", "EvalDataset", "ImageDecodeError", "MissingCaptionError", "MissingImageError",
    "Preprocess", "builtin_dataset", "coco30k_dataset", "fetch_coco30k_list", "folder_dataset",
    "kodak_dataset", "read_coco_captions", "read_image_list", "select_captions", "tfds_dataset",
    "validate_coco30k_list",
]

PREPROCESS_MODES = ("resize", "center_crop", "native")
CONDITIONING_MODES = ("gt", "none", "file")
KODAK_IDS = tuple(f"kodim{i:02d}.png" for i in range(1, 25))
COCO30K_SIZE = 30_000
COCO30K_LIST_FILE = "coco30k_file_names.txt"
# PerCo's list of the 30k COCO-2017 train images (res/doc/coco_names.txt); tried in order.
COCO30K_LIST_URLS = (
    "https://raw.githubusercontent.com/Nikolai10/PerCo/main/res/doc/coco_names.txt",
    "https://raw.githubusercontent.com/Nikolai10/PerCo/master/res/doc/coco_names.txt",
)
DOWNLOAD_TIMEOUT_S = 60
_COCO_NAME = re.compile(r"^\d{12}\.jpg$")
_LIST_LIMIT = 20  # names shown in one error message


class MissingImageError(FileNotFoundError):
    """An item is listed in the dataset but its image is not there; the message names it."""


class MissingCaptionError(LookupError):
    """``conditioning="file"`` and the caption file has no caption for an item; names it."""


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else "")


def _duplicates(names: Sequence[str]) -> list[str]:
    """The names occurring more than once, in order of their second occurrence (list[str])."""
    seen: set[str] = set()
    repeated: dict[str, None] = {}
    for name in names:
        if name in seen:
            repeated[name] = None
        seen.add(name)
    return list(repeated)


# ----------------------------------------------------------------------------------------------
# Preprocessing


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
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[-1] == 3):
            raise ValueError(f"expected a uint8 image [H, W, 3], got "
                             f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
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
    return np.ascontiguousarray(image[top:top + size, left:left + size])


# ----------------------------------------------------------------------------------------------
# Captions


def select_captions(captions: Sequence[str], conditioning: str,
                    conditioning_caption: str | None = None) -> tuple[str, str, bool]:
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


def read_coco_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """All captions of a COCO captions file (``captions_train2017.json`` format).

    Returns:
      dict[str, list[str]]: image file name (without directories) -> its captions, stripped, in
      annotation order; images without annotations map to [].
    Raises:
      CaptionFileError (a ValueError) naming the file for malformed or contradictory contents.
    """
    path = pathlib.Path(path)
    return _coco_table(json.loads(path.read_text(encoding="utf-8-sig")), str(path))


def _is_coco(data: Any) -> bool:
    return isinstance(data, dict) and "images" in data and "annotations" in data


def _coco_table(data: Mapping[str, Any], origin: str) -> dict[str, list[str]]:
    try:
        names: dict[Any, str] = {}
        for i, image in enumerate(data["images"]):
            if image["id"] in names:
                raise CaptionFileError(f"{origin}: images[{i}]: image id {image['id']!r} listed twice")
            names[image["id"]] = image_key(image["file_name"])
        clashes = _duplicates(list(names.values()))
        if clashes:
            raise CaptionFileError(f"{origin}: file names listed under several image ids: {_listing(clashes)}")
        table: dict[str, list[str]] = {name: [] for name in names.values()}
        for i, ann in enumerate(data["annotations"]):
            if ann["image_id"] not in names:
                raise CaptionFileError(f"{origin}: annotations[{i}]: unknown image_id {ann['image_id']!r}")
            if not isinstance(ann["caption"], str):
                raise CaptionFileError(f"{origin}: annotations[{i}]: caption is not a string: {ann['caption']!r}")
            table[names[ann["image_id"]]].append(ann["caption"].strip())
    except (KeyError, TypeError) as e:
        raise CaptionFileError(f"{origin}: not a COCO captions file ({type(e).__name__}: {e})") from None
    return table


def _as_caption_list(value: Any, key: str, origin: str) -> list[str]:
    """A caption or a list of captions -> list[str], stripped, empty ones dropped."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise CaptionFileError(f"{origin}: captions of {key!r} must be a string or a list of strings, got {value!r}")
    return [v.strip() for v in values if v.strip()]


def _caption_table(captions) -> tuple[dict[str, list[str]], bool, str]:
    """(table, keyed_by_relative_path, origin) for the ``captions`` argument of the datasets.

    A mapping or a non-COCO ``.json`` object is keyed by relative path; a COCO file and the
    `load_captions` formats (TSV, JSONL) by file name without directories.
    """
    if isinstance(captions, Mapping):
        origin = "the captions mapping"
        return {_normalise_name(k): _as_caption_list(v, k, origin) for k, v in captions.items()}, True, origin
    path = pathlib.Path(os.fspath(captions))
    origin = str(path)
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSONL
        if _is_coco(data):
            return _coco_table(data, origin), False, origin
        if isinstance(data, dict) and path.suffix.lower() == ".json":
            return {_normalise_name(k): _as_caption_list(v, k, origin) for k, v in data.items()}, True, origin
    return {k: _as_caption_list(v, k, origin) for k, v in load_captions(path).items()}, False, origin


def _match_captions(ids: Sequence[str], table: Mapping[str, list[str]], by_path: bool,
                    origin: str) -> list[list[str]]:
    """Ground-truth captions per id (list[list[str]]) from a caption table keyed by relative path
    (``by_path``) or by file name without directories."""
    keys = list(ids) if by_path else [image_key(i) for i in ids]
    if not by_path:
        clashes = _duplicates([k for k in keys if k in table])
        if clashes:
            raise ValueError(f"{origin} keys captions by file name, but these file names occur more than once "
                             f"in the dataset: {_listing(clashes)}")
    return [list(table.get(k, [])) for k in keys]


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
    return load_captions(conditioning_captions), str(conditioning_captions)


# ----------------------------------------------------------------------------------------------
# The dataset


class EvalDataset:
    """Random access by index over a fixed, ordered list of named items.

    Built by the ``*_dataset`` functions. ``read(index)`` gives the decoded image, uint8
    [H, W, 3], and the item's ground-truth captions (list[str]); it raises `MissingImageError`
    or `ImageDecodeError` naming the item. ``info``: JSON-able facts for `describe` (root,
    list and caption files, ...). ``exists(index)``, if given, tells without decoding whether the
    item's image is there (for `missing_ids`).
    """

    def __init__(self, name: str, ids: Sequence[str], read: Callable[[int], tuple[np.ndarray, list[str]]], *,
                 preprocess: Preprocess, conditioning: str = "gt", conditioning_captions=None,
                 info: Mapping[str, Any] | None = None, exists: Callable[[int], bool] | None = None):
        if not isinstance(preprocess, Preprocess):
            raise TypeError(f"preprocess must be a Preprocess, got {type(preprocess).__name__}")
        repeated = _duplicates(list(ids))
        if repeated:
            raise ValueError(f"dataset {name!r}: item names must be unique; repeated: {_listing(repeated)}")
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
        return {"id": item_id, "image": self.preprocess(image), "original_size": tuple(image.shape[:2]),
                "captions": list(captions), "caption": caption, "score_caption": score,
                "score_caption_is_conditioning": same}

    def _conditioning_caption(self, item_id: str) -> str | None:
        if self._table is None:
            return None
        key = image_key(item_id)
        if key not in self._table:
            raise MissingCaptionError(f"{item_id}: no conditioning caption for {key!r} in {self._table_origin} "
                                      f"({len(self._table)} captions)")
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
        return {"name": self.name, "num_items": len(self.ids), "ids_sha256": self.ids_sha256(),
                "preprocess": self.preprocess.describe(), "conditioning": self.conditioning,
                "conditioning_captions": self._table_origin, **self._info}

    def __repr__(self) -> str:
        return f"EvalDataset({self.name!r}, {len(self)} items, {self.preprocess}, conditioning={self.conditioning!r})"


# ----------------------------------------------------------------------------------------------
# Image lists and folders


def _normalise_name(name: str) -> str:
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _names_in_text(text: str) -> list[str]:
    """The names of a list file's text: one per line, blank lines and ``#`` lines skipped."""
    return [_normalise_name(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_image_list(image_list: str | os.PathLike | Sequence[str]) -> list[str]:
    """The names of an image list, in order: a text file (one name per line, relative to the
    image root; blank lines and lines starting with ``#`` ignored) or a sequence of str.

    Names are stripped, ``\\`` becomes ``/`` and a leading ``./`` is dropped. Raises ValueError
    for an empty list, a repeated name (listing them), or an absolute or ``..`` name.
    """
    if isinstance(image_list, (str, os.PathLike)):
        origin = os.fspath(image_list)
        names = _names_in_text(pathlib.Path(origin).read_text(encoding="utf-8-sig"))
    else:
        origin = "the image list"
        bad = [n for n in image_list if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"{origin}: names must be non-empty strings; got {bad[:_LIST_LIMIT]!r}")
        names = [_normalise_name(n) for n in image_list]
    if not names:
        raise ValueError(f"{origin}: no image names in it")
    outside = [n for n in names if n.startswith("/") or ".." in n.split("/") or re.match(r"^[A-Za-z]:/", n)]
    if outside:
        raise ValueError(f"{origin}: names must be relative to the image root; not {_listing(outside)}")
    repeated = _duplicates(names)
    if repeated:
        raise ValueError(f"{origin}: {len(repeated)} names listed more than once: {_listing(repeated)}")
    return names


def list_images(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Image files under ``root`` (recursive): sorted POSIX paths relative to root (list[str]).

    Names ending in ``extensions`` (case-insensitive); hidden files and directories skipped,
    symlinked directories not followed.
    """
    root = pathlib.Path(root)
    extensions = tuple(e.lower() for e in extensions)
    names = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        relative = pathlib.Path(directory).relative_to(root)
        names += [(relative / f).as_posix() for f in files if not f.startswith(".") and f.lower().endswith(extensions)]
    return sorted(names)


def _file_dataset(name: str, root, ids: Sequence[str], captions, *, preprocess: Preprocess, conditioning: str,
                  conditioning_captions, info: Mapping[str, Any]) -> EvalDataset:
    """An EvalDataset over files ``root/id``; ``captions``: None or `_caption_table`'s triple."""
    root = pathlib.Path(root)
    item_captions = [[] for _ in ids] if captions is None else _match_captions(ids, *captions)
    origin = None if captions is None else captions[2]
    paths = [root / i for i in ids]

    def read(index: int) -> tuple[np.ndarray, list[str]]:
        path = paths[index]
        if not path.is_file():
            raise MissingImageError(f"{ids[index]}: listed in dataset {name!r} but there is no file {path}")
        try:
            image = read_image(path, name=str(path))
        except FileNotFoundError:
            raise MissingImageError(f"{ids[index]}: listed in dataset {name!r} but there is no file {path}") from None
        return image, item_captions[index]

    info = {"root": str(root), **info, "captions": origin,
            "num_captioned": sum(bool(c) for c in item_captions)}
    return EvalDataset(name, ids, read, preprocess=preprocess, conditioning=conditioning,
                       conditioning_captions=conditioning_captions, info=info,
                       exists=lambda index: paths[index].is_file())


def _require_dir(root, what: str) -> pathlib.Path:
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {root} does not exist or is not a directory")
    return root


def _list_origin(image_list) -> str | None:
    if image_list is None:
        return None
    return os.fspath(image_list) if isinstance(image_list, (str, os.PathLike)) else "<list>"


def folder_dataset(root: str | os.PathLike, *, image_list=None, captions=None,
                   preprocess: Preprocess = Preprocess("native", None), conditioning: str = "gt",
                   conditioning_captions=None) -> EvalDataset:
    """The images under ``root``, or exactly those of ``image_list``.

    Args:
      root: image folder.
      image_list: None (every image file under root, `list_images` order), or a list file / a
        sequence of names relative to root (`read_image_list`); listed names absent on disk stay
        in ``ids`` and raise `MissingImageError` on load.
      captions: ground truth: None; a mapping {relative name: caption or list of captions}; a
        ``.json`` object of the same; a COCO annotations file (all captions per image, matched by
        file name without directories); or a TSV/JSONL file for `load_captions` (one caption).
      preprocess: `Preprocess`; default native.
      conditioning: "gt", "none" or "file"; conditioning_captions: the caption file (or mapping)
        for "file", keyed by file name.
    """
    root = _require_dir(root, "image folder")
    if image_list is None:
        ids = list_images(root)
        if not ids:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    else:
        ids = read_image_list(image_list)
    captions = None if captions is None else _caption_table(captions)
    return _file_dataset("folder", root, ids, captions, preprocess=preprocess, conditioning=conditioning,
                         conditioning_captions=conditioning_captions, info={"image_list": _list_origin(image_list)})


def kodak_dataset(root: str | os.PathLike, *, image_list=None, captions=None,
                  preprocess: Preprocess = Preprocess("resize", 512), conditioning: str = "gt",
                  conditioning_captions=None) -> EvalDataset:
    """Kodak: ``root/kodim01.png`` .. ``kodim24.png`` (or ``image_list``), resized to 512x512 by default.

    No ground-truth captions unless ``captions`` (as in `folder_dataset`) is given; a listed
    image absent from root raises `MissingImageError` on load.
    """
    root = _require_dir(root, "Kodak folder")
    ids = list(KODAK_IDS) if image_list is None else read_image_list(image_list)
    captions = None if captions is None else _caption_table(captions)
    return _file_dataset("kodak", root, ids, captions, preprocess=preprocess, conditioning=conditioning,
                         conditioning_captions=conditioning_captions, info={"image_list": _list_origin(image_list)})


# ----------------------------------------------------------------------------------------------
# MSCOCO-30k


def validate_coco30k_list(names: Sequence[str], strict: bool = True) -> list[str]:
    """Check a COCO-30k list: unique names like ``000000000009.jpg``, exactly 30,000 when strict.

    Returns the names as a list; raises ValueError naming the problem (``strict=False`` allows a
    shorter or longer list, e.g. a subset for a quick run or a test).
    """
    names = list(names)
    malformed = [repr(n) for n in names if not isinstance(n, str) or not _COCO_NAME.match(n)]
    if malformed:
        raise ValueError(f"COCO-30k list: {len(malformed)} names are not COCO-2017 file names "
                         f"(12 digits + .jpg): {_listing(malformed)}")
    repeated = _duplicates(names)
    if repeated:
        raise ValueError(f"COCO-30k list: {len(repeated)} names listed more than once: {_listing(repeated)}")
    if strict and len(names) != COCO30K_SIZE:
        raise ValueError(f"COCO-30k list has {len(names)} names, expected {COCO30K_SIZE} "
                         "(pass strict=False for a subset)")
    if not names:
        raise ValueError("COCO-30k list is empty")
    return names


def _default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "percov2_jax"


def _download_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        return response.read().decode("utf-8")


def fetch_coco30k_list(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """PerCo's 30,000 COCO-2017 train file names (list[str], the list's order).

    Reads ``cache_dir/coco30k_file_names.txt`` when present (``cache_dir`` None:
    ``$XDG_CACHE_HOME/percov2_jax`` or ``~/.cache/percov2_jax``); otherwise downloads it from
    `COCO30K_LIST_URLS` (PerCo's ``res/doc/coco_names.txt``, main then master branch) and writes
    the cache. Both are checked with `validate_coco30k_list` (strict).

    Raises RuntimeError, saying to pass ``--image_list``, when every download fails.
    """
    cache = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    cached = cache / COCO30K_LIST_FILE
    if cached.is_file():
        try:
            return validate_coco30k_list(read_image_list(cached))
        except ValueError as e:
            raise ValueError(f"cached COCO-30k list {cached} is invalid ({e}); delete it to download again") from None
    failures = []
    for url in COCO30K_LIST_URLS:
        try:
            names = validate_coco30k_list(_names_in_text(_download_text(url)))
        except Exception as e:  # noqa: BLE001 - any failure means: try the next URL, then explain
            failures.append(f"{url}: {type(e).__name__}: {e}")
            continue
        cache.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        partial.write_text("\n".join(names) + "\n", encoding="utf-8")
        os.replace(partial, cached)
        return names
    raise RuntimeError(
        "could not download the MSCOCO-30k file list (" + "; ".join(failures) + "). Pass --image_list with a local "
        f"copy of PerCo's res/doc/coco_names.txt (github.com/Nikolai10/PerCo), or put it at {cached} "
        f"({COCO30K_LIST_FILE}, one name per line)")


def coco30k_dataset(root: str | os.PathLike, *, annotations: str | os.PathLike | None = None, image_list=None,
                    preprocess: Preprocess = Preprocess("resize", 512), conditioning: str = "gt",
                    conditioning_captions=None, cache_dir: str | os.PathLike | None = None,
                    strict: bool = True) -> EvalDataset:
    """MSCOCO-30k (PerCo's definition): 30,000 images of COCO-2017 train, 512x512 resize by default.

    Args:
      root: the COCO ``train2017`` image folder.
      annotations: ``captions_train2017.json`` (all captions per image). Without it the items
        have no ground-truth captions, and ``conditioning`` must be "none" or "file".
      image_list: a list file or sequence of file names; None: `fetch_coco30k_list(cache_dir)`.
      strict: require the full list of 30,000 (False: a well-formed subset is fine).
    Raises:
      ValueError for a malformed list or for ``conditioning="gt"`` without annotations.
    """
    if annotations is None and conditioning == "gt":
        raise ValueError('coco30k: conditioning="gt" needs the ground-truth captions; pass annotations= '
                         '(captions_train2017.json), or use conditioning="none" or "file"')
    root = _require_dir(root, "COCO train2017 folder")
    names = fetch_coco30k_list(cache_dir) if image_list is None else read_image_list(image_list)
    ids = validate_coco30k_list(names, strict=strict)
    captions = None if annotations is None else (read_coco_captions(annotations), False, os.fspath(annotations))
    cache = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    info = {"image_list": _list_origin(image_list) or str(cache / COCO30K_LIST_FILE),
            "complete": len(ids) == COCO30K_SIZE}
    return _file_dataset("coco30k", root, ids, captions, preprocess=preprocess, conditioning=conditioning,
                         conditioning_captions=conditioning_captions, info=info)


# ----------------------------------------------------------------------------------------------
# TFDS and built-in photographs


def tfds_dataset(name_or_dir: str | os.PathLike, split: str, *, data_dir: str | os.PathLike | None = None,
                 image_key: str = "image", caption_key: str | None = None, id_key: str | None = None,
                 image_list=None, preprocess: Preprocess = Preprocess("native", None), conditioning: str = "gt",
                 conditioning_captions=None) -> EvalDataset:
    """A split of an ``array_record`` TFDS dataset (arguments as `percov2_jax.data.sources.TfdsSource`).

    Ids: the records' ``id`` feature (``id_key``) — found by reading every record once, without
    decoding images — or ``"{split}:{index}"`` when the dataset has no id feature. With
    ``image_list`` the items are the listed ids in list order; a listed id not in the split
    raises `MissingImageError` on load. Ground truth: ``[caption]`` when the record's caption is
    non-empty, else [].
    """
    from percov2_jax.data.sources import TfdsSource

    source = TfdsSource(name_or_dir, split, data_dir=data_dir, image_key=image_key, caption_key=caption_key,
                        id_key=id_key)
    record_ids = [source.record_id(i) for i in range(len(source))]  # reads every record once
    repeated = _duplicates(record_ids)
    if repeated:
        raise ValueError(f"TFDS dataset {source.name} {split}: record ids are not unique: {_listing(repeated)}")
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

    info = {"tfds": source.name, "path": os.fspath(name_or_dir), "split": split, "image_key": image_key,
            "caption_key": source.caption_key, "id_key": source.id_key, "image_list": _list_origin(image_list)}
    return EvalDataset("tfds", ids, read, preprocess=preprocess, conditioning=conditioning,
                       conditioning_captions=conditioning_captions, info=info,
                       exists=lambda index: records[index] is not None)


def builtin_dataset(preprocess: Preprocess = Preprocess("resize", 128), include_grayscale: bool = False, *,
                    conditioning: str = "gt") -> EvalDataset:
    """The built-in photographs (`BuiltinPhotos`; ids like ``"skimage/astronaut"``, one caption each)."""
    from percov2_jax.data.builtin import BuiltinPhotos

    source = BuiltinPhotos(include_grayscale=include_grayscale)

    def read(index: int) -> tuple[np.ndarray, list[str]]:
        record = source[index]
        return record["image"], [record["caption"]] if record["caption"] else []

    return EvalDataset("builtin", source.ids, read, preprocess=preprocess, conditioning=conditioning,
                       info={"include_grayscale": include_grayscale})
