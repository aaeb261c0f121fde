"""A small convolutional autoencoder fitted in under a minute: the stand-in for the SD3 VAE in
`make demo` (``vae.kind = "lapped_conv"``), where no pretrained VAE weights can be downloaded.

It has the SD3 VAE's geometry (8x downsampling, 16 latent channels, zero-mean unit-variance
latents) and its interface (``encode_to_latents`` / ``decode_latents``). Unlike the PCA patch
codec (``patch_autoencoder.py``), which decodes every 8x8 patch on its own and so draws a mosaic
of block edges whenever its latents are imperfect (as generated latents always are), every
latent here paints a 16x16 tile that overlaps its neighbours by half and fades almost to zero at
its border, so decoded images have no block edges whatever the latents are.

  encoder  image [B, H, W, 3] -> reflect-pad 4 -> conv 16x16 / stride 8, kernel times a sine
           window -> 64 coefficients [B, H/8, W/8, 64] -> the first 16 plus a small nonlinear
           head (1x1 conv, SiLU, 3x3 conv) of all 64 -> (z - shift) * scale
  decoder  latents [B, H/8, W/8, 16] -> z / scale + shift -> transposed conv 16x16 / stride 8,
           kernel times the same window -> divided by the windows' summed squares (1 inside,
           less on the 4-pixel border) -> image [B, H, W, 3]

The window w(n) = sin(pi (n + 1/2) / 16) (per axis) satisfies w(n)^2 + w(n + 8)^2 = 1, so with
matching analysis and synthesis kernels the code is a lapped transform (as in MDCT audio and
lapped-transform image coders). `fit_conv_autoencoder` starts from the PCA of windowed 16x16
patches (each windowed patch's best 16 coefficients in least squares; as a whole code a little
below the block PCA in PSNR) and trains everything but the shift and scale with Adam on random
crops; the result beats the block PCA on photographs it never saw
(experiments/results/demo_autoencoder.md). The decoder is linear: the nonlinearity sits in the
encoder, where it cannot put edges into decoded images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.models.layers import config_from_dict, config_to_dict, conv, unboxed

_CONV_DIMS = ("NHWC", "HWIO", "NHWC")
# Its file in a run directory (runs.layout.CONV_AUTOENCODER; build cannot import runs).
FITTED_FILE = "conv_autoencoder.npz"


@dataclasses.dataclass(frozen=True)
class ConvAutoencoderConfig:
    stride: int = 8  # the downsampling factor; kernels are twice as wide
    in_channels: int = 3
    latent_channels: int = 16
    analysis_channels: int = 64  # windowed-patch coefficients the encoder's head reads
    head_channels: int = 64  # width of the encoder's nonlinear head

    @property
    def downsample_factor(self) -> int:
        return self.stride

    @property
    def kernel_size(self) -> int:
        return 2 * self.stride

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvAutoencoderConfig:
        return config_from_dict(cls, d, "ConvAutoencoder")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "ConvAutoencoder")


def sine_window(config: ConvAutoencoderConfig) -> np.ndarray:
    """The 2-D window ``[k, k]`` (float32) of the analysis and synthesis kernels, ``k = 2 * stride``."""
    k = config.kernel_size
    w = np.sin(np.pi * (np.arange(k) + 0.5) / k)
    return np.outer(w, w).astype(np.float32)


class ConvAutoencoder(nn.Module):
    """Images ``[B, H, W, 3]`` in [-1, 1] <-> latents ``[B, H/8, W/8, 16]`` (``H``, ``W``
    multiples of 8 and at least 8; float32 by default).

    Parameters (``k = 16``, ``A = 64``, ``K = 16``): ``analysis_kernel [k, k, 3, A]`` and
    ``analysis_bias [A]``; the head's ``head_in`` (1x1, ``A -> 64``) and ``head_out`` (3x3,
    ``64 -> K``) convs; ``latent_shift [K]`` and ``latent_scale [K]``; ``synthesis_kernel
    [k, k, K, 3]`` and ``synthesis_bias [k, k, 3]`` (one mean tile). The window multiplies the
    two kernels inside the module; it is not a parameter.
    """

    config: ConvAutoencoderConfig = ConvAutoencoderConfig()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        k, a, c = cfg.kernel_size, cfg.analysis_channels, cfg.latent_channels
        if a < c:
            raise ValueError(f"analysis_channels ({a}) must be at least latent_channels ({c})")

        def param(name, init, shape, axes):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

        zeros = nn.initializers.zeros_init()
        self.analysis_kernel = param(
            "analysis_kernel",
            nn.initializers.lecun_normal(),
            (k, k, cfg.in_channels, a),
            (None, None, "conv_in", "conv_out"),
        )
        self.analysis_bias = param("analysis_bias", zeros, (a,), ("conv_out",))
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.head_in = conv(cfg.head_channels, 1, name="head_in", **kw)
        self.head_out = conv(c, 3, padding=((1, 1), (1, 1)), name="head_out", **kw)
        self.latent_shift = param("latent_shift", zeros, (c,), (None,))
        self.latent_scale = param("latent_scale", nn.initializers.ones_init(), (c,), (None,))
        self.synthesis_kernel = param(
            "synthesis_kernel",
            nn.initializers.lecun_normal(),
            (k, k, c, cfg.in_channels),
            (None, None, "conv_in", "conv_out"),
        )
        self.synthesis_bias = param("synthesis_bias", zeros, (k, k, cfg.in_channels), (None, None, None))

    def analysis(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` -> the windowed-patch coefficients ``[B, H/8, W/8, A]`` (float32)."""
        s = self.config.stride
        b, h, w, _ = images.shape
        if h % s or w % s or h < s or w < s:
            raise ValueError(f"image size {h}x{w} is not a positive multiple of {s}")
        # Reflection gives the border windows content to read; the decoder's normaliser undoes
        # the missing overlap there.
        x = jnp.pad(images.astype(jnp.float32), ((0, 0), (s // 2, s // 2), (s // 2, s // 2), (0, 0)), mode="reflect")
        window = jnp.asarray(sine_window(self.config))[:, :, None, None]
        kernel = self.analysis_kernel.astype(jnp.float32) * window
        out = jax.lax.conv_general_dilated(x, kernel, (s, s), "VALID", dimension_numbers=_CONV_DIMS)
        return out + self.analysis_bias.astype(jnp.float32)

    def raw_latents(self, images: jax.Array) -> jax.Array:
        """The latents before the shift and scale, ``[B, H/8, W/8, K]`` (float32)."""
        coefficients = self.analysis(images)
        head = self.head_out(nn.silu(self.head_in(coefficients.astype(self.dtype))))
        return coefficients[..., : self.config.latent_channels] + head.astype(jnp.float32)

    def encode_to_latents(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        del rng  # deterministic encoder; the argument mirrors AutoencoderKL.encode_to_latents
        z = (self.raw_latents(images) - self.latent_shift) * self.latent_scale
        return z.astype(self.dtype)

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        s = self.config.stride
        z = latents.astype(jnp.float32) / self.latent_scale + self.latent_shift
        window = jnp.asarray(sine_window(self.config))
        kernel = self.synthesis_kernel.astype(jnp.float32) * window[:, :, None, None]
        out = _overlap_add(z, kernel, s)
        # Each latent's bias is the same mean tile, so its contribution is the tile painted once
        # per latent: the transposed conv of a constant 1 with the windowed tile as kernel.
        ones = jnp.ones((1,) + z.shape[1:3] + (1,), jnp.float32)
        out = out + _overlap_add(ones, (self.synthesis_bias.astype(jnp.float32) * window[:, :, None])[:, :, None], s)
        norm = _overlap_add(ones, (window**2)[:, :, None, None], s)
        return (out / norm)[:, s // 2 : -(s // 2), s // 2 : -(s // 2)].astype(self.dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode_latents(self.encode_to_latents(images))


def _overlap_add(z: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """``[B, h, w, C]`` x ``[k, k, C, O]`` -> ``[B, stride*(h+1), stride*(w+1), O]`` with
    ``k = 2 * stride``: every position paints ``z @ kernel`` as a ``k x k`` tile at ``stride``
    (a transposed conv).

    Computed as its sub-pixel form, a 2x2 conv at latent resolution to ``stride*stride*O``
    channels and a depth-to-space: each output block is the sum of two tile halves per axis, from
    the position above / left (the tile's second half) and its own (the first half). On XLA:CPU
    this is about 4x faster to train than ``lax.conv_transpose`` and 9x faster to run.
    """
    s = stride
    b, h, w, c = z.shape
    o = kernel.shape[-1]
    # Tap (a, b) of the 2x2 conv reads position (m - 1 + a, n - 1 + b) for block (m, n), whose
    # tile quadrant there is (1 - a, 1 - b).
    taps = kernel.reshape(2, s, 2, s, c, o)[::-1, :, ::-1].transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, c, s * s * o)
    blocks = jax.lax.conv_general_dilated(z, taps, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_CONV_DIMS)
    blocks = blocks.reshape(b, h + 1, w + 1, s, s, o).transpose(0, 1, 3, 2, 4, 5)
    return blocks.reshape(b, (h + 1) * s, (w + 1) * s, o)


# ----------------------------------------------------------------------------------------------
# Fitting


def _as_float(image: np.ndarray, channels: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != channels:
        raise ValueError(f"expected [H, W, {channels}] images, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 127.5 - 1.0
    return image.astype(np.float32)


def image_pyramid(
    images: Iterable[np.ndarray], short_sides: Sequence[int], min_side: int, channels: int = 3
) -> list[np.ndarray]:
    """Every image (uint8 or float in [-1, 1], ``[H, W, C]``) downscaled so its short side is each
    of ``short_sides`` (bilinear with antialiasing, as the training pipeline resizes), never
    upscaled; float32 in [-1, 1]. Images with a short side under ``min_side`` are refused."""
    from PIL import Image

    out = []
    for image in images:
        image = np.asarray(image)
        h, w = image.shape[:2]
        if min(h, w) < min_side:
            raise ValueError(f"image {h}x{w} is smaller than the {min_side}-pixel crops")
        seen = set()
        for side in sorted(short_sides):
            scale = min(1.0, side / min(h, w))
            size = (max(min_side, round(h * scale)), max(min_side, round(w * scale)))
            if size in seen:
                continue
            seen.add(size)
            if size == (h, w):
                out.append(_as_float(image, channels))
                continue
            f = _as_float(image, channels)
            planes = [
                np.asarray(Image.fromarray(f[..., c]).resize(size[::-1], Image.Resampling.BILINEAR))
                for c in range(channels)
            ]
            out.append(np.stack(planes, axis=-1))
    if not out:
        raise ValueError("fitting needs at least one image")
    return out


def _random_crops(pyramid: list[np.ndarray], size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` crops ``[count, size, size, C]``: a uniform image, a uniform offset, a coin flip
    for a left-right mirror."""
    out = []
    for _ in range(count):
        image = pyramid[int(rng.integers(len(pyramid)))]
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        crop = image[top : top + size, left : left + size]
        out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return np.stack(out)


def fit_windowed_pca(
    pyramid: list[np.ndarray], config: ConvAutoencoderConfig, num_patches: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of windowed ``k x k`` patches: ``(mean [k*k*C], components [k*k*C, A], std [A])``
    (float64), components with a deterministic sign (largest-magnitude entry positive)."""
    k, a = config.kernel_size, config.analysis_channels
    window = sine_window(config).astype(np.float64)[:, :, None]
    dim = k * k * config.in_channels
    if num_patches < a:
        raise ValueError(f"{num_patches} patches cannot fit {a} components")
    total, outer = np.zeros(dim), np.zeros((dim, dim))
    for start in range(0, num_patches, 4096):
        n = min(4096, num_patches - start)
        patches = (_random_crops(pyramid, k, n, rng).astype(np.float64) * window).reshape(n, dim)
        total += patches.sum(axis=0)
        outer += patches.T @ patches
    mean = total / num_patches
    cov = outer / num_patches - np.outer(mean, mean)
    eigenvalues, vectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1][:a]
    components, variances = vectors[:, order], np.maximum(eigenvalues[order], 1e-12)
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(a)])
    return mean, components * signs, np.sqrt(variances)


def initial_params(
    module: ConvAutoencoder, mean: np.ndarray, components: np.ndarray, std: np.ndarray, rng: np.random.Generator
) -> dict[str, Any]:
    """The module's parameters (NumPy float32) as the windowed PCA: analysis = synthesis = the
    components, the head's output conv zero (so the latents are the first K coefficients, the
    head starts as a no-op that still gets gradients through its random input conv), scale =
    1 / std."""
    cfg = module.config
    k, c, a, K = cfg.kernel_size, cfg.in_channels, cfg.analysis_channels, cfg.latent_channels
    basis = components.reshape(k, k, c, a)
    # Drawn here, not by module.init: compiling flax's initializers takes ~8 s on XLA:CPU.
    head_in = rng.normal(size=(1, 1, a, cfg.head_channels)) / np.sqrt(a)  # LeCun normal
    params = {
        "analysis_kernel": basis,
        "analysis_bias": -mean @ components,
        "head_in": {"kernel": head_in, "bias": np.zeros(cfg.head_channels)},
        "head_out": {"kernel": np.zeros((3, 3, cfg.head_channels, K)), "bias": np.zeros(K)},
        "latent_shift": np.zeros(K),
        "latent_scale": 1.0 / std[:K],
        "synthesis_kernel": basis[..., :K].transpose(0, 1, 3, 2),
        "synthesis_bias": mean.reshape(k, k, c),
    }
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    probe = jnp.zeros((1, 2 * cfg.stride, 2 * cfg.stride, c), jnp.float32)
    want = jax.eval_shape(lambda: unboxed(module.init(jax.random.key(0), probe))["params"])
    assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(params)
    assert all(x.shape == y.shape for x, y in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(params)))
    return params


_FROZEN = ("latent_shift", "latent_scale")  # set from statistics, not by the optimizer


def fit_conv_autoencoder(
    images: Iterable[np.ndarray],
    config: ConvAutoencoderConfig = ConvAutoencoderConfig(),
    *,
    short_sides: Sequence[int] = (128, 160, 192, 256, 384),
    steps: int = 1000,
    batch_size: int = 16,
    crop_size: int = 64,
    learning_rate: float = 1e-3,
    pca_patches: int = 16384,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the parameters on images (``[H, W, 3]`` uint8, or float in [-1, 1]).

    The images are taken at each of ``short_sides`` (never upscaled: the demo trains at 128
    pixels, the codec may see larger images); the windowed PCA of ``pca_patches`` patches
    initialises the module, then ``steps`` Adam steps (warm-up, cosine decay) on the mean squared
    error of random ``crop_size`` crops train all but the shift and scale, which are then set so
    the latents of ``64 * batch_size`` crops have zero mean and unit variance per channel.

    Returns the ``params`` tree of ``ConvAutoencoder`` (NumPy arrays). Deterministic for a given
    ``seed`` on one machine; ``progress`` shows a bar on stderr.
    """
    import optax
    from tqdm import tqdm

    if crop_size % config.stride or crop_size < config.kernel_size:
        raise ValueError(f"crop_size {crop_size}: not a multiple of {config.stride} of at least {config.kernel_size}")
    module = ConvAutoencoder(config)
    rng = np.random.default_rng(seed)
    pyramid = image_pyramid(images, short_sides, crop_size, config.in_channels)
    mean, components, std = fit_windowed_pca(pyramid, config, pca_patches, rng)
    params = initial_params(module, mean, components, std, rng)
    frozen = {k: params[k] for k in _FROZEN}
    trainable = {k: v for k, v in params.items() if k not in _FROZEN}

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 10), max(steps, 2), end_value=0.05 * learning_rate
    )
    optimizer = optax.adam(schedule)

    @jax.jit
    def train_step(trainable, opt_state, batch):
        def loss_fn(t):
            return jnp.mean((module.apply({"params": {**t, **frozen}}, batch) - batch) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    opt_state = optimizer.init(trainable)
    bar = tqdm(range(steps), desc="fitting the conv autoencoder", disable=not progress)
    for step in bar:
        batch = jnp.asarray(_random_crops(pyramid, crop_size, batch_size, rng))
        trainable, opt_state, loss = train_step(trainable, opt_state, batch)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(psnr=f"{10 * math.log10(4.0 / max(float(loss), 1e-12)):.2f} dB")
    bar.close()

    raw = jax.jit(lambda t, x: module.apply({"params": {**t, **frozen}}, x, method="raw_latents"))
    sums, squares, count = 0.0, 0.0, 0
    for _ in range(64):
        z = np.asarray(raw(trainable, jnp.asarray(_random_crops(pyramid, crop_size, batch_size, rng))), np.float64)
        sums, squares, count = sums + z.sum((0, 1, 2)), squares + (z**2).sum((0, 1, 2)), count + z[..., 0].size
    shift = sums / count
    latent_std = np.sqrt(np.maximum(squares / count - shift**2, 1e-12))
    params = {k: jax.tree_util.tree_map(np.asarray, v) for k, v in trainable.items()}
    params["latent_shift"] = shift.astype(np.float32)
    params["latent_scale"] = (1.0 / latent_std).astype(np.float32)
    return params
