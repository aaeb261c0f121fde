"""A ``jax.profiler`` trace of chosen training steps, written into the run directory.

``config.profile.start_step`` (0: none) and ``num_steps`` pick the steps (1-based, as logged);
``all_processes`` traces every process instead of process 0 only. The trace goes to a local
temporary folder first and is then copied to ``WORKDIR/profile/`` (which may be on ``gs://``), in
the layout TensorBoard's profile plugin reads (``plugins/profile/<run>/<host>.xplane.pb``; also
openable in Perfetto via ``xprof``). Each step is annotated with ``StepTraceAnnotation`` so the
trace viewer groups device work by step.
"""

from __future__ import annotations

import contextlib
import tempfile

import jax

from percov2_jax import storage


class StepProfiler:
    """Call ``step(n)`` around step ``n``'s work (a context manager) and ``close()`` at the end."""

    def __init__(self, profile, directory: storage.PathLike):
        self.start = int(profile.get("start_step", 0))
        self.stop = self.start + int(profile.get("num_steps", 0))  # first step not traced
        everyone = bool(profile.get("all_processes", False))
        self.enabled = self.start > 0 and self.stop > self.start and (everyone or jax.process_index() == 0)
        self.directory = directory
        self._local: tempfile.TemporaryDirectory | None = None

    @property
    def tracing(self) -> bool:
        return self._local is not None

    @contextlib.contextmanager
    def step(self, n: int, ready=None):
        """Trace step ``n`` when it is in range; ``ready`` (the step's outputs, a callable returning
        them) is waited for before the trace of the last step stops."""
        if self.enabled and n == self.start and not self.tracing:
            self._local = tempfile.TemporaryDirectory(prefix="percov2-profile-")
            jax.profiler.start_trace(self._local.name)
        if not self.tracing:
            yield
            return
        with jax.profiler.StepTraceAnnotation("train", step_num=n):
            yield
        if n == self.stop - 1:
            if ready is not None:
                jax.block_until_ready(ready())
            self.close()

    def close(self) -> None:
        """Stop a running trace and copy it into the run directory."""
        if not self.tracing:
            return
        jax.profiler.stop_trace()
        try:
            storage.copy_tree(self._local.name, self.directory)
        finally:
            self._local.cleanup()
            self._local = None
