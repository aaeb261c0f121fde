"""experiments/cpu_vae_profile.py runs its quick mode: the JSON and markdown are written, every
variant has a time, a parity error against diffusers and an HLO summary, and both profiles (the
JAX thunk trace and torch.profiler) have convolution rows. Nothing here checks a time: a quick
run's numbers mean nothing."""

from __future__ import annotations

import math

import pytest
from experiment_runs import run_quick

pytestmark = [pytest.mark.slow, pytest.mark.parity]


def test_quick_run(tmp_path):
    pytest.importorskip("diffusers")
    report, text = run_quick("cpu_vae_profile", tmp_path)
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
