"""MSCOCO-30k as PerCo and PerCoV2 define it (`coco30k_dataset`): the 30,000 COCO-2017 *train*
images named in PerCo's ``res/doc/coco_names.txt`` (github.com/Nikolai10/PerCo), read from the
``train2017`` folder, with all ground-truth captions of ``captions_train2017.json`` (5 or so per
image, in annotation order).

The list: `fetch_coco30k_list` downloads and caches it (locally), `validate_coco30k_list` checks
it. The image folder, the annotations and a given list may be local or ``gs://``.
"""

from __future__ import annotations

import os
import pathlib
import re
import urllib.request
from collections.abc import Sequence

from percov2_jax.captions.sources import read_coco_captions
from percov2_jax.data.sources import name_listing
from percov2_jax.evaluation.datasets.caption_tables import CaptionTable
from percov2_jax.evaluation.datasets.eval_dataset import EvalDataset
from percov2_jax.evaluation.datasets.folders import file_dataset, require_dir
from percov2_jax.evaluation.datasets.image_lists import list_origin, names_in_text, read_image_list, repeated
from percov2_jax.evaluation.datasets.preprocess import Preprocess

COCO30K_SIZE = 30_000
COCO30K_LIST_FILE = "coco30k_file_names.txt"
# PerCo's list of the 30k COCO-2017 train images (res/doc/coco_names.txt); tried in order.
COCO30K_LIST_URLS = (
    "https://raw.githubusercontent.com/Nikolai10/PerCo/main/res/doc/coco_names.txt",
    "https://raw.githubusercontent.com/Nikolai10/PerCo/master/res/doc/coco_names.txt",
)
DOWNLOAD_TIMEOUT_S = 60
_COCO_NAME = re.compile(r"^\d{12}\.jpg$")


def validate_coco30k_list(names: Sequence[str], strict: bool = True) -> list[str]:
    """Check a COCO-30k list: unique names like ``000000000009.jpg``, exactly 30,000 when strict.

    Returns the names as a list; raises ValueError naming the problem (``strict=False`` allows a
    shorter or longer list, e.g. a subset for a quick run or a test).
    """
    names = list(names)
    malformed = [repr(n) for n in names if not isinstance(n, str) or not _COCO_NAME.match(n)]
    if malformed:
        raise ValueError(
            f"COCO-30k list: {len(malformed)} names are not COCO-2017 file names "
            f"(12 digits + .jpg): {name_listing(malformed)}"
        )
    twice = repeated(names)
    if twice:
        raise ValueError(f"COCO-30k list: {len(twice)} names listed more than once: {name_listing(twice)}")
    if strict and len(names) != COCO30K_SIZE:
        raise ValueError(
            f"COCO-30k list has {len(names)} names, expected {COCO30K_SIZE} (pass strict=False for a subset)"
        )
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

    Raises RuntimeError, saying to set ``config.dataset.image_list``, when every download fails.
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
            names = validate_coco30k_list(names_in_text(_download_text(url)))
        except Exception as e:  # noqa: BLE001 - any failure means: try the next URL, then explain
            failures.append(f"{url}: {type(e).__name__}: {e}")
            continue
        cache.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        partial.write_text("\n".join(names) + "\n", encoding="utf-8")
        os.replace(partial, cached)
        return names
    raise RuntimeError(
        "could not download the MSCOCO-30k file list (" + "; ".join(failures) + "). Set "
        "--config.dataset.image_list to a local "
        f"copy of PerCo's res/doc/coco_names.txt (github.com/Nikolai10/PerCo), or put it at {cached} "
        f"({COCO30K_LIST_FILE}, one name per line)"
    )


def coco30k_dataset(
    root: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    image_list=None,
    preprocess: Preprocess = Preprocess("resize", 512),
    conditioning: str = "gt",
    conditioning_captions=None,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = True,
) -> EvalDataset:
    """MSCOCO-30k (PerCo's definition): 30,000 images of COCO-2017 train, 512x512 resize by default.

    Args:
      root: the COCO ``train2017`` image folder (local or ``gs://``).
      annotations: ``captions_train2017.json``, local or ``gs://`` (all captions per image).
        Without it the items have no ground-truth captions, and ``conditioning`` must be "none"
        or "file".
      image_list: a list file or sequence of file names; None: `fetch_coco30k_list(cache_dir)`.
      strict: require the full list of 30,000 (False: a well-formed subset is fine).
    Raises:
      ValueError for a malformed list or for ``conditioning="gt"`` without annotations.
    """
    if annotations is None and conditioning == "gt":
        raise ValueError(
            'coco30k: conditioning="gt" needs the ground-truth captions; pass annotations= '
            '(captions_train2017.json), or use conditioning="none" or "file"'
        )
    root = require_dir(root, "COCO train2017 folder")
    names = fetch_coco30k_list(cache_dir) if image_list is None else read_image_list(image_list)
    ids = validate_coco30k_list(names, strict=strict)
    captions = (
        None if annotations is None else CaptionTable(read_coco_captions(annotations), False, os.fspath(annotations))
    )
    cache = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    info = {
        "image_list": list_origin(image_list) or str(cache / COCO30K_LIST_FILE),
        "complete": len(ids) == COCO30K_SIZE,
    }
    return file_dataset(
        "coco30k",
        root,
        ids,
        captions,
        preprocess=preprocess,
        conditioning=conditioning,
        conditioning_captions=conditioning_captions,
        info=info,
    )
