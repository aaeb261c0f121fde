"""The .pcv2 bitstream: one compressed image as a compact, versioned, checksummed byte string.

At the 8x8 rate a whole image is about 1,000 bits (512 token bits, 400-700 caption bits), so
the header is bit-packed: fields are written MSB first with no alignment between them, the
caption and token payloads are byte strings written at whatever bit position they fall on, and
the only padding is the zero bits that complete the last byte before the checksum.

Layout, format version 1 (``u(n)``: n-bit unsigned; ``eg(k)``: Exp-Golomb code of order k)::

  field                  present when            code                bits
  ---------------------  ----------------------  ------------------  ---------------------------
  magic 0xAC2            always                  u(12)               12
  version                always                  eg(0) of v - 1      1 (version 1)
  model id               always                  u(24)               24
  rate id                always                  eg(0)               1 ultra-low; 3 extreme,
                                                                     0.1250; 5 0.0937-0.0098;
                                                                     7 0.0024, 0.0019
  size mode              always                  eg(0)               1: sides multiples of 64,
                                                                     no policy; 3: pad, resize
  height, width          size mode 0             eg(3) of side/64-1  4 each for 64-512 px,
                                                                     6 to 1536, 8 to 3584
                         size mode pad, resize   eg(8) of side - 1   9 each to 256 px, 11 to 768,
                                                                     13 to 1792, 15 to 3840
  entropy mode           always                  eg(0)               1 prior; 3 uniform
  hybrid groups k        always                  eg(0)               1 for k = 0 (all sent);
                                                                     3 for 1-2; 5 for 3-6
  schedule id            prior, or k > 0         eg(1)               2 ids 0-1; 4 ids 2-5
  steps                  prior, or k > 0         eg(2) of steps - 1  3 for 1-4; 5 for 5-12;
                                                                     7 for 13-28
  temperature            k > 0                   eg(2) of 10 * T     3 for 0.0 (argmax) to 0.3;
                                                                     5 to 1.1; 7 to 2.7
  seed                   k > 0 and T > 0         eg(0)               1 for seed 0;
                                                                     2 * floor(log2(s + 1)) + 1
  caption coder id       always                  eg(0)               1 zlib; 3 word-ngram-v1,
                                                                     word-ngram-v1+crc8;
                                                                     5 deflate-dict-v1
  caption length, bytes  always                  eg(5)               6 for 0-31; 8 for 32-95;
                                                                     10 for 96-223
  caption bytes          always                  bytes               8 * length
  token bytes            always                  bytes               the rest up to the padding
  padding                always                  zero bits           0-7, to a byte boundary
  CRC-16                 always                  u(16)               16: the last two bytes

A 512x512 ultra-low stream (prior, qlds = schedule id 4, 12 steps, no hybrid, zlib caption of
32-95 bytes) has a 67-bit header, plus 16 checksum bits and 5 padding bits: 88 bits of overhead,
8.8% of a 1,000-bit image (the golden stream in tests/test_bitstream.py).

Choices:

* **Exp-Golomb, not LEB128-style varints.** A byte or nibble varint spends at least 8 or 4 bits
  on every field, while most fields here are 0 or 1 (one bit in ``eg(0)``). The order k moves
  the cheap range to each field's typical values (``eg(3)`` codes sides of 64-512 px in 4 bits,
  ``eg(5)`` zlib captions of 32-95 bytes in 8). Each code is prefix-free and canonical (one
  code word per value), and the reader caps its run of leading zeros at the field's maximum,
  so a corrupt varint ends in ``BitstreamError`` after at most 65 bits, never in a long loop.
* **Magic 0xAC2 (12 bits).** The first byte 0xAC is a UTF-8 continuation byte, so no text file
  starts with it, and no common container does (PNG 89, JPEG FF, GIF 47, BMP 42, RIFF/WebP
  52, TIFF 49/4D, ZIP 50, gzip 1F, zlib 78, pickle 80, npy 93, ELF 7F, PDF 25). The nibble 2 is
  for "v2". With the checksum, random bytes pass as a stream with probability 2**-28.
* **Model id, 24 bits** (`model_fingerprint`: the first 24 bits of the SHA-256 of the model's
  canonical JSON config). It guards against decoding with the wrong prior, which yields garbage
  silently; it is not a security check. Two of n models collide with probability about
  ``n**2 / 2**25``: 0.03% for 100 models (32 bits would cost 8 more bits, 0.8% of the image,
  for a risk that is already negligible; 16 bits would collide 7% of the time at 100 models).
* **Token payload length is implicit** (everything between the caption and the padding): the
  entropy decoder knows the token count from the size and rate, and the checksum catches a
  lost or added byte. An explicit length would cost 7-10 bits.
* **CRC-16/GENIBUS** (poly 0x1021, init 0xFFFF, final XOR 0xFFFF: ``binascii.crc_hqx`` inverted)
  over every byte before it. It detects every burst of up to 16 bits, every error of 1-3 bits
  in streams up to 4,000 bytes (Hamming distance 4 to 32,751 data bits), and a random
  corruption with probability 1 - 2**-16. The final XOR matters: without it
  (CRC-16/CCITT-FALSE) a zero byte appended to *any* stream passes the check. A missed
  corruption decodes to a wrong image without any error (arithmetic decoders have no
  redundancy), so CRC-8 (1 in 256 missed) is too weak; CRC-32 costs 16 more bits (1.6% of a
  1,000-bit image) to go from 1.5e-5 to 2e-10 missed.

Invariant for every future version: the stream starts with the magic and the version and ends
with the CRC-16 of all bytes before it, so any decoder can tell "corrupt" from "newer version".
Adding a field or changing a code means a new version; adding a rate, caption coder, entropy
mode or schedule only appends an id to a table (never renumber or reuse an id).

Canonical headers: fields the layout does not store, because they have no effect, are set to
``None`` by `StreamHeader` (``resize_policy`` when both sides are multiples of 64; ``schedule_id``
and ``steps`` in uniform mode without hybrid groups; ``temperature`` when k = 0; ``seed`` unless
k > 0 and temperature > 0), so ``unpack(pack(x)) == x`` for every valid ``x``, and every stream
``unpack`` accepts re-packs to the same bytes.

Errors: every problem with the *data* raises `BitstreamError` (a ``ValueError``) whose ``kind``
is one of `ERROR_KINDS`; invalid arguments to `StreamHeader` raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping

from percov2_jax import rates as rates_lib
from percov2_jax.codec.bits import ERROR_KINDS as ERROR_KINDS  # part of this module's interface
from percov2_jax.codec.bits import BitReader, BitWriter, crc16
from percov2_jax.codec.bits import BitstreamError as BitstreamError

MAGIC = 0xAC2
MAGIC_BITS = 12
FORMAT_VERSION = 1
MODEL_ID_BITS = 24
CHECKSUM_BITS = 16

MAX_SIDE = 65536  # original image sides, pixels
MAX_CAPTION_BYTES = 65535
MAX_STEPS = 65536
MAX_SCHEDULE_ID = 255
MAX_TEMPERATURE_TENTHS = 255  # temperatures 0.0 ... 25.5
MAX_SEED = 2**32 - 1
_MAX_TABLE_ID = 255  # rate, coder, entropy-mode and size-mode ids
_MAX_VERSION = 2**16  # any larger version code is corruption, not a newer version

# Stable ids: append new names with new ids; never renumber or reuse one. The commonest
# choice gets id 0 (one bit).
RATE_IDS: dict[str, int] = {
    "ultra-low": 0,
    "extreme": 1,
    "0.1250": 2,
    "0.0937": 3,
    "0.0507": 4,
    "0.0313": 5,
    "0.0098": 6,
    "0.0024": 7,
    "0.0019": 8,
}
CAPTION_CODER_IDS: dict[str, int] = {
    "zlib": 0,
    "word-ngram-v1": 1,
    "word-ngram-v1+crc8": 2,
    "deflate-dict-v1": 3,
}
ENTROPY_MODE_IDS: dict[str, int] = {"prior": 0, "uniform": 1}
# How an image whose sides are not multiples of 64 was brought to a coded size that is
# (`coded_size`); id 0 means both sides already were, and no policy applies.
RESIZE_POLICY_IDS: dict[str, int] = {"pad": 1, "resize": 2}

# --------------------------------------------------------------------------------------------
# The header


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if not _is_int(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


def coded_size(height: int, width: int, resize_policy: str | None) -> tuple[int, int]:
    """The size, multiples of 64, at which an ``height`` x ``width`` image is coded.

    ``pad``: each side rounded up (the decoder crops back); ``resize``: each side rounded to the
    nearest multiple (halves up), at least 64 (the decoder resizes back); ``None``: the sides,
    which must already be multiples of 64.
    """
    m = rates_lib.IMAGE_MULTIPLE
    if resize_policy is None:
        if height % m or width % m:
            raise ValueError(f"{height}x{width} is not a multiple of {m}: a resize policy is needed")
        return height, width
    if resize_policy == "pad":
        return -(-height // m) * m, -(-width // m) * m
    if resize_policy == "resize":
        return max(m, (height + m // 2) // m * m), max(m, (width + m // 2) // m * m)
    raise ValueError(f"unknown resize policy {resize_policy!r}; known: {', '.join(RESIZE_POLICY_IDS)}")


@dataclasses.dataclass(frozen=True)
class StreamHeader:
    """Everything a decoder needs besides the caption and token bytes.

    ``model_id``: 24-bit `model_fingerprint` of the model that made the stream. ``height``,
    ``width``: the original image size (1..65536), restored on decode. ``rate``: a name in
    `RATE_IDS`. ``entropy_mode``: ``prior`` (range coded under the learned prior along the
    schedule) or ``uniform`` (log2 V bits per token). ``schedule_id`` and ``steps``: the coding
    schedule (ids of `percov2_jax.entropy.schedules`) and its group count. ``hybrid_groups``:
    k > 0 transmits only the first k of ``steps`` groups, the decoder generates the rest with
    ``temperature`` (a multiple of 0.1 in [0, 25.5]; 0 = argmax, the default) and ``seed``
    (0 .. 2**32-1, default 0). ``resize_policy``: ``pad`` or ``resize`` (see `coded_size`).
    ``caption_coder``: a name in `CAPTION_CODER_IDS`. Fields without effect become ``None``
    (module docstring, "Canonical headers").
    """

    model_id: int
    height: int
    width: int
    rate: str = "ultra-low"
    entropy_mode: str = "prior"
    schedule_id: int | None = None
    steps: int | None = None
    hybrid_groups: int = 0
    temperature: float | None = None
    seed: int | None = None
    resize_policy: str | None = "pad"
    caption_coder: str = "zlib"
    version: int = FORMAT_VERSION

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.version != FORMAT_VERSION:
            raise ValueError(f"this module writes format version {FORMAT_VERSION}, not {self.version!r}")
        _check_int("model_id", self.model_id, 0, 2**MODEL_ID_BITS - 1)
        _check_int("height", self.height, 1, MAX_SIDE)
        _check_int("width", self.width, 1, MAX_SIDE)
        if self.rate not in RATE_IDS:
            hint = (
                " (it is in rates.RATES but has no bitstream id: append one to RATE_IDS)"
                if self.rate in rates_lib.RATES
                else ""
            )
            raise ValueError(f"unknown rate {self.rate!r}{hint}; known: {', '.join(RATE_IDS)}")
        if self.height % rates_lib.IMAGE_MULTIPLE == 0 and self.width % rates_lib.IMAGE_MULTIPLE == 0:
            put("resize_policy", None)
        elif self.resize_policy not in RESIZE_POLICY_IDS:
            raise ValueError(
                f"{self.height}x{self.width} is not a multiple of {rates_lib.IMAGE_MULTIPLE}: "
                f"resize_policy must be one of {', '.join(RESIZE_POLICY_IDS)}, "
                f"got {self.resize_policy!r}"
            )
        if self.entropy_mode not in ENTROPY_MODE_IDS:
            raise ValueError(f"unknown entropy mode {self.entropy_mode!r}; known: {', '.join(ENTROPY_MODE_IDS)}")
        _check_int("hybrid_groups", self.hybrid_groups, 0, MAX_STEPS - 1)
        if self.has_schedule:
            if self.schedule_id is None or self.steps is None:
                raise ValueError(
                    f"entropy mode {self.entropy_mode!r} with hybrid_groups={self.hybrid_groups} "
                    "needs schedule_id and steps"
                )
            _check_int("schedule_id", self.schedule_id, 0, MAX_SCHEDULE_ID)
            _check_int("steps", self.steps, 1, MAX_STEPS)
            if self.hybrid_groups >= self.steps:
                raise ValueError(
                    f"hybrid_groups must be below steps={self.steps} (0 transmits all groups), got {self.hybrid_groups}"
                )
        else:
            put("schedule_id", None)
            put("steps", None)
        if self.hybrid_groups:
            put("temperature", _tenths(self.temperature or 0.0) / 10)
        else:
            put("temperature", None)
        if self.has_seed:
            put("seed", 0 if self.seed is None else self.seed)
            _check_int("seed", self.seed, 0, MAX_SEED)
        else:
            put("seed", None)
        if self.caption_coder not in CAPTION_CODER_IDS:
            raise ValueError(f"unknown caption coder {self.caption_coder!r}; known: {', '.join(CAPTION_CODER_IDS)}")

    @property
    def has_schedule(self) -> bool:
        """Whether the stream records a schedule (prior coding, or hybrid generation)."""
        return self.entropy_mode == "prior" or self.hybrid_groups > 0

    @property
    def has_seed(self) -> bool:
        return self.hybrid_groups > 0 and bool(self.temperature)

    @property
    def coded_size(self) -> tuple[int, int]:
        """``(height, width)`` at which the image is coded: multiples of 64 (`coded_size`)."""
        return coded_size(self.height, self.width, self.resize_policy)

    @property
    def token_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the token map."""
        return rates_lib.get_rate(self.rate).token_grid(*self.coded_size)


