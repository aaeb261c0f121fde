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
