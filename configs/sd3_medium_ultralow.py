"""PerCoV2 stage 1 on SD3-medium at the ultra-low rate: 8x8 tokens at 512^2, V = 256.

  python -m percov2_jax.train --config configs/sd3_medium_ultralow.py --workdir gs://BUCKET/run \
      --config.pretrained.checkpoint=gs://BUCKET/sd3_medium --config.data.source=tfds \
      --config.data.path=gs://BUCKET/tfds/open_images

Needs a checkpoint converted with `percov2 convert` from stabilityai/stable-diffusion-3-medium-diffusers
(transformer, VAE and the three text encoders, or the text in a separate ``text.checkpoint`` or a
precomputed ``text.store``); the architecture is read from it. Paper facts and our defaults are
tagged in percov2_jax/train/defaults.py; the ultra-low rate itself is inferred from the paper's
figures (see percov2_jax/rates.py).
"""

from percov2_jax.train.defaults import release_config


def get_config():
    return release_config("sd3-medium", "ultra-low")
