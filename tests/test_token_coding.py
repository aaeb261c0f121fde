"""Token maps coded with the MIM prior along each schedule round-trip exactly, and the coded size
matches the model's code length under its quantised tables.

Tolerance: payload bits within 0.5% + 16 bits of the ideal code length (the coder's
termination costs 0-2 bits; the rest is float rounding of the per-step sums)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from percov2_jax.entropy import coder, mim, schedules, token_coding

V = 16


@pytest.fixture(scope="module")
def prior():
    config = mim.MIMConfig(vocab_size=V, width=32, num_layers=2, num_heads=2, max_side=16, caption_dim=6)
    model = mim.MaskedTokenPrior(config)
    params = jax.tree.map(
        lambda p: p * 4.0 if p.ndim == 2 else p,  # sharper than init: skewed tables
        __import__("flax").core.meta.unbox(mim.init_params(model, jax.random.key(0))),
    )
    return model, params, token_coding.make_step_probabilities(model.apply)


def _tokens(h, w, seed=0):
    rng = np.random.RandomState(seed)
    blocks = rng.randint(0, V, ((h + 1) // 2, (w + 1) // 2))
    return np.kron(blocks, np.ones((2, 2), np.int64))[:h, :w].astype(np.int32)


@pytest.mark.parametrize("name", ["checkerboard", "quincunx", "qlds", "implicit_var", "raster", "random"])
@pytest.mark.parametrize("shape", [(8, 8), (12, 8)])
def test_round_trip_every_schedule(prior, name, shape):
    model, params, probabilities = prior
    tokens = _tokens(*shape, seed=hash(name) % 1000)
    schedule = schedules.make_schedule(name, *shape)
    caption = np.linspace(-1, 1, 6)
    payload, bits = token_coding.encode_with_prior(probabilities, params, tokens, schedule, caption=caption)
    decoded, revealed = token_coding.decode_with_prior(probabilities, params, payload, schedule, caption=caption)
    np.testing.assert_array_equal(decoded, tokens)
    assert revealed.all()
    ideal = sum(bits)
    assert len(bits) == schedule.num_steps
    assert coder.payload_bits(payload) <= ideal * 1.005 + 16, (coder.payload_bits(payload), ideal)


def test_hybrid_transmits_only_the_first_groups(prior):
    model, params, probabilities = prior
    tokens = _tokens(8, 8, seed=3)
    schedule = schedules.make_schedule("quincunx", 8, 8)
    full, _ = token_coding.encode_with_prior(probabilities, params, tokens, schedule)
    part, bits = token_coding.encode_with_prior(probabilities, params, tokens, schedule, groups=2)
    assert len(bits) == 2 and len(part) < len(full)
    decoded, revealed = token_coding.decode_with_prior(probabilities, params, part, schedule, groups=2)
    assert revealed.sum() == 8  # quincunx at 8x8: groups of 4 and 4
    np.testing.assert_array_equal(decoded[revealed], tokens[revealed])
    completed = mim.hybrid_complete(jax.jit(model.apply), params, decoded, schedule, 2)
    np.testing.assert_array_equal(np.asarray(completed)[revealed], tokens[revealed])  # sent tokens verbatim


def test_wrong_caption_or_truncation_is_detected(prior):
    _, params, probabilities = prior
    tokens = _tokens(8, 8, seed=5)
    schedule = schedules.make_schedule("qlds", 8, 8)
    payload, _ = token_coding.encode_with_prior(probabilities, params, tokens, schedule, caption=np.ones(6))
    with pytest.raises(coder.CodingError):
        token_coding.decode_with_prior(
            probabilities, params, payload[: len(payload) // 2], schedule, caption=np.ones(6)
        )
    with pytest.raises(ValueError, match="do not match"):
        token_coding.encode_with_prior(probabilities, params, tokens[:4], schedule)
