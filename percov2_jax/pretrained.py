"""Pretrained components (the SD3 transformer, VAE and text encoders) in percov2-jax's own
checkpoint format: `convert` writes one from an SD3 release, `load` reads it onto a mesh.

Layout: an orbax Composite directory with ``manifest`` (JSON: format, version, component
names), ``{name}`` (params, orbax StandardSave) and ``{name}_config`` (JSON: the diffusers-style
config plus the module options the params depend on: ``param_dtype`` and ``scan_layers``), and
``tokenizers/{clip_l,clip_g,t5}`` copied from a diffusers pipeline folder. The directory may be
local or a Cloud Storage URL (``gs://bucket/sd3_medium``); the release converted from is local.

Components are written one at a time, the manifest last, in one orbax save
(``convert.component_writer``): a checkpoint appears whole or not at all, and host memory holds
one component at a time.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from percov2_jax import sharding as sharding_lib
from percov2_jax import storage
from percov2_jax.convert import component_writer
from percov2_jax.convert import registry as component_kinds
from percov2_jax.convert.core import ConversionError, flatten_shapes
from percov2_jax.convert.diffusers_folder import plan_diffusers_component
from percov2_jax.convert.single_file import plan_single_file
from percov2_jax.convert.transformers_folder import plan_transformers_component, transformers_config
from percov2_jax.models import mmdit

FORMAT = "percov2-jax/components"
VERSION = 1
_STORED_OPTIONS = ("param_dtype", "scan_layers")
# diffusers pipeline subfolders that hold model weights, by component name.
PIPELINE_COMPONENTS = {
    "transformer": "transformer",
    "vae": "vae",
    "text_encoder": "clip_l",
    "text_encoder_2": "clip_g",
    "text_encoder_3": "t5",
}
# diffusers pipeline tokenizer subfolders -> component names (``tokenizers/NAME`` in a checkpoint).
TOKENIZER_FOLDERS = {"tokenizer": "clip_l", "tokenizer_2": "clip_g", "tokenizer_3": "t5"}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, of another format, or does not match its config."""


def _options_of(module: nn.Module) -> dict[str, Any]:
    opts = {"param_dtype": jnp.dtype(module.param_dtype).name}
    if hasattr(module, "scan_layers"):
        opts["scan_layers"] = bool(module.scan_layers)
    return opts


def save(
    path: str | os.PathLike,
    components: Mapping[str, tuple[nn.Module, Any] | Callable[[], tuple[nn.Module, Any]]],
    overwrite: bool = False,
    *,
    largest_array: int | None = None,
    before_manifest: Callable[[Any], None] | None = None,
) -> None:
    """Write ``{name: (module, params)}`` to the orbax directory ``path``.

    A value may instead be a function returning ``(module, params)``: it is called when that
    component is written, and its params are released before the next one is made, so host
    memory holds one component at a time (``convert`` does this; then ``largest_array``, the
    bytes of the largest array of any component, is required). The manifest is written last and
    the directory appears whole (``convert.component_writer``); if writing fails it is removed.
    ``before_manifest(directory)`` may add files (the tokenizers) to the directory being written.
    """
    for name in components:
        if name in ("manifest", "tokenizers") or name.endswith("_config"):
            raise ValueError(f"invalid component name {name!r}")
    if largest_array is None:
        if any(callable(value) for value in components.values()):
            raise ValueError("save: components made on demand need largest_array")
        largest_array = max(component_writer.largest_array_bytes(p) for _, p in components.values())

    def with_config(module, params):
        return params, {"config": module.config.to_dict(), "options": _options_of(module)}

    def made():
        # Binds no params: the writer's reference is the only one, dropped once they are written.
        for name, value in components.items():
            yield name, *with_config(*(value() if callable(value) else value))

    manifest = {"format": FORMAT, "version": VERSION, "components": sorted(components)}
    component_writer.write(
        path,
        made(),
        {"manifest": manifest},
        largest_array=largest_array,
        overwrite=overwrite,
        before_last=before_manifest,
    )


