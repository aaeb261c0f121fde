"""Stage-1 training entry point.

  python -m percov2_jax.train --config configs/tiny.py --workdir /tmp/percov2_tiny
  python -m percov2_jax.train --config configs/sd3_medium_ultralow.py --workdir DIR \
      --config.pretrained.checkpoint=/ckpt/sd3_medium_flax --config.train.global_batch_size=256

Multi-host: start the same command on every host; with ``--distributed`` (default on TPU pods,
where ``jax.distributed.initialize()`` needs no arguments) or the coordinator flags below.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from percov2_jax.train import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "stage-1 config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and pictures go here (resumes if it has checkpoints)")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax

    distributed.initialize(FLAGS)
    from percov2_jax.train.loop import train_and_evaluate

    metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps({"final": metrics}, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
