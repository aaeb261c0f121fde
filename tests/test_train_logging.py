"""The training loop's logging pieces: TensorBoard + JSON-lines writer, progress bar, step
timer, reconstruction grid, and FLOP/MFU helpers.

TensorBoard files are read back with tensorboard's own ``EventAccumulator`` (an independent
reader of what tensorboardX wrote). The analytic MM-DiT FLOP count is checked exactly against
the matmuls of the traced model, and against XLA's compiled count within stated bounds.
"""

from __future__ import annotations

import io
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from percov2_jax import flops
from percov2_jax.models.mmdit import SD3Transformer2DModel, SD3TransformerConfig, example_inputs
from percov2_jax.runs.layout import METRICS_FILE
from percov2_jax.train.image_grid import reconstruction_grid, save_png
from percov2_jax.train.monitoring import MetricWriter, ProgressBar, StepTimer, read_metrics

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _tensorboard(workdir):
    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


# --- MetricWriter ------------------------------------------------------------------------


def test_scalars_and_images_read_back_from_tensorboard(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)  # non-square
    with MetricWriter(tmp_path) as writer:
        writer.write_scalars(1, {"train/loss": 0.25, "train/lr": np.float32(1e-4)})
        writer.write_scalars(2, {"train/loss": jnp.asarray(0.125), "train/lr": 2e-4})
        writer.write_images(2, {"reconstructions": image})
        writer.flush()

    acc = _tensorboard(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.25), (2, 0.125)]
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/lr")], [1e-4, 2e-4], rtol=1e-6)
    [event] = acc.Images("reconstructions")
    assert (event.step, event.height, event.width) == (2, 6, 10)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, image)  # PNG is lossless

    assert read_metrics(tmp_path) == [
        {"step": 1, "train/loss": 0.25, "train/lr": pytest.approx(1e-4)},
        {"step": 2, "train/loss": 0.125, "train/lr": 2e-4},
    ]


def test_jsonl_and_tensorboard_survive_a_restart_that_repeats_steps(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write_scalars(step, {"loss": float(step)})
        writer.write_scalars(4, {"eval/psnr": 20.0})  # same step, separate call: merged
        writer.write_scalars(5, {"eval/psnr": 21.0})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "loss": ')  # killed mid-write

    # Restart from the step-3 checkpoint: steps 3 and 4 are logged again, 5 not yet.
    with MetricWriter(tmp_path, purge_step=3) as writer:
        writer.write_scalars(3, {"loss": 30.0})
        writer.write_scalars(4, {"loss": 40.0})
        writer.write_scalars(4, {"eval/psnr": 24.0})

    assert read_metrics(tmp_path) == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 30.0},
        {"step": 4, "loss": 40.0, "eval/psnr": 24.0},
    ]
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert json.loads(lines[-1]) == {"step": 4, "eval/psnr": 24.0}  # appended after the torn line, not glued to it

    acc = _tensorboard(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/psnr")] == [(4, 24.0)]


@pytest.mark.integration  # talks to the Cloud Storage emulator, a server process
def test_logs_on_cloud_storage_survive_a_restart(gcs, tmp_path):
    """On ``gs://`` (no append on object storage) metrics.jsonl is rewritten whole per line: a
    restart keeps the earlier lines, mends a torn last line, and the events and PNGs land in the
    bucket too."""
    from percov2_jax import storage
    from percov2_jax.runs.layout import RunDir

    run = RunDir(gcs.create_bucket() + "/run")
    with MetricWriter(run) as writer:
        for step in (1, 2, 3):
            writer.write_scalars(step, {"loss": float(step)})
        writer.write_images(2, {"grid": np.zeros((4, 4, 3), np.uint8)})
    storage.write_text(run.metrics_file, storage.read_text(run.metrics_file) + '{"step": 4, "lo')  # killed mid-write
    with MetricWriter(run, purge_step=3) as writer:
        writer.write_scalars(3, {"loss": 30.0})
    assert read_metrics(run) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]
    assert storage.read_text(run.metrics_file).splitlines()[-1] == '{"step": 3, "loss": 30.0}'
    events = sorted(p.name for p in run.tensorboard.iterdir())
    assert len(events) == 2 and all(name.startswith("events.out.tfevents.") for name in events)
    for name in events:  # TensorBoard reads them (copied here: its reader needs TensorFlow for gs://)
        (tmp_path / "tensorboard").mkdir(exist_ok=True)
        (tmp_path / "tensorboard" / name).write_bytes(storage.read_bytes(run.tensorboard / name))
    acc = _tensorboard(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [e.step for e in acc.Images("grid")] == [2]
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    save_png(run.grid(3), image)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(storage.read_bytes(run.grid(3))))), image)


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricWriter(workdir, enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"grid": np.zeros((2, 2, 3), np.uint8)})
    writer.flush()
    writer.close()
    assert not workdir.exists()
    assert read_metrics(workdir) == []


