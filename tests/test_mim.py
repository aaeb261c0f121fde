"""The MIM prior (percov2_jax/entropy/mim.py): shapes on any grid, exact independence from
unrevealed tokens, training masks, cross-entropy in bits against NumPy, a short training run on
structured synthetic tokens, schedule code lengths, hybrid completion and caption conditioning.

A tiny model (V = 16, width 32, 2 layers, 2 heads); jitted functions are shared through
module-scoped fixtures because compiles dominate the run time on 2 CPU cores.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from percov2_jax.entropy import mim, schedules
from percov2_jax.sharding import LOGICAL_AXIS_RULES

V = 16
TINY = dict(vocab_size=V, width=32, num_layers=2, num_heads=2)
CAPTION_DIM = 8


@pytest.fixture(scope="module")
def model():
    return mim.MaskedTokenPrior(mim.MIMConfig(**TINY))


@pytest.fixture(scope="module")
def boxed_params(model):
    return mim.init_params(model, jax.random.key(0))


@pytest.fixture(scope="module")
def params(boxed_params):
    return nn.unbox(boxed_params)


@pytest.fixture(scope="module")
def apply(model):
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def caption_model():
    return mim.MaskedTokenPrior(mim.MIMConfig(**TINY, caption_dim=CAPTION_DIM))


@pytest.fixture(scope="module")
def caption_params(caption_model):
    return nn.unbox(mim.init_params(caption_model, jax.random.key(1)))


@pytest.fixture(scope="module")
def caption_apply(caption_model):
    return jax.jit(caption_model.apply)


def block_tokens(rng: np.random.Generator, batch: int, side: int = 8) -> np.ndarray:
    """Synthetic token maps: a uniform random code per 2x2 block (entropy 1 bit per token)."""
    coarse = rng.integers(0, V, (batch, side // 2, side // 2))
    return np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2).astype(np.int32)


def random_tokens(seed: int, shape) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, V, jnp.int32)


# --------------------------------------------------------------------------------------------
# Config and parameters


def test_config_round_trip_and_validation():
    cfg = mim.MIMConfig(**TINY, caption_dim=CAPTION_DIM)
    d = cfg.to_dict()
    assert d["_class_name"] == "MaskedTokenPrior"
    assert mim.MIMConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown"):
        mim.MIMConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="divisible"):
        mim.MIMConfig(vocab_size=16, width=30, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="caption_dim"):
        mim.MIMConfig(**TINY, caption_dim=0)


def test_every_parameter_has_known_logical_axes(boxed_params):
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    leaves = jax.tree_util.tree_leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= known, leaf.names


# --------------------------------------------------------------------------------------------
# Forward pass


@pytest.mark.parametrize("height,width", [(8, 8), (12, 8)])
def test_output_shape_and_dtype_on_any_grid(apply, params, height, width):
    tokens = random_tokens(0, (2, height, width))
    revealed = jax.random.bernoulli(jax.random.key(1), 0.5, (2, height, width))
    logits = apply({"params": params}, tokens, revealed, None)
    assert logits.shape == (2, height, width, V)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_grid_larger_than_max_side_is_refused(model, params):
    tokens = jnp.zeros((1, 65, 8), jnp.int32)
    with pytest.raises(ValueError, match="max_side"):
        model.apply({"params": params}, tokens, jnp.zeros_like(tokens, bool), None)


def test_unrevealed_token_values_do_not_change_logits(apply, params):
    tokens = random_tokens(2, (2, 8, 8))
    revealed = jax.random.bernoulli(jax.random.key(3), 0.4, (2, 8, 8))
    other = jnp.where(revealed, tokens, (tokens + 1 + random_tokens(4, (2, 8, 8)) % (V - 1)) % V)
    assert bool(jnp.any(other != tokens))
    a = apply({"params": params}, tokens, revealed, None)
    b = apply({"params": params}, other, revealed, None)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Changing one revealed token does change the logits (everywhere, through attention).
    r, c = np.argwhere(np.asarray(revealed[0]))[0]
    changed = tokens.at[0, r, c].set((tokens[0, r, c] + 1) % V)
    d = apply({"params": params}, changed, revealed, None)
    assert float(jnp.max(jnp.abs(d[0] - a[0]))) > 1e-4
    np.testing.assert_array_equal(np.asarray(d[1]), np.asarray(a[1]))  # the other image is untouched


# --------------------------------------------------------------------------------------------
# Training helpers


def test_uniform_masks_fraction_in_range():
    b, h, w = 4000, 8, 8
    revealed = np.asarray(mim.sample_training_masks(jax.random.key(0), b, h, w, "uniform"))
    assert revealed.shape == (b, h, w) and revealed.dtype == bool
    frac = 1.0 - revealed.reshape(b, -1).mean(axis=1)
    assert frac.min() >= 0.05 and frac.max() <= 0.99
    assert frac.min() == 4 / 64 and frac.max() == 63 / 64  # ceil(0.05 N) and floor(0.99 N) are reached
    assert abs(frac.mean() - 0.52) < 0.02  # U[0.05, 0.99] has mean 0.52
    # Roughly uniform: each quarter of [0.05, 0.99] holds about a quarter of the images.
    counts = np.histogram(frac, bins=4, range=(0.05, 0.99))[0] / b
    np.testing.assert_allclose(counts, 0.25, atol=0.04)
    # Positions are masked uniformly.
    np.testing.assert_allclose(1.0 - revealed.mean(axis=0), 0.52, atol=0.05)


def test_cosine_masks_follow_maskgit_distribution():
    b, n = 8000, 64
    revealed = np.asarray(mim.sample_training_masks(jax.random.key(1), b, 8, 8, "cosine"))
    masked = n - revealed.reshape(b, -1).sum(axis=1)
    assert masked.min() >= 1 and masked.max() <= n
    # m = ceil(cos(pi u / 2) N): P(m <= j) = P(cos(pi u / 2) <= j / N) = 1 - 2 arccos(j / N) / pi.
    j = np.arange(1, n + 1)
    empirical = (masked[:, None] <= j[None]).mean(axis=0)
    expected = 1.0 - 2.0 * np.arccos(j / n) / np.pi
    assert np.max(np.abs(empirical - expected)) < 0.02
    assert abs(masked.mean() / n - 2 / np.pi) < 0.02  # E[cos(pi u / 2)] = 2 / pi (+ ceil's ~1/2N)


def test_unknown_mask_scheme_raises():
    with pytest.raises(ValueError, match="scheme"):
        mim.sample_training_masks(jax.random.key(0), 1, 8, 8, "linear")


def test_masked_cross_entropy_bits_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5, V)).astype(np.float32) * 3
    tokens = rng.integers(0, V, (3, 4, 5))
    revealed = rng.random((3, 4, 5)) < 0.4
    mean, per_image = mim.masked_cross_entropy_bits(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(revealed))

    x = logits.astype(np.float64)
    log_probs = x - x.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    bits = -np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0] / np.log(2)
    bits = np.where(revealed, 0.0, bits)
    np.testing.assert_allclose(np.asarray(per_image), bits.sum(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(float(mean), bits.sum() / (~revealed).sum(), rtol=1e-5)


def block_training_optimum(n: int = 64) -> float:
    """The best achievable training loss on ``block_tokens`` with uniform 5-99 % masks.

    A masked token costs 4 bits if the other 3 tokens of its block are masked too, else 0. With
    ``m`` of ``n`` masked, that has probability ``C(m-1, 3) / C(n-1, 3)``. The loss is a mean
    over all masked tokens of the batch, so images weigh by ``m``: ``E[m 4 p(m)] / E[m]``, with
    ``m`` distributed as ``sample_training_masks`` draws it (rounded, clipped to [4, 63]).
    """
    r = np.linspace(0.05, 0.99, 200001)
    m = np.clip(np.round(r * n), 4, 63)
    p = (m - 1) * (m - 2) * (m - 3) / ((n - 1) * (n - 2) * (n - 3))
    return float(np.mean(m * 4 * p) / np.mean(m))


TRAIN_STEPS = 300
TRAIN_BATCH = 32


@pytest.fixture(scope="module")
def trained_params(model, params):
    """Adam on 2x2-block token maps (1 bit/token of entropy; uniform coding costs log2 V = 4)."""
    optimizer = optax.adam(3e-3)

    @jax.jit
    def train_step(p, opt_state, tokens, rng):
        grads, metrics = jax.grad(mim.prior_loss, argnums=1, has_aux=True)(model.apply, p, tokens, rng)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, metrics

    data = np.random.default_rng(0)
    p, opt_state = params, optimizer.init(params)
    history = []
    for i in range(TRAIN_STEPS):
        p, opt_state, metrics = train_step(
            p, opt_state, jnp.asarray(block_tokens(data, TRAIN_BATCH)), jax.random.key(i)
        )
        history.append(float(metrics["bits_per_token"]))
    return p, history


@pytest.mark.integration
def test_training_reduces_bits_per_token(trained_params, apply):
    p, history = trained_params
    first, last = np.mean(history[:10]), np.mean(history[-50:])
    optimum = block_training_optimum()
    print(
        f"\ntraining bits/masked token: first 10 steps {first:.3f}, last 50 steps {last:.3f} "
        f"(optimum {optimum:.3f}, log2 V = 4)"
    )
    assert first > 3.5
    assert last < optimum + 0.25

    # Held-out maps coded with the quincunx schedule: groups 1-3 reveal one token per block,
    # so the ideal cost is 16 blocks x 4 bits = 1 bit/token.
    test = block_tokens(np.random.default_rng(1), 8)
    quincunx = schedules.make_schedule("quincunx", 8, 8)
    bits = np.mean([-mim.schedule_log2_probs(apply, p, t, quincunx)[0].sum() for t in test]) / 64
    print(f"held-out quincunx bits/token {bits:.3f} (ideal 1.0, uniform 4.0)")
    assert bits < 1.3


# --------------------------------------------------------------------------------------------
# Coding helpers


@pytest.mark.parametrize("name", ["quincunx", "qlds"])
def test_schedule_log2_probs_equals_step_by_step_reference(apply, params, name):
    # 5 qlds steps: the same [5, 8, 8] batch shape as quincunx, so one compile serves both.
    schedule = schedules.make_schedule(name, 8, 8, 5 if name == "qlds" else None)
    tokens = np.asarray(random_tokens(5, (8, 8)))
    log2_probs, bits_per_step = mim.schedule_log2_probs(apply, params, tokens, schedule)
    assert log2_probs.shape == (8, 8) and bits_per_step.shape == (schedule.num_steps,)
    masks = schedule.masks()
    for i, group in enumerate(schedule.groups):
        logits = mim.step_logits(apply, params, jnp.asarray(tokens)[None], jnp.asarray(masks[i])[None])
        ref = np.asarray(mim.token_log2_probs(logits, jnp.asarray(tokens)[None]), np.float64)[0].ravel()[group]
        np.testing.assert_allclose(-ref.sum(), bits_per_step[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(log2_probs.ravel()[group], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bits_per_step.sum(), -log2_probs.sum(), rtol=1e-12)


def test_schedule_log2_probs_with_caption(caption_apply, caption_params):
    schedule = schedules.make_schedule("quincunx", 8, 8)
    tokens = np.asarray(random_tokens(6, (8, 8)))
    caption = np.random.default_rng(0).normal(size=CAPTION_DIM).astype(np.float32)
    _, with_caption = mim.schedule_log2_probs(caption_apply, caption_params, tokens, schedule, caption)
    masks = schedule.masks()
    last = schedule.num_steps - 1
    logits = mim.step_logits(
        caption_apply,
        caption_params,
        jnp.asarray(tokens)[None],
        jnp.asarray(masks[last])[None],
        jnp.asarray(caption)[None],
    )
    ref = np.asarray(mim.token_log2_probs(logits, jnp.asarray(tokens)[None]))[0].ravel()[schedule.groups[last]]
    np.testing.assert_allclose(with_caption[last], -ref.sum(), rtol=1e-5)


def test_hybrid_complete_keeps_transmitted_groups_and_is_deterministic(apply, params):
    schedule = schedules.make_schedule("quincunx", 8, 8)
    tokens = np.asarray(random_tokens(7, (8, 8)))
    k = 2
    kept = np.concatenate(schedule.groups[:k])
    garbage = tokens.copy().ravel()
    rest = np.setdiff1d(np.arange(64), kept)
    garbage[rest] = (garbage[rest] + 3) % V  # untransmitted values must not matter
    garbage = garbage.reshape(8, 8)

    sampled = mim.hybrid_complete(apply, params, tokens, schedule, k, temperature=1.0, seed=3)
    assert sampled.shape == (8, 8) and sampled.dtype == np.int32
    np.testing.assert_array_equal(sampled.ravel()[kept], tokens.ravel()[kept])
    np.testing.assert_array_equal(
        mim.hybrid_complete(apply, params, garbage, schedule, k, temperature=1.0, seed=3), sampled
    )
    assert sampled.min() >= 0 and sampled.max() < V

    greedy = mim.hybrid_complete(apply, params, tokens, schedule, k)
    np.testing.assert_array_equal(greedy, mim.hybrid_complete(apply, params, garbage, schedule, k))
    np.testing.assert_array_equal(greedy.ravel()[kept], tokens.ravel()[kept])
    # Untrained logits are nearly flat: a temperature-1 sample differs from the argmax somewhere.
    assert np.any(sampled != greedy)
    # k = S transmits everything: the map comes back unchanged.
    np.testing.assert_array_equal(mim.hybrid_complete(apply, params, tokens, schedule, schedule.num_steps), tokens)
    with pytest.raises(ValueError, match="k must be"):
        mim.hybrid_complete(apply, params, tokens, schedule, schedule.num_steps + 1)


def test_hybrid_complete_with_trained_prior_fills_blocks(trained_params, apply):
    """After quincunx groups 1-3 every 2x2 block has one token: argmax completes the map exactly."""
    p, _ = trained_params
    schedule = schedules.make_schedule("quincunx", 8, 8)
    test = block_tokens(np.random.default_rng(2), 4)
    accuracy = np.mean([(mim.hybrid_complete(apply, p, t, schedule, 3) == t).mean() for t in test])
    print(f"\nhybrid argmax completion accuracy from 16/64 tokens: {accuracy:.3f}")
    assert accuracy >= 0.95


# --------------------------------------------------------------------------------------------
# Caption conditioning


def test_caption_conditioning_changes_logits(caption_apply, caption_params, apply, params):
    # Batch 1: the shapes the schedule test above already compiled.
    tokens = random_tokens(8, (1, 8, 8))
    revealed = jax.random.bernoulli(jax.random.key(9), 0.5, (1, 8, 8))
    captions = jax.random.normal(jax.random.key(10), (2, 1, CAPTION_DIM))
    a = caption_apply({"params": caption_params}, tokens, revealed, captions[0])
    b = caption_apply({"params": caption_params}, tokens, revealed, captions[1])
    null = caption_apply({"params": caption_params}, tokens, revealed, None)  # the learned null caption
    assert a.shape == null.shape == (1, 8, 8, V)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4
    assert float(jnp.max(jnp.abs(a - null))) > 1e-4
    with pytest.raises(ValueError, match="caption_dim=None"):
        apply({"params": params}, tokens, revealed, captions[0])
