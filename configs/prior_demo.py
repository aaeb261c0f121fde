"""`make demo`, stage 2: the tiny prior on the demo run's tokens for at most 2 minutes.

  python -m percov2_jax.demo --config configs/demo.py --prior_config configs/prior_demo.py

``stage1`` is set by the demo (its --workdir); the prior trains in ``WORKDIR/prior``, where
``Codec.from_workdir`` and ``percov2 compress`` find it.
"""

import importlib.util
import os


def _prior_tiny():
    spec = importlib.util.spec_from_file_location("prior_tiny", os.path.join(os.path.dirname(__file__), "prior_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _prior_tiny().get_config()
    c.num_steps = 1500  # the cosine schedule ends here; max_minutes usually stops first
    c.max_minutes = 2.0
    c.log_every = 25
    c.checkpoint_every = 500
    return c
