"""The PerCoV2 model around the MM-DiT: widened patch embedding, bit-rates, the PCA patch
autoencoder, trainable subsets and config validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from percov2_jax import rates
from percov2_jax.models.hyper_encoder import HyperEncoderConfig
from percov2_jax.models.layers import unboxed as nn_unbox
from percov2_jax.models.mmdit import SD3Transformer2DModel, SD3TransformerConfig
from percov2_jax.models.patch_autoencoder import PatchAutoencoder, PatchAutoencoderConfig, fit_patch_pca
from percov2_jax.models.percov2 import PerCoV2, PerCoV2Config, upsample_tokens, widen_patch_embedding
from percov2_jax.models.quantizer import QuantizerConfig
from percov2_jax.train.optimizer import trainable_mask

TRANSFORMER = SD3TransformerConfig(
    sample_size=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=16,
    pooled_projection_dim=12,
    pos_embed_max_size=16,
)


def small_config(hyper_side=32, **kw):
    return PerCoV2Config(
        TRANSFORMER,
        HyperEncoderConfig(in_channels=16, channels=8, out_channels=12, latent_side=64, hyper_side=hyper_side),
        QuantizerConfig(dim=12, codebook_size=16, codebook_dim=4),
        **kw,
    )


@pytest.fixture(scope="module")
def widened_case():
    """Pretrained (random) SD3 params, the widened PerCoV2 params, and inputs for a 128x64 image."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 16, 8, 16), jnp.float32)
    text = jnp.asarray(rng.randn(2, 5, 24), jnp.float32)
    pooled = jnp.asarray(rng.randn(2, 12), jnp.float32)
    t = jnp.asarray([200.0, 850.0])
    base = SD3Transformer2DModel(TRANSFORMER)
    base_params = base.init(jax.random.key(1), x, text, pooled, t)["params"]
    base_params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), nn_unbox(base_params)
    )
    model = PerCoV2(small_config())
    variables = nn_unbox(model.init({"params": jax.random.key(3)}, x, x, text, pooled, t))
    params = {**variables["params"], "transformer": widen_patch_embedding(base_params, 12)}
    return dict(
        x=x,
        text=text,
        pooled=pooled,
        t=t,
        base=base,
        base_params=base_params,
        model=model,
        params=params,
        vq_stats=variables["vq_stats"],
    )


def test_zero_initialised_token_channels_equal_pretrained_sd3(widened_case):
    """Reference: the pretrained SD3 MM-DiT on x_t alone. Tolerance: exact up to float32
    reassociation of the wider patch convolution (<= 1e-6 relative; zeros add nothing)."""
    c = widened_case
    want = c["base"].apply({"params": c["base_params"]}, c["x"], c["text"], c["pooled"], c["t"])
    features = jax.random.normal(jax.random.key(5), (2, 4, 2, 12))  # any token features
    got = c["model"].apply(
        {"params": c["params"], "vq_stats": c["vq_stats"]},
        c["x"],
        features,
        c["text"],
        c["pooled"],
        c["t"],
        method="velocity",
    )
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert err <= 1e-6, err
    kernel = c["params"]["transformer"]["pos_embed"]["proj"]["kernel"]
    assert kernel.shape == (2, 2, 28, 16) and not np.any(np.asarray(kernel[:, :, 16:]))
    # Once the token slices are non-zero the tokens matter.
    params = jax.tree.map(lambda p: p, c["params"])
    # (Random values: a constant slice adds the same offset to every channel, which LayerNorm removes.)
    params["transformer"]["pos_embed"]["proj"]["kernel"] = kernel.at[:, :, 16:].set(
        0.1 * jax.random.normal(jax.random.key(6), kernel[:, :, 16:].shape)
    )
    moved = c["model"].apply(
        {"params": params, "vq_stats": c["vq_stats"]},
        c["x"],
        features,
        c["text"],
        c["pooled"],
        c["t"],
        method="velocity",
    )
    assert float(jnp.max(jnp.abs(moved - want))) > 1e-3


def test_widen_rejects_missing_kernel():
    with pytest.raises(KeyError, match="pos_embed/proj/kernel"):
        widen_patch_embedding({"proj_out": {}}, 4)


def test_token_path_shapes(widened_case):
    c = widened_case
    variables = {"params": c["params"], "vq_stats": c["vq_stats"]}
    q = c["model"].apply(variables, c["x"], method="hyper_latent_tokens")
    assert q.indices.shape == (2, 8, 4) and q.indices.dtype == jnp.int32 and q.quantized.shape == (2, 8, 4, 12)
    # The receiver rebuilds the same features from the indices alone.
    rebuilt = c["model"].apply(variables, q.indices, method="token_features")
    np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(q.quantized), rtol=1e-5, atol=1e-6)


