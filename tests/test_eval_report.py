"""Evaluation reports and charts (percov2_jax.evaluation.report / .chart_specs / .plots): markdown
tables from a summary.json dict, what each chart shows, and its PNG files. No JAX."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from percov2_jax.evaluation import chart_specs, plots, report
from percov2_jax.evaluation.chart_specs import ReferenceLine


def _mode(name, steps, cfg, bpp, **metrics):
    """A summary.json mode; metrics not given are null."""
    values = {
        k: None
        for k in (
            "bpp_caption",
            "bpp_tokens",
            "bpp_header",
            "psnr",
            "ms_ssim",
            "lpips",
            "fid",
            "kid",
            "clip_score",
            "clip_score_original",
        )
    }
    values.update(bpp=bpp, **metrics)
    return {
        "name": name,
        "sample_steps": steps,
        "guidance_scale": cfg,
        "coding": {"entropy_mode": "prior", "schedule": "qlds", "hybrid_groups": None},
        "metrics": values,
    }


def _summary(label="tiny", modes=None):
    """A summary with 2 modes, 2 failed images, some metrics null in one mode, FID null in both."""
    modes = modes or [
        _mode(
            "steps20_cfg3.0",
            20,
            3.0,
            0.0052,
            bpp_caption=0.002,
            bpp_tokens=0.003,
            bpp_header=0.0002,
            bpp_paper=0.005,
            psnr=15.2,
            ms_ssim=0.41,
            lpips=0.52,
            kid=0.0011,
            clip_score=28.1,
            clip_score_original=30.2,
        ),
        _mode("steps10_cfg1.0", 10, 1.0, 0.0052, psnr=16.0, ms_ssim=0.45, lpips=None),
    ]
    return {
        "run": {
            "label": label,
            "checkpoint": "/ckpt",
            "model_id": "a1b2c3",
            "created": "2026-11-22T14:00:00Z",
            "machine": "2 CPU cores",
            "process_count": 2,
        },
        "dataset": {"name": "kodak", "items": 24, "preprocess": {"mode": "resize", "size": 512}},
        "images": {
            "total": 24,
            "evaluated": 22,
            "failed": 2,
            "failures": [
                {"id": "kodim03.png", "kind": "missing", "error": "no such file"},
                {"id": "kodim07.png", "kind": "corrupt", "error": "truncated"},
            ],
        },
        "metric_weights": {
            "lpips": "alex: /w/alexnet.pth + /w/alex.pth",
            "inception": "random (smoke test: numbers are meaningless)",
            "clip": "not computed",
        },
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
    assert header[:6] == [
        "mode",
        "steps",
        "guidance",
        "coding",
        "bpp (caption / tokens / header)",
        "bpp as the papers count",
    ]
    # FID is null in every mode: no column; the others keep METRICS order, with arrows.
    assert header[6:] == [
        "PSNR (dB) ↑",
        "MS-SSIM ↑",
        "LPIPS ↓",
        "KID ×10³ ↓",
        "CLIP score ↑",
        "CLIP score (originals) ↑",
    ]
    first, second = _table_rows(text)
    assert first[:6] == ["steps20_cfg3.0", "20", "3.0", "prior, qlds", "0.0052 (0.0020 / 0.0030 / 0.0002)", "0.0050"]
    assert first[header.index("KID ×10³ ↓")] == "1.100"
    assert second[4:6] == ["0.0052", "—"]  # no split computed
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
        {
            "index": 0,
            "id": "kodim01.png",
            "mode": "steps20_cfg3.0",
            "bytes": 123,
            "bpp": 0.0051,
            "psnr": 15.0,
            "ms_ssim": 0.4,
            "lpips": None,
        },
        {
            "index": 1,
            "id": "kodim02.png",
            "mode": "steps20_cfg3.0",
            "bytes": 130,
            "bpp": 0.0053,
            "psnr": 15.4,
            "ms_ssim": 0.42,
            "lpips": 0.5,
        },
        {"index": 2, "id": "kodim03.png", "kind": "missing", "error": "no such file"},
    ]
    text = report.records_markdown(records)
    assert _table_header(text) == ["id", "mode", "bpp", "PSNR (dB) ↑", "MS-SSIM ↑", "LPIPS ↓"]
    assert _table_rows(text) == [
        ["kodim01.png", "steps20_cfg3.0", "0.0051", "15.00", "0.4000", "—"],
        ["kodim02.png", "steps20_cfg3.0", "0.0053", "15.40", "0.4200", "0.5000"],
    ]
    assert "- kodim03.png (missing): no such file" in text
    assert "1 more rows not shown" in report.records_markdown(records, max_rows=1)
    summary_md, records_md = report.write_reports(tmp_path / "run", _summary(), records)
    assert open(summary_md, encoding="utf-8").read() == report.summary_markdown(_summary())
    assert open(records_md, encoding="utf-8").read() == text


# --- chart contents ------------------------------------------------------------------------------


def _run(label, bpps, base, **extra):
    """A run with a mode per rate in ``bpps`` whose metrics move with the mode's index."""
    modes = [
        _mode(
            f"{label}_m{i}",
            20,
            3.0,
            bpp,
            psnr=base + i,
            ms_ssim=0.4 + 0.02 * i,
            lpips=0.6 - 0.05 * i,
            fid=20.0 - 2 * i,
            kid=0.002 - 0.0003 * i,
            clip_score=27.0 + 0.5 * i,
            **extra,
        )
        for i, bpp in enumerate(bpps)
    ]
    return _summary(label, modes)