def test_writer_rejects_bad_values(tmp_path):
    with MetricWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.write_scalars(1, {"step": 1})
        with pytest.raises(ValueError, match="single value"):
            writer.write_scalars(1, {"loss": np.zeros(2)})
        with pytest.raises(ValueError, match="uint8"):
            writer.write_images(1, {"grid": np.zeros((2, 2, 3), np.float32)})
        writer.write_scalars(1, {"loss": float("nan")})
    [record] = read_metrics(tmp_path)
    assert np.isnan(record["loss"])


# --- ProgressBar and StepTimer -----------------------------------------------------------


def test_progress_bar_shows_loss_lr_and_throughput(capsys):
    with ProgressBar(total_steps=10, initial_step=4, enabled=True) as bar:
        bar.update(5, loss=0.5, lr=1e-4)
        bar.update(7, images_per_second=123.45)
    out = capsys.readouterr().out
    assert "7/10" in out and "loss=0.5000" in out and "lr=1.00e-04" in out and "img/s=123.5" in out

    with ProgressBar(total_steps=10, initial_step=0, enabled=False) as bar:
        bar.update(3, loss=1.0)
        bar.write("hello")
    assert capsys.readouterr() == ("", "")


def test_step_timer_counts_input_waits_in_its_window():
    now = [0.0]
    timer = StepTimer(images_per_step=4, warmup_steps=1, clock=lambda: now[0])
    timer.add_input_time(5.0)  # during warm-up: not counted
    timer.tick()
    for _ in range(2):
        timer.add_input_time(0.25)
        now[0] += 1.0
        timer.tick()
    w = timer.window()
    assert (w.steps, w.seconds, w.input_seconds, w.input_fraction) == (2, 2.0, 0.5, 0.25)
    timer.add_input_time(1.0)
    timer.restart_window()
    now[0] += 1.0
    timer.tick()
    assert timer.window().input_seconds == 0.0


def test_step_timer_excludes_warmup_and_measures_windows():
    now = [0.0]
    timer = StepTimer(images_per_step=8, warmup_steps=1, clock=lambda: now[0])
    assert timer.window() is None
    now[0] = 30.0  # the first step compiles
    timer.tick(ready=jnp.ones(2))  # blocks on a real array
    assert timer.window() is None
    for _ in range(4):
        now[0] += 0.5
        timer.tick()
    w = timer.window()
    assert (w.steps, w.seconds, w.images_per_second, w.seconds_per_step) == (4, 2.0, 16.0, 0.5)

    now[0] += 100.0  # an evaluation
    timer.restart_window()
    now[0] += 1.0
    timer.tick()
    w = timer.window()
    assert (w.steps, w.images_per_second) == (1, 8.0)


# --- image grid --------------------------------------------------------------------------


def test_reconstruction_grid_layout_and_values():
    n, h, w, pad = 3, 2, 5, 1
    originals = np.zeros((n, h, w, 3), np.float32)
    originals[0] = -1.0
    originals[1] = 1.0
    originals[2] = -0.5  # 63.75 -> 64
    reconstructions = np.full((n, h, w, 3), 2.0, np.float32)  # clipped to 255
    reconstructions[1] = -3.0  # clipped to 0
    reconstructions[2, 0, 0] = (0.0, 0.5, 1.0)  # 127.5 -> 128, 191.25 -> 191, 255

    grid = reconstruction_grid(originals, reconstructions, pad=pad)
    assert grid.dtype == np.uint8 and grid.shape == (2 * h + 3 * pad, n * w + (n + 1) * pad, 3)

    def tile(row, col):
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        return grid[top : top + h, left : left + w]

    assert (tile(0, 0) == 0).all() and (tile(0, 1) == 255).all() and (tile(0, 2) == 64).all()
    assert (tile(1, 0) == 255).all() and (tile(1, 1) == 0).all()
    assert tuple(tile(1, 2)[0, 0]) == (128, 191, 255)
    assert (tile(1, 2)[1] == 255).all()
    # gutters: every pixel outside the six tiles is padding
    mask = np.ones(grid.shape[:2], bool)
    for row in range(2):
        for col in range(n):
            top, left = pad + row * (h + pad), pad + col * (w + pad)
            mask[top : top + h, left : left + w] = False
    assert (grid[mask] == 255).all()

    capped = reconstruction_grid(jnp.asarray(np.zeros((10, h, w, 3))), np.zeros((10, h, w, 3)), max_images=4, pad=0)
    assert capped.shape == (2 * h, 4 * w, 3) and (capped == 128).all()
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_grid(originals, reconstructions[:2])


