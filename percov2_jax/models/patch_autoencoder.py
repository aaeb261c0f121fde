"""A linear patch autoencoder (PCA of 8x8 RGB patches): the stand-in for the SD3 VAE in the
tiny config, where no pretrained VAE weights can be downloaded.

It has the SD3 VAE's geometry (8x downsampling, 16 latent channels, roughly unit-variance
latents) and its interface (``encode_to_latents`` / ``decode_latents``), and it is fitted in
seconds by ``fit_patch_pca`` on real photographs, so the tiny pipeline is honest end to end.
It is a *linear* code: its reconstructions are the best 16-component projection of each patch
and look blurred; real quality needs the converted SD3 VAE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.models.layers import config_from_dict, config_to_dict


@dataclasses.dataclass(frozen=True)
class PatchAutoencoderConfig:
    patch_size: int = 8
    in_channels: int = 3
    latent_channels: int = 16

    @property
    def downsample_factor(self) -> int:
        return self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PatchAutoencoderConfig:
        return config_from_dict(cls, d, "PatchAutoencoder")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "PatchAutoencoder")


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H/p, W/p, p*p*C]`` (row-major inside each patch)."""
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """Inverse of ``space_to_depth``."""
    b, h, w, d = x.shape
    c = d // (p * p)
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


class PatchAutoencoder(nn.Module):
    """Images ``[B, H, W, 3]`` in [-1, 1] <-> latents ``[B, H/8, W/8, 16]`` (float32).

    Parameters: ``mean [P]``, ``components [P, C]`` (orthonormal columns) and ``scale [C]``
    (one over the latent standard deviation), with ``P = 8*8*3``. All are fitted, not trained.
    """

    config: PatchAutoencoderConfig = PatchAutoencoderConfig()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.mean = self.param(
            "mean",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
            (cfg.patch_dim,),
            self.param_dtype,
        )
        self.components = self.param(
            "components",
            nn.with_logical_partitioning(nn.initializers.orthogonal(), (None, None)),
            (cfg.patch_dim, cfg.latent_channels),
            self.param_dtype,
        )
        self.scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
            (cfg.latent_channels,),
            self.param_dtype,
        )

    def encode_to_latents(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        del rng  # deterministic encoder; the argument mirrors AutoencoderKL.encode_to_latents
        patches = space_to_depth(images.astype(jnp.float32), self.config.patch_size)
        z = (patches - self.mean) @ self.components
        return (z * self.scale).astype(self.dtype)

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        z = latents.astype(jnp.float32) / self.scale
        patches = z @ self.components.T + self.mean
        return depth_to_space(patches, self.config.patch_size).astype(self.dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode_latents(self.encode_to_latents(images))


def fit_patch_pca(
    images: Iterable[np.ndarray],
    config: PatchAutoencoderConfig = PatchAutoencoderConfig(),
    max_patches: int = 200_000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Fit the parameters on images (``[H, W, 3]`` float in [-1, 1] or uint8), cropped to the patch grid.

    Returns the ``params`` dict of ``PatchAutoencoder``. Deterministic for a given ``seed``.
    """
    p = config.patch_size
    rows = []
    for image in images:
        image = np.asarray(image)
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 127.5 - 1.0
        if image.ndim != 3 or image.shape[-1] != config.in_channels:
            raise ValueError(f"expected [H, W, {config.in_channels}] images, got shape {image.shape}")
        h, w = (image.shape[0] // p) * p, (image.shape[1] // p) * p
        if h == 0 or w == 0:
            raise ValueError(f"image {image.shape[:2]} is smaller than one {p}x{p} patch")
        rows.append(np.asarray(space_to_depth(image[None, :h, :w].astype(np.float64), p)).reshape(-1, config.patch_dim))
    if not rows:
        raise ValueError("fit_patch_pca needs at least one image")
    patches = np.concatenate(rows)
    if len(patches) > max_patches:
        patches = patches[np.random.default_rng(seed).choice(len(patches), max_patches, replace=False)]
    if len(patches) < config.latent_channels:
        raise ValueError(f"{len(patches)} patches cannot fit {config.latent_channels} components")
    mean = patches.mean(axis=0)
    _, s, vt = np.linalg.svd(patches - mean, full_matrices=False)
    components = vt[: config.latent_channels].T
    # Deterministic sign: the largest-magnitude entry of each component is positive.
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(config.latent_channels)])
    components = components * signs
    std = s[: config.latent_channels] / np.sqrt(len(patches))
    return {
        "mean": mean.astype(np.float32),
        "components": components.astype(np.float32),
        "scale": (1.0 / np.maximum(std, 1e-8)).astype(np.float32),
    }
