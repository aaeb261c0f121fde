"""What the evaluation charts show, as plain data: the panels of each chart and, per panel, the
series, their points and point labels, the reference lines, the axis labels and the log-x choice.
``percov2_jax.evaluation.plots`` draws them; this file needs neither matplotlib nor JAX.

Points are exactly those drawn: a mode whose x or y metric is not computed (``None``), not
finite, or (on a log axis) not positive has no point. A panel without any point is drawn as
"not computed".
"""

from __future__ import annotations

import dataclasses
import math

from percov2_jax.evaluation.report import METRIC_BY_KEY, Metric

RATE_DISTORTION = ("psnr", "ms_ssim", "lpips")
RATE_PERCEPTION = ("fid", "kid", "clip_score")
GREY = "grey"


def colour(index: int) -> str:
    """The ``index``-th colour of matplotlib's default cycle ("tab10"), e.g. "C0"."""
    return f"C{index % 10}"


@dataclasses.dataclass(frozen=True)
class Series:
    """Points ``(x, y)`` joined in order (``line=False``: markers only); ``point_labels`` name them."""

    label: str
    colour: str
    points: tuple[tuple[float, float], ...]
    point_labels: tuple[str, ...]
    line: bool = True


@dataclasses.dataclass(frozen=True)
class ReferenceLine:
    """A dashed horizontal line at ``y``."""

    label: str
    colour: str
    y: float


@dataclasses.dataclass(frozen=True)
class Panel:
    """One set of axes."""

    title: str
    x_label: str
    y_label: str
    series: tuple[Series, ...]
    references: tuple[ReferenceLine, ...] = ()
    log_x: bool = False
    higher_is_better: bool | None = None

    @property
    def computed(self) -> bool:
        """Whether any series has a point; a panel without one says "not computed"."""
        return any(s.points for s in self.series)

    @property
    def hint(self) -> str:
        """ "higher is better", "lower is better" or "" (no direction)."""
        return {True: "higher is better", False: "lower is better", None: ""}[self.higher_is_better]


@dataclasses.dataclass(frozen=True)
class Chart:
    """Panels side by side under ``title`` ("": the single panel's title suffices), one PNG."""

    filename: str
    title: str
    panels: tuple[Panel, ...]


def _drawable(x, y, log_x: bool) -> bool:
    return x is not None and y is not None and math.isfinite(x) and math.isfinite(y) and (x > 0 or not log_x)


def _modes(summary: dict) -> list[dict]:
    """The summary's modes, or a ValueError saying the dict is not a summary.json."""
    if not isinstance(summary, dict) or not isinstance(summary.get("modes"), list):
        raise ValueError("expected a summary.json dict with a 'modes' list")
    return summary["modes"]


def metric(key: str) -> Metric:
    """``METRIC_BY_KEY[key]`` with an error listing the known keys."""
    if key not in METRIC_BY_KEY:
        raise ValueError(f"unknown metric {key!r}; known: {', '.join(METRIC_BY_KEY)}")
    return METRIC_BY_KEY[key]


def run_labels(summaries: list[dict]) -> list[str]:
    """Each summary's run label ("run N" when absent), made unique with "#2", "#3", ..."""
    labels, seen = [], {}
    for i, summary in enumerate(summaries):
        label = str((summary.get("run") or {}).get("label") or f"run {i + 1}")
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return labels


def datasets(summaries: list[dict]) -> str:
    """The dataset names of the runs, e.g. "kodak" or "kodak, clic2020"."""
    return ", ".join(dict.fromkeys(str((s.get("dataset") or {}).get("name", "?")) for s in summaries))


def auto_log_x(summaries: list[dict]) -> bool:
    """A log bpp axis when the positive rates span a factor of 10 or more."""
    rates = [(m.get("metrics") or {}).get("bpp") for s in summaries for m in _modes(s)]
    rates = [r for r in rates if r is not None and math.isfinite(r) and r > 0]
    return len(rates) > 1 and max(rates) / min(rates) >= 10


