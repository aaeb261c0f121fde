"""The evaluation run (percov2_jax.evaluate): batched codec calls equal one-image calls; a tiny
evaluation of a Kodak-style folder and a COCO-format folder (missing and corrupt images,
ground-truth captions, CLIP score with a tiny random CLIP) gives identical summaries and records
on 1 process and on 2 processes joined by jax.distributed (interrupted and resumed there), and
when the command line is interrupted and the run resumed; a workdir of another run is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import clip_setup
import eval_setup
import numpy as np
import pytest
import xla_env

pytestmark = pytest.mark.integration  # trains models or runs whole jobs

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_inputs")
    clip = clip_setup.tiny_clip(root / "clip")
    paths = {
        "kodak": eval_setup.kodak_folder(root / "kodak" / "images"),
        "coco30k": eval_setup.coco_folder(root / "coco" / "train2017"),
        "clip": {"folder": str(clip["folder"]), "tokenizer_folder": str(clip["tokenizer_folder"])},
    }
    (root / "inputs.json").write_text(json.dumps(paths))
    return dict(paths, file=str(root / "inputs.json"))


@pytest.fixture(scope="module")
def one_process(prior_workdir, stage1_workdir, inputs, tmp_path_factory):
    """Both evaluations in this process (one CPU device): the reference."""
    from percov2_jax.evaluation.job import evaluate

    out = tmp_path_factory.mktemp("eval_one")
    summaries = {}
    for dataset in ("kodak", "coco30k"):
        config = eval_setup.eval_config(stage1_workdir, dataset, inputs[dataset], inputs["clip"])
        summaries[dataset] = evaluate(config, str(out / dataset), show_progress=False)
    return {"out": str(out), "summaries": summaries}


def _env() -> dict:
    env = dict(os.environ)  # keeps conftest's persistent compilation cache
    env["XLA_FLAGS"] = xla_env.xla_flags(1)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, env.get("PYTHONPATH", "")])
    return env


def test_outputs_count_every_image_once(one_process):
    kodak = one_process["summaries"]["kodak"]
    assert kodak["images"]["total"] == 5 and kodak["images"]["evaluated"] == 3 and kodak["images"]["failed"] == 2
    assert {(f["id"], f["kind"]) for f in kodak["images"]["failures"]} == {
        ("kodim04.png", "missing"),
        ("kodim05.png", "corrupt"),
    }
    coco = one_process["summaries"]["coco30k"]
    assert (coco["images"]["evaluated"], coco["images"]["failed"]) == (3, 1)
    assert coco["images"]["failures"][0]["kind"] == "missing"
    for dataset, summary in one_process["summaries"].items():
        workdir = os.path.join(one_process["out"], dataset)
        records = eval_setup.read_records(workdir)
        scored = [(r["index"], r["mode"]) for r in records if "mode" in r]
        failed = [r["index"] for r in records if "kind" in r]
        modes = [m["name"] for m in summary["modes"]]
        assert sorted(scored) == sorted(
            {(i, m) for i in set(range(summary["images"]["total"])) - set(failed) for m in modes}
        )
        assert len(scored) == len(set(scored)) and not set(failed) & {i for i, _ in scored}
        for name in ("summary.md", "records.md", "rate_distortion.png", "rate_perception.png", "operating_modes.png"):
            assert os.path.getsize(os.path.join(workdir, name)) > 0, name
        text = open(os.path.join(workdir, "summary.md"), encoding="utf-8").read()
        assert "random (smoke test" in text and "missing" in text
        for mode in summary["modes"]:
            m = mode["metrics"]
            assert m["images"] == summary["images"]["evaluated"]
            assert m["bpp"] > 0 and abs(m["bpp"] - m["bpp_caption"] - m["bpp_tokens"] - m["bpp_header"]) < 1e-12
            assert all(np.isfinite(m[k]) for k in ("psnr", "ms_ssim", "lpips", "fid", "kid", "clip_score"))
    # The uniform mode codes 8 bits per token; the prior mode less on these (training) photos.
    prior_mode, uniform_mode = coco["modes"]
    assert uniform_mode["coding"] == {"entropy_mode": "uniform"}
    records = [r for r in eval_setup.read_records(os.path.join(one_process["out"], "coco30k")) if "mode" in r]
    for r in records:
        if r["mode"] == uniform_mode["name"]:
            assert r["bpp_tokens"] * r["height"] * r["width"] == 8 * (r["height"] // 16) * (r["width"] // 16)
    # Ground-truth captions: conditioned on the first, CLIP-scored against the second.
    assert {r["caption"] for r in records} == {
        "a woman in a space suit",
        "coffee in a white cup",
        "a ginger cat looking up",
    }
    assert coco["modes"][0]["metrics"]["clip_score_original"] is not None


def test_record_equals_a_user_round_trip(one_process, prior_workdir, stage1_workdir, inputs):
    """The evaluation's bytes are `Codec.compress`'s and its PSNR is that of `Codec.decompress`."""
    from percov2_jax.codec.api import Codec
    from percov2_jax.evaluation.job import build_dataset
    from percov2_jax.metrics import pixel

    config = eval_setup.eval_config(stage1_workdir, "coco30k", inputs["coco30k"], inputs["clip"])
    dataset = build_dataset(config.dataset)
    codec = Codec.from_workdir(stage1_workdir, sample_steps=2, guidance_scale=3.0)
    item = dataset.load(1)
    data = codec.compress(item["image"], item["caption"], config.caption_coder)  # the paper's zlib
    picture = codec.decompress(data)
    record = [
        r
        for r in eval_setup.read_records(os.path.join(one_process["out"], "coco30k"))
        if r.get("index") == 1 and r.get("mode") == "s2_g3"
    ][0]
    assert record["bytes"] == len(data)
    assert record["psnr"] == pytest.approx(float(pixel.psnr(item["image"][None], picture[None])[0]), abs=1e-3)

    # Batched calls equal one-image calls: bytes exactly, pictures to one grey level.
    images = [dataset.load(i)["image"] for i in (0, 1, 2)]
    captions = ["a", "b c", ""]
    streams = codec.compress_batch(images, captions)
    assert streams == [codec.compress(im, c) for im, c in zip(images, captions)]
    batched = codec.decompress_batch(streams)
    for s, b in zip(streams, batched):
        assert np.abs(codec.decompress(s).astype(int) - b.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="one coded size"):
        codec.compress_batch([images[0], images[0][:64]], ["", ""])


@pytest.mark.slow
def test_two_processes_on_cloud_storage_equal_one(one_process, stage1_workdir, inputs, gcs, tmp_path):
    """Two processes (one CPU device each) with the checkpoint, the images, image lists, caption
    files and the workdir in a Cloud Storage bucket (the emulator), sharing no local folder but
    the tiny CLIP's weights, split the shards; the Kodak run stopped after one shard each and
    resumed. The summaries and the per-image records equal the one-process run's (from local
    files) exactly."""
    from percov2_jax import storage

    bucket = gcs.create_bucket()
    storage.copy_tree(stage1_workdir, f"{bucket}/stage1")
    local_inputs = os.path.dirname(inputs["file"])
    for name in ("kodak", "coco"):
        storage.copy_tree(os.path.join(local_inputs, name), f"{bucket}/inputs/{name}")
    in_bucket = {
        dataset: {k: v.replace(local_inputs, f"{bucket}/inputs") for k, v in inputs[dataset].items()}
        for dataset in ("kodak", "coco30k")
    }
    assert all(v.startswith("gs://") for paths in in_bucket.values() for v in paths.values())
    (tmp_path / "inputs.json").write_text(json.dumps({**in_bucket, "clip": inputs["clip"]}))
    out = f"{bucket}/eval"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        os.path.join(HERE, "eval_check.py"),
        "--stage1",
        f"{bucket}/stage1",
        "--inputs",
        str(tmp_path / "inputs.json"),
        "--out",
        out,
        "--num-processes",
        "2",
        "--port",
        str(port),
    ]
    homes = [tmp_path / f"process_{i}" for i in range(2)]  # each its own working folder
    for home in homes:
        home.mkdir()
    procs = [
        subprocess.Popen(
            cmd + ["--process-id", str(i)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=home,
        )
        for i, home in enumerate(homes)
    ]
    outs = [p.communicate(timeout=1500) for p in procs]
    for p, (stdout, err) in zip(procs, outs):
        assert p.returncode == 0, stdout + err[-4000:]
    assert not any(any(home.iterdir()) for home in homes)  # every output went to the bucket
    for dataset, reference in one_process["summaries"].items():
        text = storage.read_text(f"{out}/{dataset}/summary.json")
        assert f"{bucket}/inputs/" in text  # the dataset's description names where it was read
        summary = json.loads(text.replace(f"{bucket}/inputs", local_inputs))
        assert summary["run"]["process_count"] == 2
        assert summary["run"]["checkpoint"] == f"{bucket}/stage1"
        assert eval_setup.comparable(summary) == eval_setup.comparable(reference)
        records = json.loads(
            json.dumps(eval_setup.read_records(f"{out}/{dataset}")).replace(f"{bucket}/inputs", local_inputs)
        )
        assert records == eval_setup.read_records(os.path.join(one_process["out"], dataset))
        shards = {
            json.loads(storage.read_text(f))["shard"]
            for f in storage.files_under(f"{out}/{dataset}/shards")
            if f.name.endswith(".json")
        }
        assert shards == set(range((summary["images"]["total"] + 1) // 2))
        names = {f.name for f in storage.files_under(f"{out}/{dataset}")}
        assert {"run.json", "summary.json", "summary.md", "records.jsonl", "records.md"} <= names


@pytest.mark.slow
def test_interrupted_cli_run_resumes_to_the_same_result(one_process, stage1_workdir, inputs, tmp_path):
    """`python -m percov2_jax.evaluate` stopped after one shard, then the run resumed (here, in this
    process) equals the uninterrupted run without redoing that shard; then a changed run in that
    workdir is refused, naming the change."""
    from percov2_jax.evaluation.job import evaluate

    workdir = tmp_path / "kodak"
    paths = inputs["kodak"]
    cmd = [
        sys.executable,
        "-m",
        "percov2_jax.evaluate",
        "--config",
        os.path.join(eval_setup.ROOT, "configs", "eval_tiny.py"),
        f"--config.checkpoint={stage1_workdir}",
        "--config.dataset.name=kodak",
        f"--config.dataset.root={paths['root']}",
        f"--config.dataset.image_list={paths['image_list']}",
        "--workdir",
        str(workdir),
        "--config.modes=[{'sample_steps': 2, 'guidance_scale': 3.0}, "
        "{'sample_steps': 1, 'guidance_scale': 1.0, 'coding': {'entropy_mode': 'uniform'}}]",
        "--config.dataset.conditioning=none",
        "--config.dataset.strict_list=false",
        "--config.shard_size=2",
        "--config.batch_size=2",
        "--config.metrics.kid_subsets=5",
        "--max_shards",
        "1",
        "--noprogress",
    ]
    first = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr[-4000:]
    assert "evaluation incomplete: 2 of 3 shards left" in first.stdout
    done = os.path.getmtime(workdir / "shards" / "shard_00000.json")
    config = eval_setup.eval_config(stage1_workdir, "kodak", paths)  # what the flags above say
    summary = evaluate(config, str(workdir), show_progress=False)
    assert os.path.getmtime(workdir / "shards" / "shard_00000.json") == done
    reference = one_process["summaries"]["kodak"]
    assert summary["modes"] == [
        {**m, "metrics": {**m["metrics"], "clip_score": None, "clip_score_original": None}} for m in reference["modes"]
    ]
    reference_records = eval_setup.read_records(os.path.join(one_process["out"], "kodak"))
    assert eval_setup.read_records(str(workdir)) == [
        {k: v for k, v in r.items() if k != "clip_score"} for r in reference_records
    ]
    config.modes = (dict(sample_steps=3),)
    with pytest.raises(ValueError, match="holds another evaluation run.*modes"):
        evaluate(config, str(workdir), show_progress=False)


def test_modes_from_config_and_fail_loudly():
    import ml_collections

    from percov2_jax.evaluation.modes import modes_from_config

    specs = (
        dict(sample_steps=20, guidance_scale=3),
        dict(sample_steps=2, guidance_scale=1.0, coding=dict(hybrid_groups=2, schedule="qlds")),
        dict(name="x"),
    )
    modes = modes_from_config(specs, 28, 7.0)
    assert [(m.name, m.sample_steps, m.guidance_scale) for m in modes] == [
        ("s20_g3", 20, 3.0),
        ("s2_g1_qlds_h2", 2, 1.0),
        ("x", 28, 7.0),
    ]
    assert modes[1].coding_overrides == {"hybrid_groups": 2, "schedule": "qlds"}
    assert [m.name for m in modes_from_config((), 20, 3.0)] == ["s20_g3"]
    assert [m.name for m in modes_from_config([], 20, 3.0)] == ["s20_g3"]
    # describe() is a mode spec again; a config keeps the modes through copies and JSON.
    assert modes_from_config([m.describe() for m in modes], 1, 1.0) == modes
    config = ml_collections.ConfigDict(dict(modes=()))
    config.modes = list(specs)
    resolved = config.copy_and_resolve_references()
    again = ml_collections.ConfigDict(json.loads(config.to_json()))
    for c in (config, resolved, again, ml_collections.ConfigDict(config.to_dict())):
        assert modes_from_config(c.modes, 28, 7.0) == modes
    for bad, match in [
        ([dict(sample_steps=2, speed=3)], r"modes\[0\].*unknown keys \['speed'\]"),
        ([dict(steps=2)], "unknown keys.*'steps'.*'coding' dict"),
        ([dict(coding=dict(step=2))], r"unknown coding keys \['step'\]"),
        ([dict(sample_steps="x")], "sample_steps must be int, got str"),
        ([dict(sample_steps=2.0)], "sample_steps must be int, got float"),
        ([dict(guidance_scale="3")], "guidance_scale must be float"),
        ([dict(sample_steps=True)], "sample_steps must be int, got bool"),
        ([dict(coding=dict(entropy_mode=1))], "coding.entropy_mode must be str"),
        ([dict(coding="uniform")], "coding must be a dict"),
        ([dict(sample_steps=0)], ">= 1"),
        ([dict(coding=dict(steps=0))], "coding.steps must be >= 1"),
        ([dict(sample_steps=2), dict(sample_steps=2)], r"modes\[0\], modes\[1\].*same name"),
        ([dict(name="")], "name must be a non-empty str"),
        (["sample_steps"], "must be a dict"),
        ("steps=2", "must be a list of dicts"),
        (dict(sample_steps=2), "must be a list of dicts"),
    ]:
        with pytest.raises(ValueError, match=match):
            modes_from_config(bad, 20, 3.0)
    assert modes_from_config([dict(coding=dict(steps=None, temperature=1))], 20, 3.0)[0].coding_overrides == {
        "steps": None,
        "temperature": 1.0,
    }


@pytest.mark.parametrize("name", ["eval_coco30k", "eval_kodak", "eval_tiny"])
def test_config_modes_and_their_command_line_override(name):
    from absl import flags
    from ml_collections import config_flags

    from percov2_jax.evaluation.modes import modes_from_config

    def parse(*overrides):
        argv = ["evaluate", f"--config={os.path.join(eval_setup.ROOT, 'configs', name + '.py')}", *overrides]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
        flag_values(argv)
        return modes_from_config(flag_values.config.modes, 28, 7.0)

    assert all(m.sample_steps >= 1 for m in parse())
    modes = parse("--config.modes=[{'sample_steps': 2, 'coding': {'entropy_mode': 'uniform'}}, {'name': 'x'}]")
    assert [(m.name, m.sample_steps, m.coding_overrides) for m in modes] == [
        ("s2_g7_uniform", 2, {"entropy_mode": "uniform"}),
        ("x", 28, {}),
    ]


def test_metrics_without_weights_fail_at_start():
    import ml_collections

    from percov2_jax.evaluation.defaults import base_eval_config
    from percov2_jax.evaluation.metric_suite import MetricSuite

    cfg = base_eval_config().metrics
    with pytest.raises(ValueError) as e:
        MetricSuite.from_config(cfg)
    for expected in ("lpips_backbone", "metrics.inception", "clip_model", "random_weights"):
        assert expected in str(e.value)
    with pytest.raises(ValueError, match="unknown metrics"):
        MetricSuite.from_config(ml_collections.ConfigDict(dict(names="psnr,miou")))
    assert MetricSuite.from_config(ml_collections.ConfigDict(dict(names="psnr"))).names == ("psnr",)