def _flat(points) -> list[float]:
    return [v for point in points for v in point]


def _three_runs():
    """Two runs (one at a single rate) without FID and a one-mode run with PSNR only."""
    a = _run("tiny", [0.0062, 0.0031, 0.0041], 14.0, clip_score_original=30.2)
    b = _run("base", [0.0052, 0.0052, 0.0052], 15.0)  # steps x guidance variants: one rate
    single = _summary("single", [_mode("only", 20, 3.0, 0.004, psnr=15.0, fid=None)])
    for mode in a["modes"] + b["modes"]:
        mode["metrics"]["fid"] = None  # FID not computed anywhere
    return [a, b, single]


def test_rate_charts_series_points_and_point_labels():
    rd, rp = chart_specs.rate_charts(_three_runs())
    assert (rd.filename, rd.title) == ("rate_distortion.png", "Rate-distortion on kodak")
    assert (rp.filename, rp.title) == ("rate_perception.png", "Rate-perception on kodak")
    assert [p.title for p in rd.panels] == ["PSNR (dB)", "MS-SSIM", "LPIPS"]
    assert [p.title for p in rp.panels] == ["FID", "KID (x1000)", "CLIP score"]
    assert [p.hint for p in rd.panels + rp.panels] == [
        "higher is better",
        "higher is better",
        "lower is better",
        "lower is better",
        "lower is better",
        "higher is better",
    ]
    psnr = rd.panels[0]
    assert (psnr.x_label, psnr.y_label, psnr.log_x) == ("bpp", "PSNR (dB)", False)
    assert [(s.label, s.colour, s.line) for s in psnr.series] == [
        ("tiny", "C0", True),
        ("base", "C1", True),
        ("single", "C2", True),
    ]
    tiny, base, single = psnr.series
    # Joined in rate order; modes at one rate stack up in value order.
    assert tiny.points == ((0.0031, 15.0), (0.0041, 16.0), (0.0062, 14.0))
    assert tiny.point_labels == ("tiny_m1", "tiny_m2", "tiny_m0")
    assert base.points == ((0.0052, 15.0), (0.0052, 16.0), (0.0052, 17.0))
    assert (single.points, single.point_labels) == (((0.004, 15.0),), ("only",))
    assert rd.panels[2].series[2].points == ()  # LPIPS not computed for "single"
    kid = rp.panels[1].series[0]
    assert _flat(kid.points) == pytest.approx([0.0031, 1.7, 0.0041, 1.4, 0.0062, 2.0])  # shown x1000
    assert all(not p.references for p in rd.panels + rp.panels[:2])


def test_not_computed_panel_keeps_its_series_for_the_legend():
    fid = chart_specs.rate_charts(_three_runs())[1].panels[0]
    assert not fid.computed and [s.label for s in fid.series] == ["tiny", "base", "single"]
    assert all(panel.computed for panel in chart_specs.rate_charts(_three_runs())[0].panels)


