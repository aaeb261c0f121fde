"""Training logs: scalars and images to TensorBoard and a JSON-lines file, a progress bar, and
a throughput timer.

Only process 0 writes (pass ``enabled=jax.process_index() == 0``); the others get writers
and bars that do nothing, so the loop calls them unconditionally.

Files (`percov2_jax.runs.layout.RunDir`): ``tensorboard/events.out.tfevents.*`` (scalars and
images) and ``metrics.jsonl`` (one ``{"step": ..., name: value, ...}`` object per write).

TensorBoard files are written with tensorboardX, which needs only numpy and protobuf (no
TensorFlow) and already handles the record framing, CRCs, image summaries and the
``purge_step`` marker that makes TensorBoard drop the events of an abandoned run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from percov2_jax import storage
from percov2_jax.runs.layout import RunDir


def _scalar(name: str, value: Any) -> float | int:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"scalar {name!r} has shape {array.shape}; expected a single value")
    item = array.reshape(()).item()
    if isinstance(item, bool) or not isinstance(item, (int, float)):
        item = float(item)
    return item


class MetricWriter:
    """Writes scalars and images for one run (a `RunDir` or its path); a no-op when not ``enabled``.

    Resuming appends to ``metrics.jsonl`` and starts a new event file. Pass the restored step
    as ``purge_step`` so TensorBoard hides the events the previous run wrote at or after it
    (``read_metrics`` does the same for the JSON lines on its own).
    """

    def __init__(self, run: str | os.PathLike | RunDir, *, enabled: bool = True, purge_step: int | None = None):
        self.run = RunDir(run)
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        if storage.is_url(self.run.tensorboard):
            _route_tensorboard_urls(os.fspath(self.run.tensorboard).split("://")[0])
        self.run.root.mkdir(parents=True, exist_ok=True)
        # tensorboardX names files by the second and opens them with "wb": a nanosecond suffix
        # keeps a quick restart from overwriting the previous file and keeps files in time order.
        self._tb = SummaryWriter(
            os.fspath(self.run.tensorboard), purge_step=purge_step, filename_suffix=f".{time.time_ns()}"
        )
        self._jsonl = _JsonLines(self.run.metrics_file)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Log ``{name: number}`` (Python, numpy or jax scalars) at ``step``; one JSON line per call."""
        if not self.enabled:
            return
        if "step" in scalars:
            raise ValueError("'step' is reserved in metrics.jsonl; pass it as the step argument")
        step = int(step)
        values = {name: _scalar(name, value) for name, value in scalars.items()}
        for name, value in values.items():
            self._tb.add_scalar(name, float(value), step)
        # NaN and inf are written as JSON's NaN/Infinity extensions, which json.loads reads back.
        self._jsonl.append(json.dumps({"step": step, **values}))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Log ``{name: uint8 [H, W, 3]}`` images at ``step`` (TensorBoard only)."""
        if not self.enabled:
            return
        for name, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image {name!r} must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
            self._tb.add_image(name, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._tb = self._jsonl = None
            self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ObjectRecordFile:
    """A TensorBoard events file on object storage, written through `percov2_jax.storage`.

    Object stores have no append, so each flush uploads the whole file (a reader sees the
    previous or the new object); a flush with nothing new uploads nothing, and closing is final.
    (tensorboardX's own gs:// writer re-uploads on every flush and again when garbage-collected.)
    """

    def __init__(self, path: str):
        self.path, self._data, self._uploaded = path, bytearray(), -1

    def write(self, data: bytes) -> None:
        self._data += data

    def flush(self) -> None:
        if self._uploaded != len(self._data):
            storage.write_bytes(self.path, bytes(self._data))
            self._uploaded = len(self._data)

    def close(self) -> None:
        self.flush()


class _ObjectRecordFiles:
    """The tensorboardX writer factory for one URL scheme."""

    def open(self, path: str) -> _ObjectRecordFile:
        return _ObjectRecordFile(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no folders to create


def _route_tensorboard_urls(scheme: str) -> None:
    """Make tensorboardX write ``scheme://`` events files through `_ObjectRecordFile`."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _ObjectRecordFiles())


class _JsonLines:
    """An append-only text file of one JSON object per line, local or on object storage.

    Locally lines are appended and flushed one by one. An object store has no append, so there
    the whole object is rewritten after each line (one small upload per log write; a reader sees
    the previous or the new object, never a part). A line cut off by a crash gets its newline
    before the next one is written.
    """

    def __init__(self, path):
        self.path = storage.path(path)
        self._remote = storage.is_url(self.path)
        existing = self.path.read_bytes() if self.path.exists() else b""
        torn = bool(existing) and not existing.endswith(b"\n")
        if self._remote:
            self._text = existing.decode("utf-8", errors="replace") + ("\n" if torn else "")
            self._file = None
        else:
            self._file = open(self.path, "a", encoding="utf-8")
            if torn:
                self._file.write("\n")

    def append(self, line: str) -> None:
        if self._remote:
            self._text += line + "\n"
            storage.write_text(self.path, self._text)
        else:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(run: str | os.PathLike | RunDir) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, one dict per step in step order.

    Records written at the same step by one run are merged (later values win). A step lower
    than one already seen marks a restart from a checkpoint: the records of the abandoned run
    at or after that step are dropped, so the result is the timeline that led to the newest
    record. Lines that do not parse (a write cut off by a crash) are skipped. An absent file
    gives ``[]``.
    """
    path = RunDir(run).metrics_file
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    last_step = None
    for line in storage.read_text(path).splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if last_step is not None and step < last_step:
            by_step = {s: r for s, r in by_step.items() if s < step}
        by_step.setdefault(step, {}).update(record)
        last_step = step
    return [by_step[s] for s in sorted(by_step)]


class ProgressBar:
    """A tqdm bar on stdout from ``initial_step`` to ``total_steps`` with loss, lr and images/s.

    ``update(step, ...)`` moves the bar to ``step`` (absolute) and shows the values given;
    values not given keep their last shown value. Does nothing when not ``enabled``.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._postfix: dict[str, str] = {}
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial_step, file=sys.stdout, unit="step", dynamic_ncols=True, smoothing=0.1
            )

    def update(
        self, step: int, *, loss: float | None = None, lr: float | None = None, images_per_second: float | None = None
    ) -> None:
        if not self.enabled:
            return
        if loss is not None:
            self._postfix["loss"] = f"{float(loss):.4f}"
        if lr is not None:
            self._postfix["lr"] = f"{float(lr):.2e}"
        if images_per_second is not None:
            self._postfix["img/s"] = f"{float(images_per_second):.1f}"
        self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(int(step) - self._bar.n)

    def write(self, message: str) -> None:
        """Print ``message`` on its own line above the bar; nothing when disabled."""
        if self.enabled:
            self._bar.write(message, file=sys.stdout)

    def close(self) -> None:
        if self.enabled and self._bar is not None:
            self._bar.close()
            self._bar = None
            self.enabled = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Throughput:
    """One timing window: ``steps`` steps in ``seconds``, ``input_seconds`` of them spent waiting
    for input batches on the host."""

    steps: int
    seconds: float
    images_per_second: float
    input_seconds: float = 0.0

    @property
    def input_fraction(self) -> float:
        """The share of the window the host spent waiting for input (near 1: input-bound)."""
        return self.input_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps


