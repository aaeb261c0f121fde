"""`make demo`, stage 1: train the tiny PerCoV2 on the photographs shipped with scikit-image for
at most 6 minutes (configs/prior_demo.py then trains the prior), checkpoint it, and write a grid
of originals and reconstructions.

  python demos/end_to_end.py --config configs/demo.py --workdir /tmp/percov2_demo
  python demos/end_to_end.py --config configs/demo.py --workdir /tmp/d --config.train.max_minutes=2

The model is configs/tiny.py (no pretrained weights: a PCA patch codec stands in for the SD3
VAE and hashed words for the text encoders), so expect blurry reconstructions that keep the
layout and colours of each photo; real quality needs converted SD3 weights and real training.
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.train.num_steps = 3000  # the cosine schedule ends here; max_minutes usually stops first
    c.train.max_minutes = 6.0
    c.train.log_every = 25
    c.train.checkpoint_every = 500
    c.train.image_every = 500
    return c
