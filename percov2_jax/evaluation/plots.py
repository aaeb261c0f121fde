"""Rate-distortion and rate-perception charts of evaluation runs, drawn with Pillow (no matplotlib).

``draw_chart`` draws one line chart into a box of an existing image; ``line_chart`` (one chart
per PNG) and ``panel_grid`` (charts side by side) are built on it. ``rate_distortion_plots``
turns ``summary.json`` dicts of one or more runs into ``rate_distortion.png`` (PSNR, MS-SSIM,
LPIPS vs bpp) and ``rate_perception.png`` (FID, KID, CLIP score vs bpp); ``operating_modes_plot``
scatters one run's modes in a perception-vs-distortion plane, as in PerCoV2's Fig. 1.

Command line (each RUN_DIR holds a ``summary.json``)::

    python -m percov2_jax.evaluation.plots OUT_DIR RUN_DIR [RUN_DIR ...] [--operating-modes]

The default Pillow font has no arrows or other non-ASCII symbols, so chart text is ASCII.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import re

from PIL import Image, ImageDraw, ImageFont

from percov2_jax.evaluation.report import METRIC_BY_KEY, Metric

# matplotlib's "tab10": distinct, and familiar to readers of RD plots.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
MUTED = (110, 110, 110)
GRID = (228, 228, 228)
MARKER_RADIUS = 4
PAD = 10
INSET = 12  # data never touches the frame: ticks span the plot area minus this margin
PANEL_SIZE = (500, 440)
CHART_SIZE = (720, 520)
RATE_DISTORTION = ("psnr", "ms_ssim", "lpips")
RATE_PERCEPTION = ("fid", "kid", "clip_score")
CHART_KEYS = {"series", "x_label", "y_label", "title", "log_x", "higher_is_better"}


# --- ticks -----------------------------------------------------------------------------------


def nice_number(value: float, round_: bool = True) -> float:
    """A "nice" number (1, 2 or 5 times a power of ten) near ``value > 0``: the nearest when
    ``round_``, else the smallest not below it (Heckbert, Graphics Gems 1990)."""
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"nice_number needs a finite positive value, got {value}")
    exponent = math.floor(math.log10(value))
    fraction = value / 10.0**exponent
    if round_:
        nice = 1 if fraction < 1.5 else 2 if fraction < 3 else 5 if fraction < 7 else 10
    else:
        eps = 1e-9
        nice = 1 if fraction <= 1 + eps else 2 if fraction <= 2 + eps else 5 if fraction <= 5 + eps else 10
    return nice * 10.0**exponent


def _round_to_step(value: float, step: float) -> float:
    """``value`` without float noise (0.30000000000000004 -> 0.3) at ``step``'s precision."""
    return round(value, max(0, -math.floor(math.log10(step))) + 2)


