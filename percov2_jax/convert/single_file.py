"""Front-end (a): an original single-file SD3 checkpoint (Stability's ``sd3_medium.safetensors``).

Keys are grouped by prefix into components; each component's config is inferred from its
keys (depth, dual layers, qk-norm ...), its names are translated to diffusers names, and the
shared back-end converts them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from percov2_jax.convert import core, sd3_transformer, sd3_vae, text_encoders
from percov2_jax.convert import registry as component_kinds
from percov2_jax.convert.safetensors_io import SafetensorsFile

# prefix -> component name.
PREFIXES = {sd3_transformer.PREFIX: "transformer", sd3_vae.PREFIX: "vae", **text_encoders.SINGLE_FILE_PREFIXES}


def split_components(keys: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    unknown = []
    for key in keys:
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            groups.setdefault(PREFIXES[prefix], []).append(key)
    if unknown:
        shown = unknown[:20] + ([f"... and {len(unknown) - 20} more"] if len(unknown) > 20 else [])
        raise core.ConversionError(f"{len(unknown)} keys belong to no known SD3 component: {shown}")
    return groups


def plan_single_file(
    path: str | os.PathLike,
    *,
    components: Sequence[str] | None = None,
    config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, component_kinds.PlannedComponent]:
    """Every wanted component of an SD3 single file planned from the header (plus the few small
    tensors config inference reads); ``.assemble()`` converts one. Arguments as ``load_single_file``."""
    reader = SafetensorsFile(path)
    groups = split_components(reader.keys())
    wanted = list(components) if components is not None else list(groups)
    absent = [c for c in wanted if c not in groups]
    if absent:
        raise core.ConversionError(f"{path}: components {absent} not in the file (it has {sorted(groups)})")
    config_overrides = config_overrides or {}
    options = options or {}
    out = {}
    for name in wanted:
        prefix = next(p for p, n in PREFIXES.items() if n == name)
        shapes = {k[len(prefix) :]: reader.shape(k) for k in groups[name]}

        def load(key, prefix=prefix):
            return reader.get(prefix + key)

        if name == "transformer":
            config = {
                "_class_name": "SD3Transformer2DModel",
                **sd3_transformer.infer_config(shapes, load, config_overrides.get(name)),
            }
            sources = sd3_transformer.original_to_diffusers(shapes, load)
        elif name == "vae":
            config = {"_class_name": "AutoencoderKL", **sd3_vae.infer_config(shapes, config_overrides.get(name))}
            sources = sd3_vae.original_to_diffusers(shapes, load)
        elif name == "t5":
            config = text_encoders.infer_t5_config(shapes, config_overrides.get(name))
            sources = text_encoders.single_file_sources(name, shapes, load)
        else:
            config = text_encoders.infer_clip_config(shapes, name, config_overrides.get(name))
            sources = text_encoders.single_file_sources(name, shapes, load)
        module, kind = component_kinds.build_module(config, **options.get(name, {}))
        out[name] = component_kinds.plan(module, kind, sources, what=f"{kind.class_name} from {path}")
    return out


def load_single_file(
    path: str | os.PathLike,
    *,
    components: Sequence[str] | None = None,
    config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    mesh=None,
    progress: bool = False,
) -> dict[str, tuple[Any, dict]]:
    """Convert an original SD3 single file: ``{"transformer": (module, params), "vae": (module, params)}``.

    Components: ``"transformer"``, ``"vae"`` and, in files that bundle them, ``"clip_l"``,
    ``"clip_g"``, ``"t5"``. ``components`` selects some (default: every one in the file).
    ``config_overrides[name]`` sets config fields the weights do not determine (e.g.
    ``attention_head_dim`` of a model without qk-norm, ``norm_num_groups``, CLIP's heads);
    ``options[name]`` are Flax module attributes (``dtype``, ``scan_layers`` ...). Every component
    is planned (and any mismatch raised) before the first tensor is converted.
    """
    planned = plan_single_file(path, components=components, config_overrides=config_overrides, options=options)
    return {name: (p.module, p.assemble(mesh=mesh, progress=progress)) for name, p in planned.items()}
