"""A rehearsal of the real SD3 release, end to end, with only documented commands.

A tiny random release in Stability's diffusers layout (`sd3_release.make_release`: float16
weights, T5 in two shards with an index, CLIP ``vocab.json`` + ``merges.txt``, a T5 tokenizer) is
taken through what docs/conversion.md and docs/training.md tell a user with the real one to do,
each step the documented command in its own process, overriding sizes only (image side, batch,
steps, T5 length, hyper-encoder and prior widths):

``percov2 convert`` -> stage 1 from ``configs/sd3_medium_ultralow.py`` with the SD3 text encoders
sharded beside the MM-DiT on 4 virtual devices (the architecture read from the checkpoint) ->
``tools/precompute_text.py --config`` and stage 1 on the precomputed store -> the prior
(``configs/prior_base.py``) -> ``python -m percov2_jax.evaluate`` on a small folder ->
``percov2 compress`` / ``info`` / ``decompress`` of both runs -> ``python -m percov2_jax.plan``
with the checkpoint's text encoders. Then both SD3.5 configs take a training step on converted
tiny SD3.5 releases.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import xla_env
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = pathlib.Path(__file__).resolve().parents[1]
T5_LENGTH = 16
IMAGE = 128  # the tiny transformer's position table covers 8x8 patches: 128 px
# Sizes only: what a user shrinks to try the real config on a laptop.
STAGE1_SIZES = [
    f"--config.image_size={IMAGE}",
    "--config.train.global_batch_size=4",
    "--config.train.num_steps=2",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=2",
    "--config.train.image_every=2",
    "--config.sample.num_steps=2",
    "--config.sample.num_images=2",
    f"--config.text.max_sequence_length={T5_LENGTH}",
    "--config.model.hyper_channels=16",
    "--config.model.hyper_out_channels=16",
    "--config.model.codebook_dim=8",
]


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)  # keeps conftest's compilation cache and the network guard
    env["XLA_FLAGS"] = xla_env.xla_flags(devices)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def run(*args: str, devices: int = 1) -> str:
    """One documented command (``python -m ...``, ``percov2 ...``, ``tools/...``) in its own process."""
    cmd = [sys.executable, *args] if not args[0] == "percov2" else [sys.executable, "-m", "percov2_jax.cli", *args[1:]]
    result = subprocess.run(cmd, env=_env(devices), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def _metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    import sd3_release

    root = tmp_path_factory.mktemp("release")
    folder = sd3_release.make_release(root, "sd3_medium", seed=0)
    ckpt = root / "sd3_medium_jax"
    out = run("percov2", "convert", "--input", str(folder), "--output", str(ckpt))
    assert "wrote" in out
    return {"root": root, "folder": folder, "ckpt": ckpt}


def test_the_sd3_medium_release_end_to_end(release, tmp_path):
    ckpt = str(release["ckpt"])
    work = tmp_path

    # Stage 1 with the text encoders on the mesh: fsdp over 4 devices (the config's own mesh).
    stage1 = work / "stage1"
    config = ["--config", "configs/sd3_medium_ultralow.py", f"--config.pretrained.checkpoint={ckpt}", *STAGE1_SIZES]
    run("-m", "percov2_jax.train", *config, "--workdir", str(stage1), devices=4)
    logged = _metrics(stage1)
    assert [m["step"] for m in logged if "loss" in m] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in logged if "loss" in m)
    from percov2_jax.runs import checkpointing
    from percov2_jax.runs.layout import RunDir

    run_dir = RunDir(str(stage1))
    assert run_dir.latest_grid.exists()  # a reconstruction grid, captions through the mesh encoders
    stored = checkpointing.read_json(run_dir, checkpointing.CONFIG)
    assert stored["model"]["transformer"]["num_layers"] == 2  # the checkpoint's, stored with the run

    # The same with precomputed text: the store keyed by the run's own example ids.
    store = work / "text_store"
    run("tools/precompute_text.py", *config, "--output", str(store))
    precomputed = work / "stage1_precomputed"
    run(
        "-m",
        "percov2_jax.train",
        *config,
        "--config.text.kind=precomputed",
        f"--config.text.store={store}",
        "--workdir",
        str(precomputed),
        devices=4,
    )
    assert [m["step"] for m in _metrics(precomputed) if "loss" in m] == [1, 2]

    # The prior on the first run's tokens.
    run(
        "-m",
        "percov2_jax.train_prior",
        "--config",
        "configs/prior_base.py",
        "--workdir",
        str(stage1 / "prior"),
        f"--config.stage1={stage1}",
        "--config.prior.width=32",
        "--config.prior.num_layers=1",
        "--config.prior.num_heads=2",
        "--config.train.global_batch_size=4",
        "--config.train.num_steps=2",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=2",
        "--config.optim.warmup_steps=1",
    )

    # Evaluation on a small folder.
    from percov2_jax.data.builtin import BuiltinPhotos

    photos = work / "photos"
    photos.mkdir()
    source = BuiltinPhotos()
    for i in range(2):
        Image.fromarray(source[i]["image"]).resize((IMAGE, IMAGE)).save(photos / f"kodim{i + 1:02d}.png")
    run(
        "-m",
        "percov2_jax.evaluate",
        "--config",
        "configs/eval_kodak.py",
        "--workdir",
        str(work / "eval"),
        f"--config.checkpoint={stage1}",
        f"--config.dataset.root={photos}",
        f"--config.dataset.size={IMAGE}",
        "--config.metrics.names=psnr",
        '--config.modes=[{"sample_steps": 2, "guidance_scale": 3.0}]',
    )
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert "psnr" in json.dumps(summary) and summary["images"]["evaluated"] == 2

    # The codec of each run: compress with a caption, info, decompress.
    for name, workdir in (("sd3", stage1), ("precomputed", precomputed)):
        stream = work / f"{name}.pcv2"
        run(
            "percov2",
            "compress",
            str(photos / "kodim01.png"),
            "-o",
            str(stream),
            "--checkpoint",
            str(workdir),
            "--caption",
            "a photo of a cat",
        )
        assert "bpp" in run("percov2", "info", str(stream))
        run("percov2", "decompress", str(stream), "-o", str(work / f"{name}.png"), "--checkpoint", str(workdir))
        assert np.asarray(Image.open(work / f"{name}.png")).shape == (IMAGE, IMAGE, 3)

    # The planner counts the run's own text encoders (read from the checkpoint).
    out = run(
        "-m",
        "percov2_jax.plan",
        *config,
        "--device_kind",
        "h100",
        "--mesh",
        "data=1,fsdp=2,tensor=1",
        "--json",
        str(work / "plan.json"),
    )
    plan = json.loads((work / "plan.json").read_text())
    names = [p["name"] for p in plan["programs"]]
    assert names == ["train_step", "decode", "text_encoders", "train_step+text_encoders", "decode+text_encoders"]
    text = plan["programs"][2]
    assert text["argument_bytes"] > 0 and "| text_encoders |" in out


@pytest.mark.parametrize(
    "variant,config", [("sd35_medium", "sd35_medium_extreme"), ("sd35_large", "sd35_large_ultralow")]
)
def test_sd35_configs_take_a_step_on_their_release(variant, config, tmp_path):
    """A converted tiny SD3.5 release trains a step with the shipped SD3.5 config, nothing about
    the architecture restated (qk-norm and dual attention come from the checkpoint)."""
    import sd3_release

    folder = sd3_release.make_release(tmp_path, variant, seed=3)
    ckpt = tmp_path / "ckpt"
    run("percov2", "convert", "--input", str(folder), "--output", str(ckpt))
    workdir = tmp_path / "run"
    run(
        "-m",
        "percov2_jax.train",
        "--config",
        f"configs/{config}.py",
        f"--config.pretrained.checkpoint={ckpt}",
        *STAGE1_SIZES,
        "--config.train.num_steps=1",
        "--config.train.image_every=0",
        "--workdir",
        str(workdir),
    )
    (logged,) = [m for m in _metrics(workdir) if "loss" in m]
    assert np.isfinite(logged["loss"])