def load(
    path: str | os.PathLike,
    *,
    components: tuple[str, ...] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, tuple[nn.Module, Any]]:
    """Read what ``save`` (or ``convert``, ``percov2 convert``) wrote: ``{name: (module, params)}``.

    ``options[name]`` are module attributes (``dtype``, ``remat_policy``, ``scan_layers`` ...);
    asking for another ``scan_layers`` than was stored converts the layout. With ``mesh`` the
    params are restored straight onto their logical-axis shardings.
    """
    path = storage.path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    options = options or {}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        names = _components(ckptr, path, components)
        out = {}
        for name in names:
            meta = _component_meta(ckptr, path, name)
            stored = dict(meta["options"])
            stored_module, kind = component_kinds.build_module(meta["config"], **stored)
            boxed = component_kinds.abstract_params(stored_module, kind)
            abstract = nn.meta.unbox(boxed)
            wanted = options.get(name, {}).get("param_dtype")
            if wanted is not None:
                # Cast while restoring (orbax reads each array into the target dtype): a bf16 copy of
                # a float32 checkpoint never holds the float32 one on the devices.
                abstract = jax.tree.map(functools.partial(_with_float_dtype, dtype=jnp.dtype(wanted)), abstract)
            if mesh is not None:
                shardings = sharding_lib.logical_shardings(boxed, mesh)
                abstract = jax.tree.map(
                    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
                )
            try:
                params = ckptr.restore(path, ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract)}))[name]
            except Exception as e:
                raise CheckpointError(f"{path}: params of {name!r} do not match its config: {e}") from None
            _check_matches(params, abstract, f"{path}:{name}")
            module_options = {**stored, **options.get(name, {})}
            module, _ = component_kinds.build_module(meta["config"], **module_options)
            if getattr(module, "scan_layers", None) is not None and module.scan_layers != stored_module.scan_layers:
                relayout = mmdit.scan_block_params if module.scan_layers else mmdit.unscan_block_params
                params = relayout(params, module.config)
            out[name] = (module, params)
    return out


def _with_float_dtype(a: jax.ShapeDtypeStruct, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a


def component_config(path: str | os.PathLike, name: str) -> dict[str, Any]:
    """The stored config.json dict of component ``name`` (e.g. the transformer's architecture),
    read without its params."""
    path = storage.path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        _components(ckptr, path, (name,))
        return dict(_component_meta(ckptr, path, name)["config"])


def _components(ckptr, path, components: Sequence[str] | None) -> list[str]:
    """The names to read (``components``, else every one), checked against the manifest."""
    try:
        manifest = ckptr.restore(path, ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
    except Exception as e:  # orbax raises several types for a non-checkpoint directory
        raise CheckpointError(f"{path}: not a percov2-jax checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: manifest format is {manifest!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {manifest.get('version')} is not supported (want {VERSION})")
    names = list(components) if components is not None else list(manifest["components"])
    absent = sorted(set(names) - set(manifest["components"]))
    if absent:
        raise CheckpointError(f"{path}: components {absent} not in the checkpoint (it has {manifest['components']})")
    return names


def _component_meta(ckptr, path, name: str) -> dict[str, Any]:
    """``{"config": ..., "options": ...}`` stored beside component ``name``'s params."""
    return ckptr.restore(path, ocp.args.Composite(**{f"{name}_config": ocp.args.JsonRestore()}))[f"{name}_config"]


def _check_matches(params: Any, abstract: Any, where: str) -> None:
    got, want = flatten_shapes(params), flatten_shapes(abstract)
    if got != want:
        missing = sorted("/".join(k) for k in set(want) - set(got))
        extra = sorted("/".join(k) for k in set(got) - set(want))
        shapes = sorted(f"{'/'.join(k)} {got[k]} != {want[k]}" for k in set(got) & set(want) if got[k] != want[k])
        raise CheckpointError(
            f"{where}: stored params do not match the config: missing {missing}, extra {extra}, mis-shaped {shapes}"
        )


# ------------------------------------------------------------------ converting an SD3 release


def _component_folder(folder: str):
    """(component name, planner) for one diffusers or transformers component folder."""
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    name = {"SD3Transformer2DModel": "transformer", "AutoencoderKL": "vae"}.get(raw.get("_class_name"))
    if name is not None:
        return name, plan_diffusers_component
    class_name = transformers_config(folder)["_class_name"]  # raises for unsupported architectures
    if class_name == "T5EncoderModel":
        return "t5", plan_transformers_component
    # CLIP-L and bigG are told apart by width (768 vs 1280); the name only labels the component.
    return ("clip_l" if raw.get("hidden_size", 0) <= 768 else "clip_g"), plan_transformers_component


def _copy_tokenizers(src: str, dst: str | os.PathLike) -> dict[str, str]:
    """Copy a pipeline's tokenizer folders to ``dst/tokenizers/{clip_l,clip_g,t5}`` (read by
    ``text.prompt_encoder.load_tokenizers``), so the checkpoint encodes captions on its own.
    Returns ``{name: source folder}`` of those copied."""
    copied = {}
    for sub, name in TOKENIZER_FOLDERS.items():
        if os.path.isdir(os.path.join(src, sub)):
            storage.copy_tree(os.path.join(src, sub), storage.path(dst) / "tokenizers" / name)
            copied[name] = os.path.abspath(os.path.join(src, sub))
    return copied


# Without these two a checkpoint cannot encode captions (``load_tokenizers``); T5's is optional.
_CLIP_TOKENIZERS = ("tokenizer", "tokenizer_2")


def _tokenizer_source(src: str, tokenizers: str | os.PathLike | None) -> tuple[str | None, str]:
    """The folder whose tokenizers go into the checkpoint and how it was found (``"given"``,
    ``"pipeline"``, ``"beside"`` a single file), or ``(None, "")``. A given folder lacking the
    CLIP tokenizers raises ``ConversionError``."""
    if tokenizers is not None:
        folder = os.fspath(tokenizers)
        missing = [f"{sub}/" for sub in _CLIP_TOKENIZERS if not os.path.isdir(os.path.join(folder, sub))]
        if not os.path.isdir(folder) or missing:
            problem = "no such folder" if not os.path.isdir(folder) else f"no {' or '.join(missing)} in it"
            raise ConversionError(
                f"tokenizers {folder}: {problem}; expected a local diffusers SD3 pipeline folder holding "
                "tokenizer/ (CLIP-L), tokenizer_2/ (CLIP-G) and optionally tokenizer_3/ (T5)"
            )
        return folder, "given"
    if os.path.isfile(src):
        beside = os.path.dirname(os.path.abspath(src))
        if all(os.path.isdir(os.path.join(beside, sub)) for sub in _CLIP_TOKENIZERS):
            return beside, "beside"
        return None, ""
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "config.json")):
        return src, "pipeline"
    return None, ""


