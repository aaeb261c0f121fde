"""Front-end (b): a diffusers component folder (``config.json`` + safetensors, sharded or not)."""

from __future__ import annotations

import json
import os
from typing import Any

from percov2_jax.convert import core
from percov2_jax.convert import registry as component_kinds
from percov2_jax.convert.safetensors_io import SafetensorsFile

WEIGHTS_NAME = "diffusion_pytorch_model"


def _weight_files(folder: str, variant: str | None, weights_name: str) -> list[str]:
    stem = weights_name + (f".{variant}" if variant else "")
    single = os.path.join(folder, f"{stem}.safetensors")
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise core.ConversionError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not os.path.exists(os.path.join(folder, name))]
        if absent:
            raise core.ConversionError(f"{index} lists shard files that do not exist: {absent}")
        return [os.path.join(folder, name) for name in files]
    if os.path.exists(single):
        return [single]
    present = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".json", ".bin")))
    hint = (
        " (.bin weights are not read; re-save them as safetensors)" if any(n.endswith(".bin") for n in present) else ""
    )
    raise core.ConversionError(
        f"{folder}: no {stem}.safetensors or {stem}.safetensors.index.json; the folder has {present}{hint}"
        + ("; pass variant=... for variant files" if variant is None else "")
    )


def read_sources(folder: str, variant: str | None = None, weights_name: str = WEIGHTS_NAME) -> list[core.SourceTensor]:
    """Every tensor of a diffusers (``diffusion_pytorch_model``) or transformers (``model``) folder
    as lazy ``SourceTensor``s, sharded or not (headers only)."""
    sources: dict[str, core.SourceTensor] = {}
    where: dict[str, str] = {}
    duplicated = []
    for path in _weight_files(folder, variant, weights_name):
        reader = SafetensorsFile(path)
        for key in reader.keys():
            if key in sources:
                duplicated.append(f"{key} (in {where[key]} and {path})")
                continue
            where[key] = path
            sources[key] = core.SourceTensor(key, reader.shape(key), lambda r=reader, k=key: r.get(k))
    if duplicated:
        raise core.ConversionError(f"{folder}: tensors stored in more than one shard: {duplicated}")
    return list(sources.values())


def plan_diffusers_component(
    path: str | os.PathLike, *, variant: str | None = None, **module_options
) -> component_kinds.PlannedComponent:
    """A diffusers ``transformer/`` or ``vae/`` folder planned from its config and headers (no
    tensor read); ``.assemble()`` converts it. Raises ``ConversionError`` as ``load_diffusers_component``."""
    folder = os.fspath(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise core.ConversionError(f"{folder}: no config.json (expected a diffusers component folder)")
    with open(config_path) as f:
        config = json.load(f)
    module, kind = component_kinds.build_module(config, **module_options)
    return component_kinds.plan(module, kind, read_sources(folder, variant), what=f"{kind.class_name} at {folder}")


def load_diffusers_component(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    mesh=None,
    shardings=None,
    progress: bool = False,
    **module_options,
) -> tuple[Any, dict]:
    """Load a diffusers ``transformer/`` or ``vae/`` folder as ``(module, params)``.

    ``module_options`` are Flax module attributes (``dtype``, ``param_dtype``, ``scan_layers``,
    ``remat_policy``, ``attention_implementation``). With ``mesh`` the parameters are placed
    by the logical-axis rules; ``shardings`` gives an explicit tree. Raises
    ``ConversionError`` naming every unknown, missing or mis-shaped key.
    """
    planned = plan_diffusers_component(path, variant=variant, **module_options)
    return planned.module, planned.assemble(mesh=mesh, shardings=shardings, progress=progress)
