"""Coding schedules: the order in which the prior codes the hyper-latent token map.

A schedule partitions an ``H x W`` token grid into ``S`` ordered, non-empty groups. Group ``i``
is entropy-coded in parallel, conditioned on the tokens of groups ``< i`` (docs/method.md
§4.1). Encoder and decoder rebuild the schedule from ``(name, H, W, steps)`` alone, so every
schedule here is a pure function of those numbers and must come out bit-identical on any
machine and NumPy version. Hence:

- only integer arithmetic and the IEEE-754 basic float64 operations (``+``, ``*``, ``floor``),
  which are correctly rounded everywhere; never ``pow``/``exp``/``log`` from the platform's libm
  where a result decides an ordering (the QLDS group sizes are computed with exact integers);
- no ``Generator`` methods for randomness: NumPy's compatibility policy lets their algorithms
  change between feature releases. ``random`` shuffles with its own Fisher-Yates over the raw
  64-bit words of ``PCG64``, whose stream for a fixed seed NumPy guarantees not to change.

Positions are flat row-major indices ``r * W + c``. Within a group, positions are listed in
the order the coder codes their symbols: row-major for the lattice schedules (checkerboard,
quincunx, implicit-VAR, raster), generation order for ``qlds`` and ``random``. A rule that
would produce an empty group (tiny grids) drops it, so ``num_steps`` can be smaller than the
nominal count there.

The schedules and the definitions chosen where the sources are silent (docs/method.md §4.3):

``checkerboard``  He et al. 2021: anchors ``(r + c)`` even, then the rest. 2 groups.
``quincunx``      Nested quincunx lattices (PQ-MIM), coarse to fine. See ``quincunx``;
                  at 8x8: 4, 4, 8, 16, 32 tokens (cumulative 4, 8, 16, 32, 64, as in
                  docs/method.md §4.3).
``qlds``          M2T's quantised R2 low-discrepancy sequence with power-law group sizes,
                  alpha = 2.2. See ``qlds``.
``implicit_var``  Coarse-to-fine sub-grids of the single map (scales 1, 2, 4, 6, 8 at 8x8:
                  1, 4, 16, 27, 16 tokens). See ``implicit_var``.
``raster``        Row-major order in contiguous, near-equal chunks (a baseline).
``random``        A fixed-seed permutation in near-equal chunks (a baseline).

Bitstream ids (``schedule_id``) are stable: never renumber or reuse one; add new schedules
with new ids. An id names the construction with its default options (``alpha``, ``seed``,
``scales``); a stream that used other options must record them itself.
"""

from __future__ import annotations

import bisect
import dataclasses
import fractions
import numbers
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_STEPS = 12  # M2T's S for qlds; also the default for raster and random (capped at H*W)
QLDS_ALPHA = 2.2  # M2T's group-size exponent
_ALPHA_MAX_DENOMINATOR = 100  # alpha is used as the nearest fraction p/q with q <= 100

# Roberts' R2 sequence: 1/g and 1/g^2, g = 1.32471795724474602596... the plastic number (the
# real root of x^3 = x + 1). Written as literals so no platform computes them differently.
_R2_STEP = (0.7548776662466927, 0.5698402909980532)


