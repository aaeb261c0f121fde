"""`make demo`, stage 2: the tiny prior on the demo run's tokens for at most 2 minutes.

  python demos/end_to_end.py --config configs/demo.py --prior_config configs/prior_demo.py

``stage1`` is set by the demo (its --workdir); the prior trains in ``WORKDIR/prior``, where
``Codec.from_workdir`` and ``percov2 compress`` find it.
"""

from configs import prior_tiny


def get_config():
    c = prior_tiny.get_config()
    c.train.num_steps = 1500  # the cosine schedule ends here; max_minutes usually stops first
    c.train.max_minutes = 2.0
    c.train.log_every = 25
    c.train.checkpoint_every = 500
    return c
