"""LPIPS weights -> Flax: torchvision's ImageNet backbone plus the lpips v0.1 linear heads.

Two files, both supplied by the user (nothing is downloaded):

- backbone: torchvision's ``alexnet-owt-7be5be79.pth`` or ``vgg16-397923af.pth`` (keys
  ``features.{i}.weight`` OIHW / ``features.{i}.bias``; the ImageNet ``classifier.*`` keys are
  expected and skipped);
- heads: lpips' ``weights/v0.1/alex.pth`` or ``vgg.pth`` (keys ``lin{k}.model.1.weight``
  ``[1, C_k, 1, 1]``; torchmetrics ships the same files).

``.pth``/``.pt`` files are read with ``torch.load(map_location="cpu", weights_only=True)``,
``.safetensors`` files without torch. Unknown, missing or mis-shaped keys raise one
``ConversionError`` naming all of them, file by file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.convert.core import ConversionError, Rule, SourceTensor, assemble, flatten_shapes, plan
from percov2_jax.metrics.lpips import BACKBONES, LPIPS

# torch name -> Flax leaf, transform. Flax module paths come from the torch names
# (``features.3`` -> ``features_3``, ``lin0.model.1`` -> ``lin0/model_1``).
BACKBONE_RULES = (
    Rule(r"features\.\d+\.weight", "kernel", "conv"),  # OIHW -> HWIO
    Rule(r"features\.\d+\.bias", "bias", "identity"),
)
HEAD_RULES = (
    Rule(r"lin\d+\.model\.1\.weight", "kernel", "conv"),  # [1, C, 1, 1] -> [1, 1, C, 1]
)
# Keys present in the published files that LPIPS does not use.
BACKBONE_SKIPPED = (r"classifier\.\d+\.(?:weight|bias)",)  # torchvision's ImageNet classifier


def read_state_dict(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """``{key: (shape, load)}`` of a flat ``.pth``/``.pt`` (torch, weights only) or ``.safetensors`` file."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from percov2_jax.convert.safetensors_io import SafetensorsFile

        f = SafetensorsFile(path)
        return {k: (f.shape(k), lambda k=k: f.get(k)) for k in f.keys()}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(
            f"{path}: expected a flat state dict of tensors (name -> tensor), got {type(state).__name__}"
        )

    def to_numpy(t: torch.Tensor) -> np.ndarray:
        t = t.detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    return {k: (tuple(v.shape), lambda v=v: to_numpy(v)) for k, v in state.items()}


def _sources(state, skipped=()) -> list[SourceTensor]:
    skip = [re.compile(p) for p in skipped]
    return [
        SourceTensor(k, shape, load) for k, (shape, load) in state.items() if not any(rx.fullmatch(k) for rx in skip)
    ]


def abstract_params(module: LPIPS) -> Any:
    """Boxed ``ShapeDtypeStruct`` parameters of ``module`` (no computation)."""
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), x, x))["params"]


def load_lpips(
    net: str,
    backbone_path: str | os.PathLike,
    heads_path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> tuple[LPIPS, dict[str, Any]]:
    """``(LPIPS(net), params)`` from a torchvision backbone file and an lpips v0.1 heads file.

    ``net`` is ``"alex"`` (torchmetrics' and PerCo's evaluation default) or ``"vgg"``.
    """
    if net not in BACKBONES:
        raise ValueError(f"net must be one of {sorted(BACKBONES)}, got {net!r}")
    module = LPIPS(net=net, dtype=dtype, param_dtype=param_dtype)
    target = flatten_shapes(nn.meta.unbox(abstract_params(module)))
    parts = (
        (backbone_path, BACKBONE_RULES, BACKBONE_SKIPPED, "features_", f"torchvision {net} backbone (features.*)"),
        (heads_path, HEAD_RULES, (), "lin", f"lpips v0.1 {net} heads (lin*.model.1.weight)"),
    )
    assignments, problems = [], []
    for path, rules, skipped, prefix, what in parts:
        part_target = {p: s for p, s in target.items() if p[0].startswith(prefix)}
        try:
            assignments += plan(
                _sources(read_state_dict(path), skipped), rules, part_target, what=f"{what} from {os.fspath(path)}"
            )
        except ConversionError as e:
            problems.append(str(e))
    if problems:
        raise ConversionError("\n".join(problems))
    return module, assemble(assignments, target, dtype=np.dtype(param_dtype))
