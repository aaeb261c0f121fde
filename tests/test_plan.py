"""``python -m percov2_jax.plan``: ahead-of-time compilation for TPU slices (libtpu's compiler, no TPU) and for
GPU kinds on virtual CPU devices, with the tiny config. Each run is a subprocess (libtpu and
the device count must be set before JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = os.environ.get("PERCOV2_LIBTPU_PATH", os.path.join(ROOT, ".venv", "libtpu"))
needs_libtpu = pytest.mark.skipif(
    not os.path.isdir(os.path.join(LIBTPU, "libtpu")), reason="libtpu not installed (`make libtpu`)"
)
pytestmark = pytest.mark.slow


def plan(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [
        sys.executable,
        "-m",
        "percov2_jax.plan",
        "--config",
        os.path.join(ROOT, "configs", "tiny.py"),
        "--libtpu_path",
        LIBTPU,
        "--json",
        str(out),
        *args,
    ]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out) as f:
        return json.load(f), result.stdout


def tiny_model_flops(batch, text_length=16):
    from configs import tiny
    from percov2_jax import build, rates
    from percov2_jax.flops import mmdit_forward_flops

    config = tiny.get_config()
    model = build.build_model(config, rates.get_rate(config.rate))
    side = int(config.image_size) // rates.LATENT_DOWNSAMPLE
    return mmdit_forward_flops(model.config.conditioned_transformer, batch, side, side, text_length)


@needs_libtpu
def test_tpu_plan_of_the_decoder(tmp_path):
    """The tiny decoder on a v5e 2x2 slice (compiled by libtpu, one image per chip)."""
    result, text = plan(
        tmp_path,
        "v5e",
        "--device_kind",
        "tpu_v5e",
        "--mesh",
        "data=1,fsdp=4,tensor=1",
        "--programs=decode",
        "--decode_batch=4",
    )
    header, (decode,) = result["header"], result["programs"]
    assert header["devices"] == 4 and header["device_kind"] == "tpu_v5e" and decode["name"] == "decode"
    # 10 Euler steps x 2 passes (CFG 3) of the MM-DiT over 4 images.
    assert decode["model_flops"] == pytest.approx(20 * tiny_model_flops(4))
    assert decode["argument_bytes"] > 0 and decode["temp_bytes"] > 0 and decode["xla_flops"] > 0
    assert decode["peak_bytes"] == (
        decode["argument_bytes"]
        + decode["output_bytes"]
        - decode["alias_bytes"]
        + decode["temp_bytes"]
        + decode["code_bytes"]
    )
    assert decode["fits"] and decode["memory_bytes"] == 16 * 2**30
    assert decode["seconds_at_mfu"]["tpu_v5e"] == pytest.approx(decode["model_flops"] / (4 * 197e12 * 0.4))
    assert "tpu_v5e x4 mesh data=1,fsdp=4,tensor=1" in text and "TPU compiler" in text and "| decode |" in text


CONSTRAINT_COUNT = """
import contextlib
import jax
from configs import tiny
from percov2_jax import sharding
import percov2_jax.train.step as step_mod
from percov2_jax.planning.plan import Planner
config = tiny.get_config()
planner = Planner(config, sharding.make_mesh(1, 4, 1))
def count():
    step, args = planner.train_step_program()
    text = step.lower(*args).as_text()
    return text.count("sdy.sharding_constraint") + text.count("@Sharding")
on = count()
import types
step_mod.sharding_lib = types.SimpleNamespace(**{**vars(sharding),
                                                 "activation_constraints": lambda mesh: contextlib.nullcontext()})
print(on, count())
"""


def test_train_step_constrains_activations_to_the_batch_axes():
    """The models' ``nn.with_logical_constraint`` calls reach the lowered train step (flax drops
    them without rules and a mesh: at SD3-medium size on 32 chips XLA then kept activations
    whole on every device, 56 GiB of temporaries per chip instead of 1.6 for one image each)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", CONSTRAINT_COUNT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    on, off = map(int, result.stdout.split()[-2:])
    assert off == 0 and on >= 4 * 3, (on, off)  # >= 3 per block (hidden, context, heads) x 4 blocks