def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Evenly spaced ticks, step 1/2/5 x 10^k, with ``ticks[0] <= lo`` and ``ticks[-1] >= hi``.
    Equal ``lo`` and ``hi`` are widened around the value (by 10% of it, or 1 for zero)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"nice_ticks needs finite bounds, got ({lo}, {hi})")
    if max_ticks < 2:
        raise ValueError(f"nice_ticks needs max_ticks >= 2, got {max_ticks}")
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        half = abs(lo) * 0.1 or 1.0
        lo, hi = lo - half, hi + half
    step = nice_number(nice_number(hi - lo, round_=False) / (max_ticks - 1), round_=True)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [_round_to_step(k * step, step) for k in range(first, last + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log axis covering ``[lo, hi]`` (both > 0): powers of ten, or 1/2/5 x 10^k
    when the range spans at most two decades (a tight axis for a narrow range of rates).
    At least two ticks; ``ticks[0] <= lo`` and ``ticks[-1] >= hi``; a narrow range is widened
    first so that a single value does not sit on the axis' end."""
    if not (lo > 0 and hi > 0 and math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"log_ticks needs finite positive bounds, got ({lo}, {hi})")
    lo, hi = min(lo, hi), max(lo, hi)
    if hi < 1.5 * lo:  # a single rate would sit on the axis' end
        lo, hi = lo / 1.25, hi * 1.25
    first = math.floor(math.log10(lo) + 1e-9)
    last = max(math.ceil(math.log10(hi) - 1e-9), first + 1)
    if last - first > 2:
        return [10.0**k for k in range(first, last + 1)]
    nice = [round(m * 10.0**k, 1 - k) for k in range(first, last + 1) for m in (1, 2, 5)]
    start = max(i for i, t in enumerate(nice) if t <= lo * (1 + 1e-9))
    stop = min(i for i, t in enumerate(nice) if t >= hi * (1 - 1e-9))
    return nice[start : max(stop, start + 1) + 1]


def _minor_log_ticks(ticks: list[float]) -> list[float]:
    """m x 10^k (m = 1..9) strictly between the first and last tick, not already a tick."""
    first, last = math.floor(math.log10(ticks[0]) + 1e-9), math.ceil(math.log10(ticks[-1]) - 1e-9)
    values = [m * 10.0**k for k in range(first, last + 1) for m in range(1, 10)]
    majors = {round(math.log10(t), 6) for t in ticks}
    return [v for v in values if ticks[0] < v < ticks[-1] and round(math.log10(v), 6) not in majors]


def format_tick(value: float, step: float) -> str:
    """``value`` with as many decimals as ``step`` needs ("0.0035", "20", "0.5")."""
    decimals = max(0, -math.floor(math.log10(abs(step)) + 1e-9)) if step else 0
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text


# --- low-level drawing -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _font(size: int):
    """Pillow's default font at ``size`` (scalable since Pillow 10.1; a fixed bitmap before)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def _text_size(text: str, font) -> tuple[int, int]:
    """Ink width and height of ``text``."""
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _line_height(font) -> int:
    """Height of a line of text with ascenders and descenders."""
    return _text_size("Ag", font)[1]


def _text(draw, xy, text: str, font, fill, anchor: str = "lt") -> tuple[int, int, int, int]:
    """Draws ``text`` with its ink box anchored at ``xy`` (``anchor``: l/m/r then t/m/b; works
    with bitmap fonts too); returns the ink box."""
    left, top, right, bottom = font.getbbox(text)
    width, height = right - left, bottom - top
    x = xy[0] - {"l": 0, "m": width / 2, "r": width}[anchor[0]]
    y = xy[1] - {"t": 0, "m": height / 2, "b": height}[anchor[1]]
    draw.text((round(x - left), round(y - top)), text, font=font, fill=fill)
    return round(x), round(y), round(x + width), round(y + height)


def _vertical_text(image: Image.Image, center, text: str, font, fill) -> None:
    """Draws ``text`` rotated 90 degrees (reading bottom to top) centred at ``center``."""
    width, height = _text_size(text, font)
    layer = Image.new("RGBA", (width + 4, _line_height(font) + 4), (0, 0, 0, 0))
    _text(ImageDraw.Draw(layer), (2, 2), text, font, fill + (255,))
    layer = layer.rotate(90, expand=True)
    image.paste(layer, (round(center[0] - layer.width / 2), round(center[1] - layer.height / 2)), layer)


def _dashed_line(draw, start, end, fill, width: int = 2, dash: int = 8, gap: int = 5) -> None:
    """A dashed straight line from ``start`` to ``end``."""
    length = math.dist(start, end)
    if length == 0:
        return
    ux, uy = (end[0] - start[0]) / length, (end[1] - start[1]) / length
    pos = 0.0
    while pos < length:
        stop = min(pos + dash, length)
        draw.line([(start[0] + ux * pos, start[1] + uy * pos), (start[0] + ux * stop, start[1] + uy * stop)], fill=fill, width=width)
        pos = stop + gap


def _marker(draw, center, colour) -> tuple[int, int, int, int]:
    """A filled circle marker; returns its box."""
    x, y = center
    box = (round(x) - MARKER_RADIUS, round(y) - MARKER_RADIUS, round(x) + MARKER_RADIUS, round(y) + MARKER_RADIUS)
    draw.ellipse(box, fill=colour)
    return box


def _darker(colour, factor: float = 0.7):
    """``colour`` darkened, for text that must stay readable on white."""
    return tuple(round(c * factor) for c in colour)


def _overlaps(a, b) -> bool:
    """Whether boxes ``(x0, y0, x1, y1)`` ``a`` and ``b`` intersect."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(box, bounds) -> bool:
    """Whether ``box`` lies within ``bounds``."""
    return box[0] >= bounds[0] and box[1] >= bounds[1] and box[2] <= bounds[2] and box[3] <= bounds[3]


# --- one chart ---------------------------------------------------------------------------------


def _series_colour(series: dict, index: int):
    """The series' ``color`` if given, else the palette's ``index``-th colour."""
    return tuple(series.get("color") or PALETTE[index % len(PALETTE)])


def _clean_points(series: dict, log_x: bool) -> list[tuple[float, float, str | None]]:
    """``(x, y, label)`` of the drawable points: no None or non-finite values, and ``x > 0``
    on a log axis."""
    points = series.get("points") or []
    labels = series.get("point_labels")
    if labels is not None and len(labels) != len(points):
        raise ValueError(f"series {series.get('label')!r}: {len(labels)} point_labels for {len(points)} points")
    kept = []
    for i, point in enumerate(points):
        if len(point) != 2:
            raise ValueError(f"series {series.get('label')!r}: point {i} is {point!r}, expected (x, y)")
        x, y = point
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)) or (log_x and x <= 0):
            continue
        kept.append((float(x), float(y), labels[i] if labels is not None else None))
    return kept