def _tenths(temperature) -> int:
    """``temperature * 10`` as an int; ValueError unless a multiple of 0.1 in range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number, got {temperature!r}")
    q = round(temperature * 10)
    if abs(temperature * 10 - q) > 1e-6 or not 0 <= q <= MAX_TEMPERATURE_TENTHS:
        raise ValueError(
            f"temperature must be a multiple of 0.1 in [0, {MAX_TEMPERATURE_TENTHS / 10}] "
            f"(it is stored in tenths), got {temperature!r}"
        )
    return q


@dataclasses.dataclass(frozen=True)
class CompressedImage:
    """One compressed image: the header, the coded caption and the coded token map."""

    header: StreamHeader
    caption_bytes: bytes = b""
    token_bytes: bytes = b""

    def __post_init__(self):
        if not isinstance(self.header, StreamHeader):
            raise TypeError(f"header must be a StreamHeader, not {type(self.header).__name__}")
        for name in ("caption_bytes", "token_bytes"):
            value = getattr(self, name)
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
            object.__setattr__(self, name, bytes(value))
        if len(self.caption_bytes) > MAX_CAPTION_BYTES:
            raise ValueError(f"caption_bytes holds {len(self.caption_bytes)} bytes; at most {MAX_CAPTION_BYTES}")

    def caption(self) -> str:
        """The caption text, decoded with the header's coder; `BitstreamError` (``caption``) if bad."""
        from percov2_jax.captions import CaptionDecodeError, get_coder

        try:
            return get_coder(self.header.caption_coder).decode(self.caption_bytes)
        except CaptionDecodeError as e:
            raise BitstreamError("caption", f"corrupt .pcv2 caption: {e}") from None


