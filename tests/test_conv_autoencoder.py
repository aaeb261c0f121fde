"""The convolutional stand-in for the SD3 VAE (models/conv_autoencoder.py), `make demo`'s
``vae.kind = "lapped_conv"``: its interface and latent statistics, a deterministic fit, smooth
decodes of any latents, a save / load round trip through `build.build_latent_codec`, and a
higher PSNR than the PCA patch codec on photographs neither saw."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from percov2_jax.data.builtin import BuiltinPhotos
from percov2_jax.data.pipeline import resize_and_crop
from percov2_jax.models.conv_autoencoder import (
    ConvAutoencoder,
    ConvAutoencoderConfig,
    fit_conv_autoencoder,
    image_pyramid,
)
from percov2_jax.models.patch_autoencoder import PatchAutoencoder, fit_patch_pca

# A small fit, the same for every test that needs one: the demo fits 1000 steps of 64 px crops
# at 1-3x the training size; 300 steps of 32 px crops at 128 px take a few seconds.
FIT = {"short_sides": (128,), "crop_size": 32, "steps": 300, "learning_rate": 2e-3, "pca_patches": 4096}


def to_float(images: np.ndarray) -> jax.Array:
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> np.ndarray:
    return np.clip(np.round((np.asarray(images, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10.0 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def training_photos():
    """The demo's training photos (the catalogue's colour photographs), uint8."""
    source = BuiltinPhotos()
    return [source[i]["image"] for i in range(len(source))]


@pytest.fixture(scope="module")
def held_out():
    """The catalogue's grey photographs (camera, coins, moon, brick, grass, gravel), repeated to
    RGB, cover-resized and centre-cropped to the demo's 128 px: uint8 [N, 128, 128, 3]."""
    source = BuiltinPhotos(include_grayscale=True)
    grey = [i for i, e in enumerate(source.entries) if not e["color"]]
    assert len(grey) >= 4
    return np.stack([resize_and_crop(source[i]["image"], (128, 128)) for i in grey])


@pytest.fixture(scope="module")
def fitted(training_photos):
    return fit_conv_autoencoder(training_photos, progress=False, **FIT)


@pytest.fixture(scope="module")
def pca(training_photos):
    """The PCA patch codec fitted on the same 128 px photos (as good on them as on the full-size
    ones the tiny configs fit it on, and faster)."""
    return fit_patch_pca(image_pyramid(training_photos, FIT["short_sides"], FIT["crop_size"]))


def test_interface_shapes_and_latent_statistics(fitted, held_out):
    module = ConvAutoencoder()
    x = to_float(np.concatenate([held_out[:2, :64, :96], held_out[2:4, 64:, 32:]]))  # [4, 64, 96, 3]
    z = module.apply({"params": fitted}, x, None, method="encode_to_latents")
    assert z.shape == (4, 8, 12, 16) and z.dtype == jnp.float32
    y = module.apply({"params": fitted}, z, method="decode_latents")
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_array_equal(module.apply({"params": fitted}, x), y)
    # Zero mean and unit variance on the fitting crops; roughly so on unseen grey photos.
    z = np.asarray(module.apply({"params": fitted}, to_float(held_out), None, method="encode_to_latents"))
    assert abs(z.mean()) < 0.3 and 0.6 < z.std() < 1.4
    with pytest.raises(ValueError, match="multiple of 8"):
        module.apply({"params": fitted}, x[:, :60], None, method="encode_to_latents")
    cfg = ConvAutoencoderConfig()
    assert ConvAutoencoderConfig.from_dict(cfg.to_dict()) == cfg and cfg.downsample_factor == 8


def test_parameters_have_logical_axes():
    import flax.linen as nn

    boxed = jax.eval_shape(lambda: ConvAutoencoder().init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) == 10
    assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)


def test_fit_is_deterministic(training_photos):
    # A small config (8x8 kernels): the same code path, a quarter of the windowed PCA's size.
    config = ConvAutoencoderConfig(stride=4, latent_channels=8, analysis_channels=16, head_channels=16)
    kwargs = dict(FIT, steps=5, pca_patches=1024, progress=False)
    a = fit_conv_autoencoder(training_photos[:2], config, seed=3, **kwargs)
    b = fit_conv_autoencoder(training_photos[:2], config, seed=3, **kwargs)
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b)))


