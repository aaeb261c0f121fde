"""Captions: lossless caption coders, the caption length policy, and caption sources.

  from percov2_jax import captions
  coder = captions.get_coder()                     # "word-ngram-v1"; "zlib" is the papers' coder
  text = captions.CaptionPolicy(max_tokens=32).apply("a man riding a horse on a dirt road near a barn")
  data = coder.encode(text)                         # 7 bytes; zlib: 49
  assert coder.decode(data) == text

Modules: `coders` (the coders and their registry), `range_coder` and `ngram` (the arithmetic
coder and fixed models behind ``word-ngram-v1``), `fit` (rebuilds the stored tables from
``data/train_captions.txt``), `policy` (length cap), `sources` (caption files), `captioner`
(optional BLIP-2, torch; import it explicitly).
"""

from percov2_jax.captions.coders import (
    CODERS,
    DEFAULT_CODER,
    PAPER_CODER,
    CaptionCoder,
    CaptionDecodeError,
    CheckedCoder,
    DeflateDictCoder,
    WordNGramCoder,
    ZlibCoder,
    get_coder,
)
from percov2_jax.captions.policy import CaptionPolicy, CaptionTooLongError, count_words
from percov2_jax.captions.sources import CaptionFile, CaptionFileError, FixedCaption, image_key, load_captions

__all__ = [
    "CODERS",
    "DEFAULT_CODER",
    "PAPER_CODER",
    "CaptionCoder",
    "CaptionDecodeError",
    "CheckedCoder",
    "DeflateDictCoder",
    "WordNGramCoder",
    "ZlibCoder",
    "get_coder",
    "CaptionPolicy",
    "CaptionTooLongError",
    "count_words",
    "CaptionFile",
    "CaptionFileError",
    "FixedCaption",
    "image_key",
    "load_captions",
]
