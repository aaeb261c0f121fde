"""Compress and decompress images with a trained stage-1 model: the Python API behind
``percov2 compress / decompress / info``.

  codec = Codec.from_workdir("/tmp/percov2_demo")           # a stage-1 training workdir
  data = codec.compress(Image.open("photo.jpg"), caption="a cat on a sofa")
  picture = codec.decompress(data)                            # uint8 [H, W, 3], original size

Encoder: image -> RGB -> padded (or resized) to multiples of 64 -> latent codec -> hyper-encoder
-> VQ indices -> token payload; the caption is coded by a caption coder; `bitstream.pack` wraps
both. Token coding here is uniform (log2 V bits per token, PerCo's baseline); the learned-prior
mode needs a stage-2 checkpoint (`percov2_jax.entropy.token_coding`).
Decoder: indices -> VQ features -> Euler sampler (caption-only CFG, fixed seed) -> latent
codec decode -> crop (or resize) back to the original size.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from percov2_jax import flow, rates
from percov2_jax.codec import bitstream
from percov2_jax.entropy import coder


@dataclasses.dataclass
class Codec:
    """A loaded stage-1 model. ``sample_steps`` / ``guidance_scale`` / ``seed`` set decoding."""

    config: Any
    model: Any
    params: Any
    vq_stats: Any
    latent_codec: Any
    vae_params: Any
    text: Any
    model_id: int
    sample_steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, **decode_options) -> "Codec":
        """Load the latest (or ``step``) checkpoint of a stage-1 training run on one device."""
        from percov2_jax import sharding as sharding_lib
        from percov2_jax.train import checkpointing, components
        from percov2_jax.train.state import build_state_spec, replicate
        from percov2_jax.train.text import build_text_conditioner

        directory = os.path.join(workdir, "checkpoints")
        config = ml_collections.ConfigDict(checkpointing.read_config(directory, step))
        mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        rate = components.validate_config(config, process_count=1)
        model = components.build_model(config, rate)
        text = build_text_conditioner(config.text, model.config.transformer, config.pretrained.checkpoint)
        if config.vae.kind == "patch_pca" and not os.path.exists(os.path.join(workdir, "patch_autoencoder.npz")):
            raise FileNotFoundError(f"{workdir}: patch_autoencoder.npz (the run's latent codec) is missing")
        latent_codec, vae_params = components.build_latent_codec(config, None, workdir, mesh=mesh)
        text_length = int(np.asarray(text.null_embeddings()[0]).shape[1])
        spec = build_state_spec(model, components.init_inputs(model, rate, text_length), config.optim, mesh,
                                ema=float(config.optim.ema_decay) > 0)
        manager = checkpointing.make_manager(directory, async_save=False)
        try:
            _, state = checkpointing.restore(manager, spec.abstract, spec.shardings, None, step)
        finally:
            manager.close()
        params = state.ema_params if state.ema_params is not None else state.params
        sample = config.sample
        options = dict(sample_steps=int(sample.num_steps), guidance_scale=float(sample.guidance_scale))
        options.update(decode_options)
        return cls(config, model, params, state.vq_stats, latent_codec, replicate(vae_params, mesh), text,
                   model_fingerprint(config), **options)

    @property
    def rate(self) -> rates.BitRate:
        return rates.get_rate(self.config.rate)

    # ------------------------------------------------------------------ encoder

    def tokens(self, image) -> tuple[np.ndarray, tuple[int, int], str | None]:
        """RGB uint8 ``[H, W, 3]`` (or a PIL image) -> ``(indices [h, w], (H, W), resize policy)``."""
        pixels = _rgb(image)
        h, w = pixels.shape[:2]
        policy = None if (h % rates.IMAGE_MULTIPLE == 0 and w % rates.IMAGE_MULTIPLE == 0) else "pad"
        ch, cw = bitstream.coded_size(h, w, policy)
        padded = np.pad(pixels, ((0, ch - h), (0, cw - w), (0, 0)), mode="edge")
        x = jnp.asarray(padded[None], jnp.float32) / 127.5 - 1.0
        indices = _encode(self.model, self.latent_codec, self.params, self.vq_stats, self.vae_params, x)
        return np.asarray(indices[0]), (h, w), policy

    def compress(self, image, caption: str = "", caption_coder: str = "zlib") -> bytes:
        """One image to a .pcv2 byte string (uniform token coding)."""
        from percov2_jax.captions import get_coder

        indices, (h, w), policy = self.tokens(image)
        token_bytes = coder.encode_uniform(indices.reshape(-1), self.rate.codebook_size)
        header = bitstream.StreamHeader(model_id=self.model_id, height=h, width=w, rate=self.config.rate,
                                        entropy_mode="uniform", resize_policy=policy, caption_coder=caption_coder)
        return bitstream.pack(bitstream.CompressedImage(header, get_coder(caption_coder).encode(caption), token_bytes))

    # ------------------------------------------------------------------ decoder

    def decompress(self, data: bytes, *, seed: int | None = None) -> np.ndarray:
        """A .pcv2 byte string to uint8 ``[H, W, 3]`` at the original size."""
        stream = bitstream.unpack(data, expected_model_id=self.model_id)
        header = stream.header
        if header.rate != self.config.rate:
            raise bitstream.BitstreamError("field", f"stream rate {header.rate!r} but the model codes {self.config.rate!r}")
        if header.entropy_mode != "uniform":
            raise NotImplementedError("prior-coded streams need a stage-2 prior checkpoint (not loaded)")
        rows, cols = header.token_grid
        try:
            indices = coder.decode_uniform(stream.token_bytes, rows * cols, self.rate.codebook_size)
        except coder.CodingError as e:
            raise bitstream.BitstreamError("field", f"token payload: {e}") from None
        caption = stream.caption()
        seq, pooled = self.text([caption])
        null_seq, null_pooled = self.text.null_embeddings()
        key = jax.random.key(self.seed if seed is None else seed)
        image = _decode(self.model, self.latent_codec, self.params, self.vq_stats, self.vae_params,
                        jnp.asarray(indices.reshape(1, rows, cols)), jnp.asarray(seq), jnp.asarray(pooled),
                        jnp.asarray(null_seq), jnp.asarray(null_pooled), key, self.sample_steps,
                        float(self.guidance_scale))
        pixels = np.asarray(jnp.clip((image[0] + 1.0) * 127.5, 0, 255).round().astype(jnp.uint8))
        return pixels[: header.height, : header.width]


def model_fingerprint(config) -> int:
    """24-bit id of everything a decoder must share with the encoder: rate, model and codec."""
    keep = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
            for k in ("rate", "model", "vae", "text") if k in config}
    return bitstream.model_fingerprint(json.dumps(keep, sort_keys=True, default=str))


def _rgb(image) -> np.ndarray:
    from percov2_jax.data.sources import array_to_rgb, to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(image)
    return array_to_rgb(np.asarray(image))


@jax.jit(static_argnums=(0, 1))
def _encode(model, latent_codec, params, vq_stats, vae_params, images):
    latents = latent_codec.apply({"params": vae_params}, images, None, method="encode_to_latents")
    q = model.apply({"params": params, "vq_stats": vq_stats}, latents.astype(jnp.float32), method="hyper_latent_tokens")
    return q.indices


@jax.jit(static_argnums=(0, 1, 11, 12))
def _decode(model, latent_codec, params, vq_stats, vae_params, indices, seq, pooled, null_seq, null_pooled, key,
            num_steps, guidance_scale):
    variables = {"params": params, "vq_stats": vq_stats}
    features = model.apply(variables, indices, method="token_features")
    f = model.config.hyper_encoder
    cells = f.latent_side // f.hyper_side
    b, rows, cols = indices.shape
    shape = (b, rows * cells, cols * cells, model.config.latent_channels)

    def velocity(x, t, c):
        return model.apply(variables, x, c["features"], c["text"], c["pooled"], t, method="velocity").astype(jnp.float32)

    cond = {"features": features, "text": seq, "pooled": pooled}
    uncond = {"features": features, "text": null_seq, "pooled": null_pooled}
    latents = flow.sample(velocity, jax.random.normal(key, shape, jnp.float32), cond, uncond, num_steps=num_steps,
                          guidance_scale=guidance_scale)
    return latent_codec.apply({"params": vae_params}, latents, method="decode_latents").astype(jnp.float32)
