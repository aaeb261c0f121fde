"""Range coding of hyper-latent tokens with a learned prior, and the uniform (PerCo) mode.

Per schedule step the prior gives probabilities ``[n_step_tokens, V]``; `quantize_probabilities`
turns them into integer frequency tables by a deterministic rule, `TokenEncoder` codes the true
tokens with them, and `TokenDecoder` decodes one step at a time so that the caller can run the
prior on the revealed tokens between steps and rebuild the same tables.

Coder: constriction's queue range coder (``constriction.stream.queue.RangeEncoder`` /
``RangeDecoder``, 32-bit words, 64-bit state, 24-bit model precision) with the model family
``constriction.stream.model.Categorical(perfect=False)``. That family turns floats into a
fixed-point table as ``cdf[i] = floor(sum(pmf[:i]) * (2**24 - V) / sum(pmf)) + i``; we pass
``pmf = f * 2**(24 - precision) - 1`` (float64, whole numbers), so the sums are exact, the scale is
exactly 1.0 and ``cdf`` is exactly our integer table (checked in ``tests/test_coder.py`` on the
coder state after one symbol). Frequencies therefore need ``precision <= 24``.

Byte layout of `TokenEncoder.finish`: constriction's words are written most significant byte
first, so the payload is one binary fraction in ``[0, 1)``; the decoder reads missing bytes as
zeros (constriction reads missing words as zeros). Instead of constriction's word-granular
termination (its last word costs 16-32 bits over the information) we emit the point of the
final interval with the most trailing zero bits, but never fewer bits than the information
coded, ``ceil(-log2 width)`` (otherwise an odd multiple of the finest needed step): the payload
then costs 0-2 bits over the information (0.8 on average, measured), and the decoder can reject
any decode that claims more information than the payload holds. `payload_bits` counts up to the
last one bit; a bit-packing container may store only those bits (every later zero is implicit).
The payload is not self-delimiting: the container stores its length, the schedule fixes the
number of tokens.

Uniform mode (`encode_uniform`): the tokens as one mixed-radix integer ``sum(s_i * V**i)`` in
exactly ``uniform_bits(n, V) = ceil(n * log2 V)`` bits (``n * log2 V`` when V is a power of two);
exact bit packing, not arithmetic coding.

Every error is a `CodingError` (a ``ValueError``): bad shapes, dtypes or values, symbols out of
range, and data that is not what the encoder wrote for the decoded tokens (truncated, corrupt,
or decoded with different tables); decoding cost is bounded by the number of tokens asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import constriction
import numpy as np

CODER_PRECISION = 24  # constriction's DefaultRangeEncoder model precision
DEFAULT_PRECISION = 24
DEFAULT_MANTISSA_BITS = 3
_FIXED_POINT_BITS = 36  # rounded probabilities become integers in units of 2**-36
_WORD_BITS = 32
_CHUNK_ELEMENTS = 1 << 20  # quantise this many table entries at a time (bounded memory)
SLACK_BITS = 0  # the payload holds at least ceil(information) - SLACK_BITS bits; see TokenDecoder


class CodingError(ValueError):
    """Bad input to the token coder, or data it cannot have written for these tables."""


# ---------------------------------------------------------------------------------------------
# Quantisation: probabilities -> integer frequency tables


def quantize_probabilities(
    probs, precision: int = DEFAULT_PRECISION, mantissa_bits: int = DEFAULT_MANTISSA_BITS
) -> np.ndarray:
    """Integer frequency tables for coding: ``[n, V]`` probabilities -> ``[n, V]`` int32.

    Every entry is >= 1 and every row sums to exactly ``2**precision``.

    Rule (one rounding step, then integer arithmetic only):

    1. ``p`` is taken as float32 (float64 input is rounded to float32; bfloat16/float16 convert
       exactly) and rounded to ``mantissa_bits`` significant bits after the leading one, i.e. to
       a relative grid of ``2**mantissa_bits`` levels per octave, by integer round-half-up on its
       IEEE bit pattern. The result is kept as ``q = floor(p_rounded * 2**36)`` (int64; entries
       below 2**-36 become 0). Rows are not renormalised in floating point: a float
       renormalisation would spread a one-ulp difference in one entry to every entry.
    2. ``free = 2**precision - V``; ``f_i = 1 + floor(q_i * free / Q) + e_i`` with ``Q = sum(q)``,
       where ``e_i = 1`` for the ``free - sum(floor(...))`` largest remainders
       ``q_i * free mod Q``, ties broken by the lower symbol index. A row with ``Q == 0`` (every
       entry below 2**-36) gets the uniform table.

    Cost, measured in ``tests/test_coder.py``: against the float model, the tables cost well under
    0.5% of the cross-entropy at precision 24 (~0.001 bits/token); precision 16 costs up to ~0.1
    bits/token at V = 8192 because ``V / 2**16`` of the mass goes to the floor of one count.

    Robustness margin (what is and is not guaranteed):

    - Same inputs, any machine: the same tables (the rounding is exact IEEE/integer arithmetic,
      NumPy sorts only integers and the result does not depend on the sort algorithm).
    - Same binary, device kind and XLA compile options: the prior's probabilities were
      bit-identical in every condition measured on CPU (threads, host devices, batching, sharding,
      stored executables), so encoder and decoder tables are identical and decoding is exact. On
      a GPU two processes can differ (autotuning) unless ``--xla_gpu_deterministic_ops=true``.
    - Otherwise (other XLA options, another CPU or jax version, GPU vs CPU): NOT guaranteed, and
      no rounding grid can make it so, since a difference of a few ulps changes a table whenever
      some ``p_i`` lies near a cell boundary. Measured (``experiments/table_agreement.py``, the
      bitstream docs): 40-100 ulp differences change 0.1-0.4% of rows, so 5-75% of maps; a GPU at
      default matmul precision changes most rows. A mismatch makes decoding produce wrong tokens;
      `TokenDecoder.finish` detects it (re-encoding check) unless the wrong tokens re-encode to
      the same bytes, and the bitstream checksum catches the rest.

    ``mantissa_bits`` trades fidelity (relative rounding error <= 2**-(mantissa_bits + 1)) for
    robustness; the default 3 keeps the measured table cost near 0.001 bits/token at V = 8192.
    """
    if not isinstance(precision, (int, np.integer)) or not 1 <= precision <= CODER_PRECISION:
        raise CodingError(f"precision must be an integer in [1, {CODER_PRECISION}], got {precision!r}")
    if not isinstance(mantissa_bits, (int, np.integer)) or not 0 <= mantissa_bits <= 23:
        raise CodingError(f"mantissa_bits must be an integer in [0, 23], got {mantissa_bits!r}")
    p = np.asarray(probs)
    if p.dtype.kind != "f" and not p.dtype.name.startswith(("bfloat", "float")):  # ml_dtypes too
        raise CodingError(f"probabilities must be real floats, got dtype {p.dtype}")
    if p.ndim != 2:
        raise CodingError(f"probabilities must have shape [n, V], got {p.shape}")
    n, vocab = p.shape
    _check_vocab(vocab, precision)
    p = np.ascontiguousarray(p, dtype=np.float32)
    if not np.isfinite(p).all():
        raise CodingError("probabilities contain NaN or infinity")
    if (p < 0).any() or (p > 1).any():
        raise CodingError("probabilities must lie in [0, 1]")
    if n and not (p.max(axis=1) > 0).all():
        raise CodingError("a probability row is all zeros")
    out = np.empty((n, vocab), np.int32)
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    for start in range(0, n, rows):
        out[start : start + rows] = _quantize_rows(p[start : start + rows], precision, mantissa_bits)
    return out


def _check_vocab(vocab: int, precision: int) -> None:
    if not 2 <= vocab <= 1 << (precision - 1):
        raise CodingError(f"alphabet size V={vocab} must be in [2, 2**(precision - 1)] = [2, {1 << (precision - 1)}]")


def _round_to_grid(p: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """``floor(round_sig(p, mantissa_bits) * 2**36)`` as int64 (p float32 in [0, 1])."""
    shift = 23 - mantissa_bits
    bits = p.view(np.uint32).astype(np.int64)
    if shift:
        bits = ((bits + (1 << (shift - 1))) >> shift) << shift  # carries into the exponent: exact
    rounded = bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return np.floor(rounded * float(1 << _FIXED_POINT_BITS)).astype(np.int64)  # exact scaling


def _quantize_rows(p: np.ndarray, precision: int, mantissa_bits: int) -> np.ndarray:
    n, vocab = p.shape
    q = _round_to_grid(p, mantissa_bits)
    total_q = q.sum(axis=1, keepdims=True)
    q[total_q[:, 0] == 0] = 1  # no mass above the grid: uniform
    total_q = q.sum(axis=1, keepdims=True)
    free = (1 << precision) - vocab
    scaled = q * free  # < 2**36 * 2**24: no int64 overflow
    base = scaled // total_q
    remainder = scaled - base * total_q
    missing = free - base.sum(axis=1)  # in [0, V)
    # The `missing` largest remainders get one more count, ties to the lower index.
    rows = np.arange(n)
    ascending = np.sort(remainder, axis=1)
    threshold = ascending[rows, np.maximum(vocab - missing, 0) % vocab][:, None]
    above = remainder > threshold
    at = remainder == threshold
    rank_at = np.cumsum(at, axis=1)
    take_at = (missing - above.sum(axis=1))[:, None]
    extra = (above | (at & (rank_at <= take_at))) & (missing > 0)[:, None]
    return (1 + base + extra).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Range coding with integer tables


def _validate_frequencies(frequencies, precision: int) -> np.ndarray:
    f = np.asarray(frequencies)
    if f.ndim != 2:
        raise CodingError(f"frequencies must have shape [n, V], got {f.shape}")
    if f.dtype.kind not in "iu":
        raise CodingError(f"frequencies must be integers, got dtype {f.dtype}")
    _check_vocab(f.shape[1], precision)
    f = f.astype(np.int64)
    if f.size and f.min() < 1:
        raise CodingError("every frequency must be >= 1")
    if f.shape[0] and not (f.sum(axis=1) == 1 << precision).all():
        raise CodingError(f"every frequency row must sum to 2**precision = {1 << precision}")
    return f


def _coder_pmf(f: np.ndarray, precision: int) -> np.ndarray:
    """The float table for which ``Categorical(perfect=False)`` builds exactly the table ``f``."""
    return np.ascontiguousarray(f * (1 << (CODER_PRECISION - precision)) - 1, dtype=np.float64)


def _validate_symbols(symbols, n: int, vocab: int) -> np.ndarray:
    s = np.asarray(symbols)
    if s.dtype.kind not in "iu":
        raise CodingError(f"symbols must be integers, got dtype {s.dtype}")
    if s.shape != (n,):
        raise CodingError(f"symbols must have shape ({n},) to match the frequencies, got {s.shape}")
    if n and (s.min() < 0 or s.max() >= vocab):
        raise CodingError(f"symbols must lie in [0, {vocab})")
    return np.ascontiguousarray(s, dtype=np.int32)


_MODEL = constriction.stream.model.Categorical(perfect=False)


class TokenEncoder:
    """Codes steps of ``(frequencies [n, V], symbols [n])``; `finish` returns the bytes.

    ``precision``: every frequency row sums to ``2**precision`` (``<= 24``).
    """

    def __init__(self, precision: int = DEFAULT_PRECISION):
        if not isinstance(precision, (int, np.integer)) or not 1 <= precision <= CODER_PRECISION:
            raise CodingError(f"precision must be an integer in [1, {CODER_PRECISION}], got {precision!r}")
        self.precision = int(precision)
        self.num_tokens = 0
        self._coder = constriction.stream.queue.RangeEncoder()

    def encode_step(self, frequencies, symbols) -> None:
        """Appends the ``n`` symbols of one step, each under its own frequency row."""
        f = _validate_frequencies(frequencies, self.precision)
        s = _validate_symbols(symbols, f.shape[0], f.shape[1])
        if s.size:
            self._coder.encode(s, _MODEL, _coder_pmf(f, self.precision))
            self.num_tokens += s.size

    def finish(self) -> bytes:
        """The payload for everything coded so far: the final interval's point with the most
        trailing zero bits, but at least ``ceil(information)`` bits long (see the module doc).

        The encoder stays usable: more steps may be coded and `finish` called again.
        """
        return _terminate(self._coder)


def _final_interval(coder) -> tuple[int, int, int]:
    """``(low, high, total_bits)``: the coder's final interval ``[low, high)`` in units of
    ``2**-total_bits``, exactly (constriction seals at ``low`` rounded up to a whole word and
    reports ``low mod 2**64``; together they give ``low``)."""
    pos, (lower, range_) = coder.pos()
    words = [int(w) for w in coder.get_compressed()]
    n_words = pos + 2  # the 64-bit state covers words pos and pos + 1
    if len(words) > n_words:
        raise AssertionError("constriction emitted more termination words than expected")
    sealed = 0
    for word in words + [0] * (n_words - len(words)):
        sealed = (sealed << _WORD_BITS) | word
    low = sealed - ((sealed - lower) % (1 << 64))
    if not (0 <= sealed - low < 1 << _WORD_BITS and sealed < low + range_):
        raise AssertionError("unexpected constriction coder state")
    return low, low + range_, _WORD_BITS * n_words


def _min_payload_bits(coder) -> int:
    """``ceil(information coded) - SLACK_BITS``: the encoder never writes fewer bits."""
    pos, (_, range_) = coder.pos()
    return _WORD_BITS * (pos + 2) - (range_.bit_length() - 1) - SLACK_BITS


def _terminate(coder) -> bytes:
    if coder.is_empty():
        return b""
    low, high, total_bits = _final_interval(coder)
    # The point in [low, high) with the most trailing zero bits: keep the common prefix of low
    # and high - 1, then the first bit where they differ set (or low itself if it already ends
    # in zeros there).
    top = high - 1
    differ = (low ^ top).bit_length()
    point = low if low & ((1 << differ) - 1) == 0 else (top >> (differ - 1)) << (differ - 1)
    bits = total_bits - ((point & -point).bit_length() - 1) if point else 0
    min_bits = _min_payload_bits(coder)
    if bits < min_bits:  # a lucky short point: lengthen to the first odd multiple of a finer step
        for bits in range(min_bits, total_bits + 1):
            step = 1 << (total_bits - bits)
            point = -(-low // step) * step
            if not (point // step) & 1:
                point += step
            if point < high:
                break
        else:
            raise AssertionError("unreachable: the interval holds an odd integer")
    if point == 0:
        return b""
    n_bytes = -(-bits // 8)
    return (point >> (total_bits - 8 * n_bytes)).to_bytes(n_bytes, "big")


def payload_bits(data: bytes) -> int:
    """Bits of ``data`` up to and including its last one bit; all later zeros are implicit.

    A container may store just these bits of a `TokenEncoder` payload and pad with zero bits
    when reading back. (A uniform payload has the fixed length `uniform_bits`, known from the
    token count and V, and `decode_uniform` wants exactly ``ceil(uniform_bits / 8)`` bytes.)
    """
    data = bytes(data).rstrip(b"\0")
    if not data:
        return 0
    last = data[-1]
    return 8 * len(data) - ((last & -last).bit_length() - 1)


class TokenDecoder:
    """Decodes `TokenEncoder` bytes one step at a time.

    Call `decode_step` with each step's frequency table (built from the tokens decoded so far)
    and `finish` at the end. Two checks turn damage into `CodingError`: a step raises as soon as
    the tokens decoded so far carry more information than the payload's bits, and `finish`
    re-encodes the decoded tokens and requires exactly ``data``. Measured on 32-token steps at
    V = 256 (1,000 trials each): payloads cut by 1-3 bytes raise in 99.2% of cases, payloads
    decoded with another model's tables in 98.6%; a one-count change in the true symbol's entry
    raises in 63%, gives the right tokens (harmless) in 31% and wrong tokens in 6%. Undetected
    wrong tokens are left to the container's checksum. Bytes past the end of ``data`` read as
    zeros, so trailing zero bytes may be dropped or added.
    """

    def __init__(self, data: bytes, precision: int = DEFAULT_PRECISION):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodingError(f"data must be bytes, got {type(data).__name__}")
        self._shadow = TokenEncoder(precision)  # re-encodes the decoded tokens for `finish`
        self.precision = self._shadow.precision
        self._data = bytes(data)
        self._payload_bits = payload_bits(self._data)
        padded = self._data + b"\0" * (-len(self._data) % 4)
        words = np.frombuffer(padded, dtype=">u4").astype(np.uint32)
        self._coder = constriction.stream.queue.RangeDecoder(words)
        self._failed = False

    @property
    def num_tokens(self) -> int:
        return self._shadow.num_tokens

    def decode_step(self, frequencies) -> np.ndarray:
        """The ``n`` symbols (int32) of the next step, one per row of ``frequencies [n, V]``."""
        if self._failed:
            raise CodingError("an earlier step failed to decode")
        f = _validate_frequencies(frequencies, self.precision)
        if not f.shape[0]:
            return np.zeros((0,), np.int32)
        pmf = _coder_pmf(f, self.precision)
        try:
            symbols = np.asarray(self._coder.decode(_MODEL, pmf), dtype=np.int32)
        except Exception as err:  # constriction raises AssertionError on invalid data
            self._failed = True
            raise CodingError(f"data is invalid under these frequency tables: {err}") from err
        self._shadow.encode_step(f, symbols)
        if _min_payload_bits(self._shadow._coder) > self._payload_bits:
            self._failed = True
            raise CodingError(
                f"decoded more information than the {self._payload_bits} payload "
                f"bits can hold: truncated data or different frequency tables"
            )
        return symbols

    def finish(self) -> None:
        """Raises `CodingError` unless ``data`` is the encoding of the tokens decoded so far."""
        if self._failed:
            raise CodingError("an earlier step failed to decode")
        if self._shadow.finish() != self._data.rstrip(b"\0"):
            raise CodingError(
                "data is not the encoding of the decoded tokens: truncated, corrupted, or decoded "
                "with frequency tables different from the encoder's"
            )


def encode_tokens(steps: Iterable[tuple[np.ndarray, np.ndarray]], precision: int = DEFAULT_PRECISION) -> bytes:
    """Convenience: `TokenEncoder` over ``(frequencies, symbols)`` steps."""
    encoder = TokenEncoder(precision)
    for frequencies, symbols in steps:
        encoder.encode_step(frequencies, symbols)
    return encoder.finish()


def decode_tokens(
    data: bytes, frequency_tables: Sequence[np.ndarray], precision: int = DEFAULT_PRECISION
) -> list[np.ndarray]:
    """Convenience for known tables: `TokenDecoder` over all steps, then `TokenDecoder.finish`."""
    decoder = TokenDecoder(data, precision)
    symbols = [decoder.decode_step(f) for f in frequency_tables]
    decoder.finish()
    return symbols


# ---------------------------------------------------------------------------------------------
# Uniform mode and measurement


def _check_uniform_args(num_tokens: int, vocab: int) -> None:
    if not isinstance(num_tokens, (int, np.integer)) or num_tokens < 0:
        raise CodingError(f"num_tokens must be a non-negative integer, got {num_tokens!r}")
    if not isinstance(vocab, (int, np.integer)) or vocab < 2:
        raise CodingError(f"V must be an integer >= 2, got {vocab!r}")


def uniform_bits(num_tokens: int, vocab: int) -> int:
    """``ceil(num_tokens * log2 V)``, exactly (``num_tokens * log2 V`` for a power-of-two V)."""
    _check_uniform_args(num_tokens, vocab)
    if vocab & (vocab - 1) == 0:
        return int(num_tokens) * (int(vocab).bit_length() - 1)
    return (int(vocab) ** int(num_tokens) - 1).bit_length()


def encode_uniform(symbols, vocab: int) -> bytes:
    """Tokens ``[n]`` in ``[0, V)`` packed into exactly `uniform_bits` bits, MSB first.

    The value ``sum(s_i * V**i)`` is written left-aligned in ``ceil(bits / 8)`` bytes, the last
    byte padded with zero bits (a bit-packing container stores only the first `uniform_bits`).
    """
    s = np.asarray(symbols)
    if s.ndim != 1 or s.dtype.kind not in "iu":
        raise CodingError(f"symbols must be a 1-D integer array, got shape {s.shape} dtype {s.dtype}")
    _check_uniform_args(s.size, vocab)
    if s.size and (s.min() < 0 or s.max() >= vocab):
        raise CodingError(f"symbols must lie in [0, {vocab})")
    bits = uniform_bits(s.size, vocab)
    value = _pack(s.astype(np.int64).tolist(), int(vocab))
    n_bytes = -(-bits // 8)
    return (value << (8 * n_bytes - bits)).to_bytes(n_bytes, "big")


def decode_uniform(data: bytes, num_tokens: int, vocab: int) -> np.ndarray:
    """Inverse of `encode_uniform`; ``data`` must have exactly ``ceil(bits / 8)`` bytes."""
    _check_uniform_args(num_tokens, vocab)
    bits = uniform_bits(num_tokens, vocab)
    n_bytes = -(-bits // 8)
    if len(data) != n_bytes:
        raise CodingError(
            f"uniform payload of {num_tokens} tokens over V={vocab} needs {n_bytes} bytes, got {len(data)}"
        )
    raw = int.from_bytes(bytes(data), "big")
    pad = 8 * n_bytes - bits
    if raw & ((1 << pad) - 1):
        raise CodingError("nonzero padding bits in a uniform payload")
    value = raw >> pad
    if value >= int(vocab) ** int(num_tokens):
        raise CodingError("uniform payload value out of range")
    return np.asarray(_unpack(value, int(num_tokens), int(vocab)), dtype=np.int32)


def _pack(symbols: list[int], vocab: int) -> int:
    """``sum(s_i * V**i)`` by halving (fast for long sequences)."""
    if len(symbols) <= 64:
        value = 0
        for s in reversed(symbols):
            value = value * vocab + s
        return value
    half = len(symbols) // 2
    return _pack(symbols[:half], vocab) + _pack(symbols[half:], vocab) * vocab**half


def _unpack(value: int, n: int, vocab: int) -> list[int]:
    if n <= 64:
        out = []
        for _ in range(n):
            value, s = divmod(value, vocab)
            out.append(s)
        return out
    half = n // 2
    high, low = divmod(value, vocab**half)
    return _unpack(low, half, vocab) + _unpack(high, n - half, vocab)


def cross_entropy_bits(probs, symbols) -> float:
    """``sum(-log2 p[..., s])`` in float64, each row ``[..., V]`` normalised by its sum.

    Works for probabilities and for integer frequency tables alike.
    """
    p = np.asarray(probs, dtype=np.float64)
    s = np.asarray(symbols)
    if p.ndim < 1 or s.shape != p.shape[:-1]:
        raise CodingError(f"symbols shape {s.shape} does not match probabilities {p.shape}")
    if s.dtype.kind not in "iu" or (s.size and (s.min() < 0 or s.max() >= p.shape[-1])):
        raise CodingError(f"symbols must be integers in [0, {p.shape[-1]})")
    chosen = np.take_along_axis(p, s[..., None].astype(np.int64), axis=-1)[..., 0]
    with np.errstate(divide="ignore"):
        return float(-(np.log2(chosen) - np.log2(p.sum(axis=-1))).sum())
