"""SD3 rectified flow: the training objective and the Euler sampler with classifier-free guidance.

Convention (SD3, diffusers ``FlowMatchEulerDiscreteScheduler``): ``σ ∈ [0, 1]`` is the noise
level, ``x_σ = (1 − σ)·x0 + σ·ε``, the model predicts the velocity ``v = ε − x0`` and is called
with the timestep ``σ·1000``. Sampling runs ``σ`` from 1 down to 0 with
``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i, σ_i)``. The shift ``s`` (3.0 for SD3) warps a uniform
grid ``t`` to ``s·t / (1 + (s − 1)·t)``, spending more steps at high noise.

Training (what diffusers' SD3 training scripts do):
  ``sigmas = sample_training_sigmas(rng, B, scheme="logit_normal")``,
  ``x_t = noisy_latents(x0, noise, sigmas)``, ``v = model(x_t, sigmas * 1000, cond)``,
  ``loss = flow_matching_loss(v, velocity_target(x0, noise), loss_weighting(sigmas, "none"))``.
Sampling: ``sample(velocity_fn, initial_noise(rng, shape), cond, uncond, num_steps=28,
guidance_scale=3.0)``; the noise is the only randomness, so a fixed key gives a fixed result.

Schedules (``training_sigma_table``, ``euler_sigmas``) are host numpy constants computed with
diffusers' exact dtype path; everything else is a pure, jittable function of arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000  # SD3 scheduler config
SHIFT = 3.0  # SD3 scheduler config
DENSITY_SCHEMES = ("logit_normal", "uniform", "mode")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


# ----------------------------------------------------------------------------- schedules


def shift_sigmas(sigmas, shift: float):
    """``shift·σ / (1 + (shift − 1)·σ)``, elementwise; keeps the array type and float dtype of ``sigmas``
    (numpy float32 stays float32: the Python-float ``shift`` is a weak scalar)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_sigma_table(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = SHIFT) -> np.ndarray:
    """The scheduler's sigma table at construction: ``FlowMatchEulerDiscreteScheduler(shift=...).sigmas``.

    ``t = linspace(1, N, N)`` in float32, reversed; ``σ = shift_sigmas(t / N)``, all in float32.
    Returns numpy float32 ``[N]``, descending from 1.0 to ``shift_sigmas(1/N)``; the matching
    timesteps are ``table * N`` (float32).
    """
    t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
    return shift_sigmas(t / np.float32(num_train_timesteps), shift).astype(np.float32)