def block_edge_ratio(images: np.ndarray, period: int = 8) -> float:
    """Mean |step| between neighbouring pixels (rows and columns) at the strongest of the
    ``period`` phases over the mean of the others: about 1 for a smooth image, large for a mosaic
    of ``period``-pixel blocks. ``images``: [B, H, W, C]."""
    dx = np.abs(np.diff(images, axis=2)).mean(axis=(0, 1, 3))  # [W - 1]
    dy = np.abs(np.diff(images, axis=1)).mean(axis=(0, 2, 3))  # [H - 1]
    phases = np.array([dx[k::period].mean() + dy[k::period].mean() for k in range(period)])
    return float(phases.max() / np.delete(phases, phases.argmax()).mean())


def test_decodes_of_any_latents_have_no_block_edges(fitted, pca):
    """Generated latents are never exact: the PCA codec turns their errors into 8x8 blocks, the
    lapped decoder into smooth blobs."""
    latents = jax.random.normal(jax.random.key(0), (4, 16, 16, 16))
    conv = np.asarray(ConvAutoencoder().apply({"params": fitted}, latents, method="decode_latents"))
    blocks = np.asarray(PatchAutoencoder().apply({"params": pca}, latents, method="decode_latents"))
    assert block_edge_ratio(blocks) > 5.0  # ~11: every 8th step is a block edge
    assert block_edge_ratio(conv) < 2.0  # ~1.6: the tiles' overlap still leaves a faint 8-px rhythm


def test_beats_the_pca_on_held_out_photos(fitted, pca, held_out):
    x = to_float(held_out)
    conv = to_uint8(ConvAutoencoder().apply({"params": fitted}, x))
    blocks = to_uint8(PatchAutoencoder().apply({"params": pca}, x))
    conv_psnr = np.mean([psnr(a, b) for a, b in zip(held_out, conv)])
    pca_psnr = np.mean([psnr(a, b) for a, b in zip(held_out, blocks)])
    assert conv_psnr > pca_psnr + 0.2, (conv_psnr, pca_psnr)  # ~29.1 vs ~28.6 dB


def test_round_trip_through_build_latent_codec(tmp_path, training_photos):
    """Fitted once and stored next to the run's patch_autoencoder.npz; reloaded without a source;
    a file of other shapes is refused; the bundle's registry rebuilds the same module."""
    from configs import demo
    from percov2_jax import build
    from percov2_jax.codec import bundle
    from percov2_jax.runs.layout import RunDir

    config = demo.get_config()
    config.vae.fit_steps = 3
    config.vae.fit_images = 1
    run = RunDir(tmp_path)
    module, params = build.build_latent_codec(config, BuiltinPhotos(), run.patch_autoencoder)
    assert isinstance(module, ConvAutoencoder)
    assert run.conv_autoencoder.exists() and not run.patch_autoencoder.exists()
    again, reloaded = build.build_latent_codec(config, None, run.patch_autoencoder)
    assert again == module
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, params, reloaded)))
    x = to_float(resize_and_crop(training_photos[0], (64, 64))[None])
    np.testing.assert_array_equal(module.apply({"params": params}, x), again.apply({"params": reloaded}, x))

    spec = {"class": "ConvAutoencoder", "config": module.config.to_dict(), "dtype": "float32", "param_dtype": "float32"}
    assert bundle._latent_codec_module(spec) == module

    np.savez(run.conv_autoencoder, analysis_kernel=np.zeros((8, 8, 3, 16), np.float32))
    with pytest.raises(ValueError, match="does not hold ConvAutoencoder parameters"):
        build.build_latent_codec(config, None, run.patch_autoencoder)
    run.conv_autoencoder.unlink()
    with pytest.raises(FileNotFoundError, match="conv_autoencoder.npz"):
        build.build_latent_codec(config, None, run.patch_autoencoder)


def test_the_run_directory_and_the_builder_name_one_file():
    from percov2_jax.models import conv_autoencoder
    from percov2_jax.runs import layout

    assert layout.CONV_AUTOENCODER == conv_autoencoder.FITTED_FILE
