"""PerCoV2 stage 1 on SD3-medium at the ultra-low rate: 8x8 tokens at 512^2, V = 256.

  python -m percov2_jax.train --config configs/sd3_medium_ultralow.py --workdir /shared/run \
      --config.pretrained.checkpoint=/path/sd3_medium_flax --config.data.source=tfds \
      --config.data.path=/path/open_images_prepared

Needs an SD3-medium checkpoint converted with `percov2 convert` (transformer, VAE and the
three text encoders). Paper facts and our defaults are tagged in percov2_jax/train/defaults.py;
the ultra-low rate itself is inferred from the paper's figures (see percov2_jax/rates.py).
"""

from percov2_jax.train.defaults import base_config


def get_config():
    c = base_config()
    c.rate = "ultra-low"
    # [ours] FSDP over every chip: `python -m percov2_jax.plan` at global batch 160 on 32 chips needs 12.2 GiB per
    # chip with fsdp=32 (fits v4, v5e, v5p) but 47.4 GiB with plain data parallelism (v5p only).
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
