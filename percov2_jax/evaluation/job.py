"""One evaluation job: ``evaluate(config, workdir)`` builds the dataset, the codec and the metric
networks from an evaluation config (``configs/eval_*.py``), runs this process's shards and, on
process 0 once every shard is done, writes the tables and plots. The command line is
``python -m percov2_jax.evaluate`` (`percov2_jax.evaluate`); the mechanics are in
`percov2_jax.evaluation.shards`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform

from absl import logging

from percov2_jax import storage


def build_dataset(cfg):
    """``config.dataset`` -> `EvalDataset`."""
    from percov2_jax.evaluation import datasets

    kind = cfg.name
    preprocess = datasets.Preprocess(cfg.preprocess, int(cfg.size) if cfg.size else None)
    common = dict(
        preprocess=preprocess, conditioning=cfg.conditioning, conditioning_captions=cfg.conditioning_captions or None
    )
    image_list = cfg.image_list or None
    if kind == "builtin":
        return datasets.builtin_dataset(preprocess, bool(cfg.include_grayscale), conditioning=cfg.conditioning)
    if not cfg.root:
        raise ValueError(f"dataset {kind!r} needs its location: --config.dataset.root=DIR")
    if kind == "coco30k":
        return datasets.coco30k_dataset(
            cfg.root,
            annotations=cfg.annotations or None,
            image_list=image_list,
            cache_dir=cfg.list_cache or None,
            strict=bool(cfg.strict_list),
            **common,
        )
    if kind == "kodak":
        return datasets.kodak_dataset(cfg.root, image_list=image_list, captions=cfg.captions or None, **common)
    if kind == "folder":
        return datasets.folder_dataset(
            cfg.root, image_list=image_list, captions=cfg.captions or cfg.annotations or None, **common
        )
    if kind == "tfds":
        return datasets.tfds_dataset(
            cfg.root,
            cfg.tfds_split,
            image_key=cfg.tfds_image_key,
            caption_key=cfg.tfds_caption_key or None,
            id_key=cfg.tfds_id_key or None,
            image_list=image_list,
            **common,
        )
    raise ValueError(f"unknown dataset {kind!r}; choose coco30k, kodak, folder, tfds or builtin")


def load_codec(config, mesh):
    from percov2_jax.codec.api import Codec

    if not config.checkpoint:
        raise ValueError("no checkpoint: --config.checkpoint=STAGE1_WORKDIR")
    prior = {"": None, "none": False}.get(config.prior, config.prior)
    codec = Codec.from_workdir(
        config.checkpoint,
        prior=prior,
        mesh=mesh,
        seed=int(config.seed),
        resize_policy=config.resize_policy,
        text_checkpoint=config.get("text_checkpoint", ""),
    )
    overrides = {k: v for k, v in config.coding.items() if v not in ("", None)}
    if overrides:
        import dataclasses

        codec = dataclasses.replace(codec, coding=dataclasses.replace(codec.coding, **overrides))
    return codec


def run_identity(config, dataset, codec, modes, suite) -> dict:
    """Everything that decides a shard's contents (see `shards.check_run_file`)."""
    import dataclasses

    return {
        "dataset": dataset.describe(),
        "model_id": f"{codec.model_id:06x}",
        "prior_model_id": None if codec.prior_model_id is None else f"{codec.prior_model_id:06x}",
        "modes": [m.describe() for m in modes],
        "coding": dataclasses.asdict(codec.coding),
        "metrics": {"names": list(suite.names), "weights": suite.weights, "fid_method": suite.fid_method},
        "shard_size": int(config.shard_size),
        "caption_coder": config.caption_coder,
        "resize_policy": config.resize_policy,
        "seed": int(config.seed),
    }


