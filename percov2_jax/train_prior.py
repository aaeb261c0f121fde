"""Stage-2 entry point: ``python -m percov2_jax.train_prior --config configs/prior_tiny.py --workdir DIR``.

Multi-host: the same command on every host with ``--distributed`` or the coordinator flags
(``percov2_jax.train.distributed``), as for stage 1.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from percov2_jax.train import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "stage-2 config file (configs/prior_*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints and logs of the prior (resumes if present)")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax

    distributed.initialize(FLAGS)
    from percov2_jax.train.prior import train_prior

    history = train_prior(FLAGS.config, FLAGS.workdir)
    if history and jax.process_index() == 0:
        print(json.dumps({"first": history[0], "last": history[-1]}, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
