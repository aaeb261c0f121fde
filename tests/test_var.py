"""The explicit-hierarchical VAR prior (percov2_jax/entropy/var.py): scale shapes, exact area
pyramids, block causality, caption conditioning, exact range-coding round trips and a short
training run.

Tolerances: area averages match a float64 NumPy box average to 1e-6 (float32 einsum); coded
payloads are within 0.5% + 16 bits of the ideal length under the quantised tables (as
test_token_coding.py); the coding steps' float probabilities give the teacher-forced code length
to 1e-5 (relative), and the quantised tables stay within 0.5% of it (coder.py's documented bound;
3-bit mantissa rounding measured up to 0.27% on these ~150-600-bit pyramids, so 0.1% would flake).
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

from percov2_jax.entropy import coder, var

V = 16
TINY = dict(vocab_size=V, width=32, num_layers=2, num_heads=2, max_side=16)
CAPTION_DIM = 6


@pytest.fixture(scope="module")
def model():
    """One model for every test: with ``caption=None`` it is the unconditional prior."""
    return var.VARPrior(var.VARConfig(**TINY, caption_dim=CAPTION_DIM))


@pytest.fixture(scope="module")
def params(model):
    return nn.unbox(var.init_params(model, jax.random.key(0)))


@pytest.fixture(scope="module")
def sharp_params(params):
    return jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)  # skewed tables for coding


@pytest.fixture(scope="module")
def apply(model):
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def probabilities(model):
    return var.make_scale_probabilities(model.apply)


def _random_pyramid(height, width, batch=None, seed=0):
    rng = np.random.RandomState(seed)
    lead = () if batch is None else (batch,)
    return [rng.randint(0, V, lead + s).astype(np.int32) for s in var.scale_shapes(height, width)]


def _nearest_code(codebook):
    codebook = jnp.asarray(codebook, jnp.float32)

    def quantize(x):  # [B, h, w, D] -> [B, h, w]
        return jnp.argmin(jnp.sum(jnp.square(x[..., None, :] - codebook), axis=-1), axis=-1).astype(jnp.int32)

    return quantize


def _smooth_features(rng, batch, size=8, dim=4):
    coarse = rng.normal(size=(batch, 3, 3, dim)).astype(np.float32)
    smooth = jax.image.resize(jnp.asarray(coarse), (batch, size, size, dim), "bilinear")
    return smooth + 0.1 * jnp.asarray(rng.normal(size=smooth.shape), jnp.float32)


# --------------------------------------------------------------------------------------------
# Shapes and the token pyramid


def test_scale_shapes():
    assert var.scale_shapes(8, 8) == ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8))
    assert var.scale_shapes(12, 8) == ((2, 1), (3, 2), (6, 4), (9, 6), (12, 8))  # 1.5 rounds half up to 2
    assert var.scale_shapes(32, 32, (1, 2, 4, 8, 16, 32)) == tuple((s, s) for s in (1, 2, 4, 8, 16, 32))
    assert var.scale_shapes(5, 3, (1, 2)) == ((3, 2), (5, 3))  # 2.5 -> 3 and 1.5 -> 2: exact half-up
    with pytest.raises(ValueError, match="strictly increase"):
        var.scale_shapes(2, 2)  # (1, 1) twice
    with pytest.raises(ValueError, match="strictly increase"):
        var.scale_shapes(8, 8, (1, 4, 2, 8))
    with pytest.raises(ValueError, match="positive"):
        var.scale_shapes(8, 8, ())
    with pytest.raises(ValueError, match="positive"):
        var.scale_shapes(0, 8)
    with pytest.raises(ValueError, match="integers"):
        var.scale_shapes(8, 8, (1, 2.5, 8))


def _box_average(x, shape):
    """Brute force in float64: repeat every cell n_out times, then average blocks of n_in."""
    x = np.asarray(x, np.float64)
    b, h, w, d = x.shape
    (ho, wo) = shape
    x = np.repeat(np.repeat(x, ho, axis=1), wo, axis=2)
    return x.reshape(b, ho, h, wo, w, d).mean(axis=(2, 4))


@pytest.mark.parametrize("size,shape", [((8, 8), (4, 4)), ((8, 8), (6, 6)), ((12, 8), (5, 6))])
def test_area_downsample_is_a_box_average(size, shape):
    x = np.random.RandomState(0).normal(size=(2, *size, 3)).astype(np.float32)
    got = np.asarray(var.area_downsample(jnp.asarray(x), shape))
    np.testing.assert_allclose(got, _box_average(x, shape), rtol=0, atol=1e-6)


def test_pyramid_tokens_last_level_is_the_token_map():
    rng = np.random.RandomState(1)
    features = _smooth_features(rng, 2, size=8)[:, :, :6]  # 8x6: shapes (1, 1) (2, 2) (4, 3) (6, 5) (8, 6)
    quantize = _nearest_code(rng.normal(size=(V, 4)))
    shapes = var.scale_shapes(8, 6)
    pyramid = jax.jit(lambda f: var.pyramid_tokens(f, quantize, shapes))(features)  # one compile, not per op
    assert [t.shape[1:] for t in pyramid] == list(shapes) and all(t.dtype == jnp.int32 for t in pyramid)
    np.testing.assert_array_equal(pyramid[-1], quantize(features))
    np.testing.assert_array_equal(pyramid[2], quantize(var.area_downsample(features, shapes[2])))
    with pytest.raises(ValueError, match="last shape"):
        var.pyramid_tokens(features, quantize, shapes[:-1])


def test_sequence_layout():
    layout = var.sequence_layout(((1, 1), (2, 2), (4, 4)))
    np.testing.assert_array_equal(layout["scale"], np.repeat([0, 1, 2], [1, 4, 16]))
    np.testing.assert_array_equal(layout["row"][5:9], [0, 0, 0, 0])
    np.testing.assert_array_equal(layout["col"][5:9], [0, 1, 2, 3])
    # Scale 1 reads the single 1x1 token (index 0); scale 2 the 2x2 cell under each centre (1 + r // 2 * 2 + c // 2).
    np.testing.assert_array_equal(layout["source"][:4], 0)
    np.testing.assert_array_equal(
        layout["source"][4:].reshape(4, 4), 1 + np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    )
    centre = var.sequence_layout(((4, 4), (6, 6)))["source"].reshape(6, 6) // 4  # 4 -> 6 rows: 0 1 1 2 3 3
    np.testing.assert_array_equal(centre[:, 0], [0, 1, 1, 2, 3, 3])
    assert var.block_causal_mask(((1, 1), (2, 2))).sum() == 1 + 4 * 5


# --------------------------------------------------------------------------------------------
# Config and model


def test_config_round_trip_and_validation():
    config = var.VARConfig(**TINY, scales=[1, 2, 4], caption_dim=CAPTION_DIM)
    assert config.scales == (1, 2, 4)
    d = config.to_dict()
    assert d["_class_name"] == "VARPrior" and d["scales"] == [1, 2, 4]
    assert var.VARConfig.from_dict(d) == config
    for bad in (
        dict(scales=()),
        dict(scales=(2, 1)),
        dict(scales=(0, 1)),
        dict(width=33),
        dict(caption_dim=0),
        dict(dropout=1.0),
        dict(vocab_size=1),
    ):
        with pytest.raises(ValueError, match="invalid VARConfig"):
            var.VARConfig(**{**TINY, **bad})
    with pytest.raises(ValueError, match="unknown"):
        var.VARConfig.from_dict({**d, "depth": 3})


def test_pyramid_shapes_and_caption_are_checked(model, params, apply):
    wrong = [jnp.zeros((1, *s), jnp.int32) for s in var.scale_shapes(8, 8, (1, 2, 4, 8))]
    with pytest.raises(ValueError, match="scale_shapes"):
        apply({"params": params}, wrong)
    unconditional = var.VARPrior(var.VARConfig(**TINY))
    pyramid = [jnp.asarray(t) for t in _random_pyramid(8, 8, batch=1)]
    with pytest.raises(ValueError, match="caption_dim=None"):
        jax.eval_shape(unconditional.init, jax.random.key(0), pyramid, jnp.zeros((1, CAPTION_DIM)))


def test_block_causality(params, apply):
    pyramid = _random_pyramid(8, 8, batch=1, seed=2)
    base = apply({"params": params}, pyramid)
    assert [l.shape for l in base] == [(1, *s, V) for s in var.scale_shapes(8, 8)]
    assert all(l.dtype == jnp.float32 for l in base)
    rng = np.random.RandomState(3)
    for k in range(len(pyramid)):
        changed = list(pyramid)
        changed[k] = (pyramid[k] + rng.randint(1, V, pyramid[k].shape)) % V  # every token of scale k differs
        out = apply({"params": params}, changed)
        for j in range(k + 1):
            np.testing.assert_array_equal(out[j], base[j], err_msg=f"scale {k} leaked into block {j}")
        if k + 1 < len(pyramid):
            assert np.abs(np.asarray(out[k + 1]) - np.asarray(base[k + 1])).max() > 1e-3


def test_caption_conditioning(model, params, apply):
    pyramid = _random_pyramid(8, 8, batch=1, seed=4)
    caption = jnp.linspace(-1.0, 1.0, CAPTION_DIM)[None]
    with_caption = jax.eval_shape(model.init, jax.random.key(0), pyramid, caption)["params"]
    assert jax.tree.map(lambda p: p.shape, nn.unbox(with_caption)) == jax.tree.map(lambda p: p.shape, params)
    none = apply({"params": params}, pyramid, None)
    first = apply({"params": params}, pyramid, caption)
    second = apply({"params": params}, pyramid, -caption)
    for a, b, c in zip(none, first, second):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
        assert np.abs(np.asarray(b) - np.asarray(c)).max() > 1e-3


# --------------------------------------------------------------------------------------------
# Coding


def _sample_pyramid(probabilities, params, shape, caption, seed):
    """A pyramid drawn from the model itself, scale by scale, so its tokens are typical."""
    rng = np.random.RandomState(seed)
    pyramid = [np.zeros(s, np.int32) for s in var.scale_shapes(*shape)]
    for k, zeros in enumerate(pyramid):
        known = tuple(jnp.asarray(t[None]) for t in pyramid)  # scales >= k are still zero
        probs = np.asarray(probabilities(params, known, caption)[k], np.float64)
        u = rng.uniform(size=(len(probs), 1))
        pyramid[k] = np.minimum((np.cumsum(probs, axis=1) < u).sum(axis=1), V - 1).astype(np.int32).reshape(zeros.shape)
    return pyramid


def _stepwise_float_bits(probabilities, params, pyramid, caption):
    """The code length under the coding steps' float probabilities (scales >= k zeroed)."""
    bits = 0.0
    for k, tokens in enumerate(pyramid):
        known = tuple(jnp.asarray((t if i < k else np.zeros_like(t))[None]) for i, t in enumerate(pyramid))
        probs = np.asarray(probabilities(params, known, caption)[k], np.float64)
        bits -= np.log2(probs[np.arange(tokens.size), tokens.reshape(-1)]).sum()
    return float(bits)


