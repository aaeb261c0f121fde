"""How long ``percov2 compress`` and ``percov2 decompress`` take as commands, start-up included:
from a training run or from its bundle (``percov2 export``), with the compilation cache off or on.

  python experiments/codec_startup.py --workdir /tmp/percov2_demo                  # ~15 min on 2 cores
  python experiments/codec_startup.py --quick --workdir RUN --out /tmp/codec_startup  # smoke test
  python experiments/codec_startup.py --baseline-tree /tmp/percov2_old ...           # also an older checkout

Every call is a fresh process (``python -m percov2_jax.cli``) timed from start to exit, one
768x512 photo (a built-in photograph resized to cover 768x512 and centre-cropped, as Kodak's
landscape images are sized) with its catalogue caption; decompress decodes the stream compress
wrote. Four configurations: ``--checkpoint`` the stage-1 run or its bundle, ``--no-compilation-
cache`` or ``--compilation-cache DIR`` with a DIR that starts empty. Per configuration and
command: the first call (with the cache on: an empty cache, everything compiled and stored) and
the median of ``--repeats`` second calls (warm caches: XLA's, the stored executables, the OS's
file cache). Every configuration must write the same stream bytes and the same PNG; the report
says so. Ratios are against "run, cache off", which is what the commands did before bundles and
the cache (apart from the import trimming, which every configuration here has).

Also measured, fresh processes again: the import of ``ml_dtypes``, of ``jax`` and of the codec
(``percov2_jax.codec.api``), the load of the codec from the run and from the bundle
(``Codec.from_workdir`` alone), ``percov2 export`` itself, and throughput: one command over a
folder of ``--folder-images`` 768x512 images (the photos, mirrored and shifted; captions from a
TSV file), images per second, with the bundle and the cache warm, and from the run with the cache
off. ``--baseline-tree DIR`` adds the single-image rows for an older checkout (its
``percov2_jax`` on ``PYTHONPATH``; cache on = ``JAX_COMPILATION_CACHE_DIR``, off = unset); its
streams are not compared (older versions may code captions differently).

``--quick``: the workdir's own image size (``--workdir`` any stage-1 run with ``prior/``, e.g. the
tests' tiny one), 2 Euler steps, two configurations (run, cache off; bundle, cache on), 1 repeat,
no warm-up runs and a folder of 3 images: about a minute, nearly all of it Python and JAX
starting up in 15 processes.

Output: ``codec_startup.json`` (every raw time) and ``codec_startup.md`` in ``--out``
(``_quick`` appended with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import results_io

SIZE = (512, 768)  # rows, columns: Kodak's landscape size
CONFIGS = [("run", "off"), ("run", "on"), ("bundle", "off"), ("bundle", "on")]
QUICK_CONFIGS = [("run", "off"), ("bundle", "on")]
TARGETS_S = {"compress": 2.5, "decompress": 4.0}  # second calls, 768x512, the bundle with the cache on


def _clean_env(extra: dict | None = None, pythonpath: str | None = None) -> dict:
    """The environment of a timed command: no cache settings inherited (each configuration sets
    its own), no virtual devices; ``pythonpath`` replaces ``PYTHONPATH``."""
    drop = ("JAX_COMPILATION_CACHE_DIR", "PERCOV2_COMPILATION_CACHE", "XLA_FLAGS", "JAX_PLATFORMS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env.update(extra or {})
    return env


def timed(cmd: list[str], env: dict, cwd: str) -> float:
    """Wall seconds of ``cmd`` from start to exit; its output is shown only if it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def percov2(*args: str) -> list[str]:
    return [sys.executable, "-m", "percov2_jax.cli", *args]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# ------------------------------------------------------------------------------ inputs