class _Axis:
    """Maps data values to pixels: ticks[0] -> ``start``, ticks[-1] -> ``stop`` (linear or log10)."""

    def __init__(self, ticks: list[float], log: bool, start: float, stop: float):
        self.ticks, self.log, self.start, self.stop = ticks, log, start, stop
        self.lo, self.hi = self._t(ticks[0]), self._t(ticks[-1])

    def _t(self, value: float) -> float:
        return math.log10(value) if self.log else value

    def __call__(self, value: float) -> float:
        return self.start + (self._t(value) - self.lo) / (self.hi - self.lo) * (self.stop - self.start)

    def labels(self) -> list[str]:
        return _tick_labels(self.ticks, self.log)


def _tick_labels(ticks: list[float], log: bool) -> list[str]:
    """Tick labels: log ticks as plain numbers, linear ticks with the step's decimals."""
    if log:
        return [format_tick(t, t) for t in ticks]
    return [format_tick(t, ticks[1] - ticks[0]) for t in ticks]


def _legend_entries(series: list[dict]) -> list[tuple[str, tuple, str]]:
    """``(label, colour, style)`` of every labelled series; style is "line", "markers" or
    "dashed" (a reference line)."""
    entries = []
    for i, s in enumerate(series):
        if s.get("label"):
            style = "dashed" if "hline" in s else "line" if s.get("line", True) else "markers"
            entries.append((s["label"], _series_colour(s, i), style))
    return entries


def _legend_rows(entries, width: int, font) -> list[list[tuple[str, tuple, bool, int]]]:
    """Legend entries wrapped into rows no wider than ``width``; each entry gets its width."""
    rows, row, used = [], [], 0
    for label, colour, style in entries:
        entry_width = 28 + _text_size(label, font)[0]
        if row and used + 16 + entry_width > width:
            rows.append(row)
            row, used = [], 0
        used += (16 if row else 0) + entry_width
        row.append((label, colour, style, entry_width))
    return rows + ([row] if row else [])


def _draw_legend(draw, rows, center_x: float, top: float, font) -> None:
    """Legend rows centred at ``center_x``: a sample (line and marker, marker, or dashed line)
    and the label."""
    row_height = _line_height(font) + 6
    for r, row in enumerate(rows):
        x = center_x - (sum(e[3] for e in row) + 16 * (len(row) - 1)) / 2
        y = top + r * row_height + row_height / 2
        for label, colour, style, entry_width in row:
            if style == "dashed":
                _dashed_line(draw, (x, y), (x + 22, y), colour, dash=6, gap=3)
            else:
                if style == "line":
                    draw.line([(x, y), (x + 22, y)], fill=colour, width=2)
                _marker(draw, (x + 11, y), colour)
            _text(draw, (x + 28, y), label, font, INK, anchor="lm")
            x += entry_width + 16