def test_original_clip_score_lines():
    runs = _three_runs()
    clip = chart_specs.rate_charts(runs)[1].panels[2]
    assert clip.references == (ReferenceLine("originals (upper bound)", "grey", 30.2),)
    for mode in runs[1]["modes"]:
        mode["metrics"]["clip_score_original"] = 29.0
    clip = chart_specs.rate_charts(runs)[1].panels[2]
    assert clip.references == (
        ReferenceLine("tiny: originals", "C0", 30.2),
        ReferenceLine("base: originals", "C1", 29.0),
    )
    for mode in runs[0]["modes"] + runs[1]["modes"]:
        mode["metrics"]["clip_score"] = None  # no CLIP score: no panel to put the originals' score in
    clip = chart_specs.rate_charts(runs)[1].panels[2]
    assert not clip.computed and clip.references == ()
    assert chart_specs.rate_charts([_run("x", [0.1], 1.0)])[1].panels[2].references == ()


def test_log_x_when_the_rates_span_a_decade():
    wide = [_run("wide", [0.002, 0.01, 0.05], 14.0), _run("other", [0.003, 0.03], 13.0)]
    assert chart_specs.auto_log_x(wide) and not chart_specs.auto_log_x(_three_runs())
    panels = chart_specs.rate_charts(wide)[0].panels + chart_specs.rate_charts(wide)[1].panels
    assert all(p.log_x and p.x_label == "bpp (log scale)" for p in panels)
    assert not any(p.log_x for p in chart_specs.rate_charts(wide, log_x=False)[0].panels)
    zero = _run("zero", [0.0, 0.004, 0.006], 14.0)
    assert not chart_specs.auto_log_x([zero])  # the positive rates span less than a decade
    psnr = chart_specs.rate_charts([zero], log_x=True)[0].panels[0]  # no place for a zero rate on a log axis
    assert psnr.series[0].points == ((0.004, 15.0), (0.006, 16.0))
    assert psnr.series[0].point_labels == ("zero_m1", "zero_m2")


def test_run_labels_datasets_and_bad_input():
    runs = [{"run": {"label": "a"}, "modes": []}, {"run": {"label": "a"}, "modes": []}, {"modes": []}]
    assert chart_specs.run_labels(runs) == ["a", "a #2", "run 3"]
    runs[1]["dataset"] = {"name": "clic2020"}
    assert chart_specs.datasets([_summary(), runs[1], _summary()]) == "kodak, clic2020"
    assert [s.label for s in chart_specs.rate_charts([_summary(), _summary()])[0].panels[0].series] == [
        "tiny",
        "tiny #2",
    ]
    with pytest.raises(ValueError, match="at least one"):
        chart_specs.rate_charts([])
    with pytest.raises(ValueError, match="'modes'"):
        chart_specs.rate_charts([{"run": {}}])


def test_operating_modes_chart():
    run = _run("tiny", [0.005] * 3, 15.0)
    run["modes"][1]["metrics"]["fid"] = None
    chart = chart_specs.operating_modes_chart(run)
    (panel,) = chart.panels
    assert (chart.title, panel.title) == ("", "Operating modes of tiny on kodak")
    assert (panel.x_label, panel.y_label, panel.hint) == ("LPIPS, lower is better", "FID", "lower is better")
    (series,) = panel.series
    assert (series.label, series.line) == ("tiny", False)
    assert _flat(series.points) == pytest.approx([0.6, 20.0, 0.5, 16.0])
    assert series.point_labels == ("tiny_m0", "tiny_m2")
    other = chart_specs.operating_modes_chart(run, metric_x="psnr", metric_y="kid").panels[0]
    assert (other.x_label, other.y_label) == ("PSNR (dB), higher is better", "KID (x1000)")
    assert _flat(other.series[0].points) == pytest.approx([15.0, 2.0, 16.0, 1.7, 17.0, 1.4])
    with pytest.raises(ValueError, match="unknown metric"):
        chart_specs.operating_modes_chart(run, metric_x="sharpness")


# --- drawing -----------------------------------------------------------------------------------


def _is_png(path) -> bool:
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


