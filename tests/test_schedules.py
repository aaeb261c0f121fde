"""Coding schedules (percov2_jax/entropy/schedules.py).

The schedules are part of the bitstream format: encoder and decoder must rebuild identical
groups from (name, H, W, steps). The golden tests pin exact orders; if one fails, a change
would break old .pcv2 streams — add a new schedule id instead of changing an existing one.
References: docs/method.md §4.3 (checkerboard 32 + 32 at 8x8; quincunx cumulative 4, 8,
16, 32, 64 at 8x8; M2T's QLDS and group-size rule; implicit-VAR sub-grids).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from percov2_jax.entropy import schedules as sch

GRIDS = [(8, 8), (12, 8), (8, 12), (32, 32), (48, 32), (1, 1), (2, 3), (5, 7)]
NAMES = list(sch.SCHEDULES)


def cells(schedule, i):
    """Group ``i`` as a set of (row, col)."""
    rows, cols = np.divmod(schedule.groups[i], schedule.width)
    return set(zip(rows.tolist(), cols.tolist()))


def digest(schedule):
    """Platform-independent fingerprint of the exact groups."""
    h = hashlib.sha256()
    h.update(np.asarray(schedule.group_sizes, "<i4").tobytes())
    h.update(schedule.order.astype("<i4").tobytes())
    return h.hexdigest()[:16]


def assert_partition(schedule, height, width):
    n = height * width
    assert (schedule.height, schedule.width) == (height, width)
    assert all(g.dtype == np.int32 and g.ndim == 1 and g.size > 0 for g in schedule.groups)
    assert sum(schedule.group_sizes) == n
    np.testing.assert_array_equal(np.sort(schedule.order), np.arange(n))


# --- every schedule is a permutation -------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("height,width", GRIDS)
def test_every_schedule_covers_each_position_once(name, height, width):
    schedule = sch.make_schedule(name, height, width)
    assert schedule.name == name
    assert_partition(schedule, height, width)


@pytest.mark.parametrize("name", ["qlds", "raster", "random"])
@pytest.mark.parametrize("height,width", GRIDS)
def test_step_counts_from_one_to_all_positions(name, height, width):
    n = height * width
    for steps in sorted({1, 2, 3, 7, n // 2, n - 1, n} & set(range(1, n + 1))):
        schedule = sch.make_schedule(name, height, width, steps)
        assert schedule.num_steps == steps
        assert_partition(schedule, height, width)


# --- group counts and sizes as documented ---------------------------------------------------


def test_checkerboard():
    schedule = sch.checkerboard(8, 8)
    assert schedule.group_sizes == (32, 32)
    assert all((r + c) % 2 == 0 for r, c in cells(schedule, 0))
    assert sch.checkerboard(5, 7).group_sizes == (18, 17)
    assert sch.checkerboard(1, 1).group_sizes == (1,)  # the empty second group is dropped


def test_quincunx_matches_the_method_file_at_8x8():
    schedule = sch.quincunx(8, 8)
    assert schedule.group_sizes == (4, 4, 8, 16, 32)
    assert list(np.cumsum(schedule.group_sizes)) == [4, 8, 16, 32, 64]
    assert cells(schedule, 0) == {(r, c) for r in (0, 4) for c in (0, 4)}
    assert cells(schedule, 1) == {(r, c) for r in (2, 6) for c in (2, 6)}
    even = {(r, c) for r in range(0, 8, 2) for c in range(0, 8, 2)}
    assert cells(schedule, 2) == even - cells(schedule, 0) - cells(schedule, 1)
    assert cells(schedule, 3) == {(r, c) for r in range(1, 8, 2) for c in range(1, 8, 2)}
    assert all((r + c) % 2 == 1 for r, c in cells(schedule, 4))


@pytest.mark.parametrize("height,width", [(32, 32), (48, 32), (12, 8)])
def test_quincunx_doubles_the_revealed_set(height, width):
    schedule = sch.quincunx(height, width)
    cumulative = np.cumsum(schedule.group_sizes)
    np.testing.assert_array_equal(cumulative[1:], 2 * cumulative[:-1])
    if (height, width) == (32, 32):
        assert schedule.group_sizes == (4, 4, 8, 16, 32, 64, 128, 256, 512)


def test_qlds_group_sizes_at_8x8_and_32x32():
    assert sch.qlds(8, 8).group_sizes == (1, 1, 2, 3, 3, 5, 6, 6, 8, 9, 10, 10)
    # 32x32 needs no repair: exactly M2T's round(1024 (k/12)^2.2) differences.
    sizes = sch.qlds(32, 32).group_sizes
    assert sizes == (4, 16, 29, 42, 58, 74, 90, 107, 124, 142, 160, 178)
    cumulative = [round(1024 * (k / 12) ** 2.2) for k in range(13)]
    assert sizes == tuple(np.diff(cumulative))


@pytest.mark.parametrize("height,width", GRIDS)
def test_qlds_sizes_are_positive_non_decreasing_and_sum_to_n(height, width):
    n = height * width
    for steps in sorted({1, 2, 4, 8, 12, n // 3, n // 2, n} & set(range(1, n + 1))):
        for alpha in (1.0, 2.2, 3.0):
            sizes = np.array(sch.qlds(height, width, steps, alpha=alpha).group_sizes)
            assert sizes.sum() == n and sizes.min() >= 1
            assert np.all(np.diff(sizes) >= 0), (height, width, steps, alpha, sizes)


def test_qlds_sizes_are_m2t_rounding_when_it_is_monotone():
    # Float reference, away from rounding ties; the module evaluates the same exactly.
    for n, steps in [(1024, 12), (1536, 8), (96, 4), (384, 12), (4096, 12)]:
        expected = np.diff([math.floor(n * (k / steps) ** 2.2 + 0.5) for k in range(steps + 1)])
        assert tuple(expected) == sch._power_group_sizes(n, steps, sch._check_alpha(2.2))


def test_qlds_power_rounding_is_exact_half_up():
    # f = 8 (k/4)^2 = 0.5, 2, 4.5, 8: ties round up (float round-half-even would give 0, 4).
    assert sch._round_power(8, 1, 4, 2, 1) == 1
    assert sch._round_power(8, 3, 4, 2, 1) == 5
    assert sch._power_group_sizes(8, 4, sch._check_alpha(2)) == (1, 1, 3, 3)
    assert sch._check_alpha(2.2) == sch.fractions.Fraction(11, 5)


def test_qlds_groups_are_spread_out():
    schedule = sch.qlds(32, 32)
    for k, min_distance in [(1, 12.0), (2, 3.5), (3, 2.8)]:
        rows, cols = np.divmod(np.concatenate(schedule.groups[:k]), 32)
        d = np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])
        d[np.diag_indices_from(d)] = np.inf
        assert d.min() >= min_distance


def test_implicit_var():
    schedule = sch.implicit_var(8, 8)  # scales 1, 2, 4, 6, 8
    assert schedule.group_sizes == (1, 4, 16, 27, 16)
    assert cells(schedule, 0) == {(4, 4)}
    assert cells(schedule, 1) == {(r, c) for r in (2, 6) for c in (2, 6)}
    assert cells(schedule, 2) == {(r, c) for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)}
    assert sch.implicit_var(32, 32).group_sizes == (1, 4, 16, 32, 60, 112, 236, 387, 176)
    assert sch.implicit_var(12, 8).group_sizes == (1, 2, 12, 22, 29, 30)
    for height, width in GRIDS:
        assert sch.implicit_var(height, width).group_sizes[0] == 1  # the tiny first group


def test_implicit_var_explicit_scales():
    assert sch.implicit_var(8, 8, scales=[2, 4, 8]).group_sizes == (4, 16, 44)
    # The full grid is appended when the list stops short; (h, w) pairs are used as given.
    assert sch.implicit_var(8, 8, scales=[1, 4]).group_sizes == (1, 16, 47)
    assert sch.implicit_var(12, 8, scales=[(3, 2), (12, 8)]).group_sizes == (6, 90)
    assert sch.make_schedule("implicit_var", 8, 8, 3, scales=[2, 4]).num_steps == 3


def test_raster_and_random_chunks_are_near_equal():
    assert sch.raster(8, 8, 4).group_sizes == (16, 16, 16, 16)
    assert sch.raster(5, 7).group_sizes == (3,) * 11 + (2,)
    np.testing.assert_array_equal(sch.raster(2, 3, 2).groups[0], [0, 1, 2])
    for height, width in GRIDS:
        sizes = sch.random(height, width).group_sizes
        assert max(sizes) - min(sizes) <= 1


# --- the derived views ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("height,width", [(8, 8), (12, 8), (5, 7), (1, 1)])
def test_masks_and_step_of(name, height, width):
    schedule = sch.make_schedule(name, height, width)
    masks = schedule.masks()
    assert masks.shape == (schedule.num_steps, height, width) and masks.dtype == bool
    assert not masks[0].any()
    assert np.all(masks[:-1] <= masks[1:])  # each step reveals a superset
    step_of = schedule.step_of
    for i, group in enumerate(schedule.groups):
        revealed = np.zeros(height * width, bool)
        revealed[np.concatenate(schedule.groups[:i]).astype(int) if i else []] = True
        np.testing.assert_array_equal(masks[i].ravel(), revealed)
        assert not masks[i].ravel()[group].any()
        assert np.all(step_of.ravel()[group] == i)
    # The last mask plus the last group is the whole grid.
    last = masks[-1].ravel().copy()
    last[schedule.groups[-1]] = True
    assert last.all()


def test_groups_are_read_only():
    schedule = sch.qlds(8, 8)
    with pytest.raises(ValueError):
        schedule.groups[0][0] = 1


# --- determinism and the bitstream contract -------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    a, b = sch.make_schedule(name, 12, 8), sch.make_schedule(name, 12, 8)
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != sch.make_schedule(name, 8, 12)


def test_random_depends_only_on_seed():
    assert sch.random(8, 8, seed=3) == sch.random(8, 8, seed=3)
    assert sch.random(8, 8, seed=3) != sch.random(8, 8, seed=4)


def test_schedule_ids_round_trip_and_never_change():
    # Bitstream ids: append new ones, never renumber.
    assert {name: sch.schedule_id(name) for name in NAMES} == {
        "raster": 0,
        "random": 1,
        "checkerboard": 2,
        "quincunx": 3,
        "qlds": 4,
        "implicit_var": 5,
    }
    for name in NAMES:
        assert sch.schedule_from_id(sch.schedule_id(name)) == name
    assert sch.schedule_id("Implicit-VAR") == 5
    assert sch.make_schedule("implicit-var", 8, 8) == sch.implicit_var(8, 8)


def test_golden_qlds_order_at_8x8():
    schedule = sch.qlds(8, 8)
    np.testing.assert_array_equal(schedule.order[:16], [36, 16, 5, 49, 38, 18, 7, 51, 32, 21, 1, 54, 34, 23, 3, 48])
    assert [g.tolist() for g in schedule.groups[:4]] == [[36], [16], [5, 49], [38, 18, 7]]
    # The first point of R2 (n = 0) is the centre of any grid.
    for height, width in GRIDS:
        assert sch.qlds(height, width).order[0] == (height // 2) * width + width // 2


def test_golden_random_order_at_8x8():
    np.testing.assert_array_equal(
        sch.random(8, 8).order[:16], [58, 25, 60, 47, 40, 2, 13, 33, 49, 0, 29, 4, 22, 21, 50, 36]
    )


GOLDEN_DIGESTS = {
    # (name, height, width) -> digest(make_schedule(name, height, width)); default options.
    ("checkerboard", 8, 8): "c0d6bfdda24331c3",
    ("quincunx", 8, 8): "4a28dfd04c39db65",
    ("qlds", 8, 8): "9b4542febb649cf5",
    ("implicit_var", 8, 8): "3eed49eba9396e2d",
    ("raster", 8, 8): "aa73ca547da5c353",
    ("random", 8, 8): "740a680b9cab914a",
    ("qlds", 12, 8): "26de9e88d212bab9",
    ("implicit_var", 12, 8): "d583d6600d85461f",
    ("qlds", 32, 32): "27a0bcc29941bd32",
    ("implicit_var", 32, 32): "3d97cf5f9864f552",
    ("quincunx", 48, 32): "be0a6ad8eb1b34e7",
}


@pytest.mark.parametrize("key", list(GOLDEN_DIGESTS))
def test_golden_digests(key):
    assert digest(sch.make_schedule(*key)) == GOLDEN_DIGESTS[key]


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sch.make_schedule("qlds", 0, 8), "height must be a positive int, got 0"),
        (lambda: sch.make_schedule("qlds", 8, -2), "width must be a positive int, got -2"),
        (lambda: sch.make_schedule("qlds", 8.0, 8), "height must be a positive int, got 8.0"),
        (lambda: sch.make_schedule("raster", True, 8), "height must be a positive int, got True"),
        (lambda: sch.make_schedule("qlds", 8, 8, 0), r"steps must be an int in \[1, 64\].*got 0"),
        (lambda: sch.make_schedule("random", 8, 8, 65), r"steps .* got 65"),
        (lambda: sch.make_schedule("raster", 2, 3, 2.5), r"steps .* got 2.5"),
        (lambda: sch.make_schedule("zigzag", 8, 8), "unknown schedule 'zigzag'"),
        (lambda: sch.make_schedule("checkerboard", 8, 8, 3), "checkerboard has 2 steps .* steps=3"),
        (lambda: sch.make_schedule("quincunx", 8, 8, 99), r"steps .* got 99"),
        (lambda: sch.qlds(8, 8, alpha=0.5), "alpha must be a number in .* got 0.5"),
        (lambda: sch.qlds(8, 8, alpha=float("nan")), "alpha must be a number"),
        (lambda: sch.random(8, 8, seed=-1), "seed must be a non-negative int, got -1"),
        (lambda: sch.implicit_var(8, 8, scales=[0, 8]), "scale 0 is not in"),
        (lambda: sch.implicit_var(8, 8, scales=[4, 2]), "scales must grow strictly"),
        (lambda: sch.implicit_var(8, 8, scales=[(9, 1)]), r"\(h, w\) pair .* got \(9, 1\)"),
        (lambda: sch.implicit_var(8, 8, scales=[]), "scales must not be empty"),
        (lambda: sch.schedule_from_id(99), "unknown schedule id 99"),
        (lambda: sch.schedule_id("nope"), "unknown schedule 'nope'"),
        (lambda: sch.Schedule("x", 2, 2, (np.array([0, 1]), np.array([1, 2]))), "exactly once"),
        (lambda: sch.Schedule("x", 2, 2, (np.arange(4), np.array([], int))), "non-empty"),
    ],
)
def test_validation_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
