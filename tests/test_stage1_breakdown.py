"""experiments/stage1_breakdown.py: its quick mode runs on CPU without the packages the accelerator
machine lacks, and reports the shipped step, a variant, the parts and a profile; device kernel
names are sorted into the right kinds. Nothing here checks a time."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

# As tests/test_accelerator_bench.py: modules absent on the accelerator machine are unimportable.
RUNNER = """
import runpy, sys
for name in ("grain", "constriction", "tensorboardX", "tensorflow", "tensorflow_datasets", "gcsfs", "diffusers"):
    sys.modules[name] = None
sys.path.insert(0, "experiments")
sys.argv = ["experiments/stage1_breakdown.py", *sys.argv[1:]]
runpy.run_path("experiments/stage1_breakdown.py", run_name="__main__")
"""


@pytest.mark.parametrize(
    "name, kind",
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
        ("sm90_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cublas", "matmul"),
        ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopB_TNN", "matmul"),
        ("gemm_fusion_dot_12", "matmul"),
        ("input_reduce_fusion_3", "reduction"),
        ("loop_convert_fusion_2", "other fusion/elementwise"),
        ("wrapped_transpose_4", "copy/transpose"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collective"),
    ],
)
def test_kernel_kinds(name, kind):
    from stage1_breakdown import kind_of

    assert kind_of(name) == kind


@pytest.mark.slow
def test_quick_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, "-c", RUNNER, "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    report = json.loads((tmp_path / "stage1_breakdown_quick.json").read_text())
    text = (tmp_path / "stage1_breakdown_quick.md").read_text()
    assert not report["errors"] and not report["skipped"]
    shipped = report["variants"][report["shipped"]]
    assert report["shipped"] == "none:float32"  # the quick config's remat
    assert set(report["variants"]) == {"none:float32", "none:bfloat16"}
    for v in report["variants"].values():
        assert v["batch"] == 2 and math.isfinite(v["jax"]["median_ms"]) and v["jax"]["median_ms"] > 0
        assert v["model_flops"] == shipped["model_flops"] > 0  # the VAE's dtype does not change the work
    assert set(report["parts"]) == {"vae_encode_float32", "vae_encode_bfloat16", "adamw_update"}
    prof = report["profile"]
    assert prof["kernel_ms_per_step"] > 0 and sum(prof["by_kind_ms"].values()) == pytest.approx(
        prof["kernel_ms_per_step"]
    )
    assert "## Device profile of the shipped step" in text and "QUICK" in text
