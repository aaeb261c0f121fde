"""What every experiment records and how it writes its results: the machine and package versions a
result was measured with, the command that made it, wall-clock summaries, and the report itself,
``STEM.json`` (the whole report) and ``STEM.md`` (its tables) in ``--out``.

``--quick`` runs append ``_quick`` to the stem, so a smoke run never overwrites a committed result,
whatever ``--out`` says.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from importlib import metadata

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Threading and XLA settings that change timings; recorded when set.
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
BUSY_LOAD = 0.5  # a 1-minute load average above this at start: the report says the machine was busy


def add_output_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """``--out`` (default ``experiments/results``, wherever the command runs from) and ``--quick``."""
    parser.add_argument("--out", default=RESULTS, help="directory of the .json and .md results")
    parser.add_argument("--quick", action="store_true", help=quick_help + "; writes STEM_quick.{json,md}")


def stem(name: str, quick: bool) -> str:
    return name + "_quick" if quick else name


def command() -> str:
    """The command line as it was run (``python experiments/NAME.py ...``)."""
    return " ".join(["python"] + sys.argv)


def machine() -> dict:
    """The host: CPU model and SIMD flags, core counts, OS, Python, the date, the thread settings
    and the load average at the time of the call; JAX's devices and torch's thread count when
    the experiment imported them (importing them here would start their runtimes for nothing)."""
    cpu, simd = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        cpu = names[0] if names else cpu
        simd = [s for s in SIMD_FLAGS if s in flags]
    except OSError:  # not Linux
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": usable,
        "simd": simd,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "load_average_at_start": list(os.getloadavg()),
    }
    if "jax" in sys.modules:
        out["jax_devices"] = [str(d) for d in sys.modules["jax"].devices()]
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    return out


def finish_machine(mach: dict) -> None:
    """Record the load average at the end of the run."""
    mach["load_average_at_end"] = list(os.getloadavg())


def describe_machine(mach: dict) -> str:
    """One sentence for a report's header."""
    simd = f"; SIMD {', '.join(mach['simd'])}" if mach.get("simd") else ""
    devices = f"; JAX devices {', '.join(mach['jax_devices'])}" if mach.get("jax_devices") else ""
    load = f"load average (1, 5, 15 min) {_load(mach['load_average_at_start'])} at start"
    if "load_average_at_end" in mach:
        load += f", {_load(mach['load_average_at_end'])} at end"
    return (
        f"{mach['cpu']}, {mach['cpu_count']} logical cores ({mach['affinity']} usable{simd}){devices}; "
        f"{load}; {mach['date'][:10]}."
    )


def provenance(report: dict) -> list[str]:
    """Markdown lines naming the command, the machine and the versions of a report that holds
    ``command``, ``machine`` and ``versions``, each followed by a blank line."""
    return [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {describe_machine(report['machine'])} {describe_versions(report['versions'])}.",
        "",
    ]


def busy_warning(mach: dict, consequence: str) -> list[str]:
    """Markdown lines warning that the machine was busy at the start (none if it was idle)."""
    load = mach["load_average_at_start"][0]
    if load <= BUSY_LOAD:
        return []
    return [f"**Warning: the machine was not idle (1-min load average {load:.2f} at start): {consequence}**", ""]


def side_by_side(titles: list[str], columns: list[dict[str, float]]) -> list[str]:
    """A markdown table of ranked lists side by side: for each title a label column and an ms
    column, row i holding each list's i-th entry (``{label: ms}``, already in order)."""
    rows = [list(c.items()) for c in columns]
    lines = ["| " + " | ".join(f"{t} | ms" for t in titles) + " |", "|" + "---|---:|" * len(titles)]
    for i in range(max((len(r) for r in rows), default=0)):
        cells = [f"{r[i][0]} | {r[i][1]:.1f}" if i < len(r) else " | " for r in rows]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _load(values) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def versions(*distributions: str) -> dict[str, str]:
    """Installed versions of these distributions (pip names); absent ones are left out."""
    out = {}
    for name in distributions:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def describe_versions(found: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in found.items())


def spread_ms(seconds, raw: bool = False) -> dict:
    """Median, p10 and p90 of wall-clock ``seconds``, in ms (``raw``: every time too)."""
    ms = np.asarray(seconds, np.float64) * 1e3
    out = {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
    }
    if raw:
        out["times_ms"] = [round(float(t), 3) for t in ms]
    return out


def _json_value(x):
    """JSON for what ``json`` does not know: NumPy scalars and arrays, paths, other numbers."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return float(x)


def write_report(out_dir: str, name: str, report: dict, text: str) -> str:
    """Write ``report`` as JSON and ``text`` as markdown to ``out_dir/name.{json,md}``, print the
    markdown, and return the path without its suffix."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path + ".json", "w") as f:
        json.dump(report, f, indent=2, default=_json_value)
    with open(path + ".md", "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    print(text)
    took = f" ({report['total_s']:.0f} s)" if "total_s" in report else ""
    print(f"wrote {path}.json and {path}.md{took}", flush=True)
    return path
