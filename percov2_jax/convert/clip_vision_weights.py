"""CLIP weights -> Flax: the vision tower (``CLIPVisionModelWithProjection``), from its own
checkpoint or from a full ``CLIPModel`` (which also yields the text tower, for the CLIP score).

Inputs (nothing is downloaded):
- a transformers folder (``config.json`` with ``architectures`` ``CLIPVisionModelWithProjection``
  or ``CLIPModel``, plus ``model.safetensors`` / sharded ``model-*.safetensors`` or
  ``pytorch_model.bin``);
- or one state-dict file (``.safetensors``, ``.bin``, ``.pth``) plus ``config`` (the file alone
  does not say ``hidden_act``, the head count or ``layer_norm_eps``).

Strict as every converter here: unknown, missing or mis-shaped keys raise one ``ConversionError``
naming all of them. Keys expected and not converted: a full ``CLIPModel``'s text side
(``text_model.*``, ``text_projection.weight``) and ``logit_scale`` when only the vision tower is
loaded, and the ``position_ids`` buffers of older checkpoints (checked to be ``arange``, then dropped).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from percov2_jax.convert import core
from percov2_jax.convert import registry as component_kinds
from percov2_jax.convert.text_encoders import tidy_sources
from percov2_jax.convert.transformers_folder import read_architecture
from percov2_jax.models import clip, clip_vision

# transformers name -> Flax leaf, transform. Flax module paths come from the names
# (``vision_model.encoder.layers.3.mlp.fc1`` -> ``vision_model/encoder/layers_3/mlp/fc1``).
RULES = (
    core.Rule(r"vision_model\.embeddings\.patch_embedding\.weight", "kernel", "conv"),  # OIHW -> HWIO
    core.Rule(r"vision_model\.embeddings\.class_embedding", "class_embedding", "identity"),
    core.Rule(r"vision_model\.embeddings\.position_embedding\.weight", "embedding", "identity"),
    core.Rule(
        r"vision_model\.(?:pre_layrnorm|post_layernorm|encoder\.layers\.\d+\.layer_norm[12])\.weight",
        "scale",
        "identity",
    ),
    core.Rule(
        r"(?:vision_model\.encoder\.layers\.\d+\.(?:self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])"
        r"|visual_projection)\.weight",
        "kernel",
        "linear",
    ),
    core.Rule(r"vision_model\..*\.bias", "bias", "identity"),
)

VISION_KIND = component_kinds.ComponentKind(
    "CLIPVisionModelWithProjection",
    clip_vision.CLIPVisionConfig,
    clip_vision.CLIPVisionModelWithProjection,
    RULES,
    clip_vision.example_inputs,
    lambda m: lambda path: (path, None),
)

ARCHITECTURES = ("CLIPVisionModelWithProjection", "CLIPModel")
TEXT_SIDE = re.compile(r"text_model\..*|text_projection\.weight")
LOGIT_SCALE = "logit_scale"


def read_config(folder: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, raw config.json dict)`` of a transformers CLIP folder."""
    return read_architecture(folder, ARCHITECTURES, "a transformers CLIP model folder")


def read_sources(path: str) -> list[core.SourceTensor]:
    """Lazy tensors of a transformers folder or one ``.safetensors`` / ``.bin`` / ``.pth`` file."""
    from percov2_jax.convert.diffusers_folder import read_sources as read_folder
    from percov2_jax.convert.lpips_weights import read_state_dict

    if os.path.isdir(path):
        names = set(os.listdir(path))
        if "model.safetensors" in names or "model.safetensors.index.json" in names:
            return read_folder(path, weights_name="model")
        if "pytorch_model.bin" in names:
            path = os.path.join(path, "pytorch_model.bin")
        else:
            raise core.ConversionError(
                f"{path}: no model.safetensors, model.safetensors.index.json or "
                f"pytorch_model.bin; the folder has {sorted(names)}"
            )
    if not path.endswith((".safetensors", ".bin", ".pth", ".pt")):
        raise core.ConversionError(f"{path}: expected a folder or a .safetensors/.bin/.pth file")
    return [core.SourceTensor(k, shape, load) for k, (shape, load) in read_state_dict(path).items()]


def _drop_position_ids(sources: list[core.SourceTensor], key: str) -> list[core.SourceTensor]:
    out = []
    for s in sources:
        if s.key == key:
            ids = np.asarray(s.load()).reshape(-1)
            if not np.array_equal(ids, np.arange(ids.size)):
                raise core.ConversionError(f"{key} is not arange(n): custom positions are not supported")
            continue
        out.append(s)
    return out