def _place_label(draw, point, text: str, font, colour, taken: list, bounds) -> None:
    """Draws a point label beside ``point`` where it overlaps no marker or earlier label and
    stays inside ``bounds``; tries right, left, then shifted up/down."""
    width, height = _text_size(text, font)
    gap = MARKER_RADIUS + 3
    candidates = []
    for shift in (0, -1, 1, -2, 2, -3, 3):
        dy = shift * (height + 2)
        candidates.append((point[0] + gap, point[1] - height / 2 + dy))
        candidates.append((point[0] - gap - width, point[1] - height / 2 + dy))
    boxes = [(round(x), round(y), round(x + width), round(y + height)) for x, y in candidates]
    inside = [b for b in boxes if _inside(b, bounds)] or boxes
    box = next((b for b in inside if not any(_overlaps(b, t) for t in taken)), inside[0])
    _text(draw, box[:2], text, font, colour)
    taken.append(box)


def _draw_not_computed(draw, frame, font) -> None:
    """An empty frame saying "not computed"."""
    draw.rectangle(frame, outline=MUTED)
    _text(draw, ((frame[0] + frame[2]) / 2, (frame[1] + frame[3]) / 2), "not computed", font, MUTED, anchor="mm")


def _draw_ticks(draw, x_axis: _Axis, y_axis: _Axis, frame, font) -> None:
    """Grid lines, tick marks and tick labels of both axes (plus minor m x 10^k ticks on log x)."""
    left, top, right, bottom = frame
    if x_axis.log:
        for value in _minor_log_ticks(x_axis.ticks):
            px = x_axis(value)
            draw.line([(px, bottom), (px, bottom + 3)], fill=MUTED)
    for value, label in zip(x_axis.ticks, x_axis.labels()):
        px = x_axis(value)
        draw.line([(px, top), (px, bottom)], fill=GRID)
        draw.line([(px, bottom), (px, bottom + 5)], fill=INK)
        _text(draw, (px, bottom + 8), label, font, INK, anchor="mt")
    for value, label in zip(y_axis.ticks, y_axis.labels()):
        py = y_axis(value)
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.line([(left - 5, py), (left, py)], fill=INK)
        _text(draw, (left - 8, py), label, font, INK, anchor="rm")
    draw.rectangle(frame, outline=INK)


def _draw_series(draw, series: list[dict], x_axis: _Axis, y_axis: _Axis, frame, label_font) -> None:
    """Lines, then markers, then dashed reference lines, then point labels (on top of all)."""
    cleaned = [(s, _series_colour(s, i), _clean_points(s, x_axis.log)) for i, s in enumerate(series)]
    for s, colour, points in cleaned:
        pixels = [(x_axis(x), y_axis(y)) for x, y, _ in points]
        if s.get("line", True) and len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2, joint="curve")
    taken = []
    for _, colour, points in cleaned:
        taken += [_marker(draw, (x_axis(x), y_axis(y)), colour) for x, y, _ in points]
    for s, colour, _ in cleaned:
        if s.get("hline") is not None:
            py = y_axis(s["hline"])
            _dashed_line(draw, (frame[0] + 1, py), (frame[2] - 1, py), colour)
    for _, colour, points in cleaned:
        for x, y, text in points:
            if text:
                _place_label(draw, (x_axis(x), y_axis(y)), str(text), label_font, _darker(colour), taken, frame)


def _data_ranges(series: list[dict], log_x: bool):
    """``(xs, ys)`` of every drawable value; reference lines count towards ``ys`` only."""
    xs, ys = [], []
    for s in series:
        for x, y, _ in _clean_points(s, log_x):
            xs.append(x)
            ys.append(y)
        if s.get("hline") is not None and math.isfinite(s["hline"]):
            ys.append(float(s["hline"]))
    return xs, ys


