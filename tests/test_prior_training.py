"""Stage 2: the MIM prior trains on a frozen stage-1 model's tokens, resumes exactly, the saved
prior codes and decodes those tokens (prior mode of the token coder), and sharded or
multi-process training equals one device."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import train_setup
import xla_env

pytestmark = pytest.mark.integration  # trains models or runs whole jobs


@pytest.fixture(scope="module")
def stage1(stage1_workdir):
    return stage1_workdir


prior_config = train_setup.prior_test_config


def test_prior_learns_resumes_and_codes(stage1, tmp_path):

    from percov2_jax.entropy import schedules, token_coding
    from percov2_jax.runs.prior import load_prior
    from percov2_jax.train.prior import PriorTrainer

    config = prior_config(stage1)
    trainer = PriorTrainer(config, str(tmp_path))
    try:
        history = trainer.train_steps(3)
        trainer.save()
        more = trainer.train_steps(2)
        tokens, caption = trainer.next_batch()
    finally:
        trainer.close()
    assert all(np.isfinite(h["bits_per_token"]) for h in history + more)
    resumed = PriorTrainer(config, str(tmp_path))
    try:
        assert resumed.step == 3
        again = resumed.train_steps(2)
    finally:
        resumed.close()
    assert [h["bits_per_token"] for h in again] == [h["bits_per_token"] for h in more]  # exact resume

    model, params = load_prior(str(tmp_path))
    probabilities = token_coding.make_step_probabilities(model.apply)
    grid = np.asarray(tokens[0])
    schedule = schedules.make_schedule("qlds", *grid.shape)
    payload, bits = token_coding.encode_with_prior(probabilities, params, grid, schedule, caption=caption[0])
    decoded, _ = token_coding.decode_with_prior(probabilities, params, payload, schedule, caption=caption[0])
    np.testing.assert_array_equal(decoded, grid)
    assert len(payload) * 8 <= sum(bits) + 16


def test_preemption_saves_the_agreed_step_and_stops(stage1, tmp_path, monkeypatch, capsys):
    """The stage-2 loop on a preemption notice (what `multihost.PreemptionWatch` reports after a
    SIGTERM; the signal path itself is tested with the stage-1 job in test_preemption.py): it
    saves that step, says so and returns; the same call resumes from it. The first run also
    writes a profiler trace of step 1 into the run."""
    from percov2_jax import multihost, storage
    from percov2_jax.runs import checkpointing
    from percov2_jax.runs.layout import RunDir
    from percov2_jax.train.prior import train_prior

    config = prior_config(stage1)
    config.train.num_steps, config.train.checkpoint_every = 6, 100
    config.profile.start_step, config.profile.num_steps = 1, 1
    monkeypatch.setattr(multihost.PreemptionWatch, "reached", lambda self, step: step == 2)
    assert len(train_prior(config, str(tmp_path))) == 2
    assert "preempted: saved step 2 " in capsys.readouterr().out
    traces = [p for p in storage.files_under(RunDir(tmp_path).profile) if p.name.endswith(".xplane.pb")]
    assert len(traces) == 1
    config.profile.start_step = 0
    manager = checkpointing.make_manager(RunDir(tmp_path))
    assert manager.all_steps() == [2]
    manager.close()
    monkeypatch.setattr(multihost.PreemptionWatch, "reached", lambda self, step: False)
    assert len(train_prior(config, str(tmp_path))) == 4  # steps 3 to 6


def test_stage1_workdir_is_required(tmp_path):
    from percov2_jax.train.prior import PriorTrainer

    config = prior_config("")
    with pytest.raises(ValueError, match="stage1"):
        PriorTrainer(config, str(tmp_path))


@pytest.mark.parametrize("schedule", ["cosine", "constant", "linear"])
def test_learning_rate_schedule(schedule):
    """optim.schedule / warmup_steps / end_learning_rate_factor through stage 1's schedule builder:
    linear warm-up from 0, then the decay ends at end_learning_rate_factor * lr at train.num_steps."""
    from percov2_jax.train.optimizer import learning_rate_schedule

    config = prior_config("unused")
    config.train.num_steps, config.optim.warmup_steps, config.optim.end_learning_rate_factor = 100, 10, 0.25
    config.optim.schedule = schedule
    lr = config.optim.learning_rate
    rate = learning_rate_schedule(config.optim)
    np.testing.assert_allclose([rate(0), rate(5), rate(10)], [0.0, lr / 2, lr], rtol=1e-6)
    end = lr if schedule == "constant" else 0.25 * lr
    np.testing.assert_allclose(rate(100), end, rtol=1e-6)
    middle = {"constant": lr, "linear": (lr + end) / 2, "cosine": end + (lr - end) / 2}[schedule]
    np.testing.assert_allclose(rate(55), middle, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Sharded and multi-process training equal one device (subprocesses running tests/prior_check.py)
#
# Reference: the same float64 run on one CPU device. Tolerance: losses and every parameter tensor
# within REL_TOL of the reference, relative to the tensor's largest magnitude but at least
# SCALE_FLOOR. The floor is for the self-attention key biases (to_k/bias): softmax ignores a shift
# shared by all keys, so their exact gradient is zero, their computed one is rounding noise, and
# after three steps they hold ~1e-14 of noise that differs from mesh to mesh; every other tensor
# has moved by ~1e-4. Measured: parameters within 3.4e-8, losses within 1.1e-7 (mim.py computes
# the loss in float32).

STEPS = 3
REL_TOL = 1e-5
SCALE_FLOOR = 1e-6
HERE = os.path.dirname(os.path.abspath(__file__))
# 2 x 2 x 2 is avoided: XLA:CPU miscomputes attention partitioned over three mesh axes (tests/test_train.py).
EIGHT_DEVICE_RUNS = [
    [[[1, 1, 1], STEPS]],  # the reference
    [[[4, 2, 1], STEPS]],
    [[[1, 2, 4], STEPS - 1], [[4, 2, 1], 1]],  # checkpoint on one mesh, resume on another
    [[[4, 1, 1], 1]],  # step 1 on a 1-process x 4-device slice, for test_resume_on_another_slice
]


def _env(devices: int) -> dict:
    env = dict(os.environ)  # keeps conftest's persistent compilation cache
    env["XLA_FLAGS"] = xla_env.xla_flags(devices)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, env.get("PYTHONPATH", "")])
    return env


def _cmd(stage1, tmp_path, runs, *extra):
    return [
        sys.executable,
        os.path.join(HERE, "prior_check.py"),
        "--stage1",
        stage1,
        "--workdir",
        str(tmp_path / "work"),
        "--runs",
        json.dumps(runs),
        "--output",
        str(tmp_path / "result"),
        *extra,
    ]


def assert_close(result, reference, where):
    losses, params = result
    ref_losses, ref_params = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=REL_TOL, err_msg=where)
    assert sorted(params) == sorted(ref_params), where
    worst = max(
        (float(np.max(np.abs(params[k] - ref_params[k]))) / max(float(np.max(np.abs(ref_params[k]))), SCALE_FLOOR), k)
        for k in ref_params
    )
    assert worst[0] <= REL_TOL, f"{where}: {worst[1]} differs by {worst[0]:.2e} relative"


@pytest.fixture(scope="module")
def eight_device_runs(stage1, tmp_path_factory):
    """All of EIGHT_DEVICE_RUNS in one process with 8 virtual CPU devices: ``results`` (one
    (losses, params) per run) and ``work`` (run i's workdir is ``work / str(i)``)."""
    tmp = tmp_path_factory.mktemp("prior8")
    result = subprocess.run(
        _cmd(stage1, tmp, EIGHT_DEVICE_RUNS), env=_env(8), capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    results = [train_setup.load_result(str(tmp / f"result_{i}.npz")) for i in range(len(EIGHT_DEVICE_RUNS))]
    return {"results": results, "work": tmp / "work"}


@pytest.mark.slow
def test_eight_devices_equal_one(eight_device_runs):
    """data x fsdp = 4 x 2 and fsdp x tensor = 2 x 4 meshes, and a checkpoint written on
    1 x 2 x 4 restored onto 4 x 2 x 1 (sharded state and data position), equal one device."""
    reference, *results = eight_device_runs["results"]
    for runs, result in zip(EIGHT_DEVICE_RUNS[1:-1], results):
        assert_close(result, reference, " -> ".join(f"mesh {mesh} for {steps}" for mesh, steps in runs))


@pytest.mark.slow
def test_resume_on_another_slice(stage1, eight_device_runs, tmp_path):
    """Step 1 on one process with 4 devices (data = 4); step 2 resumed from that checkpoint on two
    processes joined by jax.distributed on 127.0.0.1, one CPU device each: each encodes its half of
    the batch with its own stage-1 model, the prior's parameters split over both (fsdp = 2); step 3
    resumed from theirs on one process with 4 devices (data x fsdp = 2 x 2). Equal to the
    uninterrupted one-device run: the data position is global.

    (One device per process and no second trainer: process 1 cannot use the persistent
    compilation cache, which jax writes from process 0 only and keys per process on CPU, so
    each compile there is paid in full.)"""
    shutil.copytree(eight_device_runs["work"] / str(len(EIGHT_DEVICE_RUNS) - 1), tmp_path / "work" / "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = [[[[1, 2, 1], 1]]]
    procs = [
        subprocess.Popen(
            _cmd(stage1, tmp_path, runs, "--num-processes", "2", "--process-id", str(i), "--port", str(port)),
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err[-4000:]
    second, _ = train_setup.load_result(str(tmp_path / "result_0.npz"))

    # The checkpoint the two processes wrote loads in this one process, for the token coder.
    from percov2_jax.runs.prior import load_prior

    _, params = load_prior(str(tmp_path / "work" / "0"))
    reference = eight_device_runs["results"][0]
    assert {k: v.shape for k, v in train_setup.flat(params).items()} == {k: v.shape for k, v in reference[1].items()}

    result = subprocess.run(
        _cmd(stage1, tmp_path, [[[[2, 2, 1], 1]]]), env=_env(4), capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    third, params = train_setup.load_result(str(tmp_path / "result_0.npz"))
    losses = np.concatenate([eight_device_runs["results"][-1][0], second, third])
    assert_close((losses, params), reference, "1x4 -> 2x1 -> 1x4")
