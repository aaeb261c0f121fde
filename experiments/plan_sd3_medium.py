"""The README's planning table: SD3-medium stage 1 at 512^2, global batch 160 (with and without the
frozen SD3 text encoders on the mesh), compiled ahead of time for TPU slices by the planner
(``python -m percov2_jax.plan``; libtpu's compiler on this CPU host, no TPU used).

  python experiments/plan_sd3_medium.py [--only v5p v5p-remat-none]   # every row: hours on 2 cores
  python experiments/plan_sd3_medium.py --quick --out /tmp/plan        # smoke test: configs/tiny.py

Each row is one planner run in a subprocess (libtpu and the device count must be set before JAX
starts). Rows of TPU kinds need libtpu (``make libtpu`` or ``pip install 'jax[tpu]'``); without
it they are skipped and reported as such. ``--quick`` plans the tiny config instead, shrunk to two
blocks and batch 4: an H100 row on 2 virtual CPU devices (XLA:CPU memory, a proxy); add
``--only h100-tiny v5e-tiny`` for a v5e 2x2 slice through libtpu as well (the planner's TPU path
itself is tested in tests/test_plan.py).

Output: ``plan_sd3_medium.json`` (every plan) and ``plan_sd3_medium.md`` in ``--out`` (``_quick``
appended with ``--quick``), rewritten after every row: an interrupted sweep keeps the rows it
finished, and ``--only`` replaces just the rows it names.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import results_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "sd3_medium_ultralow.py")
QUICK_CONFIG = os.path.join(ROOT, "configs", "tiny.py")

# name -> (device kind, mesh, programs, extra config overrides)
RUNS = {
    "v5p": ("tpu_v5p", "data=1,fsdp=32,tensor=1", "train,decode,text", []),
    "v4": ("tpu_v4", "data=1,fsdp=32,tensor=1", "train,decode,text", []),
    "v5e": ("tpu_v5e", "data=1,fsdp=32,tensor=1", "train,decode,text", []),
    "v5p-remat-none": ("tpu_v5p", "data=1,fsdp=32,tensor=1", "train", ["--config.model.remat_policy=none"]),
    "v5p-remat-full": ("tpu_v5p", "data=1,fsdp=32,tensor=1", "train", ["--config.model.remat_policy=full"]),
    "v5p-data2": ("tpu_v5p", "data=2,fsdp=8,tensor=1", "train", []),
    "v5e-8": ("tpu_v5e", "data=1,fsdp=8,tensor=1", "train", []),  # 20 images per 16 GiB chip
    "v5p-dp32": ("tpu_v5p", "data=32,fsdp=1,tensor=1", "train", []),  # plain data parallel: no state sharding
    "v5p-splash": ("tpu_v5p", "data=1,fsdp=32,tensor=1", "train", ["--config.model.attention_implementation=splash"]),
}
# Two blocks and batch 4 keep the tiny config's compiles short; the planner and this script run as in the full sweep.
QUICK_OVERRIDES = ["--config.model.transformer.num_layers=2", "--config.train.global_batch_size=4"]
QUICK_RUNS = {
    "h100-tiny": ("h100", "data=1,fsdp=2,tensor=1", "train,decode", QUICK_OVERRIDES),
    "v5e-tiny": ("tpu_v5e", "data=1,fsdp=4,tensor=1", "train,decode", QUICK_OVERRIDES),
}


def needs_libtpu(kind: str) -> bool:
    return kind.startswith("tpu_")


def libtpu_available(libtpu_path: str) -> bool:
    """What `percov2_jax.planning.devices.enable_libtpu` will find: a ``pip --target`` copy, or an
    installed package (looked up without importing it, which would claim TPUs)."""
    return os.path.isdir(os.path.join(libtpu_path, "libtpu")) or importlib.util.find_spec("libtpu") is not None


def run(name: str, spec: tuple, config: str, libtpu: str, workdir: str) -> dict:
    kind, mesh, programs, extra = spec
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(workdir, f"{name}.json")
    cmd = [
        sys.executable,
        "-m",
        "percov2_jax.plan",
        "--config",
        config,
        "--device_kind",
        kind,
        "--mesh",
        mesh,
        "--programs",
        programs,
        "--libtpu_path",
        libtpu,
        "--json",
        out,
        *extra,
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        tail = "\n".join(line for line in result.stderr.splitlines() if not line.startswith(("W0000", "E0000")))[-1500:]
        return {"name": name, "error": tail, "seconds": time.perf_counter() - start}
    with open(out) as f:
        plan = json.load(f)
    plan.update(name=name, seconds=time.perf_counter() - start, overrides=extra)
    return plan


def markdown(report: dict) -> str:
    from percov2_jax.planning.report import MARKDOWN_HEADER, markdown_row

    quick = report["config"]["quick"]
    title = (
        "Tiny stage-1 config (configs/tiny.py, 2 blocks), planned — QUICK smoke run"
        if quick
        else "SD3-medium stage 1 at 512^2, planned for TPU slices"
    )
    lines = [
        f"# {title}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"`python -m percov2_jax.plan` on {results_io.describe_machine(report['machine'])} TPU kinds: XLA's "
        "TPU compiler from libtpu, no TPU; GPU kinds: virtual CPU devices, whose memory is XLA:CPU's (a "
        "proxy). Per-device bytes; step times assume 40% MFU of the dense bf16 peak.",
        "",
        MARKDOWN_HEADER,
    ]
    for plan in report["runs"]:
        if "error" in plan:
            lines.append(f"| {plan['name']} | failed: {plan['error'].splitlines()[-1][:200]} |")
            continue
        header = dict(plan["header"])
        other = [o.split(".")[-1] for o in plan.get("overrides", []) if "remat_policy" not in o]
        if other:
            header["remat_policy"] += " (" + ", ".join(other) + ")"
        lines.extend(markdown_row(p, header) for p in plan["programs"])
    if report["skipped"]:
        lines += ["", "Not planned (no libtpu here; `make libtpu`): " + ", ".join(report["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="rows to (re)plan; default: all")
    parser.add_argument(
        "--libtpu_path", default=os.environ.get("PERCOV2_LIBTPU_PATH", os.path.join(ROOT, ".venv", "libtpu"))
    )
    results_io.add_output_arguments(
        parser, "configs/tiny.py on 2 virtual devices as H100s (--only h100-tiny v5e-tiny adds a v5e 2x2 slice)"
    )
    args = parser.parse_args(argv)
    runs = QUICK_RUNS if args.quick else RUNS
    if args.only is None:
        args.only = ["h100-tiny"] if args.quick else list(runs)
    unknown = set(args.only) - set(runs)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {list(runs)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    runs, config = (QUICK_RUNS, QUICK_CONFIG) if args.quick else (RUNS, CONFIG)
    name = results_io.stem("plan_sd3_medium", args.quick)
    path = os.path.join(args.out, name + ".json")
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = {p["name"]: p for p in json.load(f)["runs"]}
    started = time.perf_counter()
    report = {
        "command": results_io.command(),
        "config": {**vars(args), "config_file": config},
        "machine": results_io.machine(),
        "skipped": [],
    }
    have_libtpu = libtpu_available(args.libtpu_path)
    if not have_libtpu and all(needs_libtpu(runs[row][0]) for row in args.only):
        # nothing would be planned: leave the stored rows and the machine that planned them alone
        raise SystemExit(
            f"every requested row is a TPU slice and there is no libtpu in {args.libtpu_path} or the "
            "environment (`make libtpu`)"
        )
    for row in args.only:  # the files are rewritten after every run: an interrupted sweep keeps its rows
        spec = runs[row]
        if needs_libtpu(spec[0]) and not have_libtpu:
            print(f"{row}: skipped, no libtpu in {args.libtpu_path} or the environment", flush=True)
            report["skipped"].append(row)
            continue
        print(f"{row} ...", flush=True)
        previous[row] = run(row, spec, config, args.libtpu_path, os.path.join(args.out, ".plan_runs"))
        print(json.dumps(previous[row].get("error", "ok"))[:300], flush=True)
        report["runs"] = [previous[n] for n in runs if n in previous]
        report["total_s"] = time.perf_counter() - started
        results_io.write_report(args.out, name, report, markdown(report))
    results_io.finish_machine(report["machine"])
    report["runs"] = [previous[n] for n in runs if n in previous]
    report["total_s"] = time.perf_counter() - started
    results_io.write_report(args.out, name, report, markdown(report))


if __name__ == "__main__":
    main()
