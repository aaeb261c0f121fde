"""The component kinds the converter knows: config class, Flax module, rule table, layout.

Adding a convertible model means adding one ``ComponentKind`` here plus its name table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from percov2_jax import sharding as sharding_lib
from percov2_jax.convert import core, sd3_transformer, sd3_vae, text_encoders
from percov2_jax.models import clip, mmdit, t5, vae


@dataclasses.dataclass(frozen=True)
class ComponentKind:
    class_name: str  # diffusers ``_class_name``
    config_cls: Any
    module_cls: Any
    rules: tuple[core.Rule, ...]
    example_inputs: Callable[[Any], tuple]
    locate: Callable[[nn.Module], Callable[[core.Path], tuple[core.Path, int | None]]]


KINDS: dict[str, ComponentKind] = {
    "SD3Transformer2DModel": ComponentKind(
        "SD3Transformer2DModel",
        mmdit.SD3TransformerConfig,
        mmdit.SD3Transformer2DModel,
        sd3_transformer.RULES,
        mmdit.example_inputs,
        lambda m: lambda path: mmdit.locate_block(path, m.config, m.scan_layers),
    ),
    "AutoencoderKL": ComponentKind(
        "AutoencoderKL",
        vae.AutoencoderKLConfig,
        vae.AutoencoderKL,
        sd3_vae.RULES,
        vae.example_inputs,
        lambda m: lambda path: (path, None),
    ),
    "CLIPTextModelWithProjection": ComponentKind(
        "CLIPTextModelWithProjection",
        clip.CLIPTextConfig,
        clip.CLIPTextModelWithProjection,
        text_encoders.CLIP_RULES,
        clip.example_inputs,
        lambda m: lambda path: (path, None),
    ),
    "T5EncoderModel": ComponentKind(
        "T5EncoderModel",
        t5.T5EncoderConfig,
        t5.T5EncoderModel,
        text_encoders.T5_RULES,
        t5.example_inputs,
        lambda m: lambda path: (path, None),
    ),
}


def kind_of(config: Mapping[str, Any], where: str) -> ComponentKind:
    name = config.get("_class_name")
    if name not in KINDS:
        raise core.ConversionError(
            f"{where}: unsupported component class {name!r}; percov2-jax converts {sorted(KINDS)}"
        )
    return KINDS[name]


def build_module(config: Mapping[str, Any], **module_options) -> tuple[nn.Module, ComponentKind]:
    """A Flax module from a diffusers config dict (``_class_name`` selects the kind)."""
    kind = kind_of(config, "config")
    for key in ("dtype", "param_dtype"):
        if isinstance(module_options.get(key), str):
            module_options[key] = jnp.dtype(module_options[key])
    return kind.module_cls(config=kind.config_cls.from_dict(config), **module_options), kind


def abstract_params(module: nn.Module, kind: ComponentKind) -> Any:
    """Boxed (logically partitioned) ``ShapeDtypeStruct`` params of ``module``, no computation."""
    inputs = kind.example_inputs(module.config)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]


def convert(
    module: nn.Module,
    kind: ComponentKind,
    sources: Iterable[core.SourceTensor],
    *,
    mesh: jax.sharding.Mesh | None = None,
    shardings: Any = None,
    progress: bool = False,
    what: str | None = None,
) -> dict[str, Any]:
    """Plan and assemble ``sources`` into ``module``'s parameter tree (strict; see ``core``)."""
    boxed = abstract_params(module, kind)
    target = core.flatten_shapes(nn.meta.unbox(boxed))
    assignments = core.plan(
        list(sources), kind.rules, target, kind.locate(module), what=what or f"{kind.class_name}({module.config})"
    )
    if mesh is not None and shardings is None:
        shardings = sharding_lib.logical_shardings(boxed, mesh)
    bar = tqdm(total=len(assignments), desc=f"converting {kind.class_name}", unit="tensor", disable=not progress)
    with bar:
        return core.assemble(assignments, target, dtype=module.param_dtype, shardings=shardings, progress=bar.update)
