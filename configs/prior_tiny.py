"""Stage 2 for the tiny model: a small MaskGIT-style prior on the tokens of a stage-1 run.

  python -m percov2_jax.train_prior --config configs/prior_tiny.py --workdir /tmp/prior \
      --config.stage1=/tmp/percov2_demo

Sizes are ours (the paper does not state the prior's size); M2T's "Base" is 12 x 768.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.stage1 = ""  # the stage-1 training workdir whose frozen hyper-encoder + VQ make the tokens
    c.seed = 0
    c.image_size = 0  # 0: the stage-1 run's image size
    c.batch_size = 16
    c.num_steps = 500
    c.max_minutes = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    c.log_every = 25
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    c.data_source = ""  # "" = the stage-1 run's data; else builtin / folder / tfds with data_path
    c.data_path = ""
    c.prior = ml_collections.ConfigDict(dict(
        width=64, num_layers=2, num_heads=4, mlp_ratio=4, max_side=64,
        condition_on_caption=True,  # [unknown for PerCoV2] the caption is sent first, so it is free side information
        mask_scheme="uniform",  # M2T: uniform 5-99% masked; "cosine" = MaskGIT
    ))
    c.optim = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=20, weight_decay=0.01, grad_clip=1.0))
    return c