def test_save_png_round_trip_and_overwrite(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (7, 12, 3), dtype=np.uint8)
    path = tmp_path / "samples" / "step_100.png"
    save_png(path, image)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    save_png(path, image[::-1])
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image[::-1])
    assert [p.name for p in path.parent.iterdir()] == ["step_100.png"]  # no temporary left behind


# --- FLOPs and MFU -----------------------------------------------------------------------


def _device(kind, platform="gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v2", 22.5e12),
        ("TPU v3", 61.5e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10G", 70e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("Tesla V100-PCIE-32GB", 112e12),
        ("NVIDIA L40S", None),
        ("TPU v7", None),
        ("", None),
    ],
)
def test_peak_flops_table(kind, peak):
    assert flops.peak_flops_per_device(_device(kind, "tpu" if kind.startswith("TPU") else "gpu")) == peak


def test_peak_flops_is_none_on_cpu():
    assert flops.peak_flops_per_device(jax.devices("cpu")[0]) is None
    assert flops.peak_flops_per_device(_device("TPU v4", platform="cpu")) is None


def test_model_flops_utilization_arithmetic():
    v5e = [_device("TPU v5 lite", "tpu")] * 4
    assert flops.model_flops_utilization(197e12, 2.0, v5e) == pytest.approx(197e12 / (2.0 * 4 * 197e12))
    assert flops.model_flops_utilization(None, 1.0, v5e) is None
    assert flops.model_flops_utilization(1e12, 0.0, v5e) is None
    assert flops.model_flops_utilization(1e12, 1.0, []) is None
    assert flops.model_flops_utilization(1e12, 1.0, v5e + [_device("unknown")]) is None
    assert flops.model_flops_utilization(1e12, 1.0, jax.devices("cpu")) is None


def test_compiled_flops_of_a_matmul_and_the_cost_analysis_forms():
    x, w = jnp.ones((16, 32)), jnp.ones((32, 8))
    assert flops.compiled_flops(jax.jit(jnp.matmul), x, w) == 2 * 16 * 32 * 8

    def fake(analysis):
        compiled = types.SimpleNamespace(cost_analysis=lambda: analysis)
        return types.SimpleNamespace(lower=lambda *a: types.SimpleNamespace(compile=lambda: compiled))

    assert flops.compiled_flops(fake([{"flops": 3.0}, {"flops": 4.0}])) == 7.0  # older jax: a list per module
    assert flops.compiled_flops(fake({"flops": 5.0, "transcendentals": 1.0})) == 5.0
    assert flops.compiled_flops(fake(None)) is None
    assert flops.compiled_flops(fake({"bytes accessed": 1.0})) is None
    assert flops.compiled_flops(fake({"flops": -1.0})) is None


def _tiny(num_layers=2, heads=2, head_dim=8, **kw):
    return SD3TransformerConfig(
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        caption_projection_dim=heads * head_dim,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        pos_embed_max_size=8,
        **kw,
    )


def _model_and_args(config, batch, latent_h, latent_w, text_len, scan_layers=False):
    model = SD3Transformer2DModel(config, scan_layers=scan_layers)
    args = example_inputs(config, batch, latent_h, latent_w, text_len)
    params = jax.eval_shape(model.init, jax.random.key(0), *args)
    return model, params, args


@pytest.mark.parametrize(
    "config_kw, scan_layers, latent",
    [
        (dict(), False, (8, 8)),
        (dict(num_layers=5, qk_norm="rms_norm", dual_attention_layers=(0, 1)), False, (8, 12)),
        (dict(num_layers=5, qk_norm="rms_norm", dual_attention_layers=(0, 1)), True, (8, 12)),
    ],
)
def test_analytic_mmdit_flops_equal_the_traced_matmuls(config_kw, scan_layers, latent):
    """Exact: the analytic count is every dot_general and conv of the model's jaxpr."""
    config = _tiny(**config_kw)
    model, params, args = _model_and_args(config, 2, *latent, 5, scan_layers)
    traced = flops.traced_matmul_flops(model.apply, params, *args)
    assert flops.mmdit_forward_flops(config, 2, *latent, 5) == traced


@pytest.mark.parametrize(
    "head_dim, low, high",
    [
        # Measured analytic/compiled: 0.869 at D = 16 (elementwise ops, which the analytic count
        # leaves out, are O(D) per token against the matmuls' O(D^2)); 0.961 at D = 64.
        (8, 0.84, 0.90),
        (32, 0.95, 0.98),
    ],
)
def test_analytic_mmdit_flops_against_xla(head_dim, low, high):
    config = _tiny(head_dim=head_dim)
    model, params, args = _model_and_args(config, 2, 8, 8, 5)
    compiled = flops.compiled_flops(jax.jit(model.apply), params, *args)
    analytic = flops.mmdit_forward_flops(config, 2, 8, 8, 5)
    assert low < analytic / compiled < high, analytic / compiled
