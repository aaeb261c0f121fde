"""Paths that may be local or on object storage (``gs://bucket/...``), through ``etils.epath``.

Every path a user gives goes through `path`: a local path becomes absolute (orbax takes absolute
paths only), a URL stays as it is. The write helpers are atomic on both kinds of store: locally a
temporary file is renamed over the target; on Cloud Storage one object is written whole (an
upload is visible only once complete), so a reader never sees part of a file. Object stores
have no append: a growing file is rewritten whole (the training logs do that).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike


def is_url(value: PathLike) -> bool:
    """Whether ``value`` names an object store (``gs://``, ``s3://``, ...) rather than a local path."""
    return "://" in os.fspath(value)


def path(value: PathLike) -> epath.Path:
    """``value`` as an ``epath.Path``: URLs as given, local paths made absolute."""
    text = os.fspath(value)
    return epath.Path(text if is_url(text) else os.path.abspath(os.path.expanduser(text)))


def write_bytes(target: PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically, creating parent folders."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_url(target):
        target.write_bytes(data)  # one object, visible only when the upload completes
        return
    fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, os.fspath(target))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(target: PathLike, text: str) -> None:
    """`write_bytes` of ``text`` in UTF-8."""
    write_bytes(target, text.encode("utf-8"))


def read_bytes(source: PathLike) -> bytes:
    """The bytes of ``source``; ``FileNotFoundError`` naming it if it is absent."""
    source = path(source)
    try:
        return source.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{source} does not exist") from None


def read_text(source: PathLike) -> str:
    return read_bytes(source).decode("utf-8")


def files_under(folder: PathLike) -> list[epath.Path]:
    """Every file below ``folder``, sorted (object stores refuse ``rglob``: walked folder by folder)."""
    out, pending = [], [path(folder)]
    while pending:
        for item in pending.pop().iterdir():
            (pending if item.is_dir() else out).append(item)
    return sorted(out, key=os.fspath)


def copy_tree(source: PathLike, target: PathLike) -> None:
    """Copy every file below ``source`` to the same relative place below ``target`` (either may be
    a URL); existing files are replaced."""
    source, target = path(source), path(target)
    for item in files_under(source):
        write_bytes(target / os.fspath(item.relative_to(source)), item.read_bytes())


@contextlib.contextmanager
def local_folder(folder: PathLike) -> Iterator[str]:
    """``folder`` as a local path: itself when local, else a temporary copy removed on exit (for
    readers that take only local paths, e.g. transformers' ``from_pretrained``)."""
    if not is_url(folder):
        yield os.fspath(path(folder))
        return
    with tempfile.TemporaryDirectory(prefix="percov2-") as tmp:
        copy_tree(folder, tmp)
        yield tmp