# --------------------------------------------------------------------------------------------
# The schedule value


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """An ordered partition of the ``height x width`` grid into groups of flat indices.

    ``groups[i]`` is an int32 array of row-major flat indices (``r * width + c``); together
    the groups hold every position exactly once, none is empty. The arrays are read-only.
    """

    name: str
    height: int
    width: int
    groups: tuple[np.ndarray, ...]

    def __post_init__(self):
        _check_grid(self.height, self.width)
        groups = tuple(_frozen_int32(g) for g in self.groups)
        if not groups or any(g.ndim != 1 or g.size == 0 for g in groups):
            raise ValueError(f"schedule {self.name!r}: groups must be non-empty 1-D index arrays")
        order = np.concatenate(groups)
        n = self.height * self.width
        if order.size != n or not np.array_equal(np.sort(order), np.arange(n)):
            raise ValueError(
                f"schedule {self.name!r}: groups do not cover the {self.height}x{self.width} grid exactly once"
            )
        object.__setattr__(self, "groups", groups)

    @property
    def num_steps(self) -> int:
        return len(self.groups)

    @property
    def num_positions(self) -> int:
        return self.height * self.width

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return tuple(int(g.size) for g in self.groups)

    @property
    def order(self) -> np.ndarray:
        """int32 [H*W]: all positions in coding order (the groups concatenated)."""
        return np.concatenate(self.groups)

    @property
    def step_of(self) -> np.ndarray:
        """int32 [H, W]: the index of the group that codes each position."""
        step = np.empty(self.num_positions, np.int32)
        for i, group in enumerate(self.groups):
            step[group] = i
        return step.reshape(self.height, self.width)

    def masks(self) -> np.ndarray:
        """bool [S, H, W]: ``masks()[i]`` is True where a token is revealed *before* step ``i``.

        This is what the prior sees when it predicts group ``i``; ``masks()[0]`` is all False.
        """
        steps = np.arange(self.num_steps, dtype=np.int32)[:, None, None]
        return self.step_of[None] < steps

    def __eq__(self, other):
        if not isinstance(other, Schedule):
            return NotImplemented
        return (
            (self.name, self.height, self.width) == (other.name, other.height, other.width)
            and self.num_steps == other.num_steps
            and all(np.array_equal(a, b) for a, b in zip(self.groups, other.groups))
        )

    def __hash__(self):
        return hash((self.name, self.height, self.width, tuple(g.tobytes() for g in self.groups)))

    def __repr__(self):
        return f"Schedule({self.name!r}, {self.height}x{self.width}, group_sizes={list(self.group_sizes)})"


# --------------------------------------------------------------------------------------------
# Schedules


def checkerboard(height: int, width: int) -> Schedule:
    """He et al. 2021: anchors where ``(r + c)`` is even, then the others. 32 + 32 at 8x8."""
    _check_grid(height, width)
    rows, cols = _grid(height, width)
    anchor = ((rows + cols) % 2 == 0).ravel()
    return _from_keys("checkerboard", height, width, np.where(anchor, 0, 1))


