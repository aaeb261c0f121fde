"""Running an experiment's smoke test from the suite: ``python experiments/NAME.py --quick --out
OUT`` in a subprocess, then the checks every quick run must pass (exit 0, a ``_quick`` JSON and
markdown report marked QUICK, the machine fields, no full-run file names)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_quick(name: str, out, *args: str) -> subprocess.Popen:
    """Start ``experiments/NAME.py --quick --out OUT ARGS``, its output in ``OUT/NAME.log``."""
    # The experiments set their own device counts; a multi-device test's XLA_FLAGS must not leak in.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), "--quick", "--out", str(out), *args]
    with open(out / f"{name}.log", "w") as log:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish_quick(name: str, out, process: subprocess.Popen) -> tuple[dict, str]:
    """Wait for a quick run; check its exit status and common fields; its JSON report and markdown."""
    try:
        process.wait(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
    log = (out / f"{name}.log").read_text()
    assert process.returncode == 0, log[-6000:]
    with open(out / f"{name}_quick.json") as f:
        report = json.load(f)
    with open(out / f"{name}_quick.md") as f:
        text = f.read()
    assert report["config"]["quick"] and "QUICK" in text
    assert {"cpu", "cpu_count", "load_average_at_start", "load_average_at_end"} <= set(report["machine"])
    assert not list(out.glob(f"{name}.json")), "a quick run must not write the full run's file names"
    return report, text


def run_quick(name: str, out, *args: str) -> tuple[dict, str]:
    return finish_quick(name, out, start_quick(name, out, *args))
