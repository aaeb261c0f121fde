"""The converter back-end: diffusers-named tensors -> a Flax parameter tree.

A component is converted in two phases.

1. ``plan``: from names and shapes alone (safetensors headers), every source tensor is matched
   to a target Flax leaf by a declarative rule table (regex -> leaf name + named transform),
   and every mismatch is collected: unknown keys, missing parameters, wrong shapes, duplicates.
   Any problem raises one ``ConversionError`` naming all of them, before any data is read.
2. ``assemble``: tensors are read one at a time, transformed, cast and written into a
   preallocated leaf (stacked leaves of scanned blocks are filled slice by slice); a finished
   leaf is placed on its device/sharding immediately, so at most one host copy exists.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]


class ConversionError(ValueError):
    """Checkpoint keys or shapes do not match the target model."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named array transform plus the matching shape function (used by ``plan``)."""

    name: str
    array: Callable[[np.ndarray], np.ndarray]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in [
        Transform("identity", lambda a: a, lambda s: tuple(s)),
        # torch Linear weight [out, in] -> Flax Dense kernel [in, out].
        Transform("linear", lambda a: a.T, lambda s: tuple(reversed(s)) if len(s) == 2 else ("not 2-D", *s)),
        # torch Conv2d weight [out, in, kh, kw] (OIHW) -> Flax Conv kernel HWIO.
        Transform(
            "conv",
            lambda a: a.transpose(2, 3, 1, 0),
            lambda s: (s[2], s[3], s[1], s[0]) if len(s) == 4 else ("not 4-D", *s),
        ),
    ]
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` (full match on the diffusers key) -> Flax ``leaf`` name and transform name.

    The Flax module path is the key minus its last component, with list indices joined to
    the preceding name (``to_out.0`` -> ``to_out_0``).
    """

    pattern: str
    leaf: str
    transform: str


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    """One tensor to convert, named as in diffusers and shaped as in PyTorch; ``load`` reads it."""

    key: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Assignment:
    source: SourceTensor
    target: Path
    index: int | None
    transform: Transform


def flax_module_path(dotted: str) -> Path:
    """``"transformer_blocks.3.attn.to_out.0"`` -> ``("transformer_blocks_3", "attn", "to_out_0")``."""
    out: list[str] = []
    for part in dotted.split(".") if dotted else []:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def flatten_shapes(abstract_params: Mapping[str, Any]) -> dict[Path, tuple[int, ...]]:
    """``{path: shape}`` for an (unboxed, possibly abstract) parameter tree."""
    flat = traverse_util.flatten_dict(dict(abstract_params))
    return {k: tuple(v.shape) for k, v in flat.items()}


def _summarise(kind: str, items: Sequence[str], limit: int = 25) -> str:
    shown = list(items[:limit])
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {kind}:\n    " + "\n    ".join(shown) + more


def plan(
    sources: Iterable[SourceTensor],
    rules: Sequence[Rule],
    target_shapes: Mapping[Path, tuple[int, ...]],
    locate: Callable[[Path], tuple[Path, int | None]] = lambda p: (p, None),
    what: str = "model",
) -> list[Assignment]:
    """Match every source tensor to a target leaf; raise one ``ConversionError`` listing all problems."""
    compiled = [(re.compile(r.pattern), r) for r in rules]
    assignments: list[Assignment] = []
    unknown: list[str] = []
    mismatched: list[str] = []
    duplicates: list[str] = []
    filled: dict[Path, set[int | None]] = {}
    for src in sources:
        rule = next((r for rx, r in compiled if rx.fullmatch(src.key)), None)
        if rule is None:
            unknown.append(f"{src.key} {list(src.shape)} (no conversion rule)")
            continue
        module = src.key.rsplit(".", 1)[0] if "." in src.key else ""
        path, index = locate(flax_module_path(module) + (rule.leaf,))
        if path not in target_shapes:
            unknown.append(f"{src.key} {list(src.shape)} (no parameter {'/'.join(path)})")
            continue
        transform = TRANSFORMS[rule.transform]
        want = target_shapes[path] if index is None else target_shapes[path][1:]
        got = transform.shape(src.shape)
        if index is not None and not 0 <= index < target_shapes[path][0]:
            mismatched.append(
                f"{src.key}: layer index {index} outside the stacked {'/'.join(path)} {list(target_shapes[path])}"
            )
            continue
        seen = filled.setdefault(path, set())
        if tuple(got) != tuple(want):
            mismatched.append(
                f"{src.key}: checkpoint shape {list(src.shape)} -> {list(got)} after {transform.name}, "
                f"but {'/'.join(path)} expects {list(want)}"
            )
            seen.add(index)  # reported as mis-shaped, not again as missing
            continue
        if index in seen:
            duplicates.append(f"{src.key} (writes {'/'.join(path)}{'' if index is None else f'[{index}]'} twice)")
            continue
        seen.add(index)
        assignments.append(Assignment(src, path, index, transform))

    missing: list[str] = []
    for path, shape in target_shapes.items():
        seen = filled.get(path, set())
        if None in seen:
            continue
        stacked = sorted(i for i in seen if i is not None)
        if not seen:
            missing.append(f"{'/'.join(path)} {list(shape)}")
        elif len(stacked) != shape[0]:
            absent = sorted(set(range(shape[0])) - set(stacked))
            missing.append(f"{'/'.join(path)} layers {absent} of {shape[0]}")
    problems = []
    if unknown:
        problems.append(_summarise("unknown checkpoint keys", unknown))
    if missing:
        problems.append(_summarise("missing parameters (no checkpoint key fills them)", missing))
    if mismatched:
        problems.append(_summarise("shape mismatches", mismatched))
    if duplicates:
        problems.append(_summarise("duplicate keys", duplicates))
    if problems:
        raise ConversionError(f"checkpoint does not match {what}:\n  " + "\n  ".join(problems))
    return assignments


def assemble(
    assignments: Sequence[Assignment],
    target_shapes: Mapping[Path, tuple[int, ...]],
    dtype: Any = np.float32,
    shardings: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Read, transform and cast every tensor into a nested parameter dict of ``jax.Array``.

    Each leaf is placed as soon as it is complete: on ``shardings[path]`` if given (a tree of
    ``jax.sharding.Sharding`` matching the params; works across hosts), else on the default device.
    Float tensors are cast to ``dtype`` (fp16/bf16 checkpoints are upcast exactly to float32).
    """
    dtype = np.dtype(dtype)
    flat_shardings = traverse_util.flatten_dict(dict(shardings)) if shardings is not None else None
    remaining = collections.Counter(a.target for a in assignments)  # writes left per leaf
    buffers: dict[Path, np.ndarray] = {}
    placed: dict[Path, jax.Array] = {}
    for a in assignments:
        value = a.transform.array(a.source.load())
        if _is_float(value.dtype):
            value = value.astype(dtype)
        if a.index is None:
            buf = np.ascontiguousarray(value)
        else:
            buf = buffers.get(a.target)
            if buf is None:
                buf = buffers[a.target] = np.empty(target_shapes[a.target], dtype)
            buf[a.index] = value
        remaining[a.target] -= 1
        if remaining[a.target] == 0:
            buffers.pop(a.target, None)
            placed[a.target] = _place(buf, None if flat_shardings is None else flat_shardings[a.target])
        if progress is not None:
            progress(1)
    return traverse_util.unflatten_dict(placed)


def _is_float(dtype: np.dtype) -> bool:
    try:
        ml_dtypes.finfo(dtype)  # numpy floats and ml_dtypes' bfloat16 / float8
        return True
    except ValueError:
        return False


def _place(value: np.ndarray, sharding: Any) -> jax.Array:
    if sharding is None:
        return jax.device_put(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