def _pipeline_components(folder: str) -> dict[str, str]:
    """Component name -> subfolder for a diffusers pipeline folder (weights only)."""
    found = {}
    for sub, name in PIPELINE_COMPONENTS.items():
        if os.path.isfile(os.path.join(folder, sub, "config.json")):
            found[name] = os.path.join(folder, sub)
    return found


def plan(
    src: str,
    *,
    dtype: str = "float32",
    scan_layers: bool = False,
    components: Sequence[str] | None = None,
    config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, component_kinds.PlannedComponent]:
    """Every component of ``src`` matched to its Flax params from headers alone (see ``convert``):
    ``{name: PlannedComponent}``; ``.assemble()`` converts one, ``.nbytes`` is its size in ``dtype``."""
    param_dtype = jnp.dtype(dtype)
    options = {name: {"param_dtype": param_dtype} for name in PIPELINE_COMPONENTS.values()}
    options["transformer"]["scan_layers"] = scan_layers
    if os.path.isfile(src):
        if not src.endswith(".safetensors"):
            raise ConversionError(f"{src}: single-file checkpoints must be .safetensors")
        return plan_single_file(src, components=components, config_overrides=config_overrides, options=options)
    if config_overrides and os.path.isdir(src):
        # A folder's config.json states every field; overriding it would convert weights the
        # release did not describe.
        raise ConversionError(
            f"{src}: config overrides apply to single .safetensors files only; a diffusers "
            f"folder's config.json already gives {sorted(config_overrides)}"
        )
    if os.path.isfile(os.path.join(src, "config.json")):
        name, planner = _component_folder(src)
        return {name: planner(src, **options[name])}
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: no such file or folder")
    found = _pipeline_components(src)
    if not found:
        raise ConversionError(f"{src}: neither a diffusers pipeline folder nor a component folder")
    wanted = list(components) if components is not None else list(found)
    absent = [c for c in wanted if c not in found]
    if absent:
        raise ConversionError(f"{src}: components {absent} not found (it has {sorted(found)})")
    planned = {}
    for c in wanted:
        _, planner = _component_folder(found[c])
        planned[c] = planner(found[c], **options[c])
    return planned


