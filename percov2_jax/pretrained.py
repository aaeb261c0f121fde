"""Pretrained components (the SD3 transformer, VAE and text encoders) in percov2-jax's own
checkpoint format: `convert` writes one from an SD3 release, `load` reads it onto a mesh.

Layout: an orbax Composite directory with ``manifest`` (JSON: format, version, component
names), ``{name}`` (params, orbax StandardSave) and ``{name}_config`` (JSON: the diffusers-style
config plus the module options the params depend on: ``param_dtype`` and ``scan_layers``), and
``tokenizers/{clip_l,clip_g,t5}`` copied from a diffusers pipeline folder. The directory may be
local or a Cloud Storage URL (``gs://bucket/sd3_medium``); the release converted from is local.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from percov2_jax import sharding as sharding_lib
from percov2_jax import storage
from percov2_jax.convert import registry as component_kinds
from percov2_jax.convert.core import ConversionError, flatten_shapes
from percov2_jax.convert.diffusers_folder import load_diffusers_component
from percov2_jax.convert.single_file import load_single_file
from percov2_jax.convert.transformers_folder import load_transformers_component, transformers_config
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


def save(path: str | os.PathLike, components: Mapping[str, tuple[nn.Module, Any]], overwrite: bool = False) -> None:
    """Write ``{name: (module, params)}`` to the orbax directory ``path``."""
    path = storage.path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    items: dict[str, Any] = {
        "manifest": ocp.args.JsonSave({"format": FORMAT, "version": VERSION, "components": sorted(components)})
    }
    for name, (module, params) in components.items():
        if name == "manifest" or name.endswith("_config"):
            raise ValueError(f"invalid component name {name!r}")
        items[name] = ocp.args.StandardSave(params)
        items[f"{name}_config"] = ocp.args.JsonSave({"config": module.config.to_dict(), "options": _options_of(module)})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, ocp.args.Composite(**items), force=overwrite)


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
        try:
            manifest = ckptr.restore(path, ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"]
        except Exception as e:  # orbax raises several types for a non-checkpoint directory
            raise CheckpointError(f"{path}: not a percov2-jax checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: manifest format is {manifest!r}, expected {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise CheckpointError(
                f"{path}: checkpoint version {manifest.get('version')} is not supported (want {VERSION})"
            )
        names = list(components) if components is not None else list(manifest["components"])
        absent = sorted(set(names) - set(manifest["components"]))
        if absent:
            raise CheckpointError(
                f"{path}: components {absent} not in the checkpoint (it has {manifest['components']})"
            )
        out = {}
        for name in names:
            meta = ckptr.restore(path, ocp.args.Composite(**{f"{name}_config": ocp.args.JsonRestore()}))[
                f"{name}_config"
            ]
            stored = dict(meta["options"])
            stored_module, kind = component_kinds.build_module(meta["config"], **stored)
            boxed = component_kinds.abstract_params(stored_module, kind)
            abstract = nn.meta.unbox(boxed)
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
    """(component name, loader) for one diffusers or transformers component folder."""
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    name = {"SD3Transformer2DModel": "transformer", "AutoencoderKL": "vae"}.get(raw.get("_class_name"))
    if name is not None:
        return name, load_diffusers_component
    class_name = transformers_config(folder)["_class_name"]  # raises for unsupported architectures
    if class_name == "T5EncoderModel":
        return "t5", load_transformers_component
    # CLIP-L and bigG are told apart by width (768 vs 1280); the name only labels the component.
    return ("clip_l" if raw.get("hidden_size", 0) <= 768 else "clip_g"), load_transformers_component


def _copy_tokenizers(src: str, dst: str) -> None:
    """Copy a pipeline's tokenizer folders to ``dst/tokenizers/{clip_l,clip_g,t5}`` (read by
    ``text.prompt_encoder.load_tokenizers``), so the checkpoint encodes captions on its own."""
    for sub, name in TOKENIZER_FOLDERS.items():
        if os.path.isdir(os.path.join(src, sub)):
            storage.copy_tree(os.path.join(src, sub), storage.path(dst) / "tokenizers" / name)


def _pipeline_components(folder: str) -> dict[str, str]:
    """Component name -> subfolder for a diffusers pipeline folder (weights only)."""
    found = {}
    for sub, name in PIPELINE_COMPONENTS.items():
        if os.path.isfile(os.path.join(folder, sub, "config.json")):
            found[name] = os.path.join(folder, sub)
    return found


def convert(
    src: str,
    dst: str,
    *,
    dtype: str = "float32",
    scan_layers: bool = False,
    components: Sequence[str] | None = None,
    config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert ``src`` and write ``dst``; returns a summary ``{name: {"params": n, "config": {...}}}``.

    ``src``: a ``.safetensors`` single file, a diffusers pipeline folder (``transformer/``,
    ``vae/`` ...) or one component folder (``config.json`` + weights).
    """
    param_dtype = jnp.dtype(dtype)
    options = {name: {"param_dtype": param_dtype} for name in PIPELINE_COMPONENTS.values()}
    options["transformer"]["scan_layers"] = scan_layers
    if os.path.isfile(src):
        if not src.endswith(".safetensors"):
            raise ConversionError(f"{src}: single-file checkpoints must be .safetensors")
        converted = load_single_file(
            src, components=components, config_overrides=config_overrides, options=options, progress=progress
        )
    elif config_overrides and os.path.isdir(src):
        # A folder's config.json states every field; overriding it would convert weights the
        # release did not describe.
        raise ConversionError(
            f"{src}: config overrides apply to single .safetensors files only; a diffusers "
            f"folder's config.json already gives {sorted(config_overrides)}"
        )
    elif os.path.isfile(os.path.join(src, "config.json")):
        name, loader = _component_folder(src)
        converted = {name: loader(src, progress=progress, **options[name])}
    elif os.path.isdir(src):
        found = _pipeline_components(src)
        if not found:
            raise ConversionError(f"{src}: neither a diffusers pipeline folder nor a component folder")
        wanted = list(components) if components is not None else list(found)
        absent = [c for c in wanted if c not in found]
        if absent:
            raise ConversionError(f"{src}: components {absent} not found (it has {sorted(found)})")
        converted = {}
        for c in wanted:
            _, loader = _component_folder(found[c])
            converted[c] = loader(found[c], progress=progress, **options[c])
    else:
        raise ConversionError(f"{src}: no such file or folder")
    save(dst, converted, overwrite=overwrite)
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "config.json")):
        _copy_tokenizers(src, dst)
    return {
        name: {"params": sum(int(x.size) for x in jax.tree.leaves(params)), "config": module.config.to_dict()}
        for name, (module, params) in converted.items()
    }


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


def describe(summary: Mapping[str, Any], dst: str) -> str:
    lines = [f"{name}: {info['params']:,} parameters" for name, info in summary.items()]
    return "\n".join(lines + [f"wrote {dst}"])
