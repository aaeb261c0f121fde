"""The codec's two networks as jitted functions of arrays: the encoder (image -> token indices)
and the decoder (token indices + caption embeddings -> image).

Used by `percov2_jax.codec.api.Codec`, by stage-1 training for its reconstruction grids, by
stage-2 training to make token maps, and by the planner to compile the decoder. The model and
the latent codec are static arguments (flax modules are hashable); everything else is traced.
While `percov2_jax.compilation_cache` keeps executables (the ``percov2`` commands), both come
from its store: a second process neither traces nor compiles them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from percov2_jax import flow
from percov2_jax.compilation_cache import stored
from percov2_jax.sharding import constrain_batch


@stored(static_argnums=(0, 1))
@jax.jit(static_argnums=(0, 1))
def encode_tokens(model, latent_codec, params, vq_stats, codec_params, images: jax.Array) -> jax.Array:
    """Images ``[B, H, W, 3]`` float32 in [-1, 1] (sides multiples of 64) -> VQ indices ``[B, h, w]``
    int32: latent codec, hyper-encoder, nearest codebook entry."""
    latents = latent_codec.apply({"params": codec_params}, images, None, method="encode_to_latents")
    q = model.apply({"params": params, "vq_stats": vq_stats}, latents.astype(jnp.float32), method="hyper_latent_tokens")
    return q.indices


def sample_latents(
    model,
    params,
    vq_stats,
    indices,
    seq,
    pooled,
    null_text,
    key_data,
    num_steps: int,
    guidance_scale: float,
    shift: float = flow.SHIFT,
) -> jax.Array:
    """Token indices ``[B, h, w]`` + caption embeddings ``seq [B, L, D]``, ``pooled [B, P]`` -> sampled
    latents ``[B, H, W, C]`` float32: Euler steps with classifier-free guidance on the caption only
    (the token features are in both branches). ``null_text``: the unconditional caption
    ``([1, L, D], [1, P])``, or None for the model's learned one; ``key_data``: raw key bits
    (``jax.random.key_data``) of the starting noise. Traced inside `decode_tokens`."""
    variables = {"params": params, "vq_stats": vq_stats}
    features = model.apply(variables, indices, method="token_features")
    f = model.config.hyper_encoder
    cells = f.latent_side // f.hyper_side
    b, rows, cols = indices.shape
    shape = (b, rows * cells, cols * cells, model.config.latent_channels)
    if null_text is None:
        null_text = model.apply({"params": params}, 1, method="null_text_embeddings")
    null_seq, null_pooled = null_text

    def velocity(x, t, c):
        return model.apply(variables, x, c["features"], c["text"], c["pooled"], t, method="velocity").astype(
            jnp.float32
        )

    cond = {"features": features, "text": seq, "pooled": pooled}
    uncond = {
        "features": features,
        "text": jnp.broadcast_to(null_seq, seq.shape).astype(seq.dtype),
        "pooled": jnp.broadcast_to(null_pooled, pooled.shape).astype(pooled.dtype),
    }
    # Every row starts from the noise of a one-image decode: a batch decodes each stream as a
    # one-image call does, whatever its neighbours.
    key = jax.random.wrap_key_data(key_data)
    noise = constrain_batch(jnp.broadcast_to(jax.random.normal(key, (1,) + shape[1:], jnp.float32), shape))
    return flow.sample(velocity, noise, cond, uncond, num_steps=num_steps, guidance_scale=guidance_scale, shift=shift)


@stored(static_argnums=(0, 1, 10, 11, 12))
@jax.jit(static_argnums=(0, 1, 10, 11, 12))
def decode_tokens(
    model,
    latent_codec,
    params,
    vq_stats,
    codec_params,
    indices,
    seq,
    pooled,
    null_text: Any,
    key_data,
    num_steps: int,
    guidance_scale: float,
    shift: float = flow.SHIFT,
) -> jax.Array:
    """`sample_latents` then the latent codec's decoder: images ``[B, H, W, 3]`` float32, about
    [-1, 1] (not clipped)."""
    latents = sample_latents(
        model, params, vq_stats, indices, seq, pooled, null_text, key_data, num_steps, guidance_scale, shift
    )
    return latent_codec.apply({"params": codec_params}, constrain_batch(latents), method="decode_latents").astype(
        jnp.float32
    )
