"""`make demo`: train the tiny PerCoV2 on the photographs shipped with scikit-image for at most
6 minutes (stage 1; configs/prior_demo.py then trains the prior), checkpoint it, and write
a grid of originals and reconstructions.

  python -m percov2_jax.demo --config configs/demo.py --workdir /tmp/percov2_demo
  python -m percov2_jax.demo --config configs/demo.py --workdir /tmp/d --config.train.max_minutes=2

The model is configs/tiny.py (no pretrained weights: a PCA patch codec stands in for the SD3
VAE and hashed words for the text encoders), so expect blurry reconstructions that keep the
layout and colours of each photo; real quality needs converted SD3 weights and real training.
"""

import importlib.util
import os


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(os.path.dirname(__file__), "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _tiny().get_config()
    c.train.num_steps = 3000  # the cosine schedule ends here; max_minutes usually stops first
    c.train.max_minutes = 6.0
    c.train.log_every = 25
    c.train.checkpoint_every = 500
    c.train.image_every = 500
    return c
