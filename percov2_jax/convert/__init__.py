"""PyTorch -> Flax checkpoint conversion for SD3 (diffusers folders and original single files).

Public API:
  - ``load_diffusers_component(path) -> (module, params)``
  - ``load_transformers_component(path) -> (module, params)`` (CLIP and T5 text encoders)
  - ``load_single_file(path) -> {component_name: (module, params)}``
Both are strict: unknown, missing or mis-shaped keys raise one ``ConversionError`` naming them.
"""

from percov2_jax.convert.core import ConversionError
from percov2_jax.convert.diffusers_folder import load_diffusers_component
from percov2_jax.convert.safetensors_io import CheckpointFormatError
from percov2_jax.convert.single_file import load_single_file
from percov2_jax.convert.transformers_folder import load_transformers_component

__all__ = [
    "ConversionError",
    "CheckpointFormatError",
    "load_diffusers_component",
    "load_single_file",
    "load_transformers_component",
]
