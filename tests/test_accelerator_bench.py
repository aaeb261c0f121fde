"""experiments/accelerator_bench.py runs its quick mode on CPU: every row has a finite JAX time, a
PyTorch time and their ratio, and the stage-1 step a time and an MFU; the JSON and markdown are
written and parse. The packages the accelerator machine lacks (besides the wheels carried to it)
are made unimportable in every run, so the benchmark cannot come to need them unnoticed. Without
PyTorch the PyTorch columns say why, and a spent budget marks every task skipped. Nothing here
checks a time: a quick run's numbers mean nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# Not on the accelerator machine, and not carried there (tools/accelerator_wheels.sh).
MISSING_THERE = ("grain", "constriction", "tensorboardX", "tensorflow", "tensorflow_datasets", "gcsfs")

# Runs the benchmark with the modules named in argv[1] unimportable, as absent ones are: ``import``
# fails and ``importlib.util.find_spec`` (what diffusers probes) answers None. Its arguments follow.
RUNNER = """
import runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
sys.path.insert(0, "experiments")
sys.argv = ["experiments/accelerator_bench.py", *sys.argv[2:]]
runpy.run_path("experiments/accelerator_bench.py", run_name="__main__")
"""


def run_quick(out, *args: str, blocked=MISSING_THERE) -> tuple[dict, str]:
    # A multi-device test's XLA_FLAGS must not leak in; the quick mode sets its own.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, "-c", RUNNER, ",".join(blocked), "--quick", "--out", str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    with open(out / "accelerator_bench_quick.json") as f:
        report = json.load(f)
    text = (out / "accelerator_bench_quick.md").read_text()
    assert not (out / "accelerator_bench.json").exists(), "a quick run must not write the full run's file names"
    assert report["config"]["quick"] and "QUICK" in text
    return report, text


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_against_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    report, text = run_quick(tmp_path)
    rows = report["rows"]
    assert {"matmul", "forward", "train", "decode", "vae_encode", "vae_decode", "attention_xla"} <= set(rows)
    for key, row in rows.items():
        assert finite(row["jax"]["median_ms"]) and finite(row["torch_eager"]["median_ms"]), (key, row)
        assert finite(row["ratio_torch_eager"]), key
        assert row["jax"]["timed"] >= 3 and len(row["jax"]["times_ms"]) == row["jax"]["timed"]
        assert f"| {row['name']} |" in text
    for key in ("forward", "decode", "train"):  # torch.compile is left out of quick runs, and says so
        assert "--quick" in rows[key]["torch_compile"]["skipped"]
    assert rows["train"]["settings"]["batch"] == 2 and rows["decode"]["jax"]["images_per_s"] > 0
    assert rows["attention_xla"]["max_abs_diff_vs_xla"] == 0.0
    assert rows["attention_xla"]["max_abs_diff_torch_vs_this"] < 0.1  # bf16 outputs of the same softmax
    stage1 = report["stage1"]
    assert finite(stage1["jax"]["median_ms"]) and finite(stage1["model_flops"])
    assert finite(stage1["jax"]["mfu_measured"]) and stage1["settings"]["batch"] == 2
    assert stage1["model_flops"] > stage1["transformer_flops_3x_forward"]  # VAE encode and hyper-encoder too
    assert finite(report["peak"]["measured_tflops"])
    assert {"jax", "jaxlib", "flax", "torch", "diffusers"} <= set(report["versions"])
    assert "## The project's stage-1 step" in text and "## Targets" in text


def test_quick_run_without_torch(tmp_path):
    report, text = run_quick(tmp_path, "--rows", "matmul,forward", blocked=MISSING_THERE + ("diffusers",))
    rows = report["rows"]
    for key in ("matmul", "forward"):
        assert finite(rows[key]["jax"]["median_ms"])
        assert "diffusers" in rows[key]["torch_eager"]["skipped"] and rows[key]["ratio_torch_eager"] is None
    assert rows["train"]["status"] == "not selected (--rows)"
    assert report["stage1"]["status"] == "not selected (--rows)"
    assert "not run: import of diffusers halted" in text


def test_spent_budget_skips_every_task(tmp_path):
    report, text = run_quick(tmp_path, "--no-torch", "--budget-s", "0")
    for row in [*report["rows"].values(), report["stage1"]]:
        assert row["status"] == "skipped: time budget" and "jax" not in row
    assert rows_say(report, "not run (--no-torch)")
    assert text.count("skipped: time budget") == len(report["rows"]) + 1


def rows_say(report: dict, reason: str) -> bool:
    return all(row["torch_eager"]["skipped"] == reason for row in report["rows"].values())
