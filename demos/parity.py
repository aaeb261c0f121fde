"""The parity demo: build a small random SD3 in diffusers format, convert it with the converter,
run the Flax VAE and MM-DiT on a real photograph beside diffusers, and report the agreement.

  python demos/parity.py --config configs/parity_demo.py --workdir /tmp/percov2_parity_demo

Writes ``WORKDIR/demo.png``: the photo | Flax reconstruction | diffusers reconstruction |
|difference| x 1e4. The weights are random, so the reconstructions are not the photo; what the
picture shows is that the two implementations produce the same image.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/parity_demo.py", "demo config file")
flags.DEFINE_string("workdir", "/tmp/percov2_parity_demo", "where the demo writes its models and picture")


def load_photo(name: str, size: int) -> np.ndarray:
    """A photograph shipped with scikit-image, resized to ``size`` x ``size``, in [-1, 1], ``[1, H, W, 3]``."""
    from PIL import Image
    from skimage import data

    pixels = getattr(data, name)()
    image = Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BICUBIC)
    return (np.asarray(image, np.float32) / 127.5 - 1.0)[None]


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(x, np.float32)[0] + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def build_diffusers_pipeline(config, folder: str):
    """Save a random diffusers SD3 transformer and VAE under ``folder`` and return the torch models."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(config.seed)
    transformer = SD3Transformer2DModel(**config.transformer.to_dict()).eval()
    levels = len(config.vae.block_out_channels)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **config.vae.to_dict(),
    ).eval()
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline"}, f)
    return transformer, vae


def run(config, workdir: str) -> dict[str, float]:
    import jax
    import torch
    from PIL import Image

    from percov2_jax import pretrained

    os.makedirs(workdir, exist_ok=True)
    src, dst = os.path.join(workdir, "sd3-tiny-diffusers"), os.path.join(workdir, "sd3-tiny-flax")
    print(
        f"1. building a random diffusers SD3 ({config.transformer.num_layers} MM-DiT blocks, "
        f"width {config.transformer.num_attention_heads * config.transformer.attention_head_dim}) in {src}"
    )
    torch_transformer, torch_vae = build_diffusers_pipeline(config, src)
    print(f"2. converting it with percov2_jax.convert -> {dst}")
    print(pretrained.describe(pretrained.convert(src, dst, overwrite=True), dst))
    loaded = pretrained.load(dst)
    vae, vae_params = loaded["vae"]
    transformer, transformer_params = loaded["transformer"]

    photo = load_photo(config.image, config.image_size)
    rng = np.random.RandomState(config.seed)
    context = rng.randn(1, config.context_length, config.transformer.joint_attention_dim).astype(np.float32)
    pooled = rng.randn(1, config.transformer.pooled_projection_dim).astype(np.float32)
    sigma = np.float32(config.sigma)
    timestep = np.array([1000.0 * sigma], np.float32)

    @jax.jit
    def flax_step(noise):
        z0 = vae.apply({"params": vae_params}, photo, method="encode_to_latents")
        zt = (1 - sigma) * z0 + sigma * noise  # rectified flow
        velocity = transformer.apply({"params": transformer_params}, zt, context, pooled, timestep)
        z0_hat = zt - sigma * velocity
        return z0, velocity, vae.apply({"params": vae_params}, z0_hat, method="decode_latents")

    f = 2 ** (len(config.vae.block_out_channels) - 1)
    noise = rng.randn(1, config.image_size // f, config.image_size // f, 16).astype(np.float32)
    print(
        f"3. Flax: VAE-encode the {config.image!r} photo ({config.image_size}x{config.image_size}), noise to "
        f"sigma={config.sigma}, one MM-DiT velocity prediction, decode the x0 estimate"
    )
    start = time.perf_counter()
    z0, velocity, image = jax.block_until_ready(flax_step(noise))
    print(f"   (compile + run {time.perf_counter() - start:.1f} s)")

    print("4. diffusers: the same steps in PyTorch")
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
    nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
    with torch.no_grad():
        ref_z0 = (torch_vae.encode(nchw(photo)).latent_dist.mean - config.vae.shift_factor) * config.vae.scaling_factor
        ref_zt = (1 - sigma) * ref_z0 + sigma * nchw(noise)
        ref_velocity = torch_transformer(
            ref_zt, torch.from_numpy(context), torch.from_numpy(pooled), torch.from_numpy(timestep)
        ).sample
        ref_image = torch_vae.decode(
            (ref_zt - sigma * ref_velocity) / config.vae.scaling_factor + config.vae.shift_factor
        ).sample

    rows = [
        ("VAE latents (scaled)", z0, nhwc(ref_z0)),
        ("MM-DiT velocity", velocity, nhwc(ref_velocity)),
        ("decoded image", image, nhwc(ref_image)),
    ]
    errors = {}
    print(f"\n   {'stage':22s} {'shape':>18s} {'max |flax - diffusers|':>24s} {'relative to scale':>18s}")
    for name, ours, ref in rows:
        diff = float(np.abs(np.asarray(ours) - ref).max())
        errors[name] = diff / float(np.abs(ref).max())
        print(f"   {name:22s} {str(tuple(ref.shape)):>18s} {diff:24.2e} {errors[name]:18.2e}")
    panel = np.concatenate(
        [
            to_uint8(photo),
            to_uint8(image),
            to_uint8(nhwc(ref_image)),
            np.clip(np.abs(np.asarray(image) - nhwc(ref_image))[0] * 1e4 * 255, 0, 255).astype(np.uint8),
        ],
        axis=1,
    )
    from percov2_jax import captions

    sizes = {name: len(captions.get_coder(name).encode(config.caption)) for name in captions.CODERS}
    print(f"\n   caption {config.caption!r} ({len(config.caption.encode())} UTF-8 bytes) as sent in the bitstream:")
    print(
        "   "
        + ", ".join(f"{name} {n} bytes" for name, n in sizes.items())
        + f"  (zlib is the paper's coder; at {config.image_size}x{config.image_size} the best costs "
        f"{8 * min(sizes.values()) / config.image_size**2:.4f} bpp)"
    )
    out_png = os.path.join(workdir, "demo.png")
    Image.fromarray(panel).save(out_png)
    print(
        f"\n5. wrote {out_png}: photo | Flax | diffusers | |difference| x 1e4 (random weights: the "
        "reconstructions are not the photo, they are each other)"
    )
    return errors


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # orbax logs every file at INFO
        logging.set_verbosity(logging.WARNING)
    errors = run(FLAGS.config, FLAGS.workdir)
    worst = max(errors.values())
    print(f"\nworst relative difference {worst:.1e} (parity tests require <= 1e-5)")
    if worst > 1e-5:
        raise SystemExit("demo: Flax and diffusers disagree beyond 1e-5")


if __name__ == "__main__":
    app.run(main)
