"""Preemption: a SIGTERM to a running training job makes it save the step it is at, wait for the
save to commit and exit 0 with one line saying so; the same command then resumes, and the
loss sequence of the preempted-and-resumed run equals an uninterrupted run's bit for bit (one
CPU device, the same compiled step)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import train_setup
import xla_env

pytestmark = pytest.mark.slow  # subprocess jobs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _config_file(tmp_path, write: bool = True) -> str:
    """The training tests' config (tests/train_setup.py) as a config file for the job's --config:
    a log line per step, no periodic checkpoints or grids (only the preemption saves)."""
    text = textwrap.dedent(
        """
        import train_setup

        def get_config():
            c = train_setup.test_config()
            c.train.log_every, c.train.checkpoint_every, c.train.image_every = 1, 10_000, 0
            return c
        """
    )
    if not write:
        return text
    path = tmp_path / "config.py"
    path.write_text(text)
    return str(path)


def _env() -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_env.xla_flags())  # one CPU device
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    return env


def _logged_steps(workdir) -> list[int]:
    from percov2_jax.train.monitoring import read_metrics

    return [r["step"] for r in read_metrics(workdir)]


def _start(config: str, workdir, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "percov2_jax.train", "--config", config, "--workdir", str(workdir), *flags]
    return subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_after(process: subprocess.Popen, workdir, step: int, timeout: float = 600) -> str:
    """Send a SIGTERM once the job has logged ``step``; its output."""
    deadline = time.monotonic() + timeout
    while not _logged_steps(workdir) or _logged_steps(workdir)[-1] < step:
        if process.poll() is not None:
            raise AssertionError(f"the job ended before step {step}:\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no step {step} within {timeout} s")
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=600)
    return out


def test_sigterm_saves_exits_0_and_resumes_with_the_same_losses(tmp_path):
    from percov2_jax.runs import checkpointing
    from percov2_jax.runs.layout import RunDir

    config, workdir = _config_file(tmp_path), tmp_path / "run"
    first = _start(config, workdir)
    out = _signal_after(first, workdir, 1)
    assert first.returncode == 0, out[-4000:]
    preempted = [line for line in out.splitlines() if "preempted: saved step" in line]
    assert len(preempted) == 1, out[-4000:]
    stopped = _logged_steps(workdir)[-1]
    assert f"saved step {stopped} " in preempted[0]
    manager = checkpointing.make_manager(RunDir(workdir))
    assert manager.latest_step() == stopped
    manager.close()

    second = _start(config, workdir)
    out = _signal_after(second, workdir, stopped + 2)
    assert second.returncode == 0, out[-4000:]
    from percov2_jax.train.monitoring import read_metrics

    records = read_metrics(workdir)
    steps = [r["step"] for r in records]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] >= stopped + 2
    losses, _ = train_setup.run_steps(train_setup.test_config(), str(tmp_path / "reference"), len(steps))
    np.testing.assert_array_equal(np.asarray([r["loss"] for r in records], np.float32), np.float32(losses))


def test_two_processes_stop_together_when_one_is_signalled(tmp_path):
    """Two processes joined by jax.distributed (one CPU device each): a SIGTERM to process 1
    alone reaches JAX's preemption service; both processes save the same step and exit 0; the
    same command resumes both, and its losses continue the run's (float32 on two devices:
    equal to the one-device run within 1e-5 relative, the reduction-order noise of a
    two-device batch mean after a few Adam steps)."""
    import socket

    from percov2_jax.runs import checkpointing
    from percov2_jax.runs.layout import RunDir
    from percov2_jax.train.monitoring import read_metrics

    path = tmp_path / "config.py"
    path.write_text(_config_file(tmp_path, write=False).replace("return c", "c.mesh.data = 2\n    return c"))
    workdir = tmp_path / "run"

    def start_both():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        flags = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2"]
        return [_start(str(path), workdir, *flags, "--process_id", str(i)) for i in range(2)]

    first = start_both()
    outs = [_signal_after(first[1], workdir, 1), first[0].communicate(timeout=600)[0]]
    assert [p.returncode for p in first] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    stopped = _logged_steps(workdir)[-1]
    assert f"preempted: saved step {stopped} " in outs[1]  # process 0 writes the line
    manager = checkpointing.make_manager(RunDir(workdir))
    assert manager.latest_step() == stopped
    manager.close()

    second = start_both()
    outs = [_signal_after(second[0], workdir, stopped + 1), second[1].communicate(timeout=600)[0]]
    assert [p.returncode for p in second] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    records = read_metrics(workdir)
    steps = [r["step"] for r in records]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] > stopped
    losses, _ = train_setup.run_steps(train_setup.test_config(), str(tmp_path / "reference"), len(steps))
    np.testing.assert_allclose([r["loss"] for r in records], losses, rtol=1e-5)


def test_a_second_sigterm_ends_the_process_at_once(tmp_path):
    """The first SIGTERM only raises the flag (the job goes on to save); a second one, while the
    job is still saving or stuck, ends it at once with the default action. What it leaves is a
    step without orbax's commit marker, which a restart ignores (test_train.py:
    test_interrupted_save_is_ignored, locally and in a bucket)."""
    script = textwrap.dedent(
        """
        import os, signal, time
        from percov2_jax.multihost import PreemptionWatch

        watch = PreemptionWatch()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not watch.reached(0) and time.monotonic() < deadline:
            time.sleep(0.01)
        print("first signal seen:", watch.reached(0), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("still running after the second signal", flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.splitlines() == ["first signal seen: True"], result.stdout + result.stderr[-2000:]
    assert result.returncode == -signal.SIGTERM
