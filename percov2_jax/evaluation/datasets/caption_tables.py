"""Ground-truth captions of file datasets: a table of captions per image, and each item's captions.

The ``captions`` argument of `folder_dataset` / `kodak_dataset` is a mapping ``{relative name:
caption or list of captions}``, a ``.json`` file holding such an object (both keyed by path
relative to the image root), a COCO annotations file (every caption per image, keyed by file name
without directories; `percov2_jax.captions.sources.coco_captions`), or a TSV / JSONL file for
`percov2_jax.captions.load_captions` (one caption per file name). Files may be local or ``gs://``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from percov2_jax.captions.sources import CaptionFileError, coco_captions, is_coco, load_captions
from percov2_jax.data.sources import caption_keys, read_text
from percov2_jax.evaluation.datasets.image_lists import normalise_name


class CaptionTable(NamedTuple):
    """Captions per key (dict[str, list[str]]); ``by_path``: keyed by relative path (else by file
    name without directories); ``origin``: the file or mapping, for messages and `describe`."""

    captions: dict[str, list[str]]
    by_path: bool
    origin: str


def _as_caption_list(value: Any, key: str, origin: str) -> list[str]:
    """A caption or a list of captions -> list[str], stripped, empty ones dropped."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise CaptionFileError(f"{origin}: captions of {key!r} must be a string or a list of strings, got {value!r}")
    return [v.strip() for v in values if v.strip()]


def caption_table(captions: str | os.PathLike | Mapping[str, Any]) -> CaptionTable:
    """The `CaptionTable` of a ``captions`` argument (see the module docstring)."""
    if isinstance(captions, Mapping):
        origin = "the captions mapping"
        return CaptionTable(
            {normalise_name(k): _as_caption_list(v, k, origin) for k, v in captions.items()}, True, origin
        )
    origin = os.fspath(captions)
    text = read_text(captions)
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSONL
        if is_coco(data):
            return CaptionTable(coco_captions(data, origin), False, origin)
        if isinstance(data, dict) and origin.lower().endswith(".json"):
            return CaptionTable(
                {normalise_name(k): _as_caption_list(v, k, origin) for k, v in data.items()}, True, origin
            )
    return CaptionTable({k: _as_caption_list(v, k, origin) for k, v in load_captions(captions).items()}, False, origin)


def item_captions(ids: Sequence[str], table: CaptionTable, root: str | os.PathLike) -> list[list[str]]:
    """Ground-truth captions per id (list[list[str]]; [] for an id without captions).

    ``ids``: POSIX paths relative to ``root``. ValueError when the table is keyed by file name
    and a captioned file name belongs to several ids.
    """
    keys = caption_keys(ids, table.captions, table.by_path, table.origin, root)
    return [list(table.captions.get(k, [])) for k in keys]