def euler_sigmas(
    num_steps: int, shift: float = SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[np.ndarray, np.ndarray]:
    """``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)``'s ``(sigmas, timesteps)``.

    diffusers' path, reproduced bit for bit: the endpoints are the float32 table's first and last
    entries (``1.0`` and ``shift_sigmas(1/N)``) widened to float64; ``linspace`` of ``σ·N`` between
    them, ``/ N`` and the shift run in **float64**; the result is rounded to float32 once; the
    timesteps are then ``σ_f32 · N`` in float32 (not the float64 ``linspace`` values).

    Returns numpy float32 ``sigmas [num_steps + 1]`` (descending, last entry exactly 0) and
    ``timesteps [num_steps]`` (``σ·N`` for the model).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    table = training_sigma_table(num_train_timesteps, shift)
    sigma_max, sigma_min = float(table[0]), float(table[-1])
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = shift_sigmas(t / num_train_timesteps, shift).astype(np.float32)
    timesteps = (sigmas * np.float32(num_train_timesteps)).astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


# ----------------------------------------------------------------------------- training


def density_from_draws(
    draws: jax.Array, *, scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29
) -> jax.Array:
    """``u ∈ [0, 1]`` from raw draws, as diffusers' ``compute_density_for_timestep_sampling``.

    ``draws`` float32 ``[B]``: standard normals for ``"logit_normal"`` (``u = sigmoid(mean + std·z)``),
    uniforms in ``[0, 1)`` for ``"uniform"`` (``u = draws``) and ``"mode"``
    (``u = 1 − d − mode_scale·(cos²(π·d/2) − 1 + d)``). Split from the sampling so tests can feed
    torch's draws. Returns float32 ``[B]``.
    """
    d = jnp.asarray(draws, jnp.float32)
    if scheme == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * d)
    if scheme == "uniform":
        return d
    if scheme == "mode":
        return 1 - d - mode_scale * (jnp.cos(math.pi * d / 2) ** 2 - 1 + d)
    raise ValueError(f"unknown timestep density scheme {scheme!r}; expected one of {DENSITY_SCHEMES}")


def sigmas_from_density(
    u: jax.Array, *, shift: float = SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, discrete: bool = True
) -> jax.Array:
    """Training noise levels ``σ`` float32 ``[B]`` from density samples ``u`` float32 ``[B]``.

    ``discrete=True`` is the diffusers SD3 scripts' index math: ``i = int(u·N)`` (truncation, in
    float32), ``σ = training_sigma_table()[i]``. The table descends, so ``σ ≈ shift_sigmas(1 − u)``:
    a positive ``logit_mean`` means *less* noise here. ``i`` is clipped to ``[0, N − 1]``; this only
    matters where diffusers would index out of range (``u = 1``: the ``"mode"`` scheme at draw 0).

    ``discrete=False``: ``σ = shift_sigmas(u)`` (the SD3 paper's convention: a positive
    ``logit_mean`` means *more* noise), with ``u`` clipped to ``[1/N, 1]`` so ``σ`` stays in the
    table's range ``[shift_sigmas(1/N), 1]`` and ``σ^-2`` weights stay finite.
    The two modes agree in distribution for every scheme symmetric about 1/2: ``"uniform"``,
    ``"mode"``, and ``"logit_normal"`` with ``logit_mean = 0``.
    """
    u = jnp.asarray(u, jnp.float32)
    if discrete:
        table = jnp.asarray(training_sigma_table(num_train_timesteps, shift))
        index = (u * jnp.float32(num_train_timesteps)).astype(jnp.int32)
        return table[jnp.clip(index, 0, num_train_timesteps - 1)]
    return shift_sigmas(jnp.clip(u, 1.0 / num_train_timesteps, 1.0), shift).astype(jnp.float32)


def sample_training_sigmas(
    rng: jax.Array,
    batch: int,
    *,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = SHIFT,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    discrete: bool = True,
) -> jax.Array:
    """Per-example training noise levels ``σ`` float32 ``[batch]`` in ``(0, 1]``.

    ``scheme`` ∈ ``DENSITY_SCHEMES`` picks the draw (``density_from_draws``); ``discrete`` picks the
    mapping (``sigmas_from_density``). The model timestep is ``σ · num_train_timesteps``.
    """
    if scheme == "logit_normal":
        draws = jax.random.normal(rng, (batch,), jnp.float32)
    elif scheme in DENSITY_SCHEMES:
        draws = jax.random.uniform(rng, (batch,), jnp.float32)
    else:
        raise ValueError(f"unknown timestep density scheme {scheme!r}; expected one of {DENSITY_SCHEMES}")
    u = density_from_draws(draws, scheme=scheme, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
    return sigmas_from_density(u, shift=shift, num_train_timesteps=num_train_timesteps, discrete=discrete)


def loss_weighting(sigmas: jax.Array, scheme: str = "none") -> jax.Array:
    """Per-example loss weights float32 (shape of ``sigmas``), as ``compute_loss_weighting_for_sd3``.

    ``"none"``: 1; ``"sigma_sqrt"``: ``σ^-2``; ``"cosmap"``: ``2 / (π·(1 − 2σ + 2σ²))``.
    (diffusers' ``train_dreambooth_sd3`` with ``--precondition_outputs`` compares ``x_t − σ·v`` with
    ``x0`` instead; that loss is this one with the weights multiplied by ``σ²``.)
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if scheme == "none":
        return jnp.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ValueError(f"unknown loss weighting scheme {scheme!r}; expected one of {WEIGHTING_SCHEMES}")


def _per_example(sigmas: jax.Array, ndim: int) -> jax.Array:
    """``[B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` axes (a scalar is left alone)."""
    sigmas = jnp.asarray(sigmas)
    return sigmas.reshape(sigmas.shape + (1,) * (ndim - sigmas.ndim)) if sigmas.ndim else sigmas