def quincunx(height: int, width: int) -> Schedule:
    """Nested quincunx lattices, coarse to fine (PQ-MIM's order; docs/method.md §4.3).

    With ``P = 2**L`` the coarsest lattice spacing, the groups are, for ``p = P, P/2, ..., 1``:

    1. the square lattice ``(r mod p, c mod p) == (0, 0)`` minus the positions already coded;
    2. (if ``p >= 2``) its quincunx centres ``(r mod p, c mod p) == (p/2, p/2)``.

    Each group doubles the revealed density: square, quincunx, square, ... ``2L + 1`` groups
    (fewer if some are empty on a tiny grid). ``L = max(1, floor(log2(min(H, W))) - 1)``, the
    coarsest lattice with at least two rows and two columns, which makes the first group 4
    tokens at 8x8 (``P = 4``: groups 4, 4, 8, 16, 32, cumulative 4, 8, 16, 32, 64, matching
    the cumulative counts of docs/method.md §4.3) and at 32x32 (``P = 16``: 9 groups,
    4, 4, 8, ..., 512). Lattices are anchored at (0, 0) on non-square grids too.
    """
    _check_grid(height, width)
    levels = max(1, min(height, width).bit_length() - 2)  # bit_length - 1 == floor(log2)
    rows, cols = _grid(height, width)
    key = np.full((height, width), -1, np.int64)
    group = 0
    for level in range(levels, -1, -1):
        p = 1 << level
        square = (rows % p == 0) & (cols % p == 0) & (key < 0)
        key[square] = group
        group += 1
        if p >= 2:
            centres = (rows % p == p // 2) & (cols % p == p // 2)
            key[centres] = group
            group += 1
    return _from_keys("quincunx", height, width, key.ravel())


def qlds(height: int, width: int, steps: int | None = None, alpha: float = QLDS_ALPHA) -> Schedule:
    """M2T's quantised low-discrepancy sequence (QLDS) schedule, ``steps`` groups (default 12).

    Order (docs/method.md §4.3): R2 points ``t_n = frac(0.5 + n * (1/g, 1/g^2))`` for
    ``n = 0, 1, 2, ...`` (g the plastic number) go to cell ``(floor(t_n,0 * H),
    floor(t_n,1 * W))``; cells already taken are skipped until every cell is ordered. The
    first cell is the centre, ``(H // 2, W // 2)``.

    Group sizes: M2T's ``G_k = pi[round(f(k-1)) : round(f(k))]`` with
    ``f(k) = N * (k / S) ** alpha``, rounded half up, evaluated exactly in integers (``alpha``
    is taken as the nearest fraction with denominator <= 100; 2.2 = 11/5). Our reading where
    M2T is silent: if that rounding yields an empty group or a group smaller than its
    predecessor (only when N / S is small, e.g. 64 tokens in 12 steps gives an empty first
    group), the sizes are sorted ascending and each empty group takes one token from the
    first of the largest groups. Sizes are therefore non-decreasing, at least 1, and equal to
    M2T's whenever M2T's already are.
    """
    _check_grid(height, width)
    steps = _check_steps(steps, height, width)
    ratio = _check_alpha(alpha)
    sizes = _power_group_sizes(height * width, steps, ratio)
    bounds = np.cumsum((0,) + sizes)
    order = _r2_order(height, width)
    groups = tuple(order[bounds[i] : bounds[i + 1]] for i in range(steps))
    return Schedule("qlds", height, width, groups)


def implicit_var(height: int, width: int, scales: Sequence | None = None) -> Schedule:
    """The implicit-VAR schedule: coarse-to-fine sub-grids of the single token map.

    Step ``k`` reveals the not-yet-revealed positions of an ``h_k x w_k`` sub-grid that
    samples the map at the centres of an ``h_k x w_k`` tiling: rows
    ``floor((i + 1/2) * H / h_k)``, ``i < h_k`` (likewise columns). The last scale is always the
    full grid, which reveals the rest.

    ``scales`` (our reading of the flowchart's "[S] -> 2x2 -> 4x4 -> 6x6 -> 8x8", with the 1x1
    VAR first scale standing for [S]): side lengths ``n_k`` on the longer grid side
    ``m = max(H, W)``, by default 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, ... (powers of two and
    three times powers of two, 3 itself left out as in the flowchart) below ``m``, then ``m``.
    Each axis is scaled: ``h_k = max(1, round(n_k * H / m))`` (half up), same for ``w_k``.
    An entry may also be an ``(h, w)`` pair used as is. At 8x8: scales 1, 2, 4, 6, 8 give
    groups 1, 4, 16, 27, 16. Scales that reveal nothing new are dropped.
    """
    _check_grid(height, width)
    side = max(height, width)
    if scales is None:
        scales = _default_var_ladder(side)
    sizes = [_var_scale(s, height, width, side) for s in scales]
    if not sizes:
        raise ValueError("implicit_var: scales must not be empty")
    for (h0, w0), (h1, w1) in zip(sizes, sizes[1:]):
        if h1 < h0 or w1 < w0 or (h1, w1) == (h0, w0):
            raise ValueError(f"implicit_var: scales must grow strictly, got {list(scales)}")
    if sizes[-1] != (height, width):
        sizes.append((height, width))
    key = np.full((height, width), -1, np.int64)
    for k, (h, w) in enumerate(sizes):
        rows = (2 * np.arange(h) + 1) * height // (2 * h)
        cols = (2 * np.arange(w) + 1) * width // (2 * w)
        sub = key[np.ix_(rows, cols)]
        key[np.ix_(rows, cols)] = np.where(sub < 0, k, sub)
    return _from_keys("implicit_var", height, width, key.ravel())


def raster(height: int, width: int, steps: int | None = None) -> Schedule:
    """Row-major order cut into ``steps`` contiguous chunks (default 12).

    Chunk sizes differ by at most one; the first ``H*W mod steps`` chunks are the larger.
    """
    _check_grid(height, width)
    steps = _check_steps(steps, height, width)
    order = np.arange(height * width)
    return Schedule("raster", height, width, tuple(np.array_split(order, steps)))


def random(height: int, width: int, steps: int | None = None, seed: int = 0) -> Schedule:
    """A fixed-seed random permutation cut into ``steps`` near-equal chunks (default 12).

    The permutation is a Fisher-Yates shuffle of ``0 .. N-1`` (``i = N-1 .. 1``, swap ``i``
    with a uniform ``j <= i``), drawing ``j`` from the raw 64-bit words of
    ``np.random.PCG64(seed)`` by rejection (``u mod (i + 1)`` for ``u`` below the largest
    multiple of ``i + 1`` under 2**64). Chunk sizes as in ``raster``.
    """
    _check_grid(height, width)
    steps = _check_steps(steps, height, width)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"random: seed must be a non-negative int, got {seed!r}")
    order = _shuffle(height * width, int(seed))
    return Schedule("random", height, width, tuple(np.array_split(order, steps)))


