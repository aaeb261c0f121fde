"""Stage-1 training: ``python -m percov2_jax.train --config configs/tiny.py --workdir DIR``.

  python -m percov2_jax.train --config configs/sd3_medium_ultralow.py --workdir DIR \
      --config.pretrained.checkpoint=/ckpt/sd3_medium_flax --config.train.global_batch_size=256

Restarting the same command resumes. Multi-host: the same command on every host with
``--distributed`` or the coordinator flags (`percov2_jax.jobs`).
"""

from __future__ import annotations

import json

from percov2_jax import jobs

jobs.define_flags(
    "stage-1 config file (configs/*.py)", "checkpoints, logs and pictures go here (resumes if it has checkpoints)"
)


def main() -> None:
    import jax

    from percov2_jax.train.loop import train_and_evaluate

    metrics = train_and_evaluate(jobs.FLAGS.config, jobs.FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps({"final": metrics}, sort_keys=True))


if __name__ == "__main__":
    jobs.run(main)
