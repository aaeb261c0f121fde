"""Image lists: which images a dataset evaluates, and in which order.

A list is a text file, local or ``gs://`` (one name per line, relative to the image root; blank
lines and lines starting with ``#`` ignored), or a sequence of names. Without a list, a folder's
images are `percov2_jax.data.sources.list_images` (sorted relative POSIX paths, hidden files
skipped).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from percov2_jax.data.sources import name_listing, normalise_relpath, read_text

_LIST_LIMIT = 20  # names shown in one error message


def repeated(names: Sequence[str]) -> list[str]:
    """The names occurring more than once, in order of their second occurrence (list[str])."""
    seen: set[str] = set()
    out: dict[str, None] = {}
    for name in names:
        if name in seen:
            out[name] = None
        seen.add(name)
    return list(out)


def normalise_name(name: str) -> str:
    """A listed name, stripped, as a relative POSIX path (`normalise_relpath`)."""
    return normalise_relpath(name.strip())


def names_in_text(text: str) -> list[str]:
    """The names of a list file's text: one per line, blank lines and ``#`` lines skipped."""
    return [normalise_name(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_image_list(image_list: str | os.PathLike | Sequence[str]) -> list[str]:
    """The names of an image list, in order: a text file, local or ``gs://`` (one name per line,
    relative to the image root; blank lines and lines starting with ``#`` ignored) or a sequence
    of str.

    Names are stripped, ``\\`` becomes ``/`` and a leading ``./`` is dropped. Raises ValueError
    for an empty list, a repeated name (listing them), or an absolute or ``..`` name.
    """
    if isinstance(image_list, (str, os.PathLike)):
        origin = os.fspath(image_list)
        names = names_in_text(read_text(origin))
    else:
        origin = "the image list"
        bad = [n for n in image_list if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"{origin}: names must be non-empty strings; got {bad[:_LIST_LIMIT]!r}")
        names = [normalise_name(n) for n in image_list]
    if not names:
        raise ValueError(f"{origin}: no image names in it")
    outside = [n for n in names if n.startswith("/") or ".." in n.split("/") or re.match(r"^[A-Za-z]:/", n)]
    if outside:
        raise ValueError(f"{origin}: names must be relative to the image root; not {name_listing(outside)}")
    twice = repeated(names)
    if twice:
        raise ValueError(f"{origin}: {len(twice)} names listed more than once: {name_listing(twice)}")
    return names


def list_origin(image_list) -> str | None:
    """How `describe` names an image list: its path, ``"<list>"`` for a sequence, None for none."""
    if image_list is None:
        return None
    return os.fspath(image_list) if isinstance(image_list, (str, os.PathLike)) else "<list>"