def _overlapping(boxes) -> bool:
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_drawing_follows_the_chart():
    runs = _three_runs()
    for mode in runs[0]["modes"]:
        mode["metrics"]["bpp"] *= 10  # a decade of rates: log x
    chart = chart_specs.rate_charts(runs)[1]
    figure = plots.draw(chart)
    fid, kid, clip = figure.axes
    assert [ax.get_title() for ax in figure.axes] == ["FID", "KID (x1000)", "CLIP score"]
    assert figure.get_suptitle() == "Rate-perception on kodak"
    assert "not computed" in [t.get_text() for t in fid.texts] and fid.get_xscale() == "linear"
    assert "(lower is better)" in [t.get_text() for t in kid.texts]
    assert kid.get_xscale() == clip.get_xscale() == "log" and kid.get_xlabel() == "bpp (log scale)"
    assert "0.01" in [t.get_text() for t in kid.get_xticklabels()]  # rates as plain numbers
    for ax, panel in zip(figure.axes, chart.panels):
        lines = [line for line in ax.lines if line.get_linestyle() != "--"]
        assert [tuple(map(tuple, line.get_xydata())) for line in lines] == [s.points for s in panel.series]
        assert [line.get_color() for line in lines] == ["C0", "C1", "C2"]
        labels = [t for t in ax.texts if t.get_gid() == plots.POINT_LABEL]
        assert [t.get_text() for t in labels] == [n for s in panel.series for n in s.point_labels]
    (reference,) = [line for line in clip.lines if line.get_linestyle() == "--"]
    assert tuple(reference.get_ydata()) == (30.2, 30.2) and reference.get_color() == "grey"
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["tiny", "base", "single", "originals (upper bound)"]
    # The three labels of "base" at one rate do not cover one another.
    renderer = figure.canvas.get_renderer()
    base_labels = [t.get_window_extent(renderer) for t in kid.texts if t.get_text().startswith("base_")]
    assert len(base_labels) == 3 and not _overlapping(base_labels)


def test_rate_distortion_plots_write_pngs(tmp_path):
    paths = plots.rate_distortion_plots(_three_runs(), tmp_path / "plots")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["rate_distortion.png", "rate_perception.png"]
    assert all(_is_png(p) for p in paths)


def test_operating_modes_plot_writes_a_png(tmp_path):
    path = plots.operating_modes_plot(_run("tiny", [0.005] * 3, 15.0), tmp_path / "om.png")
    assert path == str(tmp_path / "om.png") and _is_png(path)
    with pytest.raises(ValueError, match="unknown metric"):
        plots.operating_modes_plot(_summary(), tmp_path / "x.png", metric_x="sharpness")


def test_cli_puts_the_runs_in_one_chart(tmp_path, capsys, monkeypatch):
    for label, bpps in (("tiny", [0.003, 0.004, 0.006]), ("base", [0.005] * 3)):
        (tmp_path / label).mkdir()
        (tmp_path / label / "summary.json").write_text(json.dumps(_run(label, bpps, 15.0)))
    drawn, draw = [], plots.draw
    monkeypatch.setattr(plots, "draw", lambda chart: drawn.append(chart) or draw(chart))
    out = tmp_path / "out"
    paths = plots.main([str(out), str(tmp_path / "tiny"), str(tmp_path / "base"), "--operating-modes"])
    assert sorted(p.name for p in out.iterdir()) == [
        "operating_modes_base.png",
        "operating_modes_tiny.png",
        "rate_distortion.png",
        "rate_perception.png",
    ]
    assert capsys.readouterr().out.split() == paths and all(_is_png(p) for p in paths)
    assert [c.filename for c in drawn] == [
        "rate_distortion.png",
        "rate_perception.png",
        "operating_modes.png",
        "operating_modes.png",
    ]
    for chart in drawn[:2]:
        assert all([s.label for s in panel.series] == ["tiny", "base"] for panel in chart.panels)
    assert [c.panels[0].series[0].label for c in drawn[2:]] == ["tiny", "base"]
    with pytest.raises(SystemExit):
        plots.main([str(out), str(tmp_path / "nowhere")])


def test_without_matplotlib_the_charts_are_skipped(tmp_path, capsys, monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "import matplotlib" fails
    assert plots.rate_distortion_plots(_three_runs(), tmp_path / "run") == []
    assert plots.operating_modes_plot(_summary(), tmp_path / "run" / "om.png") is None
    assert capsys.readouterr().err.splitlines() == [plots.MISSING_MATPLOTLIB] * 2
    assert "pip install 'percov2-jax[plots]'" in plots.MISSING_MATPLOTLIB
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="unknown metric"):  # bad arguments are still errors
        plots.operating_modes_plot(_summary(), tmp_path / "om.png", metric_x="sharpness")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "summary.json").write_text(json.dumps(_summary()))
    with pytest.raises(SystemExit) as exit_:
        plots.main([str(tmp_path / "out"), str(tmp_path / "tiny")])
    assert exit_.value.code == 1 and capsys.readouterr().err.strip() == plots.MISSING_MATPLOTLIB
