"""`make demo` keeps working: stage 1, stage 2 and the codec for a few steps (and the parity demo)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import parity_demo as parity_config

pytestmark = pytest.mark.integration  # trains models or runs whole jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(name):
    spec = importlib.util.spec_from_file_location(f"demos_{name}", os.path.join(ROOT, "demos", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parity_demo_runs_and_agrees(tmp_path):
    config = parity_config.get_config()
    config.image_size = 64
    errors = _demo("parity").run(config, str(tmp_path))
    assert set(errors) == {"VAE latents (scaled)", "MM-DiT velocity", "decoded image"}
    assert max(errors.values()) <= 1e-5
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_demo_trains_both_stages_and_runs_the_codec(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "demos", "end_to_end.py"),
            "--config",
            os.path.join(ROOT, "configs", "demo.py"),
            "--prior_config",
            os.path.join(ROOT, "configs", "prior_demo.py"),
            "--workdir",
            str(tmp_path),
            "--config.train.num_steps=4",
            "--config.train.log_every=2",
            "--config.sample.num_steps=2",
            "--config.sample.num_images=2",
            "--prior_config.train.num_steps=4",
            "--prior_config.train.log_every=2",
            "--config.vae.fit_steps=20",  # the stand-in's fit is tested in test_conv_autoencoder.py
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads(result.stdout[result.stdout.index("{\n") :])
    assert summary["stage1"]["steps"] == 4 and summary["stage2"]["steps"] == 4
    assert summary["mean_bpp"] > 0 and summary["schedule"] == "qlds (auto)"
    assert "mean PSNR" in result.stdout
    from percov2_jax.data.builtin import BuiltinPhotos
    from percov2_jax.data.pipeline import resize_and_crop

    photos = BuiltinPhotos()  # the colour photos of the installed packages (7 with matplotlib)
    report = json.loads((tmp_path / "codec.json").read_text())
    assert len(report["images"]) == len(photos)
    for row in report["images"]:  # the bits add up, and the streams are on disk
        assert row["total_bits"] == row["caption_bits"] + row["token_bits"] + row["overhead_bits"]
        assert row["uniform_token_bits"] == 8 * 8 * 8  # 128 px at the demo rate: 8x8 tokens of 8 bits
        assert row["bpp"] <= row["uniform_bpp"] and row["token_coding"] in ("prior", "uniform")  # auto
        assert (tmp_path / "streams" / f"{row['image']}.pcv2").stat().st_size == row["total_bits"] // 8
    assert (tmp_path / "checkpoints" / "4").is_dir() and (tmp_path / "prior" / "checkpoints" / "4").is_dir()
    from PIL import Image

    grid = Image.open(tmp_path / "reconstructions.png")
    assert grid.size == (2 * 128 + 3 * 2, 2 * 128 + 3 * 2)
    picture = np.asarray(Image.open(tmp_path / "codec.png"))
    n = len(photos)
    assert picture.shape == (2 * 128 + 3 * 2, n * 128 + (n + 1) * 2, 3)
    first = resize_and_crop(photos[0]["image"], (128, 128))
    np.testing.assert_array_equal(picture[2:130, 2:130], first)  # the originals' row shows the originals
