"""experiments/cpu_vae_profile.py runs its quick mode: the JSON and markdown are written, every
variant has a time, a parity error against diffusers and an HLO summary, and both profiles (the
JAX thunk trace and torch.profiler) have convolution rows. Nothing here checks a time: a quick
run's numbers mean nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow, pytest.mark.parity]


def test_quick_run(tmp_path):
    pytest.importorskip("diffusers")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, os.path.join("experiments", "cpu_vae_profile.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    with open(tmp_path / "cpu_vae_profile_quick.json") as f:
        report = json.load(f)
    text = (tmp_path / "cpu_vae_profile_quick.md").read_text()
    assert not (tmp_path / "cpu_vae_profile.json").exists(), "a quick run must not write the full run's file names"
    assert report["config"]["quick"] and "QUICK" in text
    assert {"load_average_at_start", "load_average_at_end"} <= set(report["machine"])
    assert "xla_cpu_experimental_ynn_fusion_type" in report["xla_cpu_flags"]
    for part in ("encode", "decode"):
        r = report["parts"][part]
        assert math.isfinite(r["torch_eager"]["median_ms"]) and f"## {part}" in text
        assert set(r["variants"]) == {"current", "before"}
        for name, v in r["variants"].items():
            assert v["time"]["median_ms"] > 0 and v["rel_err_vs_torch"] < 1e-4, (part, name)
            assert v["hlo"]["convolutions"] > 0 and f"| {name} |" in text
        assert r["profile"]["jax_current"]["wall_ms_under_trace"] > 0
        assert r["profile"]["torch_eager"]["conv_by_shape_ms"]
