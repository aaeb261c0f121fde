"""experiments/table_agreement.py: its quick run (conditions ``default`` and ``batch8``, each in its
own process, on 10 maps of the shipped fixture), and the pieces its full run and ``--compare``
rest on: ulp distances, the simulated cross-decode, and a dump compared with itself."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "table_agreement.py")


@pytest.fixture(scope="module")
def experiment():
    sys.path.insert(0, os.path.dirname(SCRIPT))  # for its sibling results_io
    spec = importlib.util.spec_from_file_location("table_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["table_agreement"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_ulps(experiment):
    a = np.array([[0.5, 0.25, 0.0, 1e-30]], np.float32)
    b = a.copy()
    assert experiment.ulps(a, b).tolist() == [0]
    b[0, 1] = np.nextafter(b[0, 1], np.float32(1))
    assert experiment.ulps(a, b).tolist() == [1]
    b[0, 2] = np.float32(3 * 2.0**-149)  # three subnormal steps above zero
    assert experiment.ulps(a, b).tolist() == [3]


def test_simulated_decode_detects_other_tables(experiment):
    from percov2_jax.entropy import coder

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 16, 64)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    tables = [coder.quantize_probabilities(p.astype(np.float32)) for p in probs]
    symbols = [rng.integers(64, size=16) for _ in range(3)]
    assert experiment.simulate_stream(tables, tables, symbols) == "exact"
    other = [t.copy() for t in tables]
    other[1][:, 0] += 1 << 12  # every row of step 1 moves mass to symbol 0
    other[1][np.arange(16), 1 + np.argmax(other[1][:, 1:], axis=1)] -= 1 << 12
    assert experiment.simulate_stream(tables, other, symbols) in ("error", "wrong_tokens")


def test_quick_run(tmp_path, experiment):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "table_agreement_quick.json").read_text())
    text = (tmp_path / "table_agreement_quick.md").read_text()
    assert report["config"]["quick"] and "QUICK" in text
    assert list(report["conditions"]) == ["default", "batch8"] and list(report["pairs"]) == ["batch8"]
    for key, maps in experiment.QUICK_MAPS.items():
        pair = report["pairs"]["batch8"][key]
        assert pair["rows"] == maps * experiment.SETUPS[key].side ** 2
        assert 0 <= pair["table_rows_differ"] <= pair["float_rows_differ"] <= pair["rows"]
        # Maps whose tables agree must decode exactly, whichever condition encoded them.
        agreeing = [m for m in range(maps) if m not in pair["table_maps"]][:2]
        for direction in ("default_to_condition", "condition_to_default"):
            outcomes = {int(m): v for m, v in pair[direction].items()}
            assert set(agreeing) <= set(outcomes)
            assert all(outcomes[m] == "exact" for m in agreeing)
        cost = report["cost"][key]
        assert abs(cost["3"] - cost["float"]) < 0.05 and cost["0"] >= cost["3"] - 0.05
        assert f"| batch8 | {pair['rows']} |" in text


def test_dump_compared_with_itself(tmp_path, experiment):
    path = str(tmp_path / "tables.npz")
    experiment.dump(path, experiment.FIXTURE, ["cpu", "cpu_batch8"], 2)
    assert os.path.getsize(path) < 10_000_000
    report = experiment.compare(path, path, experiment.FIXTURE)
    assert list(report["pairs"]) == ["A:cpu vs A:cpu_batch8"]
    for key, r in report["pairs"]["A:cpu vs A:cpu_batch8"].items():
        assert r["maps"] == 1 and r["rows"] == experiment.SETUPS[key].side ** 2  # batch8 runs a quarter of the maps
        assert (r["rows_with_floats_both_sides"] > 0) == (r["float_rows_differ"] > 0)  # both maps stored
        assert len(r["streams_a_to_b"]) == r["maps_tables_differ"]
    assert "| A:cpu vs A:cpu_batch8 | v256_8x8 |" in experiment.compare_markdown({**report, "command": "x"})