def make_inputs(folder: str, size: tuple[int, int], count: int) -> tuple[str, str, str]:
    """``photo.png`` (the first built-in photo covering ``size``) with its caption, and a folder of
    ``count`` images of that size with a ``captions.tsv``; returns (photo, caption, folder)."""
    from PIL import Image

    from percov2_jax.data.builtin import BuiltinPhotos
    from percov2_jax.data.pipeline import resize_and_crop

    photos = BuiltinPhotos()
    h, w = size
    Image.fromarray(resize_and_crop(photos[1]["image"], size)).save(os.path.join(folder, "photo.png"))
    images = os.path.join(folder, "images")
    os.makedirs(images)
    rows = []
    for i in range(count):
        item = photos[i % len(photos)]
        # Photos repeat after len(photos): mirrored and covering a slightly larger size, then cut.
        variant = i // len(photos)
        grow = 1.0 + 0.1 * variant
        big = resize_and_crop(item["image"], (int(h * grow), int(w * grow)))
        picture = big[:h, big.shape[1] - w :] if variant % 2 else big[:h, :w]
        if variant % 2:
            picture = picture[:, ::-1]
        name = f"{i:02d}.png"
        Image.fromarray(np.ascontiguousarray(picture)).save(os.path.join(images, name))
        rows.append(f"{name}\t{item['caption']}\n")
    captions = os.path.join(folder, "captions.tsv")
    with open(captions, "w", encoding="utf-8") as f:
        f.writelines(rows)
    return os.path.join(folder, "photo.png"), photos[1]["caption"], images


# ------------------------------------------------------------------------------ measurements


def cache_flags(cache: str, tmp: str, label: str) -> list[str]:
    """The command-line flags of a configuration: off, or a cache directory of its own."""
    if cache == "off":
        return ["--no-compilation-cache"]
    return ["--compilation-cache", os.path.join(tmp, f"cache_{label}")]


def single_image(args, checkpoint: str, cache: str, tmp: str, photo: str, caption: str, label: str) -> dict:
    """First and second-call times of compress and decompress in one configuration."""
    flags = cache_flags(cache, tmp, label)
    env = _clean_env()
    stream, picture = os.path.join(tmp, f"{label}.pcv2"), os.path.join(tmp, f"{label}.png")
    compress = percov2("compress", photo, "-o", stream, "--checkpoint", checkpoint, "--caption", caption, *flags)
    decompress = percov2("decompress", stream, "-o", picture, "--checkpoint", checkpoint, *args.decode_flags, *flags)
    out = {"compress_s": [], "decompress_s": []}
    for _ in range(1 + args.repeats):
        out["compress_s"].append(timed(compress, env, tmp))
        out["decompress_s"].append(timed(decompress, env, tmp))
    with open(stream, "rb") as f:
        out["stream"] = f.read()
    with open(picture, "rb") as f:
        out["png"] = f.read()
    return out


