"""CLIP score (Hessel et al. 2021, with torchmetrics' weight) for the MSCOCO-30k evaluation.

Definition implemented, per image-caption pair (torchmetrics ``CLIPScore`` docstring):

    clip_score(I, C) = 100 * max(cos(E_I, E_C), 0)

with ``E_I`` the projected image embedding (``CLIPModel.get_image_features``) and ``E_C`` the
projected text embedding pooled at the EOS token (``get_text_features``). torchmetrics' default
model is ``openai/clip-vit-large-patch14``. Note that torchmetrics' *code* clamps the average,
not each pair: ``CLIPScore.compute() = max(mean_i 100 * cos_i, 0)`` (``torchmetrics_clip_score``
below). The two agree whenever no pair has a negative cosine, which is the practical case for a
real CLIP and matched captions.

Preprocessing = transformers' ``CLIPImageProcessorPil`` (the ``CLIPImageProcessor`` of
transformers 4.x; in 5.x ``CLIPImageProcessor`` is a torchvision backend): shortest side to
``image_size`` with PIL bicubic (long side ``int(image_size * long / short)``), centre crop
(top/left ``(size - crop) // 2``), ``x * (1/255)`` in float64 cast to float32, then
``(x - mean) / std`` in float32. ``preprocess`` does exactly these steps on the host (same PIL
call, same arithmetic: equal to the processor's output). ``preprocess_jax`` is an in-graph
approximation (``jax.image.resize`` antialiased bicubic in float, no uint8 rounding of the
resized image); its error against the exact path is measured in ``tests/test_clip_score.py``.
transformers 5's torchvision-backend ``CLIPImageProcessor`` (torch antialiased bicubic on
tensors) is *not* reproduced exactly by either.

Text: tokenised without truncation, then cut to ``max_position_embeddings`` tokens, as
torchmetrics does (so an over-long caption loses its EOS token, as there); padded with the pad
id to a fixed length (padding after the EOS cannot change the pooled output of the causal text
tower, so this matches torchmetrics' pad-to-longest).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TORCHMETRICS_DEFAULT_MODEL = "openai/clip-vit-large-patch14"
WEIGHT = 100.0


# ------------------------------------------------------------------ scores ----------------------


def cosine(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """Row-wise cosine ``[B, P] x [B, P] -> [B]`` (``x / ||x||``, no epsilon, as torchmetrics)."""
    image_embeds = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    text_embeds = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return jnp.sum(image_embeds * text_embeds, axis=-1)


def clip_score(image_embeds: jax.Array, text_embeds: jax.Array, weight: float = WEIGHT) -> jax.Array:
    """Per-pair CLIP score ``weight * max(cos, 0)``: ``[B, P], [B, P] -> [B]``."""
    return weight * jnp.maximum(cosine(image_embeds, text_embeds), 0.0)


def torchmetrics_clip_score(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """torchmetrics ``CLIPScore().compute()`` over these pairs: ``max(mean(100 * cos), 0)``, a scalar.
    Over several batches, accumulate ``100 * cosine(...)`` sums and counts and clamp at the end."""
    return jnp.maximum(jnp.mean(WEIGHT * cosine(image_embeds, text_embeds)), 0.0)


# ------------------------------------------------------------------ preprocessing ---------------


def to_uint8(images: Any, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Float images in ``value_range`` -> uint8 ``[..., H, W, 3]`` (round half to even, clipped),
    as if saved to PNG; torchmetrics scores integer images."""
    lo, hi = value_range
    x = (np.asarray(images, np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def resize_shortest_and_crop(image: np.ndarray, image_size: int, crop_size: int | None = None) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[crop, crop, 3]``: PIL bicubic shortest side to ``image_size``, centre crop."""
    from PIL import Image

    crop = image_size if crop_size is None else crop_size
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape} (see to_uint8)")
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    new_long = int(image_size * long / short)
    new_h, new_w = (new_long, image_size) if w <= h else (image_size, new_long)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    if crop > min(new_h, new_w):
        raise ValueError(f"crop {crop} larger than the resized image {resized.shape[:2]}")
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return resized[top : top + crop, left : left + crop]


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32, CLIP-normalised, with the processor's exact arithmetic."""
    x = (np.asarray(images).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)


def preprocess(
    images: Sequence[np.ndarray] | np.ndarray, image_size: int = 224, crop_size: int | None = None
) -> np.ndarray:
    """uint8 images (a list of ``[H, W, 3]`` of any sizes, or ``[B, H, W, 3]``) -> float32
    ``[B, crop, crop, 3]`` NHWC ``pixel_values``; equal to ``CLIPImageProcessorPil``'s output."""
    return np.stack([normalize(resize_shortest_and_crop(im, image_size, crop_size)) for im in images])


def preprocess_jax(images: jax.Array, image_size: int = 224) -> jax.Array:
    """In-graph approximation of ``preprocess`` for float images ``[B, H, W, 3]`` in [0, 1]
    (antialiased bicubic in float, no uint8 rounding; see the module docstring)."""
    b, h, w, c = images.shape
    new_long = int(image_size * max(h, w) / min(h, w))
    new_h, new_w = (new_long, image_size) if w <= h else (image_size, new_long)
    x = jax.image.resize(images.astype(jnp.float32), (b, new_h, new_w, c), method="bicubic", antialias=True)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    x = jnp.clip(x[:, top : top + image_size, left : left + image_size], 0.0, 1.0)
    return (x - jnp.array(OPENAI_CLIP_MEAN)) / jnp.array(OPENAI_CLIP_STD)


# ------------------------------------------------------------------ scorer ----------------------


def tokenize(tokenizer, captions: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 ``[B, length]``: untruncated tokens cut to ``length``, padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((len(captions), length), pad, np.int32)
    mask = np.zeros((len(captions), length), np.int32)
    for i, tokens in enumerate(tokenizer(list(captions), padding=False, truncation=False)["input_ids"]):
        tokens = tokens[:length]
        ids[i, : len(tokens)] = tokens
        mask[i, : len(tokens)] = 1
    return ids, mask


class CLIPScorer:
    """Holds a CLIP text tower, vision tower and tokenizer; ``scorer(images, captions) -> [B]``
    per-pair ``clip_score`` (images: uint8 ``[H, W, 3]`` list or ``[B, H, W, 3]``)."""

    def __init__(self, text_module, text_params, vision_module, vision_params, tokenizer):
        self.text_module, self.text_params = text_module, text_params
        self.vision_module, self.vision_params = vision_module, vision_params
        self.tokenizer = tokenizer
        self.image_size = vision_module.config.image_size
        self.text_length = text_module.config.max_position_embeddings
        self._text = jax.jit(lambda p, ids, mask: text_module.apply({"params": p}, ids, mask).text_embeds)
        self._image = jax.jit(lambda p, x: vision_module.apply({"params": p}, x).image_embeds)

    def text_embeds(self, captions: Sequence[str]) -> jax.Array:
        ids, mask = tokenize(self.tokenizer, captions, self.text_length)
        return self._text(self.text_params, ids, mask)

    def image_embeds(self, images) -> jax.Array:
        return self._image(self.vision_params, preprocess(images, self.image_size))

    def __call__(self, images, captions: Sequence[str]) -> jax.Array:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return clip_score(self.image_embeds(images), self.text_embeds(captions))
