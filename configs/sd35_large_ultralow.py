"""PerCoV2 stage 1 on SD3.5-large at the ultra-low rate: 8x8 tokens at 512^2 (38 blocks, 2432 wide, qk RMS norm).

  python -m percov2_jax.train --config configs/sd35_large_ultralow.py --workdir DIR \
      --config.pretrained.checkpoint=/path/sd35_large --config.data.source=tfds --config.data.path=...

The paper trains on SD3-medium ("PerCoV2 (SD v3.0)"); this variant is ours, with the same
settings. Convert stabilityai/stable-diffusion-3.5-large with `percov2 convert`; the architecture is
read from the checkpoint. Plan the slice first: `python -m percov2_jax.plan --config configs/sd35_large_ultralow.py`.
"""

from percov2_jax.train.defaults import release_config


def get_config():
    return release_config("sd3.5-large", "ultra-low")
