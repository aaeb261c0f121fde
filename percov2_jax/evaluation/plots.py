"""PNG charts of evaluation runs, drawn with matplotlib (Agg, never a display): rate-distortion
and rate-perception charts of one or more runs, and one run's operating modes in a
perception-vs-distortion plane (PerCoV2 Fig. 1). ``chart_specs`` decides what each chart shows.

matplotlib is optional (``pip install 'percov2-jax[plots]'``): without it the drawing functions
print one line saying the charts are skipped and return no path, so an evaluation still finishes.

Command line (each RUN_DIR holds a ``summary.json``; all runs share each chart)::

    python -m percov2_jax.evaluation.plots OUT_DIR RUN_DIR [RUN_DIR ...] [--operating-modes]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys

from percov2_jax import storage
from percov2_jax.evaluation import chart_specs
from percov2_jax.evaluation.chart_specs import Chart, Panel

MISSING_MATPLOTLIB = "matplotlib is not installed: charts skipped (pip install 'percov2-jax[plots]')"
PANEL_INCHES = (5.0, 4.4)
DPI = 100
POINT_LABEL = "point label"  # gid of the mode-name annotations, which _place_point_labels moves
# (dx, dy) in points from a point to its label, and the label's horizontal alignment; tried in order.
LABEL_OFFSETS = (
    (5, 0, "left"),
    (-5, 0, "right"),
    (5, 9, "left"),
    (-5, 9, "right"),
    (5, -9, "left"),
    (-5, -9, "right"),
    (0, 11, "center"),
    (0, -11, "center"),
)
MARKER_PIXELS = 8  # a 5 pt marker at DPI, with a little room


def _agg_figure(width: float, height: float):
    """An empty matplotlib ``Figure`` on an Agg canvas, or None after printing ``MISSING_MATPLOTLIB``."""
    try:
        # Figure and its Agg canvas, not pyplot: no global state and never a display, whatever the backend.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return None
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _draw_panel(ax, panel: Panel) -> None:
    """Series (lines and markers, point labels) and dashed reference lines, or "not computed"."""
    ax.set_title(panel.title, pad=18 if panel.hint else 6)
    if panel.hint:
        ax.annotate(
            f"({panel.hint})",
            (0.5, 1.0),
            xycoords="axes fraction",
            xytext=(0, 5),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize="small",
            color="dimgrey",
        )
    ax.set_xlabel(panel.x_label)
    ax.set_ylabel(panel.y_label)
    for series in panel.series:
        xs, ys = [x for x, _ in series.points], [y for _, y in series.points]
        ax.plot(
            xs,
            ys,
            color=series.colour,
            marker="o",
            markersize=5,
            linestyle="-" if series.line else "none",
            label=series.label,
        )
        for (x, y), text in zip(series.points, series.point_labels):
            ax.annotate(
                text,
                (x, y),
                xytext=LABEL_OFFSETS[0][:2],
                textcoords="offset points",
                ha="left",
                va="center",
                fontsize="x-small",
                color=series.colour,
                gid=POINT_LABEL,
                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
            )  # over lines
    for line in panel.references:
        ax.axhline(line.y, color=line.colour, linestyle="--", linewidth=1.5, label=line.label)
    if not panel.computed:
        ax.text(0.5, 0.5, "not computed", transform=ax.transAxes, ha="center", va="center", color="dimgrey")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        if panel.log_x:
            _log_x(ax, [x for series in panel.series for x, _ in series.points])
        else:
            ax.locator_params(axis="x", nbins=5)  # long labels ("0.0035") would touch at matplotlib's default
        ax.grid(True, which="major", color="0.9")
        ax.set_axisbelow(True)
        ax.margins(x=0.12, y=0.12)  # room for the point labels


def _log_x(ax, xs: list[float]) -> None:
    """A log x axis labelled with plain numbers ("0.002", "0.01"): at powers of ten beyond two
    decades of ``xs``, else at 1, 2, 5 x 10^k (1..9 x 10^k within less than a factor of 4)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = min(xs), max(xs)
    if hi < 1.5 * lo:  # matplotlib would widen a single rate to several decades
        ax.set_xlim(lo / 1.25, hi * 1.25)
    decades = math.log10(hi / lo)
    subs = (1.0,) if decades > 2 else (1.0, 2.0, 5.0) if decades > 0.6 else tuple(range(1, 10))
    ax.xaxis.set_major_locator(LogLocator(subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # matplotlib's own minor labels crowd a span of 1-2 decades


def _figure_legend(figure) -> None:
    """One legend under the panels: every run and reference line once."""
    handles = {}
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncols=min(len(handles), 6),
            fontsize="small",
            frameon=False,
        )


def _inside(box, frame) -> bool:
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def _place_point_labels(figure) -> None:
    """Moves each point label to the first of ``LABEL_OFFSETS`` where it stays inside its axes and
    overlaps no marker and no label placed before it (matplotlib does not avoid overlaps)."""
    from matplotlib.transforms import Bbox

    figure.canvas.draw()  # runs the layout: the extents below are final
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes:
        labels = [t for t in ax.texts if t.get_gid() == POINT_LABEL]
        frame = ax.get_window_extent(renderer)
        half = MARKER_PIXELS / 2
        taken = [
            Bbox.from_bounds(x - half, y - half, MARKER_PIXELS, MARKER_PIXELS)
            for x, y in (ax.transData.transform(t.xy) for t in labels)
        ]
        for text in labels:
            for offset in (*LABEL_OFFSETS, LABEL_OFFSETS[0]):  # nowhere free: the first place
                text.xyann = offset[:2]
                text.set_horizontalalignment(offset[2])
                box = text.get_window_extent(renderer)
                if _inside(box, frame) and not any(box.overlaps(t) for t in taken):
                    break
            taken.append(box)


def draw(chart: Chart):
    """``chart`` as a matplotlib ``Figure`` (Agg canvas), or None without matplotlib."""
    figure = _agg_figure(PANEL_INCHES[0] * len(chart.panels), PANEL_INCHES[1])
    if figure is None:
        return None
    for ax, panel in zip(figure.subplots(1, len(chart.panels), squeeze=False)[0], chart.panels):
        _draw_panel(ax, panel)
    if chart.title:
        figure.suptitle(chart.title, fontsize="x-large")
    _figure_legend(figure)
    _place_point_labels(figure)
    return figure


def _save(chart: Chart, path) -> str | None:
    """Draws ``chart`` into the PNG ``path`` (creating its folder); the path, or None without matplotlib."""
    figure = draw(chart)
    if figure is None:
        return None
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    storage.write_bytes(path, buffer.getvalue())
    return os.fspath(storage.path(path))


def rate_distortion_plots(summaries: list[dict], out_dir, *, log_x: bool | None = None) -> list[str]:
    """Writes ``out_dir/rate_distortion.png`` (PSNR, MS-SSIM, LPIPS vs bpp) and
    ``out_dir/rate_perception.png`` (FID, KID, CLIP score vs bpp; the originals' CLIP score as
    a dashed line) with one series per run; returns their paths ([] without matplotlib).
    ``log_x=None``: a log bpp axis when the rates span a factor of 10 or more."""
    charts = chart_specs.rate_charts(summaries, log_x)
    paths = []
    for chart in charts:
        path = _save(chart, storage.path(out_dir) / chart.filename)
        if path is None:
            return []
        paths.append(path)
    return paths


def operating_modes_plot(summary: dict, out_path, metric_x: str = "lpips", metric_y: str = "fid") -> str | None:
    """Writes a scatter of one run's modes, ``metric_y`` (perception) vs ``metric_x`` (distortion),
    each labelled with its mode name (PerCoV2 Fig. 1); returns the path (None without matplotlib)."""
    return _save(chart_specs.operating_modes_chart(summary, metric_x, metric_y), out_path)


def load_summary(run_dir) -> dict:
    """``RUN_DIR/summary.json`` as a dict."""
    path = storage.path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass run directories written by python -m percov2_jax.evaluate")
    return json.loads(storage.read_text(path))


def main(argv: list[str] | None = None) -> list[str]:
    """Writes the rate-distortion / rate-perception charts of the given runs together (and with
    ``--operating-modes`` one operating-modes chart per run); prints the paths. Exits with status
    1 when matplotlib is missing."""
    parser = argparse.ArgumentParser(
        prog="python -m percov2_jax.evaluation.plots",
        description="Rate-distortion and rate-perception charts of evaluation runs.",
    )
    parser.add_argument("out_dir", help="folder for the PNGs")
    parser.add_argument("run_dirs", nargs="+", help="evaluation run folders, each with a summary.json")
    parser.add_argument("--operating-modes", action="store_true", help="also an LPIPS-vs-FID chart per run")
    args = parser.parse_args(argv)
    try:
        summaries = [load_summary(d) for d in args.run_dirs]
        paths = rate_distortion_plots(summaries, args.out_dir)
        if not paths:  # no matplotlib: rate_distortion_plots has said so
            parser.exit(1)
        if args.operating_modes:
            for label, summary in zip(chart_specs.run_labels(summaries), summaries):
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
                paths.append(operating_modes_plot(summary, storage.path(args.out_dir) / f"operating_modes_{slug}.png"))
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
