"""Multi-process start-up flags shared by the training entry points.

Start the same command on every host with ``--distributed`` (TPU pods, SLURM: arguments are
auto-detected) or ``--coordinator_address host:port --num_processes N --process_id i``.
"""

from __future__ import annotations

from absl import flags


def define_flags() -> None:
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (auto-detected on TPU pods / SLURM)")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs outside TPU pods)")
    flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
    flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")


def initialize(values) -> None:
    """``jax.distributed.initialize`` as the flags ask (nothing for a one-process run)."""
    import jax

    if values.coordinator_address:
        if values.num_processes is None or values.process_id is None:
            raise SystemExit("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(values.coordinator_address, values.num_processes, values.process_id)
    elif values.distributed:
        jax.distributed.initialize()


def process0_decides(flag: bool) -> bool:
    """Process 0's ``flag`` on every process: a wall-clock decision (stop now?) must not split
    the processes, or one waits forever in the next collective."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
