"""An exact range coder on Python integers, with shortest-byte termination.

Short messages (a caption is ~7 bytes once modelled) make the usual fixed-width flush (4-8
bytes) and word-granular output (32-bit words in constriction) cost a large fraction of the
payload, so this coder writes, at the end, the *shortest* byte string whose value lies in the
final interval (against constriction's queue range coder under the same model: ~2 bytes less
per caption, measured on held-out training captions). The byte string is read back with
implicit zero bytes after its end, so it is not self-delimiting: its length must be stored by
the container, and the model must code an explicit end symbol.

A symbol is coded from a cumulative frequency table ``cum`` (a sequence of ints with
``cum[0] == 0``, ``cum[i + 1] > cum[i]`` and ``cum[-1] == total <= 2**TOTAL_BITS``): symbol ``s``
owns ``[cum[s], cum[s + 1])``.

Guard against runaway decoding: the encoder never ends with more than ``8 * len(data) +
SLACK_BITS`` bits of information coded (it lengthens the output instead, which happens only
when the shortest point falls on a lucky boundary), so the decoder raises as soon as it has
decoded more information than that.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

PRECISION_BITS = 64
RENORM_BITS = 56  # renormalise (shift in one byte) while range < 2**56
TOTAL_BITS = 32  # a frequency table may total at most 2**32
SLACK_BITS = 64


class RangeDecodeError(ValueError):
    """The data is not a stream this coder can have written."""


def _info_bits(shifts: int, range_: int) -> int:
    """An upper bound on the bits coded so far: ``-log2(range / 2**N)`` rounded up, ``N`` the scale."""
    return PRECISION_BITS + 8 * shifts - (range_.bit_length() - 1)


class RangeEncoder:
    """Codes symbols into an interval ``[low, low + range)`` of ``[0, 1)``.

    The settled leading bytes of ``low`` go to ``_out`` (a carry may still ripple into them);
    ``_low`` holds the last 64 bits, so each symbol costs O(1) however long the message.
    """

    def __init__(self):
        self._out = bytearray()
        self._low = 0
        self._range = 1 << PRECISION_BITS
        self._shifts = 0

    def encode(self, cum: Sequence[int], symbol: int) -> None:
        """Code ``symbol`` with the cumulative table ``cum`` (length = number of symbols + 1)."""
        self._code(cum[symbol], cum[symbol + 1] - cum[symbol], cum[-1])

    def encode_uniform(self, value: int, n: int) -> None:
        """Code ``value`` in ``[0, n)`` with every value equally likely (``n <= 2**32``)."""
        if not 0 <= value < n:
            raise ValueError(f"value {value} outside [0, {n})")
        self._code(value, 1, n)

    def _code(self, start: int, freq: int, total: int) -> None:
        if freq <= 0 or total > 1 << TOTAL_BITS:
            raise ValueError(f"bad frequency {freq} of total {total}")
        r = self._range // total
        self._low += r * start
        self._range = r * freq
        if self._low >> PRECISION_BITS:  # carry into the settled bytes (never past the first)
            self._low -= 1 << PRECISION_BITS
            i = len(self._out) - 1
            while self._out[i] == 0xFF:
                self._out[i] = 0
                i -= 1
            self._out[i] += 1
        while self._range < 1 << RENORM_BITS:
            self._out.append(self._low >> (PRECISION_BITS - 8))
            self._low = (self._low << 8) & ((1 << PRECISION_BITS) - 1)
            self._range <<= 8
            self._shifts += 1

    def finish(self) -> bytes:
        """The shortest bytes ``b`` with ``int(b) / 256**len(b)`` in the final interval.

        Not shorter than ``(information - SLACK_BITS) / 8`` bytes (see the module docstring).
        """
        scale = PRECISION_BITS + 8 * self._shifts
        low = (int.from_bytes(self._out, "big") << PRECISION_BITS) | self._low
        high = low + self._range
        min_bytes = max(0, -(-(_info_bits(self._shifts, self._range) - SLACK_BITS) // 8))
        for n_bytes in range(min_bytes, scale // 8 + 1):
            step = 1 << (scale - 8 * n_bytes)
            point = -(-low // step) * step
            if point < high:
                return (point >> (scale - 8 * n_bytes)).to_bytes(n_bytes, "big")
        raise AssertionError("unreachable: low itself is a point of the interval")


class RangeDecoder:
    """Reads back what `RangeEncoder` wrote; bytes past the end of ``data`` read as zeros."""

    def __init__(self, data: bytes):
        self._data = bytes(data)
        self._max_info = 8 * len(self._data) + SLACK_BITS
        self._pos = 0
        self._range = 1 << PRECISION_BITS
        self._shifts = 0
        self._code = 0  # value - low, in units of the current scale; always < range if valid
        for _ in range(PRECISION_BITS // 8):
            self._code = (self._code << 8) | self._next_byte()

    def _next_byte(self) -> int:
        pos = self._pos
        self._pos += 1
        return self._data[pos] if pos < len(self._data) else 0

    def decode(self, cum: Sequence[int]) -> int:
        """The next symbol under the cumulative table ``cum``."""
        r = self._range // cum[-1]
        target = self._code // r
        if target >= cum[-1]:
            raise RangeDecodeError("the value falls outside every symbol's interval")
        symbol = bisect.bisect_right(cum, target) - 1
        self._consume(cum[symbol], cum[symbol + 1] - cum[symbol], r)
        return symbol

    def decode_uniform(self, n: int) -> int:
        """The next value coded by `RangeEncoder.encode_uniform` with the same ``n``."""
        r = self._range // n
        value = self._code // r
        if value >= n:
            raise RangeDecodeError("the value falls outside every symbol's interval")
        self._consume(value, 1, r)
        return value

    def _consume(self, start: int, freq: int, r: int) -> None:
        self._code -= r * start
        self._range = r * freq
        while self._range < 1 << RENORM_BITS:
            self._code = (self._code << 8) | self._next_byte()
            self._range <<= 8
            self._shifts += 1
        if _info_bits(self._shifts, self._range) > self._max_info:
            raise RangeDecodeError(
                f"decoded more information than {len(self._data)} bytes can hold without an end symbol"
            )
