"""Random-access image+caption sources for the training input pipeline.

Every source has ``__len__`` and ``__getitem__(index)`` (a grain ``RandomAccessDataSource``) and
returns records ``{"image": uint8 [H, W, 3] RGB, "caption": str, "id": str}``:

* `ImageFolderSource` — image files under a directory, with an optional caption file.
* `TfdsSource` — a TFDS dataset in the ``array_record`` format (no TensorFlow needed); write one
  from an image folder with ``tools/prepare_dataset.py``.
* `percov2_jax.data.builtin.BuiltinPhotos` — photographs shipped inside installed packages.

Folders, caption files and TFDS directories may be local paths or ``gs://`` URLs
(`percov2_jax.storage`); a missing one raises FileNotFoundError naming it.

Pixel conversion (`to_rgb`), the same for every source:

* EXIF orientation is applied (a portrait phone photo comes out upright).
* ``RGB`` is kept; ``L``/``1`` are replicated to three channels; ``P``, ``CMYK``, ``YCbCr``,
  ``LAB``, ``HSV`` go through Pillow's ``convert("RGB")`` (ICC profiles are ignored).
* 16-bit grayscale (``I;16*``, and ``I``, taken as 0..65535 and clipped) is scaled to 8 bits,
  ``round(v * 255 / 65535)``; Pillow's own conversion would clip everything above 255 to white.
* Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) is composited onto a **white**
  background: ``rgb * a + 255 * (1 - a)``, rounded — transparent pixels become white, the way
  browsers show such images on a page.
* Floating-point (``F``) images are rejected: their value range is not defined.
* Multi-frame files (GIF, TIFF) give their first frame.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from percov2_jax import storage

# File name endings read as images (case-insensitive), everywhere images are listed from a folder.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_LIST_LIMIT = 20  # file names listed in one error message


class ImageDecodeError(ValueError):
    """An image file or record could not be decoded; the message names it."""


def name_listing(names: Sequence[str]) -> str:
    """Names for an error message: the first 20, comma-separated, then how many more."""
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else "")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] -> uint8 [H, W, 3], alpha-blended over white (rounded)."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """Integers in 0..65535 (clipped) -> uint8, round(v * 255 / 65535)."""
    v = np.clip(values.astype(np.int64), 0, 65535)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(image: Image.Image) -> np.ndarray:
    """A Pillow image -> uint8 [H, W, 3] RGB, by the rules in the module docstring."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "F":
        raise ImageDecodeError("floating-point (mode F) images are not supported: their value range is undefined")
    if mode.startswith("I;16") or mode == "I":
        gray = _sixteen_to_eight(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_white(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in ("L", "1"):
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """A decoded uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [H, W, 3] RGB."""
    array = np.asarray(array)
    if array.dtype == np.uint16:
        array = _sixteen_to_eight(array)
    if array.dtype != np.uint8:
        raise ImageDecodeError(f"expected a uint8 image array, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageDecodeError(f"expected an image array [H, W, 1|3|4], got shape {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        return _composite_on_white(array)
    return array


def read_image(file: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Decode an image file (a local path or a ``gs://`` URL, str or PathLike) or encoded bytes ->
    uint8 [H, W, 3] RGB.

    Raises `ImageDecodeError` naming ``name`` (default: the path) if Pillow cannot decode it, and
    FileNotFoundError naming the path if it does not exist.
    """
    what = name or (os.fspath(file) if not isinstance(file, bytes) else "<bytes>")
    if not isinstance(file, bytes) and storage.is_url(file):
        file = storage.read_bytes(file)  # Pillow opens local files only
    try:
        with Image.open(io.BytesIO(file) if isinstance(file, bytes) else os.fspath(file)) as image:
            image.load()
            return to_rgb(image)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{what}: {e}") from None
    except FileNotFoundError:
        raise
    except Image.UnidentifiedImageError as e:
        # Pillow's own message names the file object it was given (a path, or a BytesIO for
        # bytes and URLs); ``what`` already names the image, whatever it was read from.
        raise ImageDecodeError(f"{what}: cannot decode image (not in a format Pillow recognises)") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Image folders


def normalise_relpath(name: str) -> str:
    """A relative image path as a key: ``\\`` becomes ``/``, leading ``./`` dropped (str -> str)."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _endings(extensions: Sequence[str]) -> tuple[str, ...]:
    """File extensions as lower-case endings with the dot: ("PNG", ".Jpg") -> (".png", ".jpg")."""
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def list_images(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Image files under ``root`` (a local folder or a ``gs://`` URL; recursive): sorted POSIX
    paths relative to root (list[str]).

    Names ending in one of ``extensions`` (case-insensitive, the dot optional); hidden files and
    directories (names starting with ``.``) skipped, symlinked directories not followed.
    """
    root = storage.path(root)
    extensions = _endings(extensions)
    if storage.is_url(root):  # object stores refuse os.walk and rglob
        files = [f.relative_to(root).as_posix() for f in storage.files_under(root)]
    else:
        files = []
        for directory, subdirs, names in os.walk(root):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            relative = pathlib.Path(directory).relative_to(os.fspath(root))
            files += [(relative / f).as_posix() for f in names]
    return sorted(
        f for f in files if f.lower().endswith(extensions) and not any(p.startswith(".") for p in f.split("/"))
    )


def caption_keys(
    ids: Sequence[str], table: Mapping[str, Any], by_path: bool, origin: str, root: str | os.PathLike
) -> list[str]:
    """The key of each image in a caption table (list[str]).

    ``ids``: POSIX paths relative to ``root``. A table keyed by relative path (``by_path``) uses
    the id itself; otherwise the file name without directories. Raises ValueError when a file
    name that has a caption belongs to several ids (which one it captions is ambiguous);
    ``origin`` names the table.
    """
    if by_path:
        return list(ids)
    keys = [i.rsplit("/", 1)[-1] for i in ids]
    seen: dict[str, list[str]] = {}
    for key, image_id in zip(keys, ids):
        if key in table:
            seen.setdefault(key, []).append(image_id)
    clashes = sorted(k for k, v in seen.items() if len(v) > 1)
    if clashes:
        raise ValueError(
            f"{origin} keys captions by file name, but these names occur in several "
            f"subdirectories of {root}: " + name_listing([f"{k} ({', '.join(seen[k])})" for k in clashes])
        )
    return keys


def read_text(file: str | os.PathLike) -> str:
    """The text of a local or ``gs://`` file in UTF-8, a byte-order mark dropped (str);
    FileNotFoundError naming it when absent."""
    return storage.read_bytes(file).decode("utf-8-sig")


def _read_caption_file(path: str | os.PathLike) -> tuple[dict[str, str], bool]:
    """(captions, keyed_by_relative_path) for a local or ``gs://`` caption file; see `ImageFolderSource`."""
    from percov2_jax.captions.sources import is_coco

    if os.fspath(path).lower().endswith(".json"):
        data = json.loads(read_text(path))
        if not is_coco(data):
            if not isinstance(data, dict):
                raise ValueError(
                    f"{path}: a .json caption file must be an object {{relative path: caption}} "
                    f"or COCO caption annotations, got {type(data).__name__}"
                )
            bad = [k for k, v in data.items() if not isinstance(v, str)]
            if bad:
                raise ValueError(f"{path}: captions must be strings; not for {name_listing(bad)}")
            return {normalise_relpath(k): v.strip() for k, v in data.items()}, True
    from percov2_jax.captions.sources import load_captions

    return load_captions(path), False


class ImageFolderSource:
    """Image files under ``root`` (a local folder or a ``gs://`` URL; recursive) with optional captions.

    Files: `list_images` (names ending in one of ``extensions``, case-insensitive; default
    `IMAGE_EXTENSIONS`), in sorted order of their POSIX path relative to ``root``; that relative
    path is the record ``id``. Hidden files and directories (names starting with ``.``) are
    skipped, and symlinked directories are not followed.

    ``captions``: None (every caption ``""``), a mapping ``{relative path: caption}``, or a file
    (local or ``gs://``):

    * ``*.json`` — one JSON object ``{"relative/path.jpg": "caption", ...}`` keyed by the path
      relative to ``root`` (``/`` separators); or COCO caption annotations (below).
    * anything else — read by `percov2_jax.captions.load_captions`: TSV (``name<TAB>caption``),
      JSONL (``{"image": name, "caption": text}`` per line) or COCO ``captions_*.json``. These
      are keyed by **file name without directories**; two captioned images with the same file
      name in different subdirectories are an error (ambiguous).

    Images without a caption get ``""``, or raise ValueError listing them when
    ``require_captions``. Captions for files that are not in the folder are ignored.

    Decoding happens in ``__getitem__``; an unreadable file raises `ImageDecodeError` naming it.
    `verify` decodes every file up front.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        captions: str | os.PathLike | Mapping[str, str] | None = None,
        *,
        require_captions: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ):
        self.root: epath.Path = storage.path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        self.ids: list[str] = list_images(self.root, extensions)
        if not self.ids:
            raise FileNotFoundError(f"no image files ({', '.join(_endings(extensions))}) under {self.root}")
        self.paths: list[str] = [os.fspath(self.root / i) for i in self.ids]  # local paths or URLs
        self.captions: list[str] = self._match_captions(captions, require_captions)

    def _match_captions(self, captions, require_captions: bool) -> list[str]:
        if captions is None:
            if require_captions:
                raise ValueError(f"require_captions=True but no captions were given for {self.root}")
            return [""] * len(self.ids)
        if isinstance(captions, Mapping):
            table, by_path, origin = (
                {normalise_relpath(k): v for k, v in captions.items()},
                True,
                "the captions mapping",
            )
        else:
            table, by_path = _read_caption_file(captions)
            origin = os.fspath(captions)
        keys = caption_keys(self.ids, table, by_path, origin, self.root)
        missing = [i for i, key in zip(self.ids, keys) if key not in table]
        if missing and require_captions:
            raise ValueError(
                f"{len(missing)} of {len(self.ids)} images under {self.root} have no caption in "
                f"{origin}: {name_listing(missing)}"
            )
        return [table.get(key, "") for key in keys]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return {
            "image": read_image(self.paths[index], name=self.paths[index]),
            "caption": self.captions[index],
            "id": self.ids[index],
        }

    def verify(self) -> int:
        """Decode every image; returns the count, or raises `ImageDecodeError` listing all bad files."""
        bad = []
        for path in self.paths:
            try:
                read_image(path)
            except ImageDecodeError as e:
                bad.append(str(e))
        if bad:
            raise ImageDecodeError(
                f"{len(bad)} of {len(self.paths)} images under {self.root} cannot be decoded:\n"
                + "\n".join(bad[:_LIST_LIMIT])
                + ("\n..." if len(bad) > _LIST_LIMIT else "")
            )
        return len(self.paths)

    def __repr__(self) -> str:
        captioned = sum(bool(c) for c in self.captions)
        return f"ImageFolderSource({os.fspath(self.root)!r}, {len(self)} images, {captioned} captioned)"


# ----------------------------------------------------------------------------------------------
# TFDS array_record datasets


def _find_dataset_dir(directory: epath.Path) -> epath.Path:
    """The directory (local or ``gs://``) holding dataset_info.json: ``directory`` itself, its
    newest version subdirectory (``1.0.0``), or ``<name>/<version>`` one level further down."""
    if (directory / "dataset_info.json").exists():
        return directory

    def version_key(p: epath.Path):
        parts = p.name.split(".")
        return tuple(int(x) for x in parts) if len(parts) == 3 and all(x.isdigit() for x in parts) else None

    for pattern in ("*/dataset_info.json", "*/*/dataset_info.json"):
        candidates = [p.parent for p in directory.glob(pattern) if version_key(p.parent) is not None]
        if candidates:
            names = {c.parent for c in candidates}
            if len(names) > 1:
                raise ValueError(
                    f"{directory} holds several TFDS datasets ({sorted(n.name for n in names)}); pass the one to read"
                )
            return max(candidates, key=version_key)
    raise FileNotFoundError(
        f"{directory}: no TFDS dataset (dataset_info.json) in it, in a version subdirectory or in <name>/<version>"
    )


def _lookup(record: Mapping[str, Any], key: str):
    value = record
    for part in key.split("/"):
        value = value[part]
    return value


def _as_text(value) -> str:
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
        value = value[0] if len(value) else ""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _has_key(features, key: str) -> bool:
    try:
        _lookup(features, key)
    except (KeyError, TypeError):
        return False
    return True


class TfdsSource:
    """A split of a TFDS dataset stored as ``array_record``, read without TensorFlow.

    ``name_or_dir``: a prepared dataset directory, local or ``gs://`` (the version directory
    holding ``dataset_info.json``, its parent, or a ``data_dir`` with one dataset in it), or a
    registered TFDS name (``"coco_captions"``) looked up in ``data_dir`` (local or ``gs://``).
    ``split`` accepts TFDS slicing (``"train[:1000]"``).

    ``image_key``: a top-level feature holding the image (an ``Image`` feature, decoded here with
    `read_image` so grayscale and alpha follow the module's conversion rules, or a uint8 array).
    ``caption_key``/``id_key``: feature paths (``/`` for nesting, e.g. ``"captions/text"``); a
    sequence value gives its first element, bytes are decoded as UTF-8. With None, the ``caption``
    feature is used if it exists (else every caption is ``""``), and the ``id`` feature if it
    exists (else ``"{split}:{index}"``).

    Raises ValueError if the dataset is not ``array_record`` (e.g. ``tfrecord``, which needs
    TensorFlow and has no random access).
    """

    def __init__(
        self,
        name_or_dir: str | os.PathLike,
        split: str,
        data_dir: str | os.PathLike | None = None,
        image_key: str = "image",
        caption_key: str | None = None,
        id_key: str | None = None,
    ):
        import tensorflow_datasets as tfds

        path = storage.path(name_or_dir)
        if path.is_dir():
            builder = tfds.builder_from_directory(os.fspath(_find_dataset_dir(path)))
        elif storage.is_url(path):
            raise FileNotFoundError(f"TFDS dataset directory {path} does not exist")
        else:
            builder = tfds.builder(os.fspath(name_or_dir), data_dir=None if data_dir is None else os.fspath(data_dir))
        self.name = builder.info.full_name
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {self.name} is not prepared in {builder.data_dir}; build it in the array_record format "
                "(`tfds build --file_format=array_record`, or tools/prepare_dataset.py for an image folder)"
            )
        file_format = builder.info.file_format
        if file_format is None or file_format != tfds.core.FileFormat.ARRAY_RECORD:
            fmt = getattr(file_format, "value", file_format)
            raise ValueError(
                f"TFDS dataset {self.name} ({builder.data_dir}) is stored as {fmt!r}; TfdsSource reads only the "
                "random-access 'array_record' format (tfrecord also needs TensorFlow). Rebuild it with "
                "`tfds build --file_format=array_record`, or write an image folder with tools/prepare_dataset.py."
            )
        features = builder.info.features
        if image_key not in features:
            raise KeyError(f"TFDS dataset {self.name} has no image feature {image_key!r}; features: {list(features)}")
        if caption_key is None:
            caption_key = "caption" if "caption" in features else None
        elif not _has_key(features, caption_key):
            raise KeyError(
                f"TFDS dataset {self.name} has no caption feature {caption_key!r}; features: {list(features)}"
            )
        if id_key is None:
            id_key = "id" if "id" in features else None
        elif not _has_key(features, id_key):
            raise KeyError(f"TFDS dataset {self.name} has no id feature {id_key!r}; features: {list(features)}")
        decoders = None
        if isinstance(features[image_key], tfds.features.Image):
            decoders = {image_key: tfds.decode.SkipDecoding()}
        self.split, self.image_key, self.caption_key, self.id_key = split, image_key, caption_key, id_key
        self._data = builder.as_data_source(split=split, decoders=decoders)

    def __len__(self) -> int:
        return len(self._data)

    def index_id(self, index: int) -> str | None:
        """The id of record ``index`` when the dataset has no id feature (``"{split}:{index}"``,
        known without reading anything), else None."""
        return None if self.id_key else f"{self.split}:{int(index)}"

    def _text(self, record, index: int) -> tuple[str, str]:
        example_id = self.index_id(index) or _as_text(_lookup(record, self.id_key))
        return example_id, _as_text(_lookup(record, self.caption_key)) if self.caption_key else ""

    def record_id(self, index: int) -> str:
        """The id of record ``index`` without decoding its image (``"{split}:{index}"`` without an id feature)."""
        return self.record_text(index)[0]

    def record_text(self, index: int) -> tuple[str, str]:
        """``(id, caption)`` of record ``index`` without decoding its image."""
        return self._text(self._data[int(index)], int(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        record = self._data[index]
        example_id, caption = self._text(record, index)
        image = record[self.image_key]
        if isinstance(image, bytes):
            image = read_image(image, name=f"{self.name} {self.split} record {index} (id {example_id})")
        else:
            try:
                image = array_to_rgb(image)
            except ImageDecodeError as e:
                raise ImageDecodeError(f"{self.name} {self.split} record {index} (id {example_id}): {e}") from None
        return {"image": image, "caption": caption, "id": example_id}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"


# ----------------------------------------------------------------------------------------------
# Captions of any source


def example_ids(source, limit: int = 1000) -> tuple[list[str], bool]:
    """``(ids, complete)``: every example id of ``source`` when that is cheap (builtin and folder
    sources, TFDS without an id feature: ``"{split}:{index}"``), else the ids of the first
    ``limit`` records (reading a TFDS id means reading its record) and ``complete`` False."""
    if hasattr(source, "ids"):
        return list(source.ids), True
    if isinstance(source, TfdsSource) and source.id_key is None:
        return [source.index_id(i) for i in range(len(source))], True
    read = getattr(source, "record_text", None) or (lambda i: (source[i]["id"], None))
    count = min(len(source), int(limit))
    return [read(i)[0] for i in range(count)], count == len(source)


def _id_and_caption(record: Mapping[str, Any]) -> tuple[str, str]:
    return record["id"], record["caption"]


def source_captions(source, progress: bool = False) -> dict[str, str]:
    """``{example id: caption}`` of every record of ``source`` (any source of this module, or
    anything with ``len`` and ``source[i] -> {"id", "caption", ...}``), in source order, without
    decoding images where the source allows it. ValueError if an id repeats: ids key the
    precomputed text embeddings (`percov2_jax.text.store`)."""
    if hasattr(source, "ids") and hasattr(source, "captions"):
        pairs = zip(source.ids, source.captions)
    else:
        from tqdm.auto import tqdm

        read = getattr(source, "record_text", None) or (lambda i: _id_and_caption(source[i]))
        pairs = (read(i) for i in tqdm(range(len(source)), desc="captions", unit="record", disable=not progress))
    out: dict[str, str] = {}
    repeated = []
    for example_id, caption in pairs:
        if example_id in out:
            repeated.append(example_id)
        out[example_id] = caption
    if repeated:
        listing = name_listing(repeated)
        raise ValueError(f"{source!r}: {len(repeated)} example ids repeat ({listing}); ids must be unique")
    return out