def split_sources(sources: list[core.SourceTensor], architecture: str) -> tuple[list, list]:
    """``(vision, text)`` sources; ``logit_scale`` (a ``CLIPModel``'s) is expected and dropped."""
    sources = _drop_position_ids(sources, "vision_model.embeddings.position_ids")
    vision = [s for s in sources if not TEXT_SIDE.fullmatch(s.key) and s.key != LOGIT_SCALE]
    text = [s for s in sources if TEXT_SIDE.fullmatch(s.key)]
    if architecture == "CLIPVisionModelWithProjection":
        vision += text + [s for s in sources if s.key == LOGIT_SCALE]  # not expected here: reported as unknown
        text = []
    return vision, text


def _config(config: Any, where: str) -> clip_vision.CLIPVisionConfig:
    if isinstance(config, clip_vision.CLIPVisionConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if isinstance(config, Mapping):
        return (
            clip_vision.CLIPVisionConfig.from_transformers(config)
            if "_class_name" not in config
            else clip_vision.CLIPVisionConfig.from_dict(config)
        )
    raise core.ConversionError(f"{where}: a single weights file needs config= (CLIPVisionConfig, dict or config.json)")


def _vision(config, sources, where: str, mesh, shardings, progress, module_options):
    module = clip_vision.CLIPVisionModelWithProjection(config=config, **module_options)
    params = component_kinds.convert(
        module,
        VISION_KIND,
        sources,
        mesh=mesh,
        shardings=shardings,
        progress=progress,
        what=f"CLIPVisionModelWithProjection at {where}",
    )
    return module, params


def load_clip_vision(
    path: str | os.PathLike, *, config: Any = None, mesh=None, shardings=None, progress: bool = False, **module_options
) -> tuple[clip_vision.CLIPVisionModelWithProjection, dict]:
    """``(CLIPVisionModelWithProjection, params)`` from a ``CLIPVisionModelWithProjection`` or
    ``CLIPModel`` checkpoint (folder, or file plus ``config``). ``module_options``: ``dtype``,
    ``param_dtype``, ``attention_implementation``."""
    path = os.fspath(path)
    architecture = "CLIPModel"  # a bare file may be either; its text side is then skipped
    if os.path.isdir(path):
        architecture, raw = read_config(path)
        config = config if config is not None else raw
    vision, _ = split_sources(read_sources(path), architecture)
    return _vision(_config(config, path), vision, path, mesh, shardings, progress, module_options)


def load_clip_model(path: str | os.PathLike, *, mesh=None, progress: bool = False, **module_options):
    """Both towers of a transformers ``CLIPModel`` folder:
    ``((CLIPTextModelWithProjection, text_params), (CLIPVisionModelWithProjection, vision_params))``.

    Both projections take the top-level ``projection_dim`` (what ``CLIPModel`` builds), whatever
    the sub-configs say. ``logit_scale`` is not needed by the CLIP score and is dropped.
    """
    path = os.fspath(path)
    architecture, raw = read_config(path)
    if architecture != "CLIPModel":
        raise core.ConversionError(f"{path}: architecture {architecture}, expected CLIPModel (both towers)")
    vision_sources, text_sources = split_sources(read_sources(path), architecture)
    vision = _vision(_config(raw, path), vision_sources, path, mesh, None, progress, module_options)
    text_config = clip.CLIPTextConfig.from_transformers(raw)  # takes the top-level projection_dim
    text_kind = component_kinds.KINDS["CLIPTextModelWithProjection"]
    text_module = clip.CLIPTextModelWithProjection(config=text_config, **module_options)
    text_params = component_kinds.convert(
        text_module,
        text_kind,
        tidy_sources(text_kind.class_name, text_sources),
        mesh=mesh,
        progress=progress,
        what=f"CLIPModel text tower at {path}",
    )
    return (text_module, text_params), vision


def load_clip_scorer(
    model_folder: str | os.PathLike, tokenizer_folder: str | os.PathLike | None = None, **module_options
):
    """A `percov2_jax.metrics.clip_score.CLIPScorer` from a transformers ``CLIPModel`` folder (e.g. a
    local copy of ``openai/clip-vit-large-patch14``) and a folder with ``vocab.json`` + ``merges.txt``
    (default: the model folder). Never downloads."""
    from transformers import CLIPTokenizer  # v5: CLIPTokenizer(vocab_file=...) silently ignores the file

    from percov2_jax.metrics.clip_score import CLIPScorer

    (text_module, text_params), (vision_module, vision_params) = load_clip_model(model_folder, **module_options)
    tokenizer = CLIPTokenizer.from_pretrained(os.fspath(tokenizer_folder or model_folder), local_files_only=True)
    return CLIPScorer(text_module, text_params, vision_module, vision_params, tokenizer)