def convert(
    src: str,
    dst: str,
    *,
    dtype: str = "float32",
    scan_layers: bool = False,
    components: Sequence[str] | None = None,
    config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    tokenizers: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert ``src`` and write ``dst``; returns a summary ``{name: {"params": n, "bytes": b,
    "config": {...}}}`` (text encoders also ``"tokenizer"``: ``{"folder", "origin"}`` or None).

    ``src``: a ``.safetensors`` single file, a diffusers pipeline folder (``transformer/``,
    ``vae/`` ...) or one component folder (``config.json`` + weights).

    Every component is planned first, so a bad key anywhere raises before anything is written;
    then components are converted and written one at a time, each released before the next:
    host memory peaks near the largest component in ``dtype`` plus one of its largest arrays
    (docs/conversion.md, "Host memory").

    ``tokenizers``: a diffusers pipeline folder whose ``tokenizer/``, ``tokenizer_2/`` and
    ``tokenizer_3/`` (optional) are copied into ``dst/tokenizers``. Without it a pipeline
    folder's own are copied, and a single file's when its folder has ``tokenizer/`` and
    ``tokenizer_2/``.
    """
    tokenizer_folder, origin = _tokenizer_source(src, tokenizers)
    if storage.path(dst).exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    planned = plan(src, dtype=dtype, scan_layers=scan_layers, components=components, config_overrides=config_overrides)
    copied: dict[str, str] = {}

    def build(component):
        # Only the writer holds the params: they are released before the next component is read.
        return lambda: (component.module, component.assemble(progress=progress))

    def copy_tokenizers(directory):
        # Into the directory being written, so a finished checkpoint always has its tokenizers.
        if tokenizer_folder:
            copied.update(_copy_tokenizers(tokenizer_folder, directory))

    save(
        dst,
        {name: build(c) for name, c in planned.items()},
        overwrite=overwrite,
        largest_array=max(c.largest_array_bytes for c in planned.values()),
        before_manifest=copy_tokenizers,
    )
    summary = {}
    for name, component in planned.items():
        summary[name] = {
            "params": component.param_count,
            "bytes": component.nbytes,
            "config": component.module.config.to_dict(),
        }
        if name in TOKENIZER_FOLDERS.values():
            summary[name]["tokenizer"] = {"folder": copied[name], "origin": origin} if name in copied else None
    return summary


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["transformer.attention_head_dim=64", ...]`` -> ``{"transformer": {"attention_head_dim": 64}}``.

    Values are parsed as JSON when they parse, else kept as strings.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        component, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise ValueError(f"an override must look like component.field=value, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(component, {})[field] = parsed
    return out


_ORIGINS = {
    "given": "",
    "pipeline": " (the pipeline folder's)",
    "beside": " (found beside the single file)",
}


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def describe(summary: Mapping[str, Any], dst: str) -> str:
    """``convert``'s summary as the lines ``percov2 convert`` prints: components, tokenizers, notes."""
    lines = [
        f"{name}: {info['params']:,} parameters" + (f" ({_size(info['bytes'])})" if "bytes" in info else "")
        for name, info in summary.items()
    ]
    encoders = {
        name: summary[name]["tokenizer"] for name in TOKENIZER_FOLDERS.values() if "tokenizer" in summary.get(name, {})
    }
    with_tokenizer = {name: t for name, t in encoders.items() if t is not None}
    if with_tokenizer:
        folders = sorted({os.path.dirname(t["folder"]) for t in with_tokenizer.values()})
        origin = next(iter(with_tokenizer.values()))["origin"]
        lines.append(
            f"tokenizers: {', '.join(with_tokenizer)} copied from {', '.join(folders)}{_ORIGINS.get(origin, '')}"
        )
    lacking = [name for name, t in encoders.items() if t is None]
    hint = (
        "convert again with --tokenizers DIR (a diffusers SD3 pipeline folder holding tokenizer/, tokenizer_2/ "
        "and tokenizer_3/), or pass tokenizers_path=DIR to PromptEncoder.from_checkpoint"
    )
    if {"clip_l", "clip_g"} & set(lacking):
        lines.append(
            f"note: no tokenizers for {', '.join(lacking)}: captions cannot be encoded from this checkpoint "
            f"until tokenizers are given: {hint}"
        )
    elif lacking:
        lines.append(
            f"note: no T5 tokenizer: captions encode from this checkpoint without T5 only (use_t5=False); {hint}"
        )
    return "\n".join(lines + [f"wrote {dst}"])
