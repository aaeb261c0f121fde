"""FID Inception weights -> Flax: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.

The file (supplied by the user; nothing is downloaded) is the state dict of pytorch-fid's
``fid_inception_v3()`` (torchvision ``Inception3(num_classes=1008, aux_logits=False)`` with the
FID blocks): ``{Conv2d_*,Mixed_*.branch*}.conv.weight`` OIHW and
``....bn.{weight,bias,running_mean,running_var}``. The 1008-way ``fc`` classifier (and any
``bn.num_batches_tracked`` counters) are expected and skipped: pool3 features do not use them.

``.pth``/``.pt`` files are read with ``torch.load(map_location="cpu", weights_only=True)``,
``.safetensors`` files without torch. Unknown, missing or mis-shaped keys raise one
``ConversionError`` naming all of them.
"""

from __future__ import annotations

import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.convert.core import ConversionError, Rule, SourceTensor, assemble, flatten_shapes, plan
from percov2_jax.convert.lpips_weights import read_state_dict
from percov2_jax.metrics.inception import INPUT_SIZE, FIDInceptionV3

# torch name -> Flax leaf, transform. Flax module paths are the torch names
# (``Mixed_6b.branch7x7_2.bn`` -> ``Mixed_6b/branch7x7_2/bn``).
_LAYER = r"(?:Conv2d_\w+|Mixed_\w+\.branch\w+)"
RULES = (
    Rule(_LAYER + r"\.conv\.weight", "kernel", "conv"),  # OIHW -> HWIO
    Rule(_LAYER + r"\.bn\.weight", "scale", "identity"),
    Rule(_LAYER + r"\.bn\.bias", "bias", "identity"),
    Rule(_LAYER + r"\.bn\.running_mean", "mean", "identity"),
    Rule(_LAYER + r"\.bn\.running_var", "var", "identity"),
)
# Keys present in the published file (or in state dicts saved by newer torch) that pool3 does not use.
SKIPPED = (
    r"fc\.(?:weight|bias)",  # the 1008-way ImageNet classifier
    _LAYER + r"\.bn\.num_batches_tracked",
)


def _sources(state) -> list[SourceTensor]:
    skip = [re.compile(p) for p in SKIPPED]
    return [
        SourceTensor(k, shape, load) for k, (shape, load) in state.items() if not any(rx.fullmatch(k) for rx in skip)
    ]


def abstract_params(module: FIDInceptionV3) -> Any:
    """Boxed ``ShapeDtypeStruct`` parameters of ``module`` (no computation)."""
    x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]


def load_fid_inception(
    path: str | os.PathLike,
    *,
    input_scaling: str = "clean_fid",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> tuple[FIDInceptionV3, dict[str, Any]]:
    """``(FIDInceptionV3(input_scaling), params)`` from pytorch-fid's FID Inception state dict file."""
    module = FIDInceptionV3(input_scaling=input_scaling, dtype=dtype, param_dtype=param_dtype)
    target = flatten_shapes(nn.meta.unbox(abstract_params(module)))
    state = read_state_dict(path)
    assignments = plan(_sources(state), RULES, target, what=f"pytorch-fid FID InceptionV3 from {os.fspath(path)}")
    return module, assemble(assignments, target, dtype=np.dtype(param_dtype))


__all__ = ["ConversionError", "RULES", "SKIPPED", "abstract_params", "load_fid_inception"]
