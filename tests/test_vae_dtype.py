"""``vae.dtype``: the frozen SD3 VAE of the training step in float32 (the default) or bfloat16."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from percov2_jax import build, pretrained
from percov2_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from percov2_jax.train.defaults import release_config

TINY_VAE = AutoencoderKLConfig(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 32),
    layers_per_block=1,
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "ckpt"
    module = AutoencoderKL(TINY_VAE)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    pretrained.save(path, {"vae": (module, nn.meta.unbox(params))})
    return str(path)


def _config(checkpoint: str, dtype: str | None):
    config = release_config("sd3-medium", "ultra-low")
    config.pretrained.checkpoint = checkpoint
    if dtype is not None:
        config.vae.dtype = dtype
    return config


def test_bfloat16_vae_runs_in_bfloat16_and_returns_float32_latents(checkpoint):
    """bfloat16 parameters and compute, latents in float32 within bf16 rounding of the float32
    VAE's (the same posterior sample: the noise is drawn in float32 on both)."""
    images = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    latents = {}
    for name in ("float32", "bfloat16"):
        config = _config(checkpoint, name)
        module, params = build.build_latent_codec(config, None, "", dtype=build.vae_dtype(config))
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(name)}
        assert module.dtype == jnp.dtype(name)
        latents[name] = module.apply({"params": params}, images, jax.random.key(3), method="encode_to_latents")
        assert latents[name].dtype == jnp.float32 and latents[name].shape == (2, 16, 16, 16)  # two levels: 2x down
    ref, low = np.asarray(latents["float32"]), np.asarray(latents["bfloat16"])
    err = np.abs(low - ref).max() / np.abs(ref).max()
    assert 0 < err < 5e-2, err


def test_default_is_float32_and_bad_values_fail(checkpoint):
    config = _config(checkpoint, None)
    assert build.vae_dtype(config) == "float32"
    config.vae.dtype = "float16"
    with pytest.raises(ValueError, match="vae.dtype must be one of"):
        build.validate_config(config)
    stand_in = _config(checkpoint, "bfloat16")
    stand_in.vae.kind = "patch_pca"
    with pytest.raises(ValueError, match="stand-in runs in float32"):
        build.build_latent_codec(stand_in, None, "unused.npz", dtype=build.vae_dtype(stand_in))