def test_gpu_kind_plans_the_train_step_on_virtual_cpu_devices(tmp_path):
    result, text = plan(
        tmp_path,
        "h100",
        "--device_kind",
        "h100",
        "--mesh",
        "data=1,fsdp=2,tensor=1",
        "--config.train.global_batch_size=4",
        "--programs=train",
    )
    (train,) = result["programs"]
    assert result["header"]["devices"] == 2 and train["name"] == "train_step"
    # 3x the analytic MM-DiT forward over the global batch.
    assert train["model_flops"] == pytest.approx(3 * tiny_model_flops(4))
    assert train["seconds_at_mfu"]["h100"] == pytest.approx(train["model_flops"] / (2 * 989e12 * 0.4))
    # The state is donated: the new state's buffers alias the old ones.
    assert 0 < train["output_bytes"] and train["alias_bytes"] > 0.9 * train["output_bytes"]
    assert "XLA:CPU (a proxy" in text and "| train_step |" in text


def test_bad_requests_fail_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base = [sys.executable, "-m", "percov2_jax.plan", "--config", os.path.join(ROOT, "configs", "tiny.py")]
    for args, message in (
        (["--device_kind", "tpu_v9"], "unknown device kind"),
        (["--mesh", "data=3,fsdp=1,tensor=1", "--device_kind", "tpu_v5e"], "power-of-two"),
        (["--mesh", "batch=2"], "--mesh wants"),
        (
            ["--mesh", "data=2,fsdp=1,tensor=1", "--device_kind", "h100", "--config.train.global_batch_size=3"],
            "not divisible",
        ),
    ):
        result = subprocess.run(base + args, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and message in result.stderr + result.stdout, (args, result.stderr[-2000:])


def test_device_kinds_take_their_peaks_from_the_flop_table():
    """The planner's device kinds and the trainer's MFU read one peak table."""
    from percov2_jax.planning.devices import DEVICE_KINDS

    peaks = {name: kind.peak_flops for name, kind in DEVICE_KINDS.items()}
    assert peaks == {
        "tpu_v4": 275e12,
        "tpu_v5e": 197e12,
        "tpu_v5p": 459e12,
        "tpu_v6e": 918e12,
        "h100": 989e12,
        "a100": 312e12,
    }


def test_text_encoders_of_the_release_have_its_parameter_counts():
    """The planner's SD3 text encoders (used without a checkpoint) are the release's: the
    parameter counts of CLIPTextModelWithProjection (ViT-L/14 and bigG/14) and T5-XXL's encoder
    as transformers counts them."""
    import jax
    from flax import linen as nn

    from percov2_jax.convert import registry
    from percov2_jax.planning.plan import SD3_TEXT_ENCODERS

    counts = {}
    for name, config in SD3_TEXT_ENCODERS.items():
        module, kind = registry.build_module(config)
        counts[name] = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(registry.abstract_params(module, kind))))
    assert counts == {"clip_l": 123_650_304, "clip_g": 694_659_840, "t5": 4_762_310_656}


def test_resident_weights_add_to_the_peak_of_the_other_program():
    """``train_step+text_encoders``: each program's peak plus the other's resident arguments,
    whichever is larger, and both programs' code; FLOPs summed; an out-of-memory program stays one."""
    from percov2_jax.planning.plan import CompiledCost, with_resident

    def cost(name, args, temps, flops, oom=None):
        return CompiledCost(name, args, 0, 0, temps, 0, 10.0, flops, 1.0, oom)

    step, text = cost("train_step", 100, 1000, 5.0), cost("text_encoders", 30, 400, 2.0)
    both = with_resident(step, text, "train_step+text_encoders")
    assert both.peak_bytes == max(step.peak_bytes + 30, text.peak_bytes + 100) == 1130
    assert both.argument_bytes == 130 and both.model_flops == 7.0
    big_text = cost("text_encoders", 30, 5000, 2.0)
    assert with_resident(step, big_text, "x").peak_bytes == big_text.peak_bytes + 100
    refused = cost("train_step", 0, 9999, 5.0, oom="out of memory")
    assert with_resident(refused, text, "x").out_of_memory == "out of memory"
