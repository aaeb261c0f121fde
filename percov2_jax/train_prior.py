"""Stage-2 training: ``python -m percov2_jax.train_prior --config configs/prior_tiny.py --workdir DIR``.

  python -m percov2_jax.train_prior --config configs/prior_tiny.py --workdir STAGE1/prior \
      --config.stage1=STAGE1 [--config.mesh.fsdp=8]

Train in ``STAGE1/prior`` and the codec finds the prior. Restarting the same command resumes.
Multi-host: the same command on every host with ``--distributed`` or the coordinator flags
(`percov2_jax.jobs`).
"""

from __future__ import annotations

import json

from percov2_jax import jobs

jobs.define_flags("stage-2 config file (configs/prior_*.py)", "checkpoints and logs of the prior (resumes if present)")


def main() -> None:
    import jax

    from percov2_jax.train.prior import train_prior

    history = train_prior(jobs.FLAGS.config, jobs.FLAGS.workdir)
    if history and jax.process_index() == 0:
        print(json.dumps({"first": history[0], "last": history[-1]}, sort_keys=True))


if __name__ == "__main__":
    jobs.run(main)