def draw_chart(image: Image.Image, box, series: list[dict], *, x_label: str, y_label: str, title: str,
               log_x: bool = False, higher_is_better: bool | None = None) -> None:
    """Draws a line chart into ``box = (x0, y0, x1, y1)`` of ``image`` (RGB).

    ``series``: dicts with ``label``, ``points`` [(x, y), ...] joined in the given order,
    optional ``point_labels`` (one per point), ``color`` (RGB), ``line`` (False: markers only),
    or ``hline: y`` for a dashed horizontal reference line. Points with a None coordinate are
    skipped; when no point is left the chart says "not computed". ``log_x``: a log axis (``log_ticks``).
    """
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    title_font, label_font, tick_font, small_font = _font(16), _font(13), _font(11), _font(10)
    top = _text(draw, ((x0 + x1) / 2, y0 + PAD), title, title_font, INK, anchor="mt")[3] + 4
    if higher_is_better is not None:
        hint = "(higher is better)" if higher_is_better else "(lower is better)"
        top = _text(draw, ((x0 + x1) / 2, top), hint, _font(11), MUTED, anchor="mt")[3] + 4
    top += 8
    rows = _legend_rows(_legend_entries(series), x1 - x0 - 2 * PAD, label_font)
    legend_top = y1 - PAD - len(rows) * (_line_height(label_font) + 6)
    x_label_box = _text(draw, ((x0 + x1) / 2, legend_top - 4), x_label, label_font, INK, anchor="mb")
    bottom = x_label_box[1] - 8 - _line_height(tick_font) - 8
    _draw_legend(draw, rows, (x0 + x1) / 2, legend_top, label_font)
    xs, ys = _data_ranges(series, log_x)
    left_edge = x0 + PAD + _line_height(label_font) + 8
    _vertical_text(image, (x0 + PAD + _line_height(label_font) / 2, (top + bottom) / 2), y_label, label_font, INK)
    if not xs:
        _draw_not_computed(draw, (left_edge + 30, top, x1 - PAD - 10, bottom), label_font)
        return
    y_ticks = nice_ticks(min(ys), max(ys))
    x_ticks = log_ticks(min(xs), max(xs)) if log_x else nice_ticks(min(xs), max(xs))
    y_axis = _Axis(y_ticks, False, bottom - INSET, top + INSET)
    left = left_edge + max(_text_size(t, tick_font)[0] for t in y_axis.labels()) + 10
    right = x1 - PAD - _text_size(_tick_labels(x_ticks, log_x)[-1], tick_font)[0] / 2
    x_axis = _Axis(x_ticks, log_x, left + INSET, right - INSET)
    frame = (left, top, round(right), bottom)
    _draw_ticks(draw, x_axis, y_axis, frame, tick_font)
    _draw_series(draw, series, x_axis, y_axis, frame, small_font)


# --- whole images ------------------------------------------------------------------------------


