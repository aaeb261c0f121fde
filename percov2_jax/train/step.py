"""The stage-1 train step (rectified-flow loss through the MM-DiT, hyper-encoder and VQ), jitted
with explicit shardings.

All randomness of step ``n`` comes from ``fold_in(base_key, n)``, and JAX's partitionable
threefry makes random draws independent of the sharding, so a step gives the same result on one
device, on a mesh, across processes and after a restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from percov2_jax import flow
from percov2_jax import sharding as sharding_lib
from percov2_jax.train.state import StateSpec, TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Loss settings. Paper facts: caption dropout 0.1 (PerCoV2 slides). SD3 conventions (not
    stated for PerCoV2): logit-normal(0, 1) timesteps through the shift-3 sigma table."""

    caption_dropout: float = 0.1
    timestep_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 3.0
    discrete_timesteps: bool = True
    loss_weighting: str = "none"
    ema_decay: float = 0.0
    sample_posterior: bool = True  # draw z ~ q(z|x) from the VAE (SD3 scripts) instead of its mean
    learned_null_text: bool = False


def _split(key, n):
    return list(jax.random.split(key, n))


def make_train_step(
    model: nn.Module, latent_codec: nn.Module, spec: StateSpec, cfg: StepConfig, mesh: Mesh, frozen_shardings: Any
) -> Callable:
    """``step(state, batch, frozen, base_key) -> (state, metrics)``, jitted, the state donated.
    ``base_key`` is raw key data (``jax.random.key_data``), uint32.

    ``batch``: ``image [B, H, W, 3]`` float32 in [-1, 1], ``encoder_hidden_states [B, L, D]``,
    ``pooled_projections [B, P]``, all split over the batch axes of ``mesh``.
    ``frozen``: ``{"vae": latent-codec params, "null_text": ([1, L, D], [1, P]) or None}``.
    """

    def loss_and_updates(state: TrainState, batch, frozen, base_key):
        images = batch["image"]
        b = images.shape[0]
        k_vae, k_noise, k_sigma, k_drop, k_vq = _split(
            jax.random.fold_in(jax.random.wrap_key_data(base_key), state.step), 5
        )
        latents = latent_codec.apply(
            {"params": frozen["vae"]}, images, k_vae if cfg.sample_posterior else None, method="encode_to_latents"
        )
        latents = jax.lax.stop_gradient(latents.astype(jnp.float32))
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        sigmas = flow.sample_training_sigmas(
            k_sigma,
            b,
            scheme=cfg.timestep_scheme,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
            shift=cfg.shift,
            discrete=cfg.discrete_timesteps,
        )
        x_t = flow.noisy_latents(latents, noise, sigmas)
        target = flow.velocity_target(latents, noise)
        weights = flow.loss_weighting(sigmas, cfg.loss_weighting)
        drop = jax.random.bernoulli(k_drop, cfg.caption_dropout, (b,))

        def loss_fn(params):
            if cfg.learned_null_text:
                null_seq, null_pooled = model.apply({"params": params}, b, method="null_text_embeddings")
            else:
                null_seq, null_pooled = frozen["null_text"]
            text = jnp.where(drop[:, None, None], null_seq.astype(jnp.float32), batch["encoder_hidden_states"])
            pooled = jnp.where(drop[:, None], null_pooled.astype(jnp.float32), batch["pooled_projections"])
            (velocity, q), mutated = model.apply(
                {"params": params, "vq_stats": state.vq_stats},
                latents,
                x_t,
                text,
                pooled,
                sigmas * 1000.0,
                train=True,
                mutable=["vq_stats"],
                rngs={"vq": k_vq},
            )
            loss = flow.flow_matching_loss(velocity.astype(jnp.float32), target, weights)
            return loss, (mutated["vq_stats"], q)

        (loss, (vq_stats, q)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        trained = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda g, m: g if m else None, grads, spec.mask))
        grad_norm = optax.tree.norm(trained)
        updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            d = cfg.ema_decay
            ema = jax.tree_util.tree_map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, vq_stats=vq_stats, ema_params=ema
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": spec.schedule(state.step),
            "caption_dropped": jnp.mean(drop.astype(jnp.float32)),
        }
        metrics.update(q.metrics())
        return new_state, metrics

    def constrained_step(*args):
        with sharding_lib.activation_constraints(mesh):
            return loss_and_updates(*args)

    replicated = sharding_lib.replicated(mesh)
    bs = sharding_lib.batch_sharding(mesh)
    batch_shardings = {"image": bs, "encoder_hidden_states": bs, "pooled_projections": bs}
    return jax.jit(
        constrained_step,
        in_shardings=(spec.shardings, batch_shardings, frozen_shardings, replicated),
        out_shardings=(spec.shardings, replicated),
        donate_argnums=(0,),
    )
