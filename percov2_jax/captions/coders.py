"""Lossless caption coders: ``text -> bytes -> text``, byte-identical.

Every coder has a ``name``, ``encode(text: str) -> bytes`` and ``decode(data: bytes) -> str``.
The bytes are not self-delimiting: the bitstream container stores their length.

* ``zlib`` — ``zlib.compress(text.encode("utf-8"), 9)``, the coder of the PerCo/PerCoV2 papers
  (``PAPER_CODER``: what the paper-comparison evaluations use, for paper-exact rates).
  Corruption: adler32 checksum; truncation and trailing bytes are detected.
* ``deflate-dict-v1`` — raw deflate (no zlib header, no checksum) at level 9 with a preset
  dictionary of training captions (``data/deflate_dict_v1.txt``). Corruption: truncation and
  trailing bytes are detected; a flipped bit may decode to a different text silently.
* ``word-ngram-v1`` — (``DEFAULT_CODER``, the codec's default) range coding under a fixed word
  trigram model with a character-level escape for unknown words (``data/ngram_v1.json``, see
  `ngram`), or, when shorter, ``0xFF`` + the UTF-8 bytes (so it is never more than 1 byte longer
  than the UTF-8 text). Corruption: the decoder accepts exactly the encoder's outputs (it re-encodes
  what it decoded and raises unless the bytes match), which rejects nearly all trailing bytes; but a
  near-optimal code has almost no redundancy, so most truncations and many bit flips decode to
  another text without error (measured on the eval captions: 82% of truncations, 39% of single-bit
  flips, 7% of one-byte paddings; in raw mode nothing is checked beyond UTF-8 validity). Use
  ``+crc8`` below, or integrity checks in the container, where that matters.
* ``word-ngram-v1+crc8`` — ``word-ngram-v1`` plus one byte of the text's CRC-32 (`CheckedCoder`):
  one byte more, and a random corruption or truncation is rejected with probability 255/256.

All decoders raise `CaptionDecodeError` (a ValueError) on the bad data they detect, as listed.
Encoders take any ``str`` that is valid UTF-8 (no lone surrogates) and raise ValueError else.
"""

from __future__ import annotations

import functools
import pathlib
import zlib
from typing import Protocol

from percov2_jax.captions import ngram
from percov2_jax.captions.range_coder import RangeDecodeError, RangeDecoder, RangeEncoder

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
NGRAM_MODEL_PATH = DATA_DIR / "ngram_v1.json"
DEFLATE_DICT_PATH = DATA_DIR / "deflate_dict_v1.txt"


class CaptionDecodeError(ValueError):
    """The bytes are not a caption this coder wrote (corrupt, truncated or padded)."""


class CaptionCoder(Protocol):
    name: str

    def encode(self, text: str) -> bytes: ...

    def decode(self, data: bytes) -> str: ...


