"""PerCoV2 stage 1 on SD3-medium at the extreme rate: 32x32 tokens at 512^2, V = 256.

  python -m percov2_jax.train --config configs/sd3_medium_extreme.py --workdir DIR \
      --config.pretrained.checkpoint=/path/sd3_medium --config.data.source=tfds --config.data.path=...

As sd3_medium_ultralow.py but at the "extreme" rate (inferred: PerCo (SD)'s 0.0313 configuration).
"""

from percov2_jax.train.defaults import release_config


def get_config():
    return release_config("sd3-medium", "extreme")
