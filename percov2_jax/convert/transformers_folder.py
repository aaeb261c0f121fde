"""Front-end (c): a transformers model folder (``config.json`` + ``model*.safetensors``):
SD3's ``text_encoder`` / ``text_encoder_2`` (CLIPTextModelWithProjection) and ``text_encoder_3``
(T5EncoderModel)."""

from __future__ import annotations

import json
import os
from typing import Any

from percov2_jax.convert import core
from percov2_jax.convert import registry as component_kinds
from percov2_jax.convert.diffusers_folder import read_sources
from percov2_jax.convert.text_encoders import tidy_sources

ARCHITECTURES = ("CLIPTextModelWithProjection", "T5EncoderModel")


def read_architecture(
    folder: str, architectures=ARCHITECTURES, what: str = "a transformers model folder"
) -> tuple[str, dict[str, Any]]:
    """``(architecture, raw config.json dict)`` of a transformers folder whose ``architectures``
    include one of ``architectures``; `core.ConversionError` otherwise."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise core.ConversionError(f"{folder}: no config.json (expected {what})")
    with open(config_path) as f:
        raw = json.load(f)
    archs = raw.get("architectures") or []
    name = next((a for a in archs if a in architectures), None)
    if name is None:
        raise core.ConversionError(f"{folder}: architectures {archs} include none of {list(architectures)}")
    return name, raw


def transformers_config(folder: str) -> dict[str, Any]:
    """Our config dict (with ``_class_name``) for a transformers folder's ``config.json``."""
    name, raw = read_architecture(folder)
    return component_kinds.KINDS[name].config_cls.from_transformers(raw).to_dict()


def plan_transformers_component(
    path: str | os.PathLike, *, variant: str | None = None, **module_options
) -> component_kinds.PlannedComponent:
    """A transformers text-encoder folder planned from its config and headers; ``.assemble()`` converts it."""
    folder = os.fspath(path)
    config = transformers_config(folder)
    module, kind = component_kinds.build_module(config, **module_options)
    sources = tidy_sources(kind.class_name, read_sources(folder, variant, weights_name="model"))
    return component_kinds.plan(module, kind, sources, what=f"{kind.class_name} at {folder}")


def load_transformers_component(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    mesh=None,
    shardings=None,
    progress: bool = False,
    **module_options,
) -> tuple[Any, dict]:
    """Load a transformers ``CLIPTextModelWithProjection`` or ``T5EncoderModel`` folder as ``(module, params)``.

    Same strictness and options as ``load_diffusers_component``.
    """
    planned = plan_transformers_component(path, variant=variant, **module_options)
    return planned.module, planned.assemble(mesh=mesh, shardings=shardings, progress=progress)