@pytest.mark.parametrize("shape", [(8, 8), (12, 8)])
@pytest.mark.parametrize("with_caption", [True, False])
def test_round_trip_and_code_length(sharp_params, apply, probabilities, shape, with_caption):
    caption = np.linspace(-1.0, 1.0, CAPTION_DIM) if with_caption else None
    batch_caption = None if caption is None else jnp.asarray(caption, jnp.float32)[None]
    pyramid = _sample_pyramid(probabilities, sharp_params, shape, batch_caption, seed=shape[0] + with_caption)
    payload, bits = var.encode_with_var(probabilities, sharp_params, pyramid, caption=caption)
    decoded = var.decode_with_var(probabilities, sharp_params, payload, var.scale_shapes(*shape), caption=caption)
    assert len(decoded) == len(pyramid)
    for got, want in zip(decoded, pyramid):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    ideal = sum(bits)
    assert len(bits) == len(pyramid) and len(payload) * 8 <= ideal * 1.005 + 16, (len(payload) * 8, ideal)
    log2_probs = var.pyramid_log2_probs(apply, sharp_params, [t[None] for t in pyramid], batch_caption)
    float_bits = -sum(float(np.sum(l)) for l in log2_probs)
    # The coding steps' float probabilities are the teacher-forced ones (float32 noise only) ...
    step_bits = _stepwise_float_bits(probabilities, sharp_params, pyramid, batch_caption)
    assert abs(step_bits - float_bits) <= 1e-5 * float_bits, (step_bits, float_bits)
    # ... and quantising them (3-bit mantissas) costs at most 0.5%, the bound coder.py documents.
    assert abs(ideal - float_bits) <= 5e-3 * float_bits, (ideal, float_bits)
    if with_caption and shape == (8, 8):
        with pytest.raises(coder.CodingError):
            var.decode_with_var(
                probabilities, sharp_params, payload[: len(payload) // 2], var.scale_shapes(*shape), caption=caption
            )


# --------------------------------------------------------------------------------------------
# Training


@pytest.mark.integration
def test_training_reduces_bits_per_token(model, params):
    rng = np.random.RandomState(5)
    quantize = _nearest_code(rng.normal(size=(V, 4)))
    pyramid = jax.jit(lambda f: var.pyramid_tokens(f, quantize, var.scale_shapes(8, 8)))(_smooth_features(rng, 16))
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(p, opt_state):
        (loss, metrics), grads = jax.value_and_grad(var.var_loss, argnums=1, has_aux=True)(model.apply, p, pyramid)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, metrics

    p, opt_state = params, optimizer.init(params)
    history = []
    for _ in range(30):
        p, opt_state, metrics = step(p, opt_state)
        history.append(float(metrics["bits_per_token"]))
    scale_sum = sum(float(metrics[f"bits_scale_{k}"]) for k in range(5))
    assert abs(scale_sum - float(metrics["bits_per_token"])) < 1e-4
    assert np.mean(history[-5:]) < 0.8 * np.mean(history[:5]), history
