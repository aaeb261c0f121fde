"""Converted-model checkpoints: an orbax directory holding, per component, its params and its
config as JSON.

Layout (orbax Composite): ``manifest`` (JSON: format, version, component names),
``{name}`` (params, orbax StandardSave) and ``{name}_config`` (JSON: the diffusers-style config
plus the module options the params depend on: ``param_dtype`` and ``scan_layers``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from percov2_jax import sharding as sharding_lib
from percov2_jax.convert import components as component_kinds
from percov2_jax.convert.core import flatten_shapes
from percov2_jax.models import mmdit

FORMAT = "percov2-jax/components"
VERSION = 1
_STORED_OPTIONS = ("param_dtype", "scan_layers")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, of another format, or does not match its config."""


def _options_of(module: nn.Module) -> dict[str, Any]:
    opts = {"param_dtype": jnp.dtype(module.param_dtype).name}
    if hasattr(module, "scan_layers"):
        opts["scan_layers"] = bool(module.scan_layers)
    return opts


def save(path: str | os.PathLike, components: Mapping[str, tuple[nn.Module, Any]], overwrite: bool = False) -> None:
    """Write ``{name: (module, params)}`` to the orbax directory ``path``."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    items: dict[str, Any] = {"manifest": ocp.args.JsonSave({"format": FORMAT, "version": VERSION,
                                                             "components": sorted(components)})}
    for name, (module, params) in components.items():
        if name == "manifest" or name.endswith("_config"):
            raise ValueError(f"invalid component name {name!r}")
        items[name] = ocp.args.StandardSave(params)
        items[f"{name}_config"] = ocp.args.JsonSave({"config": module.config.to_dict(), "options": _options_of(module)})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, ocp.args.Composite(**items), force=overwrite)


def load(path: str | os.PathLike, *, components: tuple[str, ...] | None = None, mesh: jax.sharding.Mesh | None = None,
         options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, tuple[nn.Module, Any]]:
    """Read what ``save`` (or ``tools/convert_sd3.py``) wrote: ``{name: (module, params)}``.

    ``options[name]`` are module attributes (``dtype``, ``remat_policy``, ``scan_layers`` ...);
    asking for another ``scan_layers`` than was stored converts the layout. With ``mesh`` the
    params are restored straight onto their logical-axis shardings.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
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
            raise CheckpointError(f"{path}: checkpoint version {manifest.get('version')} is not supported (want {VERSION})")
        names = list(components) if components is not None else list(manifest["components"])
        absent = sorted(set(names) - set(manifest["components"]))
        if absent:
            raise CheckpointError(f"{path}: components {absent} not in the checkpoint (it has {manifest['components']})")
        out = {}
        for name in names:
            meta = ckptr.restore(path, ocp.args.Composite(**{f"{name}_config": ocp.args.JsonRestore()}))[f"{name}_config"]
            stored = dict(meta["options"])
            stored_module, kind = component_kinds.build_module(meta["config"], **stored)
            boxed = component_kinds.abstract_params(stored_module, kind)
            abstract = nn.meta.unbox(boxed)
            if mesh is not None:
                shardings = sharding_lib.logical_shardings(boxed, mesh)
                abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
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
        raise CheckpointError(f"{where}: stored params do not match the config: missing {missing}, extra {extra}, "
                              f"mis-shaped {shapes}")
