"""Evaluation reports and plots (percov2_jax.evaluation.report / .plots): markdown tables from
a summary.json dict, "nice" axis ticks, and Pillow PNG charts. No JAX."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from percov2_jax.evaluation import plots, report

RED = (200, 0, 0)


def _mode(name, steps, cfg, bpp, **metrics):
    """A summary.json mode; metrics not given are null."""
    values = {k: None for k in ("bpp_caption", "bpp_tokens", "bpp_header", "psnr", "ms_ssim", "lpips", "fid",
                                "kid", "clip_score", "clip_score_original")}
    values.update(bpp=bpp, **metrics)
    return {"name": name, "sample_steps": steps, "guidance_scale": cfg,
            "coding": {"entropy_mode": "prior", "schedule": "qlds", "hybrid_groups": None}, "metrics": values}


def _summary(label="tiny", modes=None):
    """A summary with 2 modes, 2 failed images, some metrics null in one mode, FID null in both."""
    modes = modes or [
        _mode("steps20_cfg3.0", 20, 3.0, 0.0052, bpp_caption=0.002, bpp_tokens=0.003, bpp_header=0.0002,
              psnr=15.2, ms_ssim=0.41, lpips=0.52, kid=0.0011, clip_score=28.1, clip_score_original=30.2),
        _mode("steps10_cfg1.0", 10, 1.0, 0.0052, psnr=16.0, ms_ssim=0.45, lpips=None),
    ]
    return {
        "run": {"label": label, "checkpoint": "/ckpt", "model_id": "a1b2c3", "created": "2026-11-22T14:00:00Z",
                "machine": "2 CPU cores", "process_count": 2},
        "dataset": {"name": "kodak", "items": 24, "preprocess": {"mode": "resize", "size": 512}},
        "images": {"total": 24, "evaluated": 22, "failed": 2, "failures": [
            {"id": "kodim03.png", "kind": "missing", "error": "no such file"},
            {"id": "kodim07.png", "kind": "corrupt", "error": "truncated"}]},
        "metric_weights": {"lpips": "alex: /w/alexnet.pth + /w/alex.pth",
                           "inception": "random (smoke test: numbers are meaningless)", "clip": "not computed"},
        "modes": modes,
    }


def _table_header(markdown: str) -> list[str]:
    """Cells of the first markdown table's header row."""
    line = next(line for line in markdown.splitlines() if line.startswith("| "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _table_rows(markdown: str) -> list[list[str]]:
    """Cells of the first markdown table's body rows."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


# --- markdown ----------------------------------------------------------------------------------


def test_summary_markdown_columns_nulls_and_failures():
    text = report.summary_markdown(_summary())
    assert text.startswith("# Evaluation of tiny on kodak")
    header = _table_header(text)
    assert header[:5] == ["mode", "steps", "guidance", "coding", "bpp (caption / tokens / header)"]
    # FID is null in every mode: no column; the others keep METRICS order, with arrows.
    assert header[5:] == ["PSNR (dB) ↑", "MS-SSIM ↑", "LPIPS ↓", "KID ×10³ ↓", "CLIP score ↑",
                          "CLIP score (originals) ↑"]
    first, second = _table_rows(text)
    assert first[:5] == ["steps20_cfg3.0", "20", "3.0", "prior, qlds", "0.0052 (0.0020 / 0.0030 / 0.0002)"]
    assert first[header.index("KID ×10³ ↓")] == "1.100"
    assert second[4] == "0.0052"  # no split computed
    assert second[header.index("LPIPS ↓")] == "—" and second[header.index("CLIP score ↑")] == "—"
    assert "22 of 24 images evaluated; 2 failed: kodim03.png (missing), kodim07.png (corrupt)" in text
    assert "- inception: random (smoke test: numbers are meaningless)" in text
    assert "- KID: shown ×10³" in text
    assert "- CLIP score (originals): CLIP score of the originals (upper bound)" in text


def test_failures_line_lists_twenty_then_counts_the_rest():
    failures = [{"id": f"img{i}.png", "kind": "missing", "error": "x"} for i in range(25)]
    line = report.failures_line({"total": 30, "evaluated": 5, "failed": 25, "failures": failures})
    assert "img19.png (missing), ... 5 more" in line and "img20.png" not in line
    assert report.failures_line({"total": 3, "evaluated": 3, "failed": 0, "failures": []}) == "3 of 3 images evaluated."


def test_summary_markdown_names_a_missing_key():
    with pytest.raises(ValueError, match="'modes'"):
        report.summary_markdown({"run": {}, "dataset": {}, "images": {}})


def test_records_markdown_and_write_reports(tmp_path):
    records = [
        {"index": 0, "id": "kodim01.png", "mode": "steps20_cfg3.0", "bytes": 123, "bpp": 0.0051, "psnr": 15.0,
         "ms_ssim": 0.4, "lpips": None},
        {"index": 1, "id": "kodim02.png", "mode": "steps20_cfg3.0", "bytes": 130, "bpp": 0.0053, "psnr": 15.4,
         "ms_ssim": 0.42, "lpips": 0.5},
        {"index": 2, "id": "kodim03.png", "kind": "missing", "error": "no such file"},
    ]
    text = report.records_markdown(records)
    assert _table_header(text) == ["id", "mode", "bpp", "PSNR (dB) ↑", "MS-SSIM ↑", "LPIPS ↓"]
    assert _table_rows(text) == [["kodim01.png", "steps20_cfg3.0", "0.0051", "15.00", "0.4000", "—"],
                                 ["kodim02.png", "steps20_cfg3.0", "0.0053", "15.40", "0.4200", "0.5000"]]
    assert "- kodim03.png (missing): no such file" in text
    assert "1 more rows not shown" in report.records_markdown(records, max_rows=1)
    summary_md, records_md = report.write_reports(tmp_path / "run", _summary(), records)
    assert open(summary_md, encoding="utf-8").read() == report.summary_markdown(_summary())
    assert open(records_md, encoding="utf-8").read() == text


# --- ticks -------------------------------------------------------------------------------------


def _is_nice_step(step: float) -> bool:
    """Whether ``step`` is 1, 2 or 5 times a power of ten."""
    mantissa = step / 10.0 ** math.floor(math.log10(step) + 1e-9)
    return any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 5, 10))


@pytest.mark.parametrize("lo, hi", [(0.0031, 0.0052), (12, 97), (0, 1), (5.0, 5.0), (0, 0), (-3.5, 2.1)])
def test_nice_ticks_cover_the_range_with_a_nice_step(lo, hi):
    ticks = plots.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 11
    steps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert all(math.isclose(s, steps[0], rel_tol=1e-6) for s in steps) and _is_nice_step(steps[0])


def test_nice_ticks_known_values():
    assert plots.nice_ticks(12, 97) == [0, 20, 40, 60, 80, 100]
    assert plots.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert plots.nice_ticks(0.0031, 0.0052) == [0.003, 0.004, 0.005, 0.006]
    assert plots.format_tick(0.0035, 0.0005) == "0.0035" and plots.format_tick(40.0, 20) == "40"


def test_log_ticks():
    assert plots.log_ticks(0.0001, 0.5) == [0.0001, 0.001, 0.01, 0.1, 1.0]
    assert plots.log_ticks(0.002, 0.033) == [0.002, 0.005, 0.01, 0.02, 0.05]
    single = plots.log_ticks(0.005, 0.005)
    assert single[0] < 0.005 < single[-1]
    with pytest.raises(ValueError, match="positive"):
        plots.log_ticks(0, 1)


# --- plots -------------------------------------------------------------------------------------


def _colours(path) -> set[tuple[int, int, int]]:
    """The distinct RGB colours of a PNG (checked to be RGB)."""
    image = Image.open(path)
    assert image.mode == "RGB"
    return {c for _, c in image.getcolors(maxcolors=1 << 20)}


def _run(label, bpps, base, **extra):
    """A run with 3 modes at ``bpps`` whose metrics move with the rate."""
    modes = [_mode(f"{label}_m{i}", 20, 3.0, bpp, psnr=base + i, ms_ssim=0.4 + 0.02 * i, lpips=0.6 - 0.05 * i,
                   fid=20.0 - 2 * i, kid=0.002 - 0.0003 * i, clip_score=27.0 + 0.5 * i, **extra)
             for i, bpp in enumerate(bpps)]
    return _summary(label, modes)


def test_line_chart_draws_marker_colour_single_point_and_gaps(tmp_path):
    path = tmp_path / "chart.png"
    series = [
        {"label": "known", "points": [(1, 2), (2, None), (3, 5)], "point_labels": ["a", "b", "c"], "color": RED},
        {"label": "single", "points": [(2, 3)]},
        {"label": "vertical", "points": [(2.5, 1), (2.5, 4)], "line": True},
        {"label": "reference", "hline": 4.5},
    ]
    plots.line_chart(path, series, x_label="x", y_label="y", title="t", higher_is_better=True, size=(400, 300))
    assert Image.open(path).size == (400, 300)
    colours = _colours(path)
    assert RED in colours and plots.PALETTE[1] in colours and plots.PALETTE[2] in colours
    assert len(colours) > 10


def test_all_none_panel_says_not_computed(tmp_path):
    path = tmp_path / "empty.png"
    plots.line_chart(path, [{"label": "r", "points": [(0.1, None), (None, 2)], "color": RED}],
                     x_label="bpp", y_label="FID", title="FID", size=(300, 200))
    colours = _colours(path)
    assert RED in colours  # the legend sample
    assert plots.MUTED in colours  # the frame and "not computed"


def test_panel_grid_size_and_bad_panel(tmp_path):
    panel = {"series": [{"label": "a", "points": [(0, 0), (1, 1)]}], "x_label": "x", "y_label": "y", "title": "p"}
    path = tmp_path / "grid.png"
    plots.panel_grid(path, [panel, panel, panel], title="grid", panel_size=(200, 180))
    assert Image.open(path).size == (600, 220)
    with pytest.raises(ValueError, match="panel 0"):
        plots.panel_grid(path, [{"series": []}], title="bad")


def test_rate_distortion_plots_two_runs_single_point_and_missing_metric(tmp_path):
    a = _run("tiny", [0.0031, 0.0041, 0.0062], 14.0, clip_score_original=30.2)
    b = _run("base", [0.0052, 0.0052, 0.0052], 15.0)  # steps x guidance variants: one rate
    single = _summary("single", [_mode("only", 20, 3.0, 0.004, psnr=15.0, fid=None)])
    for mode in a["modes"] + b["modes"]:
        mode["metrics"]["fid"] = None  # FID not computed anywhere
    paths = plots.rate_distortion_plots([a, b, single], tmp_path / "plots")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["rate_distortion.png", "rate_perception.png"]
    for path in paths:
        image = Image.open(path)
        assert image.size == (3 * plots.PANEL_SIZE[0], plots.PANEL_SIZE[1] + 40)
        colours = _colours(path)
        assert all(plots.PALETTE[i] in colours for i in range(3)) and len(colours) > 20
    assert plots.MUTED in _colours(paths[1])  # the originals' CLIP score line


def test_operating_modes_plot(tmp_path):
    path = plots.operating_modes_plot(_run("tiny", [0.005] * 3, 15.0), tmp_path / "om.png")
    assert plots.PALETTE[0] in _colours(path)
    with pytest.raises(ValueError, match="unknown metric"):
        plots.operating_modes_plot(_summary(), tmp_path / "x.png", metric_x="sharpness")


def test_cli_over_two_run_dirs(tmp_path, capsys):
    for label, bpps in (("tiny", [0.003, 0.004, 0.006]), ("base", [0.005] * 3)):
        (tmp_path / label).mkdir()
        (tmp_path / label / "summary.json").write_text(json.dumps(_run(label, bpps, 15.0)))
    out = tmp_path / "out"
    paths = plots.main([str(out), str(tmp_path / "tiny"), str(tmp_path / "base"), "--operating-modes"])
    assert sorted(p.name for p in out.iterdir()) == ["operating_modes_base.png", "operating_modes_tiny.png",
                                                     "rate_distortion.png", "rate_perception.png"]
    assert capsys.readouterr().out.split() == paths
    with pytest.raises(SystemExit):
        plots.main([str(out), str(tmp_path / "nowhere")])
