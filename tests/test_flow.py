"""Rectified flow and the Euler/CFG sampler (``percov2_jax.flow``) against diffusers.

References (diffusers, installed): ``FlowMatchEulerDiscreteScheduler`` (construction, ``set_timesteps``,
``step``, ``scale_noise``), ``training_utils.compute_density_for_timestep_sampling`` and
``compute_loss_weighting_for_sd3``, and the SD3 training scripts' index math and loss reduction
(``train_dreambooth_sd3.py``, quoted where used) and ``StableDiffusion3Pipeline``'s CFG loop.
Each test states its tolerance; schedules are required to be bit-exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from percov2_jax import flow

pytestmark = pytest.mark.parity  # against PyTorch reference models

STEPS = (1, 2, 5, 20, 28, 50)
SHIFTS = (1.0, 3.0)
B, H, W, C = 2, 4, 4, 3


def _max_rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("shift", SHIFTS)
def test_training_sigma_table_equals_scheduler_init(shift):
    """Reference: ``FlowMatchEulerDiscreteScheduler(shift=s).sigmas`` / ``.timesteps`` at construction. Exact."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    table = flow.training_sigma_table(1000, shift)
    assert table.dtype == np.float32 and table.shape == (1000,)
    np.testing.assert_array_equal(table, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(table * np.float32(1000), scheduler.timesteps.numpy())


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_euler_sigmas_equal_set_timesteps(num_steps, shift):
    """Reference: ``FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n)`` sigmas and timesteps.
    Exact (0 ulp): the float64 linspace/shift path is reproduced, then rounded to float32 once."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    sigmas, timesteps = flow.euler_sigmas(num_steps, shift)
    assert sigmas.dtype == timesteps.dtype == np.float32
    assert sigmas.shape == (num_steps + 1,) and timesteps.shape == (num_steps,) and sigmas[-1] == 0
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())


def test_euler_step_equals_scheduler_step():
    """Reference: one ``scheduler.step(v, t, x)`` at step 7 of 28 (shift 3) on random float32 tensors.
    Tolerance: max |ours − ref| <= 1e-6."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(28)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H, W, C)).astype(np.float32)
    v = rng.standard_normal((B, H, W, C)).astype(np.float32)
    ref = scheduler.step(torch.from_numpy(v), scheduler.timesteps[7], torch.from_numpy(x)).prev_sample.numpy()
    sigmas, _ = flow.euler_sigmas(28, 3.0)
    ours = flow.euler_step(jnp.asarray(x), jnp.asarray(v), sigmas[7], sigmas[8])
    assert ours.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-6


# ----------------------------------------------------------------------------- sampling


def _toy_velocity_torch(x, t, cond):
    """v = 0.5·x − 0.3·(t/1000)·x + 0.7·(t/1000) + caption·(1 − t/1000) + 0.1·tokens (channels-last)."""
    s = (t / 1000.0)[:, None, None, None]
    return 0.5 * x - 0.3 * s * x + 0.7 * s + cond["caption"][:, None, None, :] * (1 - s) + 0.1 * cond["tokens"]


CALLS: list[int] = []  # batch size seen by each *trace* of the JAX toy velocity


def _toy_velocity_jax(x, t, cond):
    """The same function as ``_toy_velocity_torch``; appends the batch it was traced with to ``CALLS``."""
    CALLS.append(x.shape[0])
    s = (t / 1000.0)[:, None, None, None]
    return 0.5 * x - 0.3 * s * x + 0.7 * s + cond["caption"][:, None, None, :] * (1 - s) + 0.1 * cond["tokens"]


def _toy_inputs(seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((B, H, W, C)).astype(np.float32)
    tokens = rng.standard_normal((B, H, W, C)).astype(np.float32)
    cond = {"caption": rng.standard_normal((B, C)).astype(np.float32), "tokens": tokens}
    uncond = {"caption": rng.standard_normal((B, C)).astype(np.float32), "tokens": tokens}  # tokens kept
    return noise, cond, uncond


def _diffusers_loop(noise, cond, uncond, num_steps, guidance_scale, shift):
    """StableDiffusion3Pipeline's denoising loop with the toy model: [uncond; cond] batch, chunk, mix, step."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    latents = torch.from_numpy(noise)
    cond_t = {k: torch.from_numpy(v) for k, v in cond.items()}
    both_t = {k: torch.cat([torch.from_numpy(uncond[k]), cond_t[k]]) for k in cond}
    for t in scheduler.timesteps:
        if guidance_scale != 1.0:
            v = _toy_velocity_torch(torch.cat([latents] * 2), t.expand(2 * B), both_t)
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            v = _toy_velocity_torch(latents, t.expand(B), cond_t)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return latents.numpy()


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [5, 28])
def test_sample_matches_diffusers_loop(num_steps, guidance_scale):
    """Reference: diffusers' scheduler loop with manual CFG (``_diffusers_loop``), same noise and toy model.
    Tolerance: max |ours − ref| <= 1e-5 · max |ref|. Also: velocity_fn traced exactly once, with batch
    2B under CFG (both branches in one call) and B without."""
    noise, cond, uncond = _toy_inputs()
    ref = _diffusers_loop(noise, cond, uncond, num_steps, guidance_scale, 3.0)
    CALLS.clear()
    ours = flow.sample(
        _toy_velocity_jax,
        jnp.asarray(noise),
        cond,
        uncond,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        shift=3.0,
    )
    assert CALLS == [2 * B if guidance_scale != 1.0 else B]
    assert ours.dtype == jnp.float32 and ours.shape == (B, H, W, C)
    err = _max_rel(ours, ref)
    assert err <= 1e-5, err


def test_sample_trajectory_and_checks():
    """The trajectory starts at the noise and ends at the returned latents; CFG without uncond raises;
    a bf16 model still gives a float32 state."""
    noise, cond, uncond = _toy_inputs()
    final, path = flow.sample(
        _toy_velocity_jax, jnp.asarray(noise), cond, uncond, num_steps=4, guidance_scale=2.0, return_trajectory=True
    )
    assert path.shape == (5, B, H, W, C)
    np.testing.assert_array_equal(path[0], noise)
    np.testing.assert_array_equal(path[-1], final)
    with pytest.raises(ValueError, match="uncond"):
        flow.sample(_toy_velocity_jax, jnp.asarray(noise), cond, None, num_steps=2, guidance_scale=3.0)
    bf16 = lambda x, t, c: _toy_velocity_jax(x.astype(jnp.bfloat16), t, c).astype(jnp.bfloat16)
    out = flow.sample(bf16, jnp.asarray(noise), cond, uncond, num_steps=3, guidance_scale=3.0)
    assert out.dtype == jnp.float32


# One module-level jitted sampler: the same compiled program serves every call of the same shapes.
_SAMPLE_JIT = jax.jit(
    functools.partial(flow.sample, _toy_velocity_jax), static_argnames=("num_steps", "guidance_scale")
)


def test_jitted_sample_compiles_once_and_is_deterministic():
    """Repeated calls with the same shapes trace (and compile) once; the same key gives bitwise the same
    latents; a traced guidance scale matches the static one (<= 1e-6 relative) without retracing."""
    _, cond, uncond = _toy_inputs()
    CALLS.clear()
    outs = [
        _SAMPLE_JIT(
            flow.initial_noise(jax.random.key(seed), (B, H, W, C)), cond, uncond, num_steps=3, guidance_scale=3.0
        )
        for seed in (0, 1, 0)
    ]
    assert CALLS == [2 * B]
    np.testing.assert_array_equal(outs[0], outs[2])
    assert not np.array_equal(outs[0], outs[1])

    traced = jax.jit(functools.partial(flow.sample, _toy_velocity_jax, num_steps=3))
    noise = flow.initial_noise(jax.random.key(0), (B, H, W, C))
    CALLS.clear()
    a = traced(noise, cond, uncond, guidance_scale=jnp.float32(3.0))
    traced(noise, cond, uncond, guidance_scale=jnp.float32(5.0))
    assert CALLS == [2 * B]
    assert _max_rel(a, outs[0]) <= 1e-6


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_training_sigmas_equal_diffusers_index_math(scheme):
    """Reference: ``compute_density_for_timestep_sampling`` (torch generator) then the SD3 scripts'
    ``indices = (u * N).long(); timesteps = scheduler.timesteps[indices]``, σ looked up by timestep
    (``get_sigmas``). Our density from torch's own draws: |u_ours − u_ref| <= 2.4e-7 (2 ulp at 1;
    torch.normal's mean + std·z may round differently). σ from the reference u: exact."""
    batch, logit_mean, logit_std = 4096, (0.3 if scheme == "logit_normal" else 0.0), 0.8
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u_ref = compute_density_for_timestep_sampling(
        scheme, batch, logit_mean, logit_std, 1.29, generator=torch.Generator().manual_seed(0)
    )
    gen = torch.Generator().manual_seed(0)
    draws = torch.randn(batch, generator=gen) if scheme == "logit_normal" else torch.rand(batch, generator=gen)
    u_ours = flow.density_from_draws(
        jnp.asarray(draws.numpy()), scheme=scheme, logit_mean=logit_mean, logit_std=logit_std, mode_scale=1.29
    )
    assert np.max(np.abs(np.asarray(u_ours) - u_ref.numpy())) <= 2.4e-7

    indices = (u_ref * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas_ref = scheduler.sigmas[step_indices].numpy()
    sigmas = flow.sigmas_from_density(jnp.asarray(u_ref.numpy()), shift=3.0, discrete=True)
    assert sigmas.dtype == jnp.float32
    np.testing.assert_array_equal(sigmas, sigmas_ref)


@pytest.mark.parametrize("discrete", [True, False])
@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_training_sigmas_range_and_distribution(scheme, discrete):
    """All σ in (0, 1] and finite σ^-2; for these schemes (symmetric about 1/2) discrete and continuous
    mappings agree in mean (|Δ| <= 3e-3 at 200k draws); the logit-normal u has mean 0.5 (|Δ| <= 2e-3)."""
    key = jax.random.key(1)
    sigmas = np.asarray(flow.sample_training_sigmas(key, 200_000, scheme=scheme, discrete=discrete))
    assert sigmas.dtype == np.float32
    assert np.all(sigmas > 0) and np.all(sigmas <= 1)
    assert np.all(np.isfinite(flow.loss_weighting(sigmas, "sigma_sqrt")))
    other = np.asarray(flow.sample_training_sigmas(key, 200_000, scheme=scheme, discrete=not discrete))
    assert abs(sigmas.mean() - other.mean()) <= 3e-3
    if scheme == "logit_normal":
        u = flow.density_from_draws(jax.random.normal(key, (200_000,)), scheme=scheme)
        assert abs(float(u.mean()) - 0.5) <= 2e-3


def test_density_edges_and_logit_mean_direction():
    """Edges: u = 1 (the "mode" scheme at draw 0, where diffusers would index out of range) maps to the
    table's last σ; u = 0 to σ = 1 (discrete) / σ_min (continuous). A positive logit_mean means less
    noise in diffusers' discrete mapping and more in the continuous (SD3 paper) one."""
    table = flow.training_sigma_table()
    u = flow.density_from_draws(jnp.zeros(1), scheme="mode")
    assert float(u[0]) == 1.0
    assert float(flow.sigmas_from_density(u)[0]) == table[-1]
    assert float(flow.sigmas_from_density(jnp.zeros(1))[0]) == 1.0
    assert float(flow.sigmas_from_density(jnp.zeros(1), discrete=False)[0]) == pytest.approx(table[-1], rel=1e-6)
    key = jax.random.key(2)
    kw = dict(scheme="logit_normal", logit_mean=1.0)
    centred = float(flow.sample_training_sigmas(key, 50_000, scheme="logit_normal").mean())
    assert float(flow.sample_training_sigmas(key, 50_000, discrete=True, **kw).mean()) < centred - 0.05
    assert float(flow.sample_training_sigmas(key, 50_000, discrete=False, **kw).mean()) > centred + 0.05
    with pytest.raises(ValueError):
        flow.sample_training_sigmas(key, 2, scheme="cosmap")


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_equals_diffusers(scheme):
    """Reference: ``compute_loss_weighting_for_sd3(scheme, sigmas)`` on the shift-3 table plus random σ.
    Tolerance: max relative error <= 1e-6."""
    sigmas = np.concatenate(
        [flow.training_sigma_table(), np.random.default_rng(0).uniform(1e-3, 1, 256).astype(np.float32)]
    )
    ref = compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sigmas)).numpy()
    ours = np.asarray(flow.loss_weighting(jnp.asarray(sigmas), scheme))
    assert ours.dtype == np.float32
    assert np.max(np.abs(ours - ref) / np.abs(ref)) <= 1e-6
    with pytest.raises(ValueError):
        flow.loss_weighting(jnp.asarray(sigmas), "logit_normal")


def test_noisy_latents_target_and_loss():
    """``noisy_latents`` vs ``scheduler.scale_noise`` at three inference timesteps (<= 1e-6 abs);
    the loss vs the SD3 script's reduction
    ``torch.mean((w * (pred - target) ** 2).reshape(B, -1), 1).mean()`` (<= 1e-6 relative)."""
    rng = np.random.default_rng(0)
    x0, noise, pred = (rng.standard_normal((3, H, W, C)).astype(np.float32) for _ in range(3))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(20)
    picks = [0, 5, 11]
    ref = scheduler.scale_noise(torch.from_numpy(x0), scheduler.timesteps[picks], torch.from_numpy(noise)).numpy()
    sigmas = jnp.asarray(scheduler.sigmas[picks].numpy())
    x_t = flow.noisy_latents(jnp.asarray(x0), jnp.asarray(noise), sigmas)
    assert np.max(np.abs(np.asarray(x_t) - ref)) <= 1e-6

    target = flow.velocity_target(jnp.asarray(x0), jnp.asarray(noise))
    np.testing.assert_array_equal(target, noise - x0)
    weights = flow.loss_weighting(sigmas, "cosmap")
    w_t = torch.from_numpy(np.array(weights))[:, None, None, None]
    ref_loss = torch.mean((w_t * (torch.from_numpy(pred) - torch.from_numpy(noise - x0)) ** 2).reshape(3, -1), 1)
    loss = flow.flow_matching_loss(jnp.asarray(pred), target, weights)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert abs(float(loss) - float(ref_loss.mean())) <= 1e-6 * float(ref_loss.mean())
    per_example = flow.flow_matching_loss(jnp.asarray(pred), target, weights, per_example=True)
    assert _max_rel(per_example, ref_loss.numpy()) <= 1e-6