def _rate_series(summary: dict, label: str, index: int, key: str, log_x: bool) -> Series:
    """``key`` vs bpp of one run's modes, sorted by bpp then value (modes at one rate stack up)."""
    scale = METRIC_BY_KEY[key].scale
    rows = []
    for mode in _modes(summary):
        values = mode.get("metrics") or {}
        bpp, value = values.get("bpp"), values.get(key)
        if _drawable(bpp, value, log_x):
            rows.append((float(bpp), float(value) * scale, str(mode.get("name", "?"))))
    rows.sort(key=lambda r: (r[0], r[1]))
    return Series(label, colour(index), tuple((b, v) for b, v, _ in rows), tuple(n for _, _, n in rows))


def _original_clip_score(summary: dict) -> float | None:
    """The CLIP score of the originals (the first mode that has it), or None."""
    for mode in _modes(summary):
        value = (mode.get("metrics") or {}).get("clip_score_original")
        if value is not None and math.isfinite(value):
            return float(value)
    return None


def original_clip_lines(summaries: list[dict], labels: list[str]) -> tuple[ReferenceLine, ...]:
    """Lines at the originals' CLIP score (an upper bound): one grey line when every run that has
    it agrees, else one per run in the run's colour."""
    found = [(i, score) for i, s in enumerate(summaries) if (score := _original_clip_score(s)) is not None]
    if len({round(score, 6) for _, score in found}) == 1:
        return (ReferenceLine("originals (upper bound)", GREY, found[0][1]),)
    return tuple(ReferenceLine(f"{labels[i]}: originals", colour(i), score) for i, score in found)


def metric_panel(summaries: list[dict], labels: list[str], key: str, log_x: bool) -> Panel:
    """``key`` vs bpp, a series per run; the CLIP score panel also has the originals' score."""
    m = metric(key)
    series = tuple(_rate_series(s, label, i, key, log_x) for i, (s, label) in enumerate(zip(summaries, labels)))
    panel = Panel(
        m.axis_label(),
        "bpp" + (" (log scale)" if log_x else ""),
        m.axis_label(),
        series,
        log_x=log_x,
        higher_is_better=m.higher_is_better,
    )
    if key == "clip_score" and panel.computed:
        panel = dataclasses.replace(panel, references=original_clip_lines(summaries, labels))
    return panel


def rate_charts(summaries: list[dict], log_x: bool | None = None) -> list[Chart]:
    """``rate_distortion.png`` (PSNR, MS-SSIM, LPIPS vs bpp) and ``rate_perception.png`` (FID,
    KID, CLIP score vs bpp) of one or more runs. ``log_x=None``: ``auto_log_x``."""
    if not summaries:
        raise ValueError("the rate charts need at least one summary")
    labels = run_labels(summaries)
    log_x = auto_log_x(summaries) if log_x is None else log_x
    return [
        Chart(
            filename,
            f"{title} on {datasets(summaries)}",
            tuple(metric_panel(summaries, labels, key, log_x) for key in keys),
        )
        for filename, title, keys in (
            ("rate_distortion.png", "Rate-distortion", RATE_DISTORTION),
            ("rate_perception.png", "Rate-perception", RATE_PERCEPTION),
        )
    ]


def operating_modes_chart(summary: dict, metric_x: str = "lpips", metric_y: str = "fid") -> Chart:
    """One run's modes as points, ``metric_y`` (perception) vs ``metric_x`` (distortion), each
    labelled with its mode name (PerCoV2 Fig. 1)."""
    mx, my = metric(metric_x), metric(metric_y)
    points, names = [], []
    for mode in _modes(summary):
        values = mode.get("metrics") or {}
        x, y = values.get(mx.key), values.get(my.key)
        if _drawable(x, y, log_x=False):
            points.append((float(x) * mx.scale, float(y) * my.scale))
            names.append(str(mode.get("name", "?")))
    label = run_labels([summary])[0]
    direction = {True: ", higher is better", False: ", lower is better", None: ""}[mx.higher_is_better]
    series = Series(label, colour(0), tuple(points), tuple(names), line=False)
    panel = Panel(
        f"Operating modes of {label} on {datasets([summary])}",
        mx.axis_label() + direction,
        my.axis_label(),
        (series,),
        higher_is_better=my.higher_is_better,
    )
    return Chart("operating_modes.png", "", (panel,))
