"""XLA settings for the test processes and their subprocesses.

Tests compile far more than they run (tiny models, a few steps each), and on 2 CPU cores LLVM's
optimisation of the generated kernels is ~40% of every compile: measured on the training tests'
config, the state initialisation 21.8 s -> 12.0 s and the first train step 25.4 s -> 14.9 s.
``FAST_COMPILE`` turns that optimisation off. Mostly it changes how fast kernels run, but not
only: float results move by tens of ulps (experiments/table_agreement.py measures up to 101 ulps
in the prior's probabilities), so streams a test encodes are decoded by the tests, never
compared with streams made without it. The benchmarks in experiments/ run without it.
"""

from __future__ import annotations

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a test subprocess: fast compiles, and ``devices`` virtual CPU devices."""
    flags = [FAST_COMPILE]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)