def test_upsample_tokens_is_nearest():
    f = jnp.arange(6.0).reshape(1, 2, 3, 1)
    up = upsample_tokens(f, 4, 6)
    assert up.shape == (1, 4, 6, 1) and float(up[0, 3, 5, 0]) == 5.0 and float(up[0, 1, 1, 0]) == 0.0
    with pytest.raises(ValueError, match="integer multiple"):
        upsample_tokens(f, 4, 5)


def test_config_consistency_errors():
    with pytest.raises(ValueError, match="quantizer.dim"):
        PerCoV2Config(
            TRANSFORMER,
            HyperEncoderConfig(in_channels=16, channels=8, out_channels=12),
            QuantizerConfig(dim=10, codebook_size=16, codebook_dim=4),
        )
    with pytest.raises(ValueError, match="in_channels"):
        PerCoV2Config(
            TRANSFORMER,
            HyperEncoderConfig(in_channels=4, channels=8, out_channels=12),
            QuantizerConfig(dim=12, codebook_size=16, codebook_dim=4),
        )
    cfg = small_config(learned_null_text=True, text_length=7)
    assert PerCoV2Config.from_dict(cfg.to_dict()) == cfg


def test_rates_table():
    """PerCo Table 2 arithmetic: uniform bpp = log2(V) / (512 / s)^2."""
    assert rates.get_rate("0.0019").uniform_bpp == pytest.approx(0.001953125)
    assert rates.get_rate("0.0507").uniform_bpp == pytest.approx(0.05078125)
    for name, rate in rates.RATES.items():
        if name[0].isdigit():
            assert abs(rate.uniform_bpp - float(name)) < 1e-4, name
    ultra = rates.get_rate("ultra-low")
    assert ultra.token_grid(512, 512) == (8, 8) and ultra.token_grid(512, 768) == (8, 12)
    assert rates.get_rate("extreme").token_grid(512, 512) == (32, 32)
    assert ultra.latent_cells_per_token == 8
    with pytest.raises(ValueError, match="unknown bit-rate 'low'.*ultra-low"):
        rates.get_rate("low")
    with pytest.raises(ValueError, match="height 500 is not a positive multiple of 64"):
        ultra.token_grid(500, 512)


def test_patch_autoencoder_pca():
    """The fitted codec: orthonormal components, unit-variance latents, and exact reconstruction
    when it keeps every component (then it is an invertible rotation of the patches)."""
    rng = np.random.RandomState(0)
    base = rng.rand(6, 8, 12, 3)
    images = [np.clip(np.kron(b, np.ones((4, 4, 1))) * 2 - 1 + 0.05 * rng.randn(32, 48, 3), -1, 1) for b in base]
    params = fit_patch_pca(images)
    comp = params["components"]
    np.testing.assert_allclose(comp.T @ comp, np.eye(16), atol=1e-5)
    module = PatchAutoencoder()
    x = jnp.asarray(np.stack(images), jnp.float32)
    z = module.apply({"params": params}, x, method="encode_to_latents")
    assert z.shape == (6, 4, 6, 16)
    assert np.allclose(np.asarray(z).reshape(-1, 16).std(0), 1.0, atol=0.05)
    # More components, smaller error (PCA is optimal for each count).
    errors = []
    for k in (4, 16, 64):
        cfg = PatchAutoencoderConfig(latent_channels=k)
        recon = PatchAutoencoder(cfg).apply({"params": fit_patch_pca(images, cfg)}, x)
        errors.append(float(jnp.sqrt(jnp.mean((recon - x) ** 2))))
    assert errors[0] > errors[1] > errors[2] and errors[1] < 0.1, errors
    # Exact when every component is kept: an invertible rotation of the patches.
    small = [img[:16, :16] for img in images] * 3
    p_all = fit_patch_pca(small, PatchAutoencoderConfig(patch_size=4, latent_channels=48))
    xs = jnp.asarray(np.stack(small[:6]), jnp.float32)
    assert (
        float(
            jnp.max(
                jnp.abs(
                    PatchAutoencoder(PatchAutoencoderConfig(patch_size=4, latent_channels=48)).apply(
                        {"params": p_all}, xs
                    )
                    - xs
                )
            )
        )
        < 1e-5
    )
    with pytest.raises(ValueError, match="expected \\[H, W, 3\\]"):
        fit_patch_pca([np.zeros((16, 16))])


