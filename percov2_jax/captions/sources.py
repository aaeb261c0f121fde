"""Where an image's caption comes from: one string for every image, or a caption file.

Caption files (UTF-8), detected by `load_captions`:

* **TSV** — ``name<TAB>caption`` per line; the caption is everything after the first tab.
* **JSONL** — one ``{"image": name, "caption": text}`` object per line (other keys ignored).
* **COCO** — a ground-truth captions file (``captions_train2017.json`` format): ``images``
  with ``id``/``file_name``, ``annotations`` with ``id``/``image_id``/``caption``. An image
  gets the caption of its annotation with the smallest annotation ``id``; images without
  annotations get none. `read_coco_captions` (`coco_captions` for parsed JSON) gives every
  caption of every image instead.

Blank lines are skipped. Captions are stripped of leading and trailing whitespace (the inner
whitespace is kept). Images are keyed by their *file name with extension and without
directory*: ``"val/kodim01.png"`` is ``"kodim01.png"`` (``/`` and ``\\`` both separate
directories). A name listed twice with the same caption is fine; with different captions it is
an error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from percov2_jax import storage

FORMATS = ("auto", "tsv", "jsonl", "coco")


class CaptionFileError(ValueError):
    """A caption file is malformed or contradicts itself."""


def image_key(name: str) -> str:
    """The key of an image: its file name without directory, extension kept (str -> str)."""
    key = re.split(r"[\\/]", str(name))[-1]
    if not key:
        raise ValueError(f"no file name in image name {name!r}")
    return key


def _stem(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key.lstrip(".") else key


def detect_format(text: str) -> str:
    """ "coco", "jsonl" or "tsv" for the contents ``text`` (str) of a caption file."""
    if not text.lstrip().startswith("{"):
        return "tsv"
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return "jsonl"
    return "coco" if is_coco(data) else "jsonl"


def is_coco(data: Any) -> bool:
    """Whether parsed JSON ``data`` is COCO caption annotations: an object with ``images`` and ``annotations``."""
    return isinstance(data, dict) and "images" in data and "annotations" in data


class _Collector:
    """Adds ``(name, caption)`` pairs, rejecting a key given two different captions."""

    def __init__(self, path: str):
        self.path, self.captions, self.origin = path, {}, {}

    def add(self, name, caption, where: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise CaptionFileError(f"{self.path}: {where}: the image name must be a non-empty string, got {name!r}")
        if not isinstance(caption, str):
            raise CaptionFileError(f"{self.path}: {where}: the caption must be a string, got {caption!r}")
        key, caption = image_key(name.strip()), caption.strip()
        if key in self.captions and self.captions[key] != caption:
            raise CaptionFileError(
                f"{self.path}: image {key!r} has two different captions: {self.origin[key]}: "
                f"{self.captions[key]!r} and {where}: {caption!r}"
            )
        self.captions.setdefault(key, caption)
        self.origin.setdefault(key, where)


def _lines(text: str):
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield number, line


def _parse_tsv(text: str, out: _Collector) -> None:
    for number, line in _lines(text):
        if "\t" not in line:
            raise CaptionFileError(
                f"{out.path}: line {number}: expected 'name<TAB>caption', found no tab: {line[:80]!r}"
            )
        name, caption = line.split("\t", 1)
        out.add(name, caption, f"line {number}")


def _parse_jsonl(text: str, out: _Collector) -> None:
    for number, line in _lines(text):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaptionFileError(f"{out.path}: line {number}: not JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict) or "image" not in record or "caption" not in record:
            raise CaptionFileError(
                f"{out.path}: line {number}: expected an object with 'image' and 'caption', got {line[:80]!r}"
            )
        out.add(record["image"], record["caption"], f"line {number}")


def _coco_images(data: Any, origin: str) -> list[tuple[Any, list[tuple[int, Mapping]]]]:
    """Parsed COCO caption annotations -> ``[(file_name, [(index in annotations, annotation), ...])]``,
    one entry per image; images and each image's annotations in file order.

    Raises CaptionFileError naming ``origin`` for a repeated image id, an annotation of an unknown
    image, or a missing field."""
    try:
        images: dict[Any, tuple[Any, list]] = {}
        for i, image in enumerate(data["images"]):
            if image["id"] in images:
                raise CaptionFileError(f"{origin}: images[{i}]: image id {image['id']!r} listed twice")
            images[image["id"]] = (image["file_name"], [])
        for i, ann in enumerate(data["annotations"]):
            if ann["image_id"] not in images:
                raise CaptionFileError(f"{origin}: annotations[{i}]: unknown image_id {ann['image_id']!r}")
            images[ann["image_id"]][1].append((i, ann))
    except (KeyError, TypeError) as e:
        raise CaptionFileError(f"{origin}: not a COCO captions file ({type(e).__name__}: {e})") from None
    return list(images.values())


def coco_captions(data: Any, origin: str) -> dict[str, list[str]]:
    """Every caption of parsed COCO caption annotations ``data`` (``origin`` names it in errors).

    Returns:
      dict[str, list[str]]: image key (`image_key` of ``file_name``) -> its captions, stripped,
      in the order of ``annotations``; images without annotations map to [].
    Raises:
      CaptionFileError for malformed contents, a non-string caption, or one file name listed
      under two image ids.
    """
    table: dict[str, list[str]] = {}
    for name, image_annotations in _coco_images(data, origin):
        key = image_key(name)
        if key in table:
            raise CaptionFileError(f"{origin}: file name {key!r} is listed under several image ids")
        table[key] = []
        for i, ann in image_annotations:
            if "caption" not in ann:
                raise CaptionFileError(f"{origin}: not a COCO captions file (KeyError: 'caption')")
            if not isinstance(ann["caption"], str):
                raise CaptionFileError(f"{origin}: annotations[{i}]: caption is not a string: {ann['caption']!r}")
            table[key].append(ann["caption"].strip())
    return table


def read_coco_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """`coco_captions` of a COCO captions file (``captions_train2017.json``): every caption per image key.

    Raises CaptionFileError (a ValueError) naming the file for malformed or contradictory contents.
    """
    return coco_captions(json.loads(storage.read_bytes(path).decode("utf-8-sig")), os.fspath(storage.path(path)))


def _parse_coco(text: str, out: _Collector) -> None:
    """Each image's caption of smallest annotation id, added in the order of those annotations."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CaptionFileError(f"{out.path}: not a COCO captions file (JSONDecodeError: {e})") from None
    chosen = []  # (index in annotations, file name, annotation id, caption)
    try:
        for name, image_annotations in _coco_images(data, out.path):
            if image_annotations:
                i, ann = min(image_annotations, key=lambda indexed: indexed[1]["id"])
                chosen.append((i, name, ann["id"], ann["caption"]))
    except (KeyError, TypeError) as e:
        raise CaptionFileError(f"{out.path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    for i, name, ann_id, caption in sorted(chosen, key=lambda c: c[0]):
        out.add(name, caption, f"annotations[{i}] (id {ann_id})")


def load_captions(path: str | os.PathLike, format: str = "auto") -> dict[str, str]:
    """The captions of a caption file, keyed by image file name (see the module docstring).

    Args:
      path: str | PathLike, a TSV, JSONL or COCO captions file, local or a ``gs://`` URL.
      format: one of `FORMATS`; "auto" detects it: a file whose first non-blank character is
        not ``{`` is TSV; one that parses as a single JSON object with ``images`` and
        ``annotations`` is COCO; anything else starting with ``{`` is JSONL.
    Returns:
      dict[str, str], image key -> caption.
    Raises:
      FileNotFoundError; CaptionFileError (a ValueError) for malformed or contradictory files.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    text = storage.read_bytes(path).decode("utf-8-sig")
    fmt = detect_format(text) if format == "auto" else format
    out = _Collector(os.fspath(storage.path(path)))
    {"tsv": _parse_tsv, "jsonl": _parse_jsonl, "coco": _parse_coco}[fmt](text, out)
    return out.captions


class CaptionFile:
    """Captions from a file (`load_captions`), looked up by image name.

    ``caption_for(name)`` takes a path or file name and looks up its key (`image_key`); when
    that key is absent but exactly one key has the same stem (name without its last extension),
    that caption is used, so captions listed for ``x.jpg`` serve ``x.png``.
    """

    def __init__(self, path: str | os.PathLike, format: str = "auto"):
        self.path = storage.path(path)
        self.captions = load_captions(self.path, format)
        self._by_stem: dict[str, list[str]] = {}
        for key in self.captions:
            self._by_stem.setdefault(_stem(key), []).append(key)

    def __len__(self) -> int:
        return len(self.captions)

    def caption_for(self, image: str | os.PathLike) -> str:
        """The caption of ``image`` (str | PathLike); KeyError naming the image and the file."""
        key = image_key(os.fspath(image))
        if key in self.captions:
            return self.captions[key]
        same_stem = self._by_stem.get(_stem(key), [])
        if len(same_stem) == 1:
            return self.captions[same_stem[0]]
        hint = f"; ambiguous between {sorted(same_stem)}" if same_stem else ""
        raise KeyError(f"no caption for image {key!r} in {self.path} ({len(self.captions)} captions{hint})")


class FixedCaption:
    """One caption ``text`` (str) for every image."""

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"a caption must be str, not {type(text).__name__}")
        self.text = text

    def caption_for(self, image: str | os.PathLike) -> str:
        return self.text