def _save(image: Image.Image, path) -> str:
    """Saves ``image`` as PNG (creating parent folders); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return str(path)


def line_chart(path, series: list[dict], *, x_label: str, y_label: str, title: str, log_x: bool = False,
               higher_is_better: bool | None = None, size: tuple[int, int] = CHART_SIZE) -> None:
    """One chart as a PNG at ``path``; ``series`` as in ``draw_chart``."""
    image = Image.new("RGB", size, BACKGROUND)
    draw_chart(image, (0, 0, *size), series, x_label=x_label, y_label=y_label, title=title,
               log_x=log_x, higher_is_better=higher_is_better)
    _save(image, path)


def panel_grid(path, panels: list[dict], *, title: str, panel_size: tuple[int, int] = PANEL_SIZE) -> None:
    """Charts side by side in one PNG under a common ``title``. Each panel is a dict of
    ``draw_chart``'s arguments: ``series``, ``x_label``, ``y_label``, ``title``, and optional
    ``log_x``, ``higher_is_better``."""
    if not panels:
        raise ValueError("panel_grid needs at least one panel")
    for i, panel in enumerate(panels):
        if set(panel) - CHART_KEYS or not {"series", "x_label", "y_label", "title"} <= set(panel):
            raise ValueError(f"panel {i} has keys {sorted(panel)}; expected series, x_label, y_label, "
                             "title and optionally log_x, higher_is_better")
    width, height = panel_size
    header = 40 if title else 0
    image = Image.new("RGB", (width * len(panels), header + height), BACKGROUND)
    if title:
        _text(ImageDraw.Draw(image), (image.width / 2, header / 2), title, _font(20), INK, anchor="mm")
    for i, panel in enumerate(panels):
        draw_chart(image, (i * width, header, (i + 1) * width, header + height), **panel)
    _save(image, path)


# --- evaluation summaries ----------------------------------------------------------------------


def _run_labels(summaries: list[dict]) -> list[str]:
    """Each summary's run label ("run N" when absent), made unique with "#2", "#3", ..."""
    labels, seen = [], {}
    for i, summary in enumerate(summaries):
        label = str((summary.get("run") or {}).get("label") or f"run {i + 1}")
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return labels


def _modes(summary: dict) -> list[dict]:
    """The summary's modes, or a ValueError saying the dict is not a summary.json."""
    if not isinstance(summary, dict) or not isinstance(summary.get("modes"), list):
        raise ValueError("expected a summary.json dict with a 'modes' list")
    return summary["modes"]


def _mode_points(summary: dict, metric: Metric) -> tuple[list[tuple[float, float]], list[str]]:
    """``(bpp, value)`` of the modes where both are computed, sorted by bpp then value (modes
    at one bpp stack vertically), and the mode names."""
    rows = []
    for mode in _modes(summary):
        values = mode.get("metrics") or {}
        bpp, value = values.get("bpp"), values.get(metric.key)
        if bpp is not None and value is not None:
            rows.append((bpp, value * metric.scale, str(mode.get("name", "?"))))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [(b, v) for b, v, _ in rows], [n for _, _, n in rows]


def _original_clip_score(summary: dict) -> float | None:
    """The CLIP score of the originals (the first mode that has it), or None."""
    for mode in _modes(summary):
        value = (mode.get("metrics") or {}).get("clip_score_original")
        if value is not None:
            return float(value)
    return None


def _reference_lines(summaries: list[dict], labels: list[str]) -> list[dict]:
    """Dashed lines at the originals' CLIP score: one grey line when all runs agree, else one
    per run in its colour."""
    found = [(i, score) for i, s in enumerate(summaries) if (score := _original_clip_score(s)) is not None]
    if not found:
        return []
    if len({round(score, 6) for _, score in found}) == 1:
        return [{"label": "originals (upper bound)", "hline": found[0][1], "color": MUTED}]
    return [{"label": f"{labels[i]}: originals", "hline": score, "color": PALETTE[i % len(PALETTE)]}
            for i, score in found]


def _metric_panel(summaries: list[dict], labels: list[str], key: str, log_x: bool) -> dict:
    """One panel: ``key`` vs bpp, a series per run, mode names as point labels."""
    metric = METRIC_BY_KEY[key]
    series = []
    for i, (summary, label) in enumerate(zip(summaries, labels)):
        points, names = _mode_points(summary, metric)
        series.append({"label": label, "points": points, "point_labels": names, "color": PALETTE[i % len(PALETTE)]})
    if key == "clip_score":
        series += _reference_lines(summaries, labels)
    return {"series": series, "x_label": "bpp" + (" (log scale)" if log_x else ""), "y_label": metric.axis_label(),
            "title": metric.axis_label(), "log_x": log_x, "higher_is_better": metric.higher_is_better}


def _auto_log_x(summaries: list[dict]) -> bool:
    """Log bpp axis when the rates span at least a factor of 10."""
    rates = [m["metrics"]["bpp"] for s in summaries for m in _modes(s) if (m.get("metrics") or {}).get("bpp")]
    rates = [r for r in rates if r > 0]
    return len(rates) > 1 and max(rates) / min(rates) >= 10