def model_fingerprint(config: Mapping | str | bytes) -> int:
    """The 24-bit model id of a config: SHA-256 of its canonical JSON (sorted keys), first 24 bits.

    Pass what fixes the token distribution (the stage-1 and prior configs, or their checkpoint
    digests), e.g. ``model_fingerprint(config.to_dict())``; ``str``/``bytes`` are hashed as given.
    """
    if isinstance(config, Mapping):
        config = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if isinstance(config, str):
        config = config.encode("utf-8")
    if not isinstance(config, bytes):
        raise TypeError(f"model_fingerprint takes a mapping, str or bytes, not {type(config).__name__}")
    return int.from_bytes(hashlib.sha256(config).digest()[: MODEL_ID_BITS // 8], "big")


# --------------------------------------------------------------------------------------------
# Pack and unpack


def _write_header(w: BitWriter, h: StreamHeader, caption_length: int) -> None:
    w.write(MAGIC, MAGIC_BITS)
    w.write_eg(h.version - 1, 0)
    w.write(h.model_id, MODEL_ID_BITS)
    w.write_eg(RATE_IDS[h.rate], 0)
    if h.resize_policy is None:
        w.write_eg(0, 0)
        w.write_eg(h.height // rates_lib.IMAGE_MULTIPLE - 1, 3)
        w.write_eg(h.width // rates_lib.IMAGE_MULTIPLE - 1, 3)
    else:
        w.write_eg(RESIZE_POLICY_IDS[h.resize_policy], 0)
        w.write_eg(h.height - 1, 8)
        w.write_eg(h.width - 1, 8)
    w.write_eg(ENTROPY_MODE_IDS[h.entropy_mode], 0)
    w.write_eg(h.hybrid_groups, 0)
    if h.has_schedule:
        w.write_eg(h.schedule_id, 1)
        w.write_eg(h.steps - 1, 2)
    if h.hybrid_groups:
        w.write_eg(_tenths(h.temperature), 2)
    if h.has_seed:
        w.write_eg(h.seed, 0)
    w.write_eg(CAPTION_CODER_IDS[h.caption_coder], 0)
    w.write_eg(caption_length, 5)


def header_bits(header: StreamHeader, caption_length: int) -> int:
    """Bits of the header fields (magic through caption length; no checksum or padding)."""
    w = BitWriter()
    _write_header(w, header, caption_length)
    return w.nbits


def pack(image: CompressedImage) -> bytes:
    """The .pcv2 bytes of ``image`` (layout in the module docstring)."""
    if not isinstance(image, CompressedImage):
        raise TypeError(f"pack takes a CompressedImage, not {type(image).__name__}")
    w = BitWriter()
    _write_header(w, image.header, len(image.caption_bytes))
    w.write_bytes(image.caption_bytes)
    w.write_bytes(image.token_bytes)
    body = w.to_bytes()
    return body + crc16(body).to_bytes(CHECKSUM_BITS // 8, "big")


def unpack(data: bytes, expected_model_id: int | None = None) -> CompressedImage:
    """Parse .pcv2 bytes; `BitstreamError` for anything but a valid stream of this version.

    With ``expected_model_id``, a stream made by another model is refused (``kind="model"``);
    pass ``None`` to decode it anyway.
    """
    return _parse(data, expected_model_id)[0]


def _parse(data, expected_model_id):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"unpack takes bytes, not {type(data).__name__}")
    if expected_model_id is not None:
        _check_int("expected_model_id", expected_model_id, 0, 2**MODEL_ID_BITS - 1)
    data = bytes(data)
    if len(data) < 2:
        raise BitstreamError("truncated", f"truncated .pcv2 stream: {len(data)} bytes cannot hold the magic")
    if int.from_bytes(data[:2], "big") >> (16 - MAGIC_BITS) != MAGIC:
        raise BitstreamError(
            "magic",
            f"not a .pcv2 stream: it starts with {data[:2].hex()}, not the magic "
            f"{MAGIC:03x} (or its first bytes are corrupt)",
        )
    checksum_bytes = CHECKSUM_BITS // 8
    if len(data) < 2 + checksum_bytes:
        raise BitstreamError("truncated", f"truncated .pcv2 stream: {len(data)} bytes")
    body, stored = data[:-checksum_bytes], int.from_bytes(data[-checksum_bytes:], "big")
    if crc16(body) != stored:
        raise BitstreamError(
            "checksum",
            f"corrupt .pcv2 stream: checksum mismatch (stored {stored:04x}, "
            f"computed {crc16(body):04x}); the file is damaged, truncated "
            "or has bytes added",
        )
    r = BitReader(body, 8 * len(body))
    r.read(MAGIC_BITS, "magic")
    version = r.read_eg(0, _MAX_VERSION, "format version") + 1  # (version 301 is "unsupported")
    if version != FORMAT_VERSION:
        raise BitstreamError(
            "version",
            f"unsupported .pcv2 format version {version}: this decoder reads "
            f"version {FORMAT_VERSION} (a newer percov2-jax wrote it?)",
        )
    fields = {"model_id": r.read(MODEL_ID_BITS, "model id"), "rate": r.read_id(RATE_IDS, 0, _MAX_TABLE_ID, "rate id")}
    size_mode = r.read_eg(0, _MAX_TABLE_ID, "size mode")
    if size_mode == 0:
        fields["resize_policy"] = None
        for side in ("height", "width"):
            max_units = MAX_SIDE // rates_lib.IMAGE_MULTIPLE - 1
            fields[side] = (r.read_eg(3, max_units, side) + 1) * rates_lib.IMAGE_MULTIPLE
    else:
        names = {i: name for name, i in RESIZE_POLICY_IDS.items()}
        if size_mode not in names:
            raise BitstreamError(
                "field",
                f"unknown size mode {size_mode} in .pcv2 stream (known: 0, "
                f"{sorted(names)}; written by a newer version?)",
            )
        fields["resize_policy"] = names[size_mode]
        for side in ("height", "width"):
            fields[side] = r.read_eg(8, MAX_SIDE - 1, side) + 1
        if all(fields[s] % rates_lib.IMAGE_MULTIPLE == 0 for s in ("height", "width")):
            raise BitstreamError(
                "field",
                f"corrupt .pcv2 stream: size mode {fields['resize_policy']} for "
                f"{fields['height']}x{fields['width']}, which needs none",
            )
    fields["entropy_mode"] = r.read_id(ENTROPY_MODE_IDS, 0, _MAX_TABLE_ID, "entropy mode")
    k = fields["hybrid_groups"] = r.read_eg(0, MAX_STEPS - 1, "hybrid group count")
    if fields["entropy_mode"] == "prior" or k:
        fields["schedule_id"] = r.read_eg(1, MAX_SCHEDULE_ID, "schedule id")
        fields["steps"] = r.read_eg(2, MAX_STEPS - 1, "step count") + 1
    if k:
        tenths = r.read_eg(2, MAX_TEMPERATURE_TENTHS, "temperature")
        fields["temperature"] = tenths / 10
        if tenths:
            fields["seed"] = r.read_eg(0, MAX_SEED, "seed")
    fields["caption_coder"] = r.read_id(CAPTION_CODER_IDS, 0, _MAX_TABLE_ID, "caption coder id")
    caption_length = r.read_eg(5, MAX_CAPTION_BYTES, "caption length")
    try:
        header = StreamHeader(**fields)
    except ValueError as e:
        raise BitstreamError("field", f"corrupt .pcv2 stream: {e}") from None
    n_header_bits = r.pos
    if 8 * caption_length > r.end - r.pos:
        raise BitstreamError(
            "truncated",
            f"truncated .pcv2 stream: the caption length is {caption_length} bytes but {(r.end - r.pos) // 8} remain",
        )
    caption = r.read(8 * caption_length, "caption").to_bytes(caption_length, "big")
    token_length, padding = divmod(r.end - r.pos, 8)
    tokens = r.read(8 * token_length, "tokens").to_bytes(token_length, "big")
    if r.read(padding, "padding"):
        raise BitstreamError("field", "corrupt .pcv2 stream: the padding bits are not zero")
    if expected_model_id is not None and header.model_id != expected_model_id:
        raise BitstreamError(
            "model",
            f".pcv2 stream made by model {header.model_id:06x}, but this decoder's "
            f"model is {expected_model_id:06x}: decode with the model that wrote "
            "it (or force, to get an image from the wrong prior)",
        )
    image = CompressedImage(header, caption, tokens)
    return image, {
        "header": n_header_bits,
        "caption": 8 * caption_length,
        "tokens": 8 * token_length,
        "padding": padding,
        "checksum": CHECKSUM_BITS,
    }


def bit_budget(data: bytes | CompressedImage) -> dict:
    """Where the bits of a stream go, as ``percov2 info`` prints it.

    Keys ``{part}_bits`` and ``{part}_bpp`` (bits per pixel of the original image size) for
    ``part`` in header, caption, tokens, padding, checksum and total (the parts sum to total),
    ``paper_bits`` / ``paper_bpp`` (what the PerCo/PerCoV2 papers count: caption + tokens, no
    header, padding or checksum), plus ``height`` and ``width``. Raises `BitstreamError` for an
    invalid stream.
    """
    if isinstance(data, CompressedImage):
        data = pack(data)
    image, parts = _parse(data, None)
    parts["total"] = 8 * len(data)
    pixels = image.header.height * image.header.width
    budget = {"height": image.header.height, "width": image.header.width}
    parts["paper"] = parts["caption"] + parts["tokens"]
    for part, bits in parts.items():
        budget[f"{part}_bits"] = bits
        budget[f"{part}_bpp"] = bits / pixels
    return budget