ScheduleFn = Callable[..., Schedule]

SCHEDULES: dict[str, ScheduleFn] = {
    "checkerboard": checkerboard,
    "quincunx": quincunx,
    "qlds": qlds,
    "implicit_var": implicit_var,
    "raster": raster,
    "random": random,
}

# Bitstream ids. Never renumber or reuse an id: old streams must keep decoding.
_SCHEDULE_IDS: dict[str, int] = {
    "raster": 0,
    "random": 1,
    "checkerboard": 2,
    "quincunx": 3,
    "qlds": 4,
    "implicit_var": 5,
}

# Schedules whose group count follows from the grid (steps may be passed only to confirm it).
_FIXED_STEPS = frozenset({"checkerboard", "quincunx", "implicit_var"})


def make_schedule(name: str, height: int, width: int, steps: int | None = None, **options) -> Schedule:
    """Build schedule ``name`` for a ``height x width`` grid.

    ``steps`` sets the group count of ``qlds``, ``raster`` and ``random`` (default 12, capped
    at ``H*W``). ``checkerboard``, ``quincunx`` and ``implicit_var`` fix their own count; a
    ``steps`` given for them must equal it. ``options`` go to the schedule function
    (``alpha`` for qlds, ``seed`` for random, ``scales`` for implicit_var).
    """
    key = _canonical_name(name)
    _check_grid(height, width)
    fn = SCHEDULES[key]
    if key not in _FIXED_STEPS:
        return fn(height, width, steps, **options)
    schedule = fn(height, width, **options)
    if steps is not None:
        _check_steps(steps, height, width)
        if steps != schedule.num_steps:
            raise ValueError(f"{key} has {schedule.num_steps} steps on a {height}x{width} grid, got steps={steps}")
    return schedule


def schedule_id(name: str) -> int:
    """The stable bitstream id of schedule ``name``."""
    return _SCHEDULE_IDS[_canonical_name(name)]


def schedule_from_id(schedule_id: int) -> str:
    """The schedule name for a bitstream id (inverse of ``schedule_id``)."""
    if _is_int(schedule_id):
        for name, i in _SCHEDULE_IDS.items():
            if i == schedule_id:
                return name
    known = sorted(_SCHEDULE_IDS.values())
    raise ValueError(f"unknown schedule id {schedule_id!r}; known: {known}")


# --------------------------------------------------------------------------------------------
# Construction helpers


def _r2_order(height: int, width: int) -> np.ndarray:
    """Grid cells in order of first visit by the quantised R2 sequence (flat indices)."""
    n_cells = height * width
    count = 4 * n_cells + 64  # about 2.5 N points visit every cell; grow if not enough
    while True:
        n = np.arange(count, dtype=np.float64)
        t0 = 0.5 + n * _R2_STEP[0]
        t1 = 0.5 + n * _R2_STEP[1]
        t0 -= np.floor(t0)
        t1 -= np.floor(t1)
        rows = np.minimum(np.floor(t0 * height).astype(np.int64), height - 1)
        cols = np.minimum(np.floor(t1 * width).astype(np.int64), width - 1)
        cells, first = np.unique(rows * width + cols, return_index=True)
        if cells.size == n_cells:
            return cells[np.argsort(first)]
        count *= 2