def test_trainable_subsets(widened_case):
    params = widened_case["params"]
    flat = lambda m: {"/".join(k): v for k, v in __import__("flax").traverse_util.flatten_dict(m).items()}
    every = flat(trainable_mask(params, "all"))
    assert not every["transformer/pos_embed/pos_embed"] and sum(every.values()) == len(every) - 1
    linear = flat(trainable_mask(params, "linear"))
    assert linear["transformer/transformer_blocks_0/attn/to_q/kernel"]
    assert linear["transformer/transformer_blocks_0/ff/net_2/bias"]
    assert linear["transformer/pos_embed/proj/kernel"]  # the widened input must learn
    assert linear["hyper_encoder/" + next(k.split("/", 1)[1] for k in linear if k.startswith("hyper_encoder/"))]
    assert not any(v for k, v in linear.items() if k.endswith("/scale"))  # norms stay
    hyper = flat(trainable_mask(params, "hyper_encoder"))
    assert not hyper["transformer/transformer_blocks_0/attn/to_q/kernel"]
    assert hyper["transformer/pos_embed/proj/kernel"] and all(v for k, v in hyper.items() if k.startswith("quantizer/"))
    with pytest.raises(ValueError, match="unknown trainable mode"):
        trainable_mask(params, "lora")


def test_config_validation_errors():
    from configs import tiny
    from percov2_jax import build

    def bad(**changes):
        c = tiny.get_config()
        for key, value in changes.items():
            node = c
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return c

    with pytest.raises(ValueError, match="image height 100 is not a positive multiple of 64"):
        build.validate_config(bad(image_size=100))
    with pytest.raises(ValueError, match="unknown bit-rate 'super-low'"):
        build.validate_config(bad(rate="super-low"))
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        build.validate_config(bad(**{"train.global_batch_size": 7}), process_count=2)

    class FakeMesh:
        shape = {"data": 4, "fsdp": 2, "tensor": 1}

    with pytest.raises(ValueError, match="not divisible by the mesh's data x fsdp = 4 x 2 = 8"):
        build.validate_config(bad(**{"train.global_batch_size": 12}), process_count=1, mesh=FakeMesh())
    with pytest.raises(ValueError, match="caption_dropout"):
        build.validate_config(bad(**{"text.caption_dropout": 1.5}))


def test_hashed_text_encoder():
    """The tiny config's parameter-free text stand-in: deterministic, word order kept, the empty
    caption is zeros, and the sd3 kind without a checkpoint fails loudly."""
    import ml_collections

    from percov2_jax.text.conditioners import HashedTextEncoder, text_conditioner

    enc = HashedTextEncoder(length=6, features=8, pooled_features=4, seed=3)
    seq, pooled = enc(["a red bus", "bus red a", ""])
    again, _ = HashedTextEncoder(6, 8, 4, seed=3)(["a red bus"])
    assert seq.shape == (3, 6, 8) and pooled.shape == (3, 4)
    np.testing.assert_array_equal(seq[0], again[0])
    np.testing.assert_array_equal(seq[0, 0], seq[1, 2])  # the same word, the same vector
    np.testing.assert_allclose(pooled[0], pooled[1], rtol=1e-6)  # the bag of words is the same
    assert not np.any(seq[2]) and not np.any(pooled[2]) and not np.any(seq[0, 3:])
    with pytest.raises(TypeError):
        enc("one string")
    cfg = ml_collections.ConfigDict(dict(kind="sd3", checkpoint="", max_sequence_length=256, use_t5=True))
    with pytest.raises(ValueError, match="needs text.checkpoint or pretrained.checkpoint"):
        text_conditioner(cfg, 333, TRANSFORMER.joint_attention_dim, TRANSFORMER.pooled_projection_dim)


@pytest.mark.parametrize(
    "kind, use_t5, max_sequence_length, expected",
    [
        ("sd3", True, 256, 333),
        ("sd3", True, 128, 205),
        ("sd3", False, 128, 205),
        ("precomputed", True, 77, 154),
        ("hashed", True, 16, 16),
    ],
)
def test_caption_length_is_derived_from_the_text_config(kind, use_t5, max_sequence_length, expected):
    """One source of truth: the transformer's caption length, the learned null text's length and
    the conditioner's output all follow ``text.kind`` and ``text.max_sequence_length``."""
    from configs import tiny
    from percov2_jax import build

    c = tiny.get_config()
    c.text.kind, c.text.use_t5, c.text.max_sequence_length = kind, use_t5, max_sequence_length
    c.model.learned_null_text = True
    assert build.caption_length(c.text) == expected
    model = build.build_model(c, rates.get_rate(c.rate))
    assert model.config.text_length == expected
    variables = jax.eval_shape(
        lambda: model.init(
            {"params": jax.random.key(0), "vq": jax.random.key(0)}, *build.init_inputs(model, rates.get_rate(c.rate))
        )
    )
    seq, pooled = jax.eval_shape(lambda v: model.apply(v, 2, method="null_text_embeddings"), variables)
    assert seq.shape == (2, expected, TINY_WIDTH) and pooled.shape == (2, TINY_WIDTH)
    if kind == "hashed":
        text = build.build_text_conditioner(c)
        assert text([""])[0].shape == (1, expected, TINY_WIDTH)


TINY_WIDTH = 64  # configs/tiny.py's joint_attention_dim and pooled_projection_dim
