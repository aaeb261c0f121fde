"""The component kinds the converter knows: config class, Flax module, rule table, layout.

Adding a convertible model means adding one ``ComponentKind`` here plus its name table.
"""

from __future__ import annotations

import dataclasses
import math
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


@dataclasses.dataclass(frozen=True)
class PlannedComponent:
    """A component whose every source tensor is matched to a Flax leaf (``core.plan``), nothing
    read yet: what ``assemble`` will build, and how big it will be."""

    module: nn.Module
    kind: ComponentKind
    boxed: Any  # boxed ShapeDtypeStruct params (logical axis names for ``mesh``)
    assignments: tuple[core.Assignment, ...]

    @property
    def param_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(self.boxed)))

    @property
    def nbytes(self) -> int:
        """Bytes of the params once assembled (every leaf in ``module.param_dtype``)."""
        return self.param_count * jnp.dtype(self.module.param_dtype).itemsize

    @property
    def largest_array_bytes(self) -> int:
        itemsize = jnp.dtype(self.module.param_dtype).itemsize
        return max(math.prod(x.shape) * itemsize for x in jax.tree.leaves(nn.meta.unbox(self.boxed)))

    def assemble(self, *, mesh: jax.sharding.Mesh | None = None, shardings: Any = None, progress: bool = False):
        """Read, transform and place every tensor: the nested params dict of ``jax.Array``."""
        target = core.flatten_shapes(nn.meta.unbox(self.boxed))
        if mesh is not None and shardings is None:
            shardings = sharding_lib.logical_shardings(self.boxed, mesh)
        name = self.kind.class_name
        bar = tqdm(total=len(self.assignments), desc=f"converting {name}", unit="tensor", disable=not progress)
        with bar:
            return core.assemble(
                self.assignments, target, dtype=self.module.param_dtype, shardings=shardings, progress=bar.update
            )


def plan(
    module: nn.Module, kind: ComponentKind, sources: Iterable[core.SourceTensor], what: str | None = None
) -> PlannedComponent:
    """Match ``sources`` to ``module``'s params from shapes alone; raises ``ConversionError`` (see ``core.plan``)."""
    boxed = abstract_params(module, kind)
    target = core.flatten_shapes(nn.meta.unbox(boxed))
    assignments = core.plan(
        list(sources), kind.rules, target, kind.locate(module), what=what or f"{kind.class_name}({module.config})"
    )
    return PlannedComponent(module, kind, boxed, tuple(assignments))


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
    return plan(module, kind, sources, what).assemble(mesh=mesh, shardings=shardings, progress=progress)
