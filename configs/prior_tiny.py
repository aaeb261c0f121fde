"""Stage 2 for the tiny model: a small MaskGIT-style prior on the tokens of a stage-1 run.

  python -m percov2_jax.train_prior --config configs/prior_tiny.py --workdir /tmp/percov2_tiny/prior \
      --config.stage1=/tmp/percov2_tiny

Every size is shrunk so a CPU trains it in minutes (percov2_jax/train/prior_defaults.py has the
schema and its tags).
"""

from percov2_jax.train.prior_defaults import base_prior_config


def get_config():
    c = base_prior_config()
    c.prior.width, c.prior.num_layers, c.prior.num_heads = 64, 2, 4
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.optim.decay_steps = 500
    c.mesh.data = 1  # one device; the batch splits over data * fsdp
    c.train.global_batch_size = 16
    c.train.log_every = 25
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 2
    return c
