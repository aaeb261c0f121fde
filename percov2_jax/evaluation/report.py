"""Markdown reports of an evaluation run: ``summary.md`` (one row per operating mode) and
``records.md`` (one row per image and mode), from the ``summary.json`` / per-image records that
``python -m percov2_jax.evaluate`` writes.

``METRICS`` is the one table of metric keys, display names, formats and directions; the plots
(``percov2_jax.evaluation.plots``) read it too. Any metric value may be ``None`` (not computed);
it is shown as "—". This file needs no JAX.
"""

from __future__ import annotations

import dataclasses
import os

from percov2_jax import storage

MISSING = "—"
MAX_LISTED_FAILURES = 20
BPP_PARTS = ("bpp_caption", "bpp_tokens", "bpp_header")


@dataclasses.dataclass(frozen=True)
class Metric:
    """One metric column: ``key`` in ``summary.json``, an ASCII display ``name`` (plots use it,
    the default plot font has no arrows), a format spec for the value after ``scale``, and
    whether higher values are better (``None``: no direction, e.g. the rate)."""

    key: str
    name: str
    fmt: str
    higher_is_better: bool | None
    unit: str = ""
    scale: float = 1.0
    note: str = ""

    def format(self, value) -> str:
        """``value`` scaled and formatted, or "—" when it is ``None``."""
        return MISSING if value is None else format(value * self.scale, self.fmt)

    def axis_label(self) -> str:
        """ASCII label for a plot axis, e.g. "PSNR (dB)", "KID (x1000)"."""
        extras = [self.unit] if self.unit else []
        if self.scale != 1.0:
            extras.append(f"x{self.scale:g}")
        return f"{self.name} ({', '.join(extras)})" if extras else self.name

    def header(self) -> str:
        """Markdown column header with an arrow for the direction, e.g. "PSNR (dB) ↑"."""
        text = self.name + (f" ({self.unit})" if self.unit else "")
        if self.scale == 1e3:
            text += " ×10³"
        elif self.scale != 1.0:
            text += f" ×{self.scale:g}"
        if self.higher_is_better is not None:
            text += " ↑" if self.higher_is_better else " ↓"
        return text


METRICS: tuple[Metric, ...] = (
    Metric("bpp", "bpp", ".4f", None, note="bits per pixel of the whole bitstream"),
    Metric("psnr", "PSNR", ".2f", True, unit="dB"),
    Metric("ms_ssim", "MS-SSIM", ".4f", True),
    Metric("lpips", "LPIPS", ".4f", False),
    Metric("fid", "FID", ".2f", False),
    Metric("kid", "KID", ".3f", False, scale=1e3, note="shown ×10³ (multiplied by 1000)"),
    Metric("clip_score", "CLIP score", ".2f", True),
    Metric(
        "clip_score_original",
        "CLIP score (originals)",
        ".2f",
        True,
        note="CLIP score of the originals (upper bound)",
    ),
)
METRIC_BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}
RECORD_METRICS = ("bpp", "psnr", "ms_ssim", "lpips")


def _require(mapping: dict, key: str, where: str):
    """``mapping[key]``, or a ValueError naming what is missing and where."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} should be a JSON object, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"{where} has no {key!r} (it has {sorted(mapping)})")
    return mapping[key]


def _cell(value) -> str:
    """Text safe inside a markdown table cell ("—" for ``None``)."""
    if value is None:
        return MISSING
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; numeric-looking columns are right-aligned by the reader's renderer."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def failures_line(images: dict) -> str:
    """ "22 of 24 images evaluated; 2 failed: kodim03.png (missing), ..." (at most 20 listed)."""
    total, evaluated = images.get("total"), images.get("evaluated")
    failures = images.get("failures") or []
    failed = max(images.get("failed") or 0, len(failures))
    line = f"{evaluated} of {total} images evaluated"
    if not failed:
        return line + "."
    listed = [f"{f.get('id', '?')} ({f.get('kind', 'error')})" for f in failures[:MAX_LISTED_FAILURES]]
    if failed > len(listed):
        listed.append(f"... {failed - len(listed)} more")
    return f"{line}; {failed} failed: " + ", ".join(listed)


def _coding_text(coding: dict | None) -> str:
    """ "prior, qlds" plus ", hybrid groups 4" when the mode sends hybrid token groups."""
    if not coding:
        return MISSING
    parts = [str(coding[k]) for k in ("entropy_mode", "schedule") if coding.get(k) is not None]
    if coding.get("hybrid_groups") is not None:
        parts.append(f"hybrid groups {coding['hybrid_groups']}")
    return ", ".join(parts) or MISSING


def _bpp_text(metrics: dict) -> str:
    """ "total (caption / tokens / header)" with "—" for any part not computed."""
    bpp = METRIC_BY_KEY["bpp"]
    total = bpp.format(metrics.get("bpp"))
    if all(metrics.get(k) is None for k in BPP_PARTS):
        return total
    return f"{total} ({' / '.join(bpp.format(metrics.get(k)) for k in BPP_PARTS)})"


def computed_metrics(modes: list[dict]) -> list[Metric]:
    """The metrics (other than bpp) that are non-null in at least one mode, in ``METRICS`` order."""
    return [
        m
        for m in METRICS
        if m.key != "bpp" and any((mode.get("metrics") or {}).get(m.key) is not None for mode in modes)
    ]


def _mode_row(mode: dict, metrics: list[Metric]) -> list[str]:
    """One table row: name, steps, guidance, coding, bpp split, then the chosen metrics."""
    values = mode.get("metrics") or {}
    return [
        _cell(_require(mode, "name", "a mode of summary.json")),
        _cell(mode.get("sample_steps")),
        _cell(mode.get("guidance_scale")),
        _cell(_coding_text(mode.get("coding"))),
        _bpp_text(values),
        METRIC_BY_KEY["bpp"].format(values.get("bpp_paper")),
    ] + [m.format(values.get(m.key)) for m in metrics]


def _run_lines(run: dict, dataset: dict) -> list[str]:
    """Bullet lines describing the run and the dataset's preprocessing."""
    lines = []
    for key in ("checkpoint", "model_id", "created", "machine", "process_count"):
        if run.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: `{run[key]}`")
    preprocess = dataset.get("preprocess")
    if preprocess:
        text = ", ".join(f"{k}={v}" for k, v in preprocess.items()) if isinstance(preprocess, dict) else preprocess
        lines.append(f"- preprocess: {text}")
    return lines


