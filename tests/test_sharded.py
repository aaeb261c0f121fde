"""Converted SD3 weights (and a T5 encoder) placed straight onto a (data, fsdp, tensor) mesh, on 8
virtual CPU devices in one process and across two processes (jax.distributed on 127.0.0.1), equal
the PyTorch references within 1e-5 of the output scale. Subprocesses keep XLA_FLAGS isolated."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import xla_env
from torch_reference import nhwc, randomize_, tiny_sd3
from transformers import T5Config, T5EncoderModel

from percov2_jax import pretrained

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = [pytest.mark.slow, pytest.mark.parity]  # subprocesses; PyTorch references


@pytest.fixture(scope="module")
def sharded_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    model = tiny_sd3("sd3_medium", seed=51)
    model.save_pretrained(root / "transformer")
    pretrained.convert(str(root / "transformer"), str(root / "ckpt"), progress=False)
    rng = np.random.RandomState(5)
    x = dict(
        latents=rng.randn(2, 8, 12, 16).astype(np.float32),
        context=rng.randn(2, 4, 12).astype(np.float32),
        pooled=rng.randn(2, 10).astype(np.float32),
        timestep=np.array([250.0, 750.0], np.float32),
    )
    with torch.no_grad():
        ref = model(
            torch.from_numpy(x["latents"].transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(x["context"]),
            torch.from_numpy(x["pooled"]),
            torch.from_numpy(x["timestep"]),
        ).sample
    t5 = randomize_(
        T5EncoderModel(
            T5Config(
                vocab_size=64,
                d_model=32,
                d_kv=8,
                d_ff=48,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8,
            )
        ),
        52,
    )
    t5.save_pretrained(root / "t5")
    t5_ids = rng.randint(0, 64, (2, 10))
    with torch.no_grad():
        t5_ref = t5(torch.from_numpy(t5_ids)).last_hidden_state.numpy()
    np.savez(root / "inputs.npz", reference=nhwc(ref), t5_ids=t5_ids.astype(np.int32), t5_reference=t5_ref, **x)
    return root


def _cmd(root, *extra):
    return [
        sys.executable,
        os.path.join(HERE, "multidevice_check.py"),
        "--folder",
        str(root / "transformer"),
        "--checkpoint",
        str(root / "ckpt"),
        "--inputs",
        str(root / "inputs.npz"),
        "--t5",
        str(root / "t5"),
        *extra,
    ]


def _env(devices_per_process):
    env = dict(os.environ, XLA_FLAGS=xla_env.xla_flags(devices_per_process), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def test_eight_devices_one_process(sharded_case):
    result = subprocess.run(_cmd(sharded_case), env=_env(8), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("relative error") == 3


def test_two_processes_four_devices_each(sharded_case):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            _cmd(sharded_case, "--num-processes", "2", "--process-id", str(i), "--port", str(port)),
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err[-4000:]
        assert out.count("relative error") == 3