def baseline_image(args, tmp: str, photo: str, caption: str) -> dict:
    """The same single-image calls with an older checkout (its own cache settings)."""
    out = {}
    for cache in ("off", "on"):
        extra = {"JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "cache_baseline")} if cache == "on" else {}
        env = _clean_env(extra, pythonpath=os.path.abspath(args.baseline_tree))
        stream, picture = os.path.join(tmp, f"baseline_{cache}.pcv2"), os.path.join(tmp, f"baseline_{cache}.png")
        compress = percov2("compress", photo, "-o", stream, "--checkpoint", args.workdir, "--caption", caption)
        decompress = percov2("decompress", stream, "-o", picture, "--checkpoint", args.workdir, *args.decode_flags)
        times = {"compress_s": [], "decompress_s": []}
        for _ in range(1 + args.repeats):
            times["compress_s"].append(timed(compress, env, tmp))
            times["decompress_s"].append(timed(decompress, env, tmp))
        out[cache] = times
    return out


def folder_throughput(args, checkpoint: str, cache: str, tmp: str, images: str, label: str) -> dict:
    flags = cache_flags(cache, tmp, label)
    captions = os.path.join(os.path.dirname(images), "captions.tsv")
    streams, decoded = os.path.join(tmp, f"streams_{label}"), os.path.join(tmp, f"decoded_{label}")
    env = _clean_env()
    compress = percov2("compress", images, "-o", streams, "--checkpoint", checkpoint, "--captions", captions, *flags)
    compress_s = timed(compress, env, tmp)
    decompress = percov2("decompress", streams, "-o", decoded, "--checkpoint", checkpoint, *args.decode_flags, *flags)
    decompress_s = timed(decompress, env, tmp)
    return {"compress_s": compress_s, "decompress_s": decompress_s}


def median(xs) -> float:
    return float(np.median(xs))


def summarise(times: dict) -> dict:
    """First call and the median of the second calls of each command."""
    return {
        cmd: {"first_s": times[f"{cmd}_s"][0], "second_s": median(times[f"{cmd}_s"][1:]), "raw_s": times[f"{cmd}_s"]}
        for cmd in ("compress", "decompress")
    }


# ------------------------------------------------------------------------------ report


def markdown(report: dict) -> str:
    quick = report["config"]["quick"]
    h, w = report["image_size"]
    lines = [
        "# Codec start-up: `percov2 compress` / `decompress` as commands" + (" (QUICK)" if quick else ""),
        "",
        *results_io.provenance(report),
        *results_io.busy_warning(report["machine"], "times are inflated and noisy"),
        f"Model: `{report['config']['workdir']}` ({report['model']}); one {w}x{h} photo, "
        f"its caption {report['caption']!r}; {report['decode_steps']} Euler steps. Every time is a fresh "
        f"process, start to exit; second calls: median of {report['config']['repeats']}.",
        "",
        "| checkpoint | compilation cache | compress, first | compress, second | decompress, first "
        "| decompress, second | second calls vs run, cache off |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    ref = report["single"]["run, cache off"]
    for name, entry in report["single"].items():
        c, d = entry["compress"], entry["decompress"]
        ratio = (
            f"{c['second_s'] / ref['compress']['second_s']:.2f}x / {d['second_s'] / ref['decompress']['second_s']:.2f}x"
        )
        source, cache = name.split(", ")
        lines.append(
            f"| {source} | {cache} | {c['first_s']:.2f} s | **{c['second_s']:.2f} s** | {d['first_s']:.2f} s "
            f"| **{d['second_s']:.2f} s** | {ratio} |"
        )
    for cache, entry in report.get("baseline", {}).items():
        c, d = summarise(entry).values()
        lines.append(
            f"| run, older checkout | {cache} (JAX's own) | {c['first_s']:.2f} s | {c['second_s']:.2f} s "
            f"| {d['first_s']:.2f} s | {d['second_s']:.2f} s | "
            f"{c['second_s'] / ref['compress']['second_s']:.2f}x / "
            f"{d['second_s'] / ref['decompress']['second_s']:.2f}x |"
        )
    best = report["single"].get("bundle, cache on", {})
    if best:
        met = [
            f"{cmd} {best[cmd]['second_s']:.2f} s (target {t} s: {'met' if best[cmd]['second_s'] <= t else 'missed'})"
            for cmd, t in TARGETS_S.items()
        ]
        lines += ["", "Targets, second call, bundle with the cache on: " + "; ".join(met) + "."]
    lines += [
        "",
        f"Identical output in every configuration: streams {report['identical']['streams']}, "
        f"decoded PNGs {report['identical']['pngs']}.",
        "",
        "## Where a second call's time goes",
        "",
        "| fresh process | median |",
        "|---|---:|",
    ]
    for name, seconds in report["pieces"].items():
        lines.append(f"| {name} | {seconds:.2f} s |")
    lines += [
        "",
        f"`percov2 export` of the run: {report['export_s']:.2f} s; the bundle holds "
        f"{report['bundle_bytes'] / 2**20:.1f} MiB, the run's checkpoint {report['run_bytes'] / 2**20:.1f} MiB "
        "(the train state, optimizer moments included, and the data position).",
        "",
        f"## Throughput: one command over a folder of {report['folder']['images']} images ({w}x{h})",
        "",
        "| checkpoint, cache | compress | images/s | decompress | images/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in report["folder"]["runs"].items():
        n = report["folder"]["images"]
        lines.append(
            f"| {name} | {entry['compress_s']:.1f} s | {n / entry['compress_s']:.2f} | "
            f"{entry['decompress_s']:.1f} s | {n / entry['decompress_s']:.2f} |"
        )
    lines += [
        "",
        "Notes: a first call with the cache on starts from an empty cache directory: it compiles every "
        "program, stores the codec's executables and XLA's, and so costs more than a call with the cache "
        "off. What is left of a second call is the Python and JAX imports, reading the model, and the work "
        "itself: the encoder plus, in the default `auto` token coding, one prior pass per schedule group "
        "(12 with qlds) whose stream is kept only when shorter than uniform coding; the decoder's Euler "
        "steps with classifier-free guidance (two transformer passes per step). `import jax` includes "
        "`import ml_dtypes`, and the codec's import includes both.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/percov2_demo", help="stage-1 workdir with prior/ (make demo)")
    ap.add_argument("--repeats", type=int, default=5, help="second calls per configuration and command")
    ap.add_argument("--folder-images", type=int, default=24, help="images of the throughput folder")
    ap.add_argument("--baseline-tree", default=None, help="an older checkout to time too (its percov2_jax)")
    results_io.add_output_arguments(ap, "the run's image size, 2 Euler steps, 2 configurations, 1 repeat, 3 images")
    args = ap.parse_args(argv)
    args.workdir = os.path.abspath(args.workdir)
    if args.quick:
        args.repeats, args.folder_images = 1, 3
    args.decode_flags = ["--steps", "2"] if args.quick else []
    return args


def main(argv=None):
    args = parse_args(argv)
    from percov2_jax.runs import checkpointing
    from percov2_jax.runs.layout import RunDir

    started = time.perf_counter()
    report = {"command": results_io.command(), "machine": results_io.machine(), "config": dict(vars(args))}
    report["versions"] = results_io.versions("jax", "jaxlib", "flax", "ml_dtypes", "numpy", "orbax-checkpoint")
    run = RunDir(args.workdir)
    config = checkpointing.read_json(run)
    size = SIZE if not args.quick else (int(config["image_size"]), int(config["image_size"]) * 3 // 2)
    report["image_size"] = list(size)
    report["decode_steps"] = 2 if args.quick else int(config["sample"]["num_steps"])
    report["model"] = (
        f"rate {config['rate']}, latent codec {config['vae']['kind']}, text {config['text']['kind']}, "
        f"MM-DiT {config['model']['transformer']['num_layers']} layers"
    )
    tmp = tempfile.mkdtemp(prefix="codec_startup_")
    try:
        photo, caption, images = make_inputs(tmp, size, args.folder_images)
        report["caption"] = caption
        bundle = os.path.join(tmp, "bundle")
        env = _clean_env()
        report["export_s"] = timed(percov2("export", args.workdir, bundle, "--no-compilation-cache"), env, tmp)
        report["bundle_bytes"] = sum(os.path.getsize(os.path.join(bundle, f)) for f in os.listdir(bundle))
        newest = run.checkpoints / str(checkpointing.latest_step(run))
        report["run_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(newest) for f in fs)
        sources = {"run": args.workdir, "bundle": bundle}
        single, outputs = {}, {}
        for source, cache in QUICK_CONFIGS if args.quick else CONFIGS:
            label = f"{source}_{cache}"
            t0 = time.perf_counter()
            times = single_image(args, sources[source], cache, tmp, photo, caption, label)
            outputs[label] = (times.pop("stream"), times.pop("png"))
            single[f"{source}, cache {cache}"] = summarise(times)
            c, d = single[f"{source}, cache {cache}"].values()
            print(
                f"{source}, cache {cache}: compress {c['first_s']:.2f} / {c['second_s']:.2f} s, "
                f"decompress {d['first_s']:.2f} / {d['second_s']:.2f} s ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        report["single"] = single
        report["identical"] = {
            "streams": len({s for s, _ in outputs.values()}) == 1,
            "pngs": len({p for _, p in outputs.values()}) == 1,
        }
        if not all(report["identical"].values()):
            raise SystemExit(f"configurations disagree: {report['identical']}")
        if args.baseline_tree:
            report["baseline"] = baseline_image(args, tmp, photo, caption)
        load = "from percov2_jax.codec.api import Codec; Codec.from_workdir({!r})"
        pieces = {
            "import ml_dtypes": python("import ml_dtypes"),
            "import jax": python("import jax"),
            "import percov2_jax.codec.api": python("import percov2_jax.codec.api"),
            "import the codec, load it from the run": python(load.format(args.workdir)),
            "import the codec, load it from the bundle": python(load.format(bundle)),
        }
        warm = 0 if args.quick else 1  # an untimed first run warms the OS's file cache
        report["pieces_raw_s"] = {
            name: [timed(cmd, env, tmp) for _ in range(warm + args.repeats)][warm:] for name, cmd in pieces.items()
        }
        report["pieces"] = {name: median(v) for name, v in report["pieces_raw_s"].items()}
        folder_configs = [("bundle", "on")] if args.quick else [("run", "off"), ("bundle", "on")]
        runs = {}
        for source, cache in folder_configs:
            label = f"{source}_{cache}"  # the single-image runs warmed this cache
            runs[f"{source}, cache {cache}"] = folder_throughput(args, sources[source], cache, tmp, images, label)
            print(f"folder, {source}, cache {cache}: {runs[f'{source}, cache {cache}']}", flush=True)
        report["folder"] = {"images": args.folder_images, "runs": runs}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["total_s"] = time.perf_counter() - started
    results_io.finish_machine(report["machine"])
    results_io.write_report(args.out, results_io.stem("codec_startup", args.quick), report, markdown(report))


if __name__ == "__main__":
    main()