def summary_markdown(summary: dict) -> str:
    """The run's ``summary.json`` as markdown: title, run details, images line, the per-mode
    table (only metrics computed for some mode; bpp split as total (caption / tokens / header),
    and as the papers count it: caption + tokens),
    notes and the metric weights used (so random smoke-test weights are visible)."""
    run = _require(summary, "run", "summary.json")
    dataset = _require(summary, "dataset", "summary.json")
    modes = _require(summary, "modes", "summary.json")
    metrics = computed_metrics(modes)
    lines = [f"# Evaluation of {run.get('label', '?')} on {dataset.get('name', '?')}", ""]
    lines += _run_lines(run, dataset) + [""]
    lines += [failures_line(_require(summary, "images", "summary.json")), ""]
    header = ["mode", "steps", "guidance", "coding", "bpp (caption / tokens / header)", "bpp as the papers count"]
    lines += _table(header + [m.header() for m in metrics], [_mode_row(mode, metrics) for mode in modes])
    if any(m.note for m in metrics):
        lines += [""] + [f"- {m.name}: {m.note}" for m in metrics if m.note]
    weights = summary.get("metric_weights") or {}
    if weights:
        lines += ["", "## Metric weights", ""] + [f"- {k}: {_cell(v)}" for k, v in weights.items()]
    return "\n".join(lines) + "\n"


def records_markdown(records: list[dict], max_rows: int | None = None) -> str:
    """Per-image records as markdown: a table (id, mode, bpp, PSNR, MS-SSIM, LPIPS) of at most
    ``max_rows`` rows, then the failed images (records with a ``kind`` and no ``mode``)."""
    evaluated = [r for r in records if "mode" in r]
    failed = [r for r in records if "mode" not in r]
    shown = evaluated if max_rows is None else evaluated[:max_rows]
    metrics = [METRIC_BY_KEY[k] for k in RECORD_METRICS]
    rows = [[_cell(r.get("id")), _cell(r.get("mode"))] + [m.format(r.get(m.key)) for m in metrics] for r in shown]
    lines = ["# Per-image results", ""]
    lines += _table(["id", "mode"] + [m.header() for m in metrics], rows)
    if len(shown) < len(evaluated):
        lines += ["", f"... {len(evaluated) - len(shown)} more rows not shown"]
    if failed:
        lines += ["", f"## Failed images ({len(failed)})", ""]
        lines += [f"- {_cell(r.get('id'))} ({r.get('kind', 'error')}): {_cell(r.get('error', ''))}" for r in failed]
    return "\n".join(lines) + "\n"


def write_reports(workdir, summary: dict, records: list[dict]) -> tuple[str, str]:
    """Writes ``workdir/summary.md`` and ``workdir/records.md``; returns their paths."""
    workdir = storage.path(workdir)
    summary_path, records_path = workdir / "summary.md", workdir / "records.md"
    storage.write_text(summary_path, summary_markdown(summary))
    storage.write_text(records_path, records_markdown(records))
    return os.fspath(summary_path), os.fspath(records_path)
