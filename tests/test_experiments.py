"""Every experiment in ``experiments/`` runs: ``python experiments/NAME.py --quick --out TMP`` in a
subprocess exits 0 and writes ``NAME_quick.json`` and ``NAME_quick.md`` with the expected keys and
table rows. Quick runs go through the full runs' functions and report writer, so a full run
cannot rot unnoticed. Nothing here checks a time: the numbers of a smoke run mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from experiment_runs import ROOT, finish_quick, run_quick, start_quick

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def compile_depth_run(request, tmp_path_factory):
    """compile_depth's quick run is the longest (its compiles are cold by design: no persistent
    cache) and XLA's compiler leaves much of a second core idle, so when its test is selected it
    starts first and overlaps the JAX-only experiments before it in this file. The torch ones
    come after it: PyTorch's spin-waiting threads slow down many times over on a shared core."""
    if not any(item.name == "test_compile_depth" for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("compile_depth")
    process = start_quick("compile_depth", out)
    yield out, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_caption_coding(tmp_path):
    from percov2_jax.captions import CODERS

    report, text = run_quick("caption_coding", tmp_path)
    assert report["captions"]["count"] == 16
    assert set(CODERS) <= set(report["coders"]) and report["coders"]["zlib"]["vs_zlib"] == 1.0
    for name in CODERS:
        assert len(report["coders"][name]["bytes"]) == 16 and f"| {name} |" in text
        kinds = report["corruption"][name]
        assert set(kinds) == {"truncated", "padded", "bit flip"}
        assert sum(kinds["padded"].values()) == 16
    assert "| coder | truncated | padded | bit flip |" in text


def test_codec_latency(tmp_path, stage1_workdir, prior_workdir):
    report, text = run_quick("codec_latency", tmp_path, "--workdir", stage1_workdir)
    modes = ["uniform", "prior-qlds", "hybrid-qlds-2"]
    assert list(report["sizes"]) == ["128"] and list(report["sizes"]["128"]) == modes
    for mode in modes:
        entry = report["sizes"]["128"][mode]
        assert entry["grid"] == [8, 8] and len(entry["payload_bytes"]) == 2
        assert set(entry["compress_ms"]) == set(entry["decompress_ms"]) == {"median_ms", "p10_ms", "p90_ms"}
        assert {"latent encode", "hyper+vq", "pack"} <= set(entry["encoder"]["stages"])
        assert {"unpack", "sampling", "latent decode", "output"} <= set(entry["decoder"]["stages"])
    prior = report["sizes"]["128"]["prior-qlds"]
    assert "prior pass" in prior["encoder"]["stages"] and prior["coder_throughput"]["tokens"] == 64
    assert "generation pass" in report["sizes"]["128"]["hybrid-qlds-2"]["decoder"]["stages"]
    for row in (
        "## 128 x 128 px (8x8 tokens)",
        "| latent codec encode (PCA patch AE) | jit |",
        "| token features + flow sampling (Euler, CFG) | jit, one lax.scan |",
        "| 128 | prior-qlds | 64 | 12 |",
    ):
        assert row in text


def test_codec_startup(tmp_path, stage1_workdir, prior_workdir):
    report, text = run_quick("codec_startup", tmp_path, "--workdir", stage1_workdir)
    assert list(report["single"]) == ["run, cache off", "bundle, cache on"]
    for entry in report["single"].values():
        for command in ("compress", "decompress"):
            assert len(entry[command]["raw_s"]) == 2 and entry[command]["second_s"] > 0
    assert report["identical"] == {"streams": True, "pngs": True}
    assert report["folder"]["images"] == 3 and set(report["folder"]["runs"]) == {"bundle, cache on"}
    assert {"import jax", "import the codec, load it from the bundle"} <= set(report["pieces"])
    assert report["bundle_bytes"] > 0 and report["export_s"] > 0
    for row in ("| run | cache off |", "| bundle | cache on |", "Identical output in every configuration"):
        assert row in text


def test_encoder_overlap(tmp_path, stage1_workdir, prior_workdir):
    report, text = run_quick("encoder_overlap", tmp_path, "--workdir", stage1_workdir)
    (row,) = report["rows"]
    assert (row["size"], row["tokens"], row["schedule"], row["groups"]) == (128, "8x8", "qlds", 12)
    assert len(row["raw_ms"]["sequential"]) == len(row["raw_ms"]["overlapped"]) == 2
    assert "| 128² | 8x8 | qlds | 12 |" in text


def test_entropy_schedules(tmp_path, stage1_workdir):
    """Its own file layout (one JSON per grid, a table and a chart): the quick run writes every
    file under the ``_quick`` prefix, and ``--plot_only`` redraws the chart from them."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [
        sys.executable,
        os.path.join(ROOT, "experiments", "entropy_schedules.py"),
        "--stage1",
        stage1_workdir,
        "--quick",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "entropy_schedules_quick.md",
        "entropy_schedules_quick.png",
        "entropy_schedules_quick_8x8.json",
    ]
    saved = json.loads((tmp_path / "entropy_schedules_quick_8x8.json").read_text())
    bits = saved["8x8"]["bits"]
    assert {"unigram", "qlds", "checkerboard", "implicit_var", "VAR"} <= set(bits) and saved["8x8"]["vocab"] == 256
    assert "| MIM, qlds |" in (tmp_path / "entropy_schedules_quick.md").read_text()
    (tmp_path / "entropy_schedules_quick.png").unlink()
    redraw = subprocess.run(cmd + ["--plot_only"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert redraw.returncode == 0, redraw.stderr[-3000:]
    assert (tmp_path / "entropy_schedules_quick.png").stat().st_size > 0


def test_mesh_self_check(tmp_path):
    report, text = run_quick("mesh_self_check", tmp_path)
    assert report["devices"] == 4 and report["config"]["meshes"] == [[1, 2, 2]]
    assert [(r["scan_layers"], r["constraints"]) for r in report["rows"]] == [
        (False, False),
        (False, True),
        (True, False),
        (True, True),
    ]
    assert all(r["agrees"] for r in report["rows"]), report["rows"]
    assert "| 1 x 2 x 2 | True | True |" in text and "All 4 agree." in text


def test_plan_sd3_medium(tmp_path):
    report, text = run_quick("plan_sd3_medium", tmp_path)
    names = [r["name"] for r in report["runs"]]
    assert names == ["h100-tiny"] and not report["skipped"]
    for run in report["runs"]:
        assert "error" not in run, run.get("error")
        assert [p["name"] for p in run["programs"]] == ["train_step", "decode"]
        assert run["header"]["params"] > 0 and all(p["fits"] for p in run["programs"])
    h100 = report["runs"][names.index("h100-tiny")]
    assert h100["header"]["devices"] == 2 and h100["header"]["batch"]["train_step"] == 4
    assert "| h100 x2 | data=1,fsdp=2,tensor=1 | train_step | 4 |" in text
    assert "| h100 x2 | data=1,fsdp=2,tensor=1 | decode |" in text


def test_compile_depth(compile_depth_run):
    report, text = finish_quick("compile_depth", *compile_depth_run)
    cells = {(m["kind"], m["remat_policy"], m["depth"], m["scan_layers"]) for m in report["measurements"]}
    assert cells == {
        (kind, remat, depth, scan)
        for kind, remat in (("forward", "none"), ("train", "dots_no_batch"))
        for depth in (2, 3)
        for scan in (True, False)
    }
    for m in report["measurements"]:
        assert m["repeats"] == 1 and m["median_s"] > 0 and m["traced_matmul_flops"] > 0
        assert bool(m["scanned_runs"]) == (m["scan_layers"] and m["depth"] == 3)  # depth 2 has no scanned run
    for row in ("| 2 |", "| 3 |", "| ratio 3 / 2 |", "Forward compile with scan is", "Train-step compile with scan is"):
        assert row in text


def test_bench_vs_diffusers(tmp_path):
    report, text = run_quick("bench_vs_diffusers", tmp_path)
    w = report["workloads"]
    assert set(w) == {"forward", "train", "sampling", "vae"} and set(w["vae"]) == {"encode", "decode"}
    for r in (w["forward"], w["train"], w["sampling"], w["vae"]["encode"], w["vae"]["decode"]):
        assert {"median_ms", "p10_ms", "p90_ms", "times_ms", "lower_s", "compile_s"} <= set(r["jax"])
        assert len(r["jax"]["times_ms"]) == len(r["torch_eager"]["times_ms"]) == 2
        assert "torch_compile" not in r  # off in quick mode
    # the same weights and inputs on both sides: parity, not speed, is checked
    for r in (w["forward"], w["sampling"], w["vae"]["encode"], w["vae"]["decode"]):
        assert r["parity_rel_max"] < 1e-4
    assert max(w["train"]["parity"][k] for k in ("loss_step0_rel", "grad_norm_rel", "loss_after_one_update_rel")) < 1e-4
    assert report["matmul_peak"]["peak_gflops"] > 0 and "not run (--quick" in report["torch_compile_status"]
    assert report["machine"]["torch_threads"] >= 1 and "torch" in report["versions"]
    for row in (
        "| MM-DiT forward |",
        "| training step (fwd+bwd+AdamW) |",
        "| Euler sampling, 2 steps, CFG |",
        "| VAE encode |",
        "| VAE decode |",
        "Training-step MFU",
    ):
        assert row in text


def test_bf16_error(tmp_path):
    report, text = run_quick("bf16_error", tmp_path)
    assert [r["timestep"] for r in report["mmdit"]] == [50.0, 500.0, 950.0]
    cells = [r[side] for r in report["mmdit"] for side in ("percov2_jax", "diffusers")]
    cells += [report["vae"][part][side] for part in ("encode_mean", "decode") for side in ("percov2_jax", "diffusers")]
    for cell in cells:  # bfloat16 keeps ~3 significant digits: errors well above 0, well below 1
        assert 1e-5 < cell["mean_rel"] < 0.2 and 1e-5 < cell["max_rel"] < 0.5
    for row in ("| 50 |", "| 500 |", "| 950 |", "| encode (posterior mean) |", "| decode (of the float32 mean) |"):
        assert row in text


def test_convert_memory(tmp_path):
    report, text = run_quick("convert_memory", tmp_path)
    components = report["components"]
    assert sorted(components) == ["clip_g", "clip_l", "t5", "transformer", "vae"]
    t5 = components["t5"]  # stored like the release's text_encoder_3: float16 shards and their index
    assert t5["source_dtype"] == "float16" and len(t5["files"]) >= 2 and t5["index"]
    assert t5["bytes"]["float32"] == 4 * t5["params"]
    (run,) = report["runs"]
    assert run["dtype"] == "float32" and run["total_bytes"] == sum(c["bytes"]["float32"] for c in components.values())
    assert run["peak_rss_bytes"] > 0 and report["baseline"]["peak_rss_bytes"] > 0
    assert run["above_baseline_bytes"] == run["peak_rss_bytes"] - report["baseline"]["peak_rss_bytes"]
    assert "| t5 | " in text and "| float32 | " in text and "(peak − baseline) / largest" in text


def test_token_coding_guard(tmp_path, stage1_workdir, prior_workdir):
    report, text = run_quick("token_coding_guard", tmp_path, "--stage1", stage1_workdir)
    for part, maps in (("held_out", 10), ("training", 5)):
        s = report[part]
        assert s["maps"] == maps and len(s["rows"]) == maps
        assert s["bits_per_token"]["uniform"] == s["log2_vocab"] == 8.0
        # auto never codes a map's tokens longer than uniform, nor a stream longer than the uniform one
        assert s["worst_excess_bits"]["auto"] <= 0 and s["worst_stream_excess_bits"]["auto"] <= 0
        for eps in ("0.001", "0.01", "0.03", "0.1"):
            assert s["bits_per_token"][f"floor {eps} (ideal)"] <= 8 - np.log2(float(eps)) + 1e-9
    assert "## Held-out photographs: 10 maps" in text and "| auto |" in text