def _power_group_sizes(n: int, steps: int, alpha: fractions.Fraction) -> tuple[int, ...]:
    """Non-decreasing positive group sizes summing to ``n`` (see ``qlds``)."""
    p, q = alpha.numerator, alpha.denominator
    cumulative = [_round_power(n, s, steps, p, q) for s in range(steps + 1)]
    sizes = sorted(b - a for a, b in zip(cumulative, cumulative[1:]))
    # Both moves keep the list sorted: fill the last empty slot, then take from the first of
    # the largest sizes (>= 2, since the sizes now sum to n + 1 > steps).
    for last_empty in range(sizes.count(0) - 1, -1, -1):
        sizes[last_empty] = 1
        sizes[bisect.bisect_left(sizes, sizes[-1])] -= 1
    return tuple(sizes)


def _round_power(n: int, s: int, steps: int, p: int, q: int) -> int:
    """``floor(n * (s / steps) ** (p / q) + 1/2)`` exactly, by bisection on integers.

    ``c`` qualifies iff ``c - 1/2 <= n (s/steps)^(p/q)``, i.e. for ``c >= 1`` iff
    ``(2c - 1)^q * steps^p <= (2n)^q * s^p``.
    """
    rhs = (2 * n) ** q * s**p
    scale = steps**p
    lo, hi = 0, n  # lo always qualifies
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (2 * mid - 1) ** q * scale <= rhs:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _shuffle(n: int, seed: int) -> np.ndarray:
    words = _RawWords(seed)
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = words.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return np.asarray(order, np.int64)


class _RawWords:
    """Uniform integers from PCG64's raw 64-bit output, independent of ``Generator`` methods."""

    def __init__(self, seed: int):
        self._bits = np.random.PCG64(seed)
        self._buffer: list[int] = []

    def below(self, bound: int) -> int:
        limit = (1 << 64) - (1 << 64) % bound
        while True:
            if not self._buffer:
                self._buffer = [int(w) for w in self._bits.random_raw(256)][::-1]
            word = self._buffer.pop()
            if word < limit:
                return word % bound


def _default_var_ladder(side: int) -> list[int]:
    ladder, power = [1], 2
    while power < side:
        ladder += [s for s in (power, 3 * power) if s < side]
        power *= 2
    return sorted(set(ladder)) + ([side] if side > 1 else [])


def _var_scale(scale, height: int, width: int, side: int) -> tuple[int, int]:
    if _is_int(scale):
        if not 1 <= scale <= side:
            raise ValueError(f"implicit_var: scale {scale!r} is not in [1, {side}]")
        return (
            max(1, (2 * int(scale) * height + side) // (2 * side)),
            max(1, (2 * int(scale) * width + side) // (2 * side)),
        )
    if (
        isinstance(scale, Sequence)
        and len(scale) == 2
        and all(_is_int(v) for v in scale)
        and 1 <= scale[0] <= height
        and 1 <= scale[1] <= width
    ):
        return int(scale[0]), int(scale[1])
    raise ValueError(
        f"implicit_var: a scale must be an int in [1, {side}] or an (h, w) pair within {height}x{width}, got {scale!r}"
    )


def _from_keys(name: str, height: int, width: int, keys: np.ndarray) -> Schedule:
    """Groups = positions sharing a key, in increasing key order, row-major inside a group."""
    order = np.argsort(keys, kind="stable")
    _, starts = np.unique(keys[order], return_index=True)
    return Schedule(name, height, width, tuple(np.split(order, starts[1:])))


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(height), np.arange(width), indexing="ij")


def _frozen_int32(indices) -> np.ndarray:
    array = np.array(indices, dtype=np.int32, copy=True)
    array.setflags(write=False)
    return array


# --------------------------------------------------------------------------------------------
# Validation


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_grid(height, width) -> None:
    for label, value in (("height", height), ("width", width)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")


def _check_steps(steps, height: int, width: int) -> int:
    n = height * width
    if steps is None:
        return min(DEFAULT_STEPS, n)
    if not _is_int(steps) or not 1 <= steps <= n:
        raise ValueError(f"steps must be an int in [1, {n}] for a {height}x{width} grid, got {steps!r}")
    return int(steps)


def _check_alpha(alpha) -> fractions.Fraction:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 1 <= alpha <= 16:
        raise ValueError(f"qlds: alpha must be a number in [1, 16], got {alpha!r}")
    return fractions.Fraction(alpha).limit_denominator(_ALPHA_MAX_DENOMINATOR)


def _canonical_name(name) -> str:
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return key