def _datasets(summaries: list[dict]) -> str:
    """The dataset names of the runs, e.g. "kodak" or "kodak, clic2020"."""
    names = dict.fromkeys(str((s.get("dataset") or {}).get("name", "?")) for s in summaries)
    return ", ".join(names)


def rate_distortion_plots(summaries: list[dict], out_dir, *, log_x: bool | None = None) -> list[str]:
    """Writes ``out_dir/rate_distortion.png`` (PSNR, MS-SSIM, LPIPS vs bpp) and
    ``out_dir/rate_perception.png`` (FID, KID, CLIP score vs bpp; the originals' CLIP score as
    a dashed line) with one series per run; returns their paths. ``log_x=None``: a log bpp
    axis when the rates span a factor of 10 or more."""
    if not summaries:
        raise ValueError("rate_distortion_plots needs at least one summary")
    labels = _run_labels(summaries)
    log_x = _auto_log_x(summaries) if log_x is None else log_x
    out_dir = pathlib.Path(out_dir)
    paths = []
    for name, keys, title in (("rate_distortion.png", RATE_DISTORTION, "Rate-distortion"),
                              ("rate_perception.png", RATE_PERCEPTION, "Rate-perception")):
        panels = [_metric_panel(summaries, labels, key, log_x) for key in keys]
        panel_grid(out_dir / name, panels, title=f"{title} on {_datasets(summaries)}")
        paths.append(str(out_dir / name))
    return paths


def _metric(key: str) -> Metric:
    """``METRIC_BY_KEY[key]`` with an error listing the known keys."""
    if key not in METRIC_BY_KEY:
        raise ValueError(f"unknown metric {key!r}; known: {', '.join(METRIC_BY_KEY)}")
    return METRIC_BY_KEY[key]


def operating_modes_plot(summary: dict, out_path, metric_x: str = "lpips", metric_y: str = "fid") -> str:
    """A scatter of one run's modes, ``metric_y`` (perception) vs ``metric_x`` (distortion),
    each labelled with its mode name (PerCoV2 Fig. 1); returns the path."""
    mx, my = _metric(metric_x), _metric(metric_y)
    points, names = [], []
    for mode in _modes(summary):
        values = mode.get("metrics") or {}
        x, y = values.get(mx.key), values.get(my.key)
        points.append((None if x is None else x * mx.scale, None if y is None else y * my.scale))
        names.append(str(mode.get("name", "?")))
    label = _run_labels([summary])[0]
    direction = {True: ", higher is better", False: ", lower is better", None: ""}[mx.higher_is_better]
    line_chart(out_path, [{"label": label, "points": points, "point_labels": names, "line": False}],
               x_label=mx.axis_label() + direction, y_label=my.axis_label(),
               title=f"Operating modes of {label} on {_datasets([summary])}", higher_is_better=my.higher_is_better)
    return str(out_path)


# --- command line ------------------------------------------------------------------------------


def load_summary(run_dir) -> dict:
    """``RUN_DIR/summary.json`` as a dict."""
    path = pathlib.Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass run directories written by python -m percov2_jax.evaluate")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> list[str]:
    """Writes the rate-distortion / rate-perception plots of the given runs; prints the paths."""
    parser = argparse.ArgumentParser(prog="python -m percov2_jax.evaluation.plots", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder for the PNGs")
    parser.add_argument("run_dirs", nargs="+", help="evaluation run folders, each with a summary.json")
    parser.add_argument("--operating-modes", action="store_true", help="also an LPIPS-vs-FID plot per run")
    args = parser.parse_args(argv)
    try:
        summaries = [load_summary(d) for d in args.run_dirs]
        paths = rate_distortion_plots(summaries, args.out_dir)
        if args.operating_modes:
            for label, summary in zip(_run_labels(summaries), summaries):
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
                paths.append(operating_modes_plot(summary, pathlib.Path(args.out_dir) / f"operating_modes_{slug}.png"))
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
