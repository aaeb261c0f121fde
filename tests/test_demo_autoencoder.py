"""experiments/demo_autoencoder.py runs: ``--quick`` in a subprocess exits 0 and writes
``demo_autoencoder_quick.{json,md}`` with both stand-ins' rows and, given two demo runs'
``codec.json`` (made up here, with their ``codec.png``), the codec comparison. Nothing here
checks a number: a smoke run's numbers mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def fake_demo_run(path, psnr: float, tiles: np.ndarray) -> str:
    """A ``codec.json`` in the demo's format for two photos, with a ``codec.png`` beside it."""
    from percov2_jax.train.image_grid import reconstruction_grid, save_png

    path.mkdir()
    picture = str(path / "codec.png")
    save_png(picture, reconstruction_grid(tiles, tiles, max_images=len(tiles)))
    names = ("skimage_astronaut", "skimage_chelsea")
    report = {
        "images": [{"image": name, "psnr": psnr, "bpp": 0.03} for name in names],
        "picture": picture,
        "mean_psnr": psnr,
        "mean_bpp": 0.03,
        "stage1": {"steps": 4},
        "stage2": {"steps": 4},
    }
    path = path / "codec.json"
    path.write_text(json.dumps(report))
    return str(path)


def test_quick_run(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)  # no preferred phase
    blocks = np.repeat(np.repeat(rng.integers(0, 255, (2, 4, 4, 3), dtype=np.uint8), 8, 1), 8, 2)
    before = fake_demo_run(tmp_path / "before", 15.0, blocks)
    after = fake_demo_run(tmp_path / "after", 16.0, noise)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "demo_autoencoder.py"), "--quick", "--out", str(out)]
    result = subprocess.run(
        cmd + ["--before", before, "--after", after], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "demo_autoencoder_quick.json").read_text())
    text = (out / "demo_autoencoder_quick.md").read_text()
    assert report["config"]["quick"] and "QUICK" in text
    assert not (out / "demo_autoencoder.json").exists()
    assert set(report["stand_ins"]) == {"patch_pca", "lapped_conv"}
    for result in report["stand_ins"].values():
        assert set(result["psnr"]["128"]) == {"camera", "retina"}
        assert result["fit_s"] > 0 and set(result["time_768x512_ms"]) == {"encode", "decode"}
    runs = report["demo_runs"]
    assert runs["before"]["mean_psnr"] == 15.0 and runs["after"]["mean_psnr"] == 16.0
    assert runs["before"]["block_edge_ratio"]["8"] > 3.0 > runs["after"]["block_edge_ratio"]["8"]
    for row in ("mean PSNR, held-out, 128 px", "block-edge ratio, N(0, 1) latents", "| skimage_chelsea |", "| 16 px |"):
        assert row in text
