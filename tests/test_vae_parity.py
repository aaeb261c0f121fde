"""Parity of the Flax SD3 VAE with diffusers' ``AutoencoderKL`` (torch, CPU).

Reference: diffusers, a tiny 3-level VAE with 16 latent channels (as SD3), every weight random,
non-square 24x40 images. Tolerances: float32 max |ours - ref| <= 1e-5 * max |ref| (measured about
1e-6); float64 <= 1e-10 (measured about 1e-15).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_reference import max_rel_error, nchw, nhwc, tiny_vae

from percov2_jax.convert import load_diffusers_component
from percov2_jax.models import vae

pytestmark = pytest.mark.parity  # against PyTorch reference models

F32_TOL = 1e-5
F64_TOL = 1e-10


@pytest.fixture(scope="module", params=["sd3", "with_quant_convs"])
def vae_case(request, tmp_path_factory):
    overrides = {} if request.param == "sd3" else dict(use_quant_conv=True, use_post_quant_conv=True)
    model = tiny_vae(seed=21, **overrides)
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    model.save_pretrained(folder)
    images = np.random.RandomState(2).uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
    with torch.no_grad():
        post = model.encode(nchw(images)).latent_dist
        decoded = model.decode(post.mean).sample
    module, params = load_diffusers_component(folder)
    return dict(
        model=model,
        folder=folder,
        images=images,
        mean=nhwc(post.mean),
        logvar=nhwc(post.logvar),
        decoded=nhwc(decoded),
        module=module,
        params=params,
    )


def test_encode_parity(vae_case):
    mean, logvar = jax.jit(lambda p, x: vae_case["module"].apply({"params": p}, x, method="encode"))(
        vae_case["params"], vae_case["images"]
    )
    assert mean.shape == (2, 6, 10, 16)
    assert max_rel_error(mean, vae_case["mean"]) <= F32_TOL
    assert max_rel_error(logvar, vae_case["logvar"]) <= F32_TOL


def test_decode_parity(vae_case):
    out = jax.jit(lambda p, z: vae_case["module"].apply({"params": p}, z, method="decode"))(
        vae_case["params"], vae_case["mean"]
    )
    assert out.shape == (2, 24, 40, 3)
    assert max_rel_error(out, vae_case["decoded"]) <= F32_TOL


def test_scaled_latent_helpers(vae_case):
    module, params = vae_case["module"], vae_case["params"]
    z = module.apply({"params": params}, vae_case["images"], method="encode_to_latents")
    expected = (vae_case["mean"] - 0.0609) * 1.5305  # SD3 pipeline convention
    assert max_rel_error(z, expected) <= F32_TOL
    with torch.no_grad():
        ref = vae_case["model"].decode(nchw(np.asarray(z)) / 1.5305 + 0.0609).sample
    assert max_rel_error(module.apply({"params": params}, z, method="decode_latents"), nhwc(ref)) <= F32_TOL
    # A posterior sample differs from the mean by exp(logvar / 2) * noise.
    sample = module.apply({"params": params}, vae_case["images"], jax.random.key(3), method="encode_to_latents")
    assert sample.shape == z.shape and not np.allclose(sample, z)


def test_vae_exact_in_float64(vae_case):
    ref_model = copy.deepcopy(vae_case["model"]).double()
    images = vae_case["images"].astype(np.float64)
    with torch.no_grad():
        post = ref_model.encode(nchw(images)).latent_dist
        decoded = ref_model.decode(post.mean).sample
    with jax.enable_x64(True):
        module, params = load_diffusers_component(vae_case["folder"], dtype=jnp.float64, param_dtype=jnp.float64)
        mean, logvar = module.apply({"params": params}, images, method="encode")
        out = module.apply({"params": params}, mean, method="decode")
    assert out.dtype == np.float64
    assert max_rel_error(mean, nhwc(post.mean)) <= F64_TOL
    assert max_rel_error(logvar, nhwc(post.logvar)) <= F64_TOL
    assert max_rel_error(out, nhwc(decoded)) <= F64_TOL


def test_bad_inputs_are_named(vae_case):
    module, params = vae_case["module"], vae_case["params"]
    with pytest.raises(ValueError, match=r"NHWC \[B, H, W, 3\]"):
        module.apply({"params": params}, np.zeros((1, 3, 24, 40), np.float32), method="encode")
    with pytest.raises(ValueError, match="multiples of 4"):
        module.apply({"params": params}, np.zeros((1, 26, 40, 3), np.float32), method="encode")
    with pytest.raises(ValueError, match="latents must be NHWC"):
        module.apply({"params": params}, np.zeros((1, 6, 10, 4), np.float32), method="decode")


def test_config_rejects_unsupported_blocks():
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        vae.AutoencoderKLConfig(down_block_types=("CrossAttnDownBlock2D",))
    with pytest.raises(ValueError, match="unknown AutoencoderKL config fields"):
        vae.AutoencoderKLConfig.from_dict({"latent_channels": 16, "bogus": 1})
