"""Stage 2 at full size: an M2T "Base"-sized prior (12 layers x 768) on the tokens of an SD3
stage-1 run (configs/sd3_medium_*.py).

  python -m percov2_jax.train_prior --config configs/prior_base.py --workdir STAGE1/prior \
      --config.stage1=STAGE1 [--config.mesh.fsdp=8]

Every value is the schema's (percov2_jax/train/prior_defaults.py, each tagged): the paper states
nothing about the prior's size or training.
"""

from percov2_jax.train.prior_defaults import base_prior_config


def get_config():
    return base_prior_config()
