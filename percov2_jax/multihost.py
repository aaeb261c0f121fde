"""Decisions all processes of a multi-host job must take together."""

from __future__ import annotations

import numpy as np


def process0_decides(flag: bool) -> bool:
    """Process 0's ``flag`` on every process: a wall-clock decision (stop now?) must not split
    the processes, or one waits forever in the next collective."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


class PreemptionWatch:
    """Tells every process of a job, at the same step, that the job is being stopped.

    With ``jax.distributed`` initialised, JAX's preemption service does it: a SIGTERM to any
    process (or, on TPU, the platform's maintenance notice) starts a protocol after which
    ``reached(step)`` is True on every process at one agreed step (the largest step any process
    had reached, plus one). Every process must call ``reached`` at every step. In a
    single-process job a SIGTERM handler sets a flag that ``reached`` returns. A second SIGTERM
    (single process) kills at once: the last committed checkpoint stays the restart point.

    Watching starts on construction; ``close()`` restores the previous SIGTERM handler.
    """

    def __init__(self):
        import signal

        import jax

        # With jax.distributed the preemption service owns SIGTERM: a Python handler would take
        # the signal away from it.
        self._distributed = jax.distributed.is_initialized()
        self._flag = False
        self._previous = None
        if not self._distributed:
            import threading

            if threading.current_thread() is threading.main_thread():
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        import signal

        self._flag = True
        # A second SIGTERM gets the default action (the process ends at once, whatever it is
        # doing); orbax ignores a step whose save it cut short.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def reached(self, step: int) -> bool:
        """Whether to save ``step`` and stop (the same answer on every process)."""
        if self._distributed:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        return self._flag

    @staticmethod
    def saved_line(step: int, checkpoints) -> str:
        """What a job prints when it stops for a preemption after saving ``step``."""
        return f"preempted: saved step {step} in {checkpoints}; run the same command to resume"

    def close(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
