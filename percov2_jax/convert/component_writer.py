"""Writing a checkpoint of several components one at a time, for ``pretrained.save`` / ``convert``.

The directory is an orbax Composite checkpoint: per component ``{name}`` (params, orbax
``StandardSave``) and ``{name}_config`` (JSON), then the last JSON items (the manifest). One
orbax ``Checkpointer`` save writes it all, so the directory is as atomic as any orbax checkpoint
(written under a temporary name and renamed into place; on Cloud Storage orbax refuses it until
its commit file, written last, exists) and the step metadata is orbax's own. Inside that save
the components are made and written one after the other, each released before the next is
made, so host memory holds one component at a time.

Host memory while one component is written: its params, plus the host copies orbax makes of
arrays on their way to disk (on CPU as on accelerators), which tensorstore keeps until they are
written. Unlimited, all of them are in flight at once (measured: +70 % of the component);
orbax's ``save_concurrent_gb`` limits them to ``write_window_bytes``, about one largest array.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from percov2_jax import storage

MIN_WRITE_WINDOW_BYTES = 64 << 20


def write_window_bytes(largest_array_bytes: int) -> int:
    """Bytes allowed in flight to disk: one of the largest arrays (orbax refuses an array bigger
    than its limit), at least ``MIN_WRITE_WINDOW_BYTES`` so that small arrays overlap (as fast
    as unlimited, measured)."""
    return max(int(largest_array_bytes), MIN_WRITE_WINDOW_BYTES) + 1


def largest_array_bytes(params: Any) -> int:
    return max((x.size * x.dtype.itemsize for x in jax.tree.leaves(params)), default=0)


class _ComponentByComponent(ocp.CompositeCheckpointHandler):
    """Orbax's Composite handler, except that its one ``save`` first writes ``components``
    (``(name, params, config)`` made on demand), each written and finalized before the next is
    asked for, then ``before_last(directory)``, then the save's own args."""

    def __init__(
        self,
        components: Iterator[tuple[str, Any, dict]],
        write_window: int,
        before_last: Callable[[Any], None] | None,
    ):
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        window_gb = write_window / 1e9  # orbax counts in (decimal) GB
        registry.add(None, ocp.args.StandardSave, ocp.StandardCheckpointHandler(save_concurrent_gb=window_gb))
        # Item folders are created before each save, not alongside it: the asynchronous creation
        # signals once per Checkpointer save, and this save has one per component (orbax's own
        # nested composites, e.g. RandomKeyCheckpointHandler, do the same).
        options = ocp.options.AsyncOptions(create_directories_asynchronously=False)
        super().__init__(composite_options=ocp.CompositeOptions(async_options=options), handler_registry=registry)
        self._components = components
        self._before_last = before_last
        self._written: dict[str, Any] = {}  # item -> handler type, for the step metadata

    def save(self, directory, args):
        for name, params, config in self._components:
            items = {name: ocp.args.StandardSave(params), f"{name}_config": ocp.args.JsonSave(config)}
            del params
            super().save(directory, ocp.args.Composite(**items))
            del items  # the params go before the next component is made
            self._written.update(super().metadata_from_temporary_paths(directory).item_handlers)
            super().finalize(directory)
            _return_freed_memory()
        if self._before_last is not None:
            self._before_last(directory)
        super().save(directory, args)

    def metadata_from_temporary_paths(self, directory):
        metadata = super().metadata_from_temporary_paths(directory)
        return dataclasses.replace(metadata, item_handlers={**self._written, **(metadata.item_handlers or {})})


def _return_freed_memory() -> None:
    """Hand the heap pages freed with a component back to the OS. glibc keeps them for reuse, but
    the next component's large arrays are mapped afresh, so kept pages would add to its peak
    (measured: a quarter of the converted size). No-op where there is no ``malloc_trim``."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


@ocp.args.register_with_handler(_ComponentByComponent, for_save=True, for_restore=True)
class _LastArgs(ocp.args.Composite):
    """The save's own args: orbax's ``Checkpointer`` finds a handler's args by its exact type."""


def write(
    path: str | os.PathLike,
    components: Iterator[tuple[str, Any, dict]],
    last: Mapping[str, Any],
    *,
    largest_array: int,
    overwrite: bool = False,
    before_last: Callable[[Any], None] | None = None,
) -> None:
    """Write ``components`` (``(name, params, config)``, taken one at a time) and then the JSON
    items ``last`` to the orbax directory ``path``.

    ``largest_array``: bytes of the largest array of any component (sets the bytes in flight to
    disk, ``write_window_bytes``). ``before_last(directory)`` may add files to the directory being
    written. If writing fails (or is interrupted) the partial directory is removed.
    """
    path = storage.path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    handler = _ComponentByComponent(components, write_window_bytes(largest_array), before_last)
    with ocp.Checkpointer(handler) as ckptr:
        try:
            ckptr.save(path, _LastArgs(**{k: ocp.args.JsonSave(v) for k, v in last.items()}), force=overwrite)
        except BaseException:
            # The temporary folder (locally), or the uncommitted directory (Cloud Storage).
            partial = ckptr.get_temporary_path(path).get()
            with contextlib.suppress(Exception):  # the original error matters more than the cleanup's
                if partial.exists():
                    partial.rmtree()
            raise
