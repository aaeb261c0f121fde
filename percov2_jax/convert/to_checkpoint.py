"""Convert an SD3 release (diffusers pipeline/component folder or original single file) into a
percov2-jax orbax checkpoint. Used by ``tools/convert_sd3.py`` and ``percov2 convert``."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from percov2_jax import checkpoints
from percov2_jax.convert.core import ConversionError
from percov2_jax.convert.diffusers_folder import load_diffusers_component
from percov2_jax.convert.single_file import load_single_file
from percov2_jax.convert.transformers_folder import load_transformers_component, transformers_config

# diffusers pipeline subfolders that hold model weights, by component name.
PIPELINE_COMPONENTS = {
    "transformer": "transformer", "vae": "vae",
    "text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5",
}


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
    ``conditioning.load_tokenizers``), so the checkpoint encodes captions on its own."""
    from percov2_jax.conditioning import TOKENIZER_FOLDERS

    for sub, name in TOKENIZER_FOLDERS.items():
        if os.path.isdir(os.path.join(src, sub)):
            shutil.copytree(os.path.join(src, sub), os.path.join(dst, "tokenizers", name), dirs_exist_ok=True)


def _pipeline_components(folder: str) -> dict[str, str]:
    """Component name -> subfolder for a diffusers pipeline folder (weights only)."""
    found = {}
    for sub, name in PIPELINE_COMPONENTS.items():
        if os.path.isfile(os.path.join(folder, sub, "config.json")):
            found[name] = os.path.join(folder, sub)
    return found


def convert_to_checkpoint(
    src: str, dst: str, *, dtype: str = "float32", scan_layers: bool = False,
    components: Sequence[str] | None = None, config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False, progress: bool = True,
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
        converted = load_single_file(src, components=components, config_overrides=config_overrides,
                                     options=options, progress=progress)
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
    checkpoints.save(dst, converted, overwrite=overwrite)
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "config.json")):
        _copy_tokenizers(src, dst)
    return {name: {"params": sum(int(x.size) for x in jax.tree.leaves(params)), "config": module.config.to_dict()}
            for name, (module, params) in converted.items()}


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