class StepTimer:
    """Images per second over windows of training steps, leaving out the warm-up (compile) steps.

    Call ``tick()`` once after each step. The first ``warmup_steps`` ticks only start the
    clock: the first call of a jitted step compiles it, and that time is not throughput.
    ``window()`` returns the throughput of the steps ticked since the previous window (or
    since warm-up) and starts a new window; ``restart_window()`` discards the current one,
    e.g. after an evaluation or a checkpoint save that should not count as step time.

    Dispatch is asynchronous: a step returns before the device finishes it. Pass the step's
    outputs as ``ready`` on the last warm-up tick and on the tick that closes a window (the
    log step, whose metrics are fetched anyway); the clock is then read after
    ``jax.block_until_ready(ready)``. Ticks in between should not block, so the host keeps
    dispatching ahead of the device.

    ``images_per_step`` is the global batch size, so the rate is that of the whole job.
    """

    def __init__(self, images_per_step: int, *, warmup_steps: int = 1, clock: Callable[[], float] = time.perf_counter):
        if images_per_step <= 0 or warmup_steps < 0:
            raise ValueError("images_per_step must be positive and warmup_steps non-negative")
        self.images_per_step = images_per_step
        self.warmup_steps = warmup_steps
        self._clock = clock
        self._ticks = 0
        self._window_start = clock() if warmup_steps == 0 else None
        self._window_steps = 0
        self._input_seconds = 0.0

    def add_input_time(self, seconds: float) -> None:
        """Count ``seconds`` the host waited for the next batch (outside warm-up) in the window."""
        if self._window_start is not None:
            self._input_seconds += float(seconds)

    def tick(self, ready: Any = None) -> None:
        """Mark the end of one step; block on ``ready`` first if given."""
        if ready is not None:
            import jax

            jax.block_until_ready(ready)
        self._ticks += 1
        if self._ticks <= self.warmup_steps:
            if self._ticks == self.warmup_steps:
                self._window_start = self._clock()
            return
        self._window_steps += 1

    def window(self) -> Throughput | None:
        """The throughput since the window began, and a new window; None before any timed step."""
        if self._window_start is None or self._window_steps == 0:
            return None
        now = self._clock()
        seconds = now - self._window_start
        result = Throughput(
            self._window_steps,
            seconds,
            self._window_steps * self.images_per_step / seconds if seconds > 0 else math.inf,
            self._input_seconds,
        )
        self._window_start, self._window_steps, self._input_seconds = now, 0, 0.0
        return result

    def restart_window(self) -> None:
        """Drop the current window's steps and restart its clock (after time that is not training)."""
        if self._window_start is not None:
            self._window_start, self._window_steps, self._input_seconds = self._clock(), 0, 0.0
