"""What every config-driven job shares: its flags and its start-up.

The jobs ``python -m percov2_jax.train``, ``python -m percov2_jax.train_prior``,
``python -m percov2_jax.evaluate`` and ``python -m percov2_jax.plan`` take

  --config FILE [--config.FIELD=VALUE ...]   an ml_collections config file (configs/*.py) and overrides
  --workdir DIR                              where the job writes (and resumes from)
  --distributed | --coordinator_address host:port --num_processes N --process_id i
                                             multi-host start-up (train, train_prior, evaluate)

Start the same command on every host of a multi-host run: with ``--distributed`` where
``jax.distributed.initialize()`` finds its arguments itself (TPU pods, SLURM), else with the
coordinator flags.
"""

from __future__ import annotations

from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags(config_help: str, workdir_help: str | None, *, multihost: bool = True) -> None:
    """``--config`` (required), ``--workdir`` (required unless ``workdir_help`` is None) and the
    multi-host flags (unless ``multihost`` is False)."""
    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    required = ["config"]
    if workdir_help is not None:
        flags.DEFINE_string("workdir", None, workdir_help)
        required.append("workdir")
    if multihost:
        flags.DEFINE_bool(
            "distributed", False, "call jax.distributed.initialize() (arguments auto-detected on TPU pods and SLURM)"
        )
        flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs elsewhere)")
        flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
        flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
    flags.mark_flags_as_required(required)


def start() -> None:
    """Quiet logging (orbax logs every file at INFO) unless ``--verbosity`` is given, then
    ``jax.distributed.initialize`` as the multi-host flags ask (nothing for one process)."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if "coordinator_address" not in FLAGS:
        return
    import jax

    if FLAGS.coordinator_address:
        if FLAGS.num_processes is None or FLAGS.process_id is None:
            raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def run(main: Callable[[], None]) -> None:
    """``absl.app.run`` of a job's ``main()`` (no argv: a job takes flags only)."""

    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; jobs take flags only")
        start()
        main()

    app.run(absl_main)
