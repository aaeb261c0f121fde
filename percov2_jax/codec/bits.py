"""Bit-level pieces of the .pcv2 format: MSB-first writer and reader, Exp-Golomb codes, CRC-16.

Reading past the end, an over-long code or an out-of-range value raises `BitstreamError`, the
one error a decoder of .pcv2 streams raises for bad bytes (`percov2_jax.codec.bitstream`).
"""

from __future__ import annotations

import binascii

ERROR_KINDS = ("truncated", "magic", "checksum", "version", "model", "field", "caption")


class BitstreamError(ValueError):
    """A byte string that is not a valid .pcv2 stream for this decoder.

    ``kind`` says why: ``truncated`` (too short, or a field runs past the end), ``magic`` (not a
    .pcv2 stream), ``checksum`` (corrupt, truncated or padded), ``version`` (a format version this
    decoder does not read), ``model`` (made by another model), ``field`` (an out-of-range or
    unknown value, e.g. written by a newer decoder's tables), ``caption`` (the caption bytes do
    not decode with their coder).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class BitWriter:
    """MSB-first bit accumulator."""

    def __init__(self):
        self._acc = 0
        self.nbits = 0

    def write(self, value: int, nbits: int) -> None:
        assert 0 <= value < (1 << nbits)
        self._acc = (self._acc << nbits) | value
        self.nbits += nbits

    def write_eg(self, value: int, k: int) -> None:
        """Exp-Golomb of order ``k``: ``n - 1 - k`` zeros, then ``value + 2**k`` in its ``n`` bits."""
        x = value + (1 << k)
        n = x.bit_length()
        self.write(0, n - 1 - k)
        self.write(x, n)

    def write_bytes(self, data: bytes) -> None:
        self.write(int.from_bytes(data, "big"), 8 * len(data))

    def to_bytes(self) -> bytes:
        """The bits, completed with zero bits to a whole byte."""
        pad = -self.nbits % 8
        return (self._acc << pad).to_bytes((self.nbits + pad) // 8, "big")


class BitReader:
    """MSB-first reader of ``data``'s first ``end`` bits; reading past ``end`` raises `BitstreamError`."""

    def __init__(self, data: bytes, end: int):
        self.data, self.end, self.pos = data, end, 0

    def read(self, nbits: int, field: str) -> int:
        stop = self.pos + nbits
        if stop > self.end:
            raise BitstreamError("truncated", f"truncated .pcv2 stream: it ends inside the {field}")
        first, last = self.pos >> 3, (stop + 7) >> 3
        chunk = int.from_bytes(self.data[first:last], "big")
        self.pos = stop
        return (chunk >> (8 * last - stop)) & ((1 << nbits) - 1)

    def read_eg(self, k: int, max_value: int, field: str) -> int:
        max_zeros = (max_value + (1 << k)).bit_length() - 1 - k
        zeros = 0
        while not self.read(1, field):
            zeros += 1
            if zeros > max_zeros:
                raise BitstreamError(
                    "field",
                    f"corrupt .pcv2 stream: the {field} code is longer than that of any value up to {max_value}",
                )
        value = ((1 << (zeros + k)) | self.read(zeros + k, field)) - (1 << k)
        if value > max_value:
            raise BitstreamError("field", f"corrupt .pcv2 stream: {field} {value} is above its maximum {max_value}")
        return value

    def read_id(self, table: dict, k: int, max_id: int, field: str):
        """The name whose id in ``table`` is the next ``eg(k)`` value (at most ``max_id``)."""
        value = self.read_eg(k, max_id, field)
        for name, i in table.items():
            if i == value:
                return name
        raise BitstreamError(
            "field",
            f"unknown {field} {value} in .pcv2 stream (known: {sorted(table.values())}; written by a newer version?)",
        )


def crc16(data: bytes) -> int:
    """CRC-16/GENIBUS (poly 0x1021, init 0xFFFF, final XOR 0xFFFF): 0xD64E for b"123456789"."""
    return binascii.crc_hqx(data, 0xFFFF) ^ 0xFFFF