def _utf8(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"a caption must be str, not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"caption is not valid Unicode text (lone surrogate?): {e}") from None


def _text(raw: bytes, coder: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaptionDecodeError(f"{coder}: decoded bytes are not UTF-8 ({e})") from None


def _inflate(data: bytes, coder: str, **kwargs) -> bytes:
    """Decompress one complete zlib/deflate stream, rejecting truncation and trailing bytes."""
    inflater = zlib.decompressobj(**kwargs)
    try:
        raw = inflater.decompress(bytes(data)) + inflater.flush()
    except zlib.error as e:
        raise CaptionDecodeError(f"{coder}: corrupt data ({e})") from None
    if not inflater.eof:
        raise CaptionDecodeError(f"{coder}: truncated data (the stream does not end)")
    if inflater.unused_data:
        raise CaptionDecodeError(f"{coder}: {len(inflater.unused_data)} trailing bytes after the stream")
    return raw


class ZlibCoder:
    """The papers' coder: ``zlib.compress(utf8, 9)``."""

    name = "zlib"

    def encode(self, text: str) -> bytes:
        return zlib.compress(_utf8(text), 9)

    def decode(self, data: bytes) -> str:
        return _text(_inflate(data, self.name), self.name)


class DeflateDictCoder:
    """Raw deflate, level 9, with a preset dictionary ``zdict`` (bytes, at most 32 KiB)."""

    name = "deflate-dict-v1"

    def __init__(self, zdict: bytes | None = None):
        self.zdict = DEFLATE_DICT_PATH.read_bytes() if zdict is None else bytes(zdict)
        if len(self.zdict) > 32768:
            raise ValueError(f"a deflate dictionary holds at most 32768 bytes, got {len(self.zdict)}")

    def encode(self, text: str) -> bytes:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, self.zdict)
        return deflater.compress(_utf8(text)) + deflater.flush()

    def decode(self, data: bytes) -> str:
        return _text(_inflate(data, self.name, wbits=-15, zdict=self.zdict), self.name)


# word-ngram-v1 ---------------------------------------------------------------------------

# A modelled stream starts by coding symbol 0 of this table, so its first byte is < 0xFF; a
# first byte 0xFF marks raw mode: 0xFF + the UTF-8 bytes, not range coded.
_MODE_TABLE = (0, 255, 256)
_RAW_MARK = b"\xff"
_CODE_POINTS = 0x110000


class WordNGramCoder:
    """Range coding under a fixed word n-gram model with a character-level escape.

    A text is coded as a mode symbol (probability 255/256), the pieces of ``text.split(" ")``
    (none for the empty text), each a vocabulary word or ``ESCAPE`` + characters +
    ``END_OF_WORD``, then ``END``; or, when strictly shorter, as raw mode: ``0xFF`` + UTF-8.
    """

    name = "word-ngram-v1"

    def __init__(self, words: ngram.NGramModel | None = None, chars: ngram.NGramModel | None = None):
        if words is None or chars is None:
            words, chars = ngram.load_models(NGRAM_MODEL_PATH)
        self.words, self.chars = words, chars

    def encode(self, text: str) -> bytes:
        raw = _utf8(text)
        modelled = self._encode_modelled(text)
        return modelled if len(modelled) <= len(raw) + 1 else _RAW_MARK + raw

    def _encode_modelled(self, text: str) -> bytes:
        enc = RangeEncoder()
        enc.encode(_MODE_TABLE, 0)
        history = [ngram.WORD_START] * self.words.order
        for piece in text.split(" ") if text else []:
            table = self.words.table(history)
            if piece in self.words.index:
                enc.encode(table, self.words.index[piece])
                history.append(piece)
            else:
                enc.encode(table, self.words.index[ngram.ESCAPE])
                self._encode_chars(enc, piece)
                history.append(ngram.WORD_UNKNOWN)
        enc.encode(self.words.table(history), self.words.index[ngram.WORD_END])
        return enc.finish()

    def _encode_chars(self, enc: RangeEncoder, piece: str) -> None:
        history = [ngram.CHAR_START] * self.chars.order
        for ch in piece:
            table = self.chars.table(history)
            if ch in self.chars.index:  # (a character is never CHAR_END "" nor ESCAPE)
                enc.encode(table, self.chars.index[ch])
                history.append(ch)
            else:
                enc.encode(table, self.chars.index[ngram.ESCAPE])
                enc.encode_uniform(ord(ch), _CODE_POINTS)
                history.append(ngram.ESCAPE)
        enc.encode(self.chars.table(history), self.chars.index[ngram.CHAR_END])

    def decode(self, data: bytes) -> str:
        data = bytes(data)
        try:
            if data.startswith(_RAW_MARK):
                text = _text(data[1:], self.name)
            else:
                dec = RangeDecoder(data)
                dec.decode(_MODE_TABLE)  # symbol 0, as the first byte is below 0xFF
                text = self._decode_modelled(dec)
        except RangeDecodeError as e:
            raise CaptionDecodeError(f"{self.name}: corrupt data ({e})") from None
        try:
            canonical = self.encode(text)
        except ValueError:
            raise CaptionDecodeError(f"{self.name}: corrupt data (decodes to invalid Unicode)") from None
        if canonical != data:
            raise CaptionDecodeError(
                f"{self.name}: corrupt, truncated or padded data ({len(data)} bytes are not the "
                f"encoding of the text they decode to, which takes {len(canonical)} bytes)"
            )
        return text

    def _decode_modelled(self, dec: RangeDecoder) -> str:
        pieces = []
        history = [ngram.WORD_START] * self.words.order
        end, escape = self.words.index[ngram.WORD_END], self.words.index[ngram.ESCAPE]
        while (symbol := dec.decode(self.words.table(history))) != end:
            if symbol == escape:
                pieces.append(self._decode_chars(dec))
                history.append(ngram.WORD_UNKNOWN)
            else:
                pieces.append(self.words.symbols[symbol])
                history.append(pieces[-1])
        return " ".join(pieces)

    def _decode_chars(self, dec: RangeDecoder) -> str:
        chars = []
        history = [ngram.CHAR_START] * self.chars.order
        end, escape = self.chars.index[ngram.CHAR_END], self.chars.index[ngram.ESCAPE]
        while (symbol := dec.decode(self.chars.table(history))) != end:
            if symbol == escape:
                chars.append(chr(dec.decode_uniform(_CODE_POINTS)))
                history.append(ngram.ESCAPE)
            else:
                chars.append(self.chars.symbols[symbol])
                history.append(chars[-1])
        return "".join(chars)


class CheckedCoder:
    """``inner`` plus ``check_bytes`` bytes of the text's CRC-32, appended.

    Rejects a random corruption, truncation or padding with probability ``1 - 256**-check_bytes``
    (on top of what ``inner`` rejects), for ``check_bytes`` more bytes per caption.
    """

    def __init__(self, inner: CaptionCoder, check_bytes: int = 1):
        if not 1 <= check_bytes <= 4:
            raise ValueError(f"check_bytes must be 1..4, got {check_bytes}")
        self.inner, self.check_bytes = inner, check_bytes
        self.name = f"{inner.name}+crc{8 * check_bytes}"

    def _check(self, text: str) -> bytes:
        return zlib.crc32(_utf8(text)).to_bytes(4, "big")[-self.check_bytes :]

    def encode(self, text: str) -> bytes:
        return self.inner.encode(text) + self._check(text)

    def decode(self, data: bytes) -> str:
        data = bytes(data)
        if len(data) < self.check_bytes:
            raise CaptionDecodeError(f"{self.name}: {len(data)} bytes cannot hold the {self.check_bytes}-byte check")
        text = self.inner.decode(data[: -self.check_bytes])
        if self._check(text) != data[-self.check_bytes :]:
            raise CaptionDecodeError(f"{self.name}: check value mismatch (corrupt, truncated or padded data)")
        return text


# registry --------------------------------------------------------------------------------

_FACTORIES = {
    ZlibCoder.name: ZlibCoder,
    DeflateDictCoder.name: DeflateDictCoder,
    WordNGramCoder.name: WordNGramCoder,
    WordNGramCoder.name + "+crc8": lambda: CheckedCoder(get_coder(WordNGramCoder.name), 1),
}
CODERS: tuple[str, ...] = tuple(_FACTORIES)
# The shortest coder with no loss of robustness inside a .pcv2 stream (whose CRC-16 covers the
# caption): the codec's default. ``zlib`` stays for paper-exact rates (the evaluation configs).
DEFAULT_CODER = WordNGramCoder.name
PAPER_CODER = ZlibCoder.name


@functools.cache
def get_coder(name: str = DEFAULT_CODER) -> CaptionCoder:
    """The coder called ``name`` (one of `CODERS`); instances are shared and stateless."""
    if name not in _FACTORIES:
        raise KeyError(f"unknown caption coder {name!r}; known: {', '.join(CODERS)}")
    return _FACTORIES[name]()