def evaluate(config, workdir: str, *, max_shards: int | None = None, show_progress: bool = True) -> dict | None:
    """Run (or resume) the evaluation; process 0 returns the summary once every shard is done
    (None on other processes and while shards remain)."""
    import jax
    from jax.experimental import multihost_utils

    from percov2_jax import sharding
    from percov2_jax.evaluation import shards
    from percov2_jax.evaluation.metric_suite import MetricSuite
    from percov2_jax.evaluation.modes import modes_from_config

    mesh = sharding.make_mesh(
        int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor), devices=jax.local_devices()
    )
    dataset = build_dataset(config.dataset)
    suite = MetricSuite.from_config(config.metrics, mesh)
    codec = load_codec(config, mesh)
    modes = modes_from_config(config.modes, codec.sample_steps, codec.guidance_scale)
    identity = run_identity(config, dataset, codec, modes, suite)
    pid, count = jax.process_index(), jax.process_count()
    if pid == 0:
        shards.check_run_file(workdir, identity, write=True)
    multihost_utils.sync_global_devices("percov2_eval_run_file")
    shards.check_run_file(workdir, identity, write=False)
    evaluator = shards.Evaluator(
        codec, suite, modes, batch_size=int(config.batch_size), caption_coder=config.caption_coder
    )
    status = shards.run_shards(
        evaluator,
        dataset,
        workdir,
        identity,
        shard_size=int(config.shard_size),
        process_index=pid,
        process_count=count,
        max_shards=max_shards,
        max_minutes=float(config.max_minutes) or None,
        show_progress=show_progress,
    )
    logging.info(
        "process %d: shards done %s, skipped %s, remaining %s",
        pid,
        status["done"],
        status["skipped"],
        status["remaining"],
    )
    multihost_utils.sync_global_devices("percov2_eval_shards_done")
    if pid != 0:
        return None
    left = shards.missing_shards(workdir, len(dataset), int(config.shard_size))
    if left:
        print(
            f"evaluation incomplete: {len(left)} of {len(shards.shard_ranges(len(dataset), int(config.shard_size)))} "
            f"shards left; run the same command again to continue"
        )
        return None
    return write_outputs(config, workdir, identity, modes, suite, dataset, codec, count)


def write_outputs(config, workdir, identity, modes, suite, dataset, codec, process_count) -> dict:
    """Aggregate every shard into ``summary.json`` / ``.md``, ``records.jsonl`` / ``.md`` and the plots."""
    from percov2_jax.evaluation import plots, report, shards

    records, failures, arrays = shards.load_shards(
        workdir, len(dataset), int(config.shard_size), shards.fingerprint(identity)
    )
    mode_results = shards.dataset_metrics(
        records,
        arrays,
        modes,
        suite.names,
        kid_subsets=int(config.metrics.kid_subsets),
        kid_subset_size=int(config.metrics.kid_subset_size),
        seed=int(config.seed),
        fid_method=suite.fid_method,
    )
    failures.sort(key=lambda f: f["index"])
    summary = {
        "run": {
            "label": config.label or storage.path(workdir).name,
            "checkpoint": config.checkpoint,
            "model_id": identity["model_id"],
            "prior_model_id": identity["prior_model_id"],
            "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{len(codec.mesh.devices.flat)} device(s) per process",
            "process_count": process_count,
        },
        "dataset": identity["dataset"],
        "images": {
            "total": len(dataset),
            "evaluated": len({r["index"] for r in records}),
            "failed": len(failures),
            "failures": [{k: f[k] for k in ("id", "kind", "error")} for f in failures],
        },
        "metric_weights": {**{k: "not computed" for k in ("lpips", "inception", "clip")}, **suite.weights},
        "modes": mode_results,
    }
    root = storage.path(workdir)
    storage.write_text(root / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    all_rows = sorted(records + failures, key=lambda r: (r["index"], r.get("mode", "")))
    storage.write_text(root / "records.jsonl", "".join(json.dumps(row, sort_keys=True) + "\n" for row in all_rows))
    report.write_reports(workdir, summary, all_rows)
    plots.rate_distortion_plots([summary], workdir)
    plots.operating_modes_plot(summary, root / "operating_modes.png")
    return summary


def summary_markdown(workdir: str) -> str:
    """The ``summary.md`` a finished evaluation wrote in ``workdir``."""
    return storage.read_text(storage.path(workdir) / "summary.md")