def noisy_latents(x0: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """``x_σ = (1 − σ)·x0 + σ·ε``. ``x0``, ``noise`` ``[B, H, W, C]``; ``sigmas`` ``[B]`` (or scalar).

    Computed in float32, returned in ``result_type(x0, noise)``.
    """
    dtype = jnp.result_type(x0, noise)
    s = _per_example(jnp.asarray(sigmas, jnp.float32), x0.ndim)
    return ((1 - s) * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(dtype)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The rectified-flow regression target ``ε − x0`` (shape and dtype of the inputs)."""
    return noise - x0


def flow_matching_loss(
    pred: jax.Array, target: jax.Array, weights: jax.Array | None = None, *, per_example: bool = False
) -> jax.Array:
    """``mean_b mean_{h,w,c} w_b·(pred − target)²`` in float32, as the diffusers SD3 scripts reduce it.

    ``pred``, ``target`` ``[B, ...]``; ``weights`` ``[B]`` (``loss_weighting``) or None for 1.
    Returns a float32 scalar, or the float32 ``[B]`` per-example losses with ``per_example=True``.
    """
    err = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    if weights is not None:
        err = _per_example(jnp.asarray(weights, jnp.float32), err.ndim) * err
    losses = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return losses if per_example else jnp.mean(losses)


# ----------------------------------------------------------------------------- sampling


def initial_noise(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """The sampler's starting point ``ε ~ N(0, I)`` (``shape`` = latent ``[B, H, W, C]``), float32.

    A decoder that regenerates it from the same key gets the same reconstruction. (It is not
    torch's ``randn`` stream: parity with diffusers needs the same noise array passed in.)
    """
    return jax.random.normal(rng, shape, dtype)


def euler_step(x: jax.Array, v: jax.Array, sigma, sigma_next) -> jax.Array:
    """One Euler step ``x + (σ_next − σ)·v`` in float32 (``scheduler.step`` with its defaults).

    ``x``, ``v`` ``[B, H, W, C]`` (``v`` may be bf16; it is widened first, where diffusers multiplies
    ``dt·v`` in the model dtype and rounds the result back to it); ``sigma``, ``sigma_next`` scalars
    or ``[B]``. Returns float32.
    """
    x = x.astype(jnp.float32)
    dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)
    return x + _per_example(dt, x.ndim) * v.astype(jnp.float32)


def _concat_batch(first: Any, second: Any) -> Any:
    """Concatenate two pytrees of batch-major arrays along axis 0 (same structure required)."""
    if jax.tree.structure(first) != jax.tree.structure(second):
        raise ValueError(
            "cond and uncond must be pytrees of the same structure: "
            f"{jax.tree.structure(second)} vs {jax.tree.structure(first)}"
        )
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), first, second)


def sample(
    velocity_fn: VelocityFn,
    noise: jax.Array,
    cond: Any,
    uncond: Any = None,
    *,
    num_steps: int,
    guidance_scale: float | jax.Array = 1.0,
    shift: float = SHIFT,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    return_trajectory: bool = False,
):
    """Euler sampling of the flow ODE from ``σ = 1`` (``noise``) to ``σ = 0`` with classifier-free guidance.

    Args:
      velocity_fn: ``(x [B', H, W, C] float32, timestep [B'] float32 (σ·N), cond pytree) -> v [B', H, W, C]``.
        Called once per step (traced once: the loop is a ``lax.scan`` over the constant
        ``euler_sigmas`` table, so no host round trips).
      noise: ``[B, H, W, C]``, the starting point; used in float32.
      cond, uncond: pytrees whose leaves have batch ``B`` on axis 0 (same structure). For PerCoV2 the
        hyper-latent tokens appear in both and only the caption embedding differs.
      num_steps: static number of Euler steps.
      guidance_scale: ``s`` in ``v = v_u + s·(v_c − v_u)``. A Python ``1.0`` runs the conditional
        branch alone (``uncond`` may be None); any other value needs ``uncond`` and runs both
        branches in ONE ``velocity_fn`` call on the batch ``[uncond; cond]`` (``2B``, diffusers'
        order). May be a traced scalar (then CFG is always on, and changing it does not
        recompile). The guidance mix is in float32. Unlike the diffusers pipeline (CFG only when
        ``s > 1``), ``s < 1`` is honoured: ``s = 0`` samples from the unconditional branch.
      shift, num_train_timesteps: the scheduler config (SD3: 3.0, 1000).
      return_trajectory: also return ``[num_steps + 1, B, H, W, C]``: the noise, then every ``x_{i+1}``.

    Returns the float32 latents ``x_0 [B, H, W, C]`` (and the trajectory). The state is carried in
    float32 whatever the model dtype (diffusers rounds it to the model dtype after each step).
    """
    use_cfg = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0)
    if use_cfg and uncond is None:
        raise ValueError("guidance_scale != 1 needs an unconditional pytree (uncond)")
    sigmas, timesteps = euler_sigmas(num_steps, shift, num_train_timesteps)
    x = jnp.asarray(noise).astype(jnp.float32)
    batch = x.shape[0]
    model_cond = _concat_batch(uncond, cond) if use_cfg else cond

    def step(x, schedule):
        timestep, sigma, sigma_next = schedule
        if use_cfg:
            v = velocity_fn(jnp.concatenate([x, x], axis=0), jnp.full((2 * batch,), timestep), model_cond)
            v_uncond, v_cond = v[:batch].astype(jnp.float32), v[batch:].astype(jnp.float32)
            v = v_uncond + jnp.asarray(guidance_scale, jnp.float32) * (v_cond - v_uncond)
        else:
            v = velocity_fn(x, jnp.full((batch,), timestep), model_cond)
        x = euler_step(x, v, sigma, sigma_next)
        return x, (x if return_trajectory else None)

    x, path = jax.lax.scan(step, x, (jnp.asarray(timesteps), jnp.asarray(sigmas[:-1]), jnp.asarray(sigmas[1:])))
    if return_trajectory:
        return x, jnp.concatenate([jnp.asarray(noise, jnp.float32)[None], path], axis=0)
    return x
