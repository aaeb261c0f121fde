"""Stage 2 for the tiny model: a small MaskGIT-style prior on the tokens of a stage-1 run.

  python -m percov2_jax.train_prior --config configs/prior_tiny.py --workdir /tmp/prior \
      --config.stage1=/tmp/percov2_demo

The paper states nothing about the prior's size or training: every value here is [ours] unless
tagged with its source (M2T's "Base" prior is 12 x 768).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.stage1 = ""  # the stage-1 training workdir whose frozen hyper-encoder + VQ make the tokens
    c.seed = 0  # [ours]
    c.image_size = 0  # [ours] 0: the stage-1 run's image size
    c.batch_size = 16  # [ours] global batch over all processes
    c.num_steps = 500  # [ours]
    c.max_minutes = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    c.log_every = 25
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    c.data_source = ""  # "" = the stage-1 run's data; else builtin / folder / tfds with data_path
    c.data_path = ""
    c.mesh = ml_collections.ConfigDict(dict(  # devices = data * fsdp * tensor; one size may be -1 (the rest)
        data=1, fsdp=1, tensor=1))  # [ours] one device; the batch splits over data * fsdp
    c.prior = ml_collections.ConfigDict(dict(
        width=64, num_layers=2, num_heads=4, mlp_ratio=4, max_side=64,  # [ours] shrunk for a CPU
        condition_on_caption=True,  # [ours] the caption is sent first, so it is free side information
        mask_scheme="uniform",  # [M2T] uniform 5-99% masked; "cosine" = MaskGIT
        dtype="float32",  # [ours] compute dtype
        param_dtype="float32",  # [ours]
    ))
    c.optim = ml_collections.ConfigDict(dict(  # AdamW, all [ours]: the paper does not describe the prior's training
        learning_rate=1e-3,
        schedule="cosine",  # "cosine" | "constant" | "linear" decay after the warm-up, ending at num_steps
        warmup_steps=20,  # linear warm-up from 0
        final_lr_fraction=0.1,  # the learning rate at num_steps, as a fraction of learning_rate (not for constant)
        b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.01,
        grad_clip=1.0,  # global-norm clipping; 0 = none
    ))
    return c
