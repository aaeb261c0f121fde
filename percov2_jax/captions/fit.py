"""Build the stored caption-coding tables from the training captions, and only from them.

  python -m percov2_jax.captions.fit          # rewrite data/ngram_v1.json, data/deflate_dict_v1.txt
  python -m percov2_jax.captions.fit --check  # exit 1 if the stored tables differ from a rebuild

The tables define the ``-v1`` coders' bitstreams: rewriting them makes old streams undecodable,
so a changed training set or fitting rule needs new file and coder names (``-v2``).
``data/eval_captions.txt`` is disjoint from the training captions and never read here.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from percov2_jax.captions import ngram
from percov2_jax.captions.coders import DATA_DIR, DEFLATE_DICT_PATH, NGRAM_MODEL_PATH

TRAIN_CAPTIONS_PATH = DATA_DIR / "train_captions.txt"
EVAL_CAPTIONS_PATH = DATA_DIR / "eval_captions.txt"


def read_caption_lines(path: str | pathlib.Path) -> list[str]:
    """The non-empty lines of a UTF-8 caption file, newline removed (list[str])."""
    return [line for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if line]


def build_deflate_dictionary(captions: list[str], max_bytes: int = 32768) -> bytes:
    """The deflate preset dictionary: the captions joined by newlines, the last ``max_bytes``.

    (Ordering captions by word frequency, nearest-to-the-text last, measured the same in
    cross-validation, so the file order is kept.)
    """
    return "\n".join(captions).encode("utf-8")[-max_bytes:]


def dump_models(models: dict) -> str:
    """``models`` as JSON with one line per field and per context (readable diffs)."""

    def compact(x) -> str:
        return json.dumps(x, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    lines = ["{"]
    for key in ("format", "version"):
        lines.append(f"{compact(key)}:{compact(models[key])},")
    for i, key in enumerate(("chars", "words")):
        model = models[key]
        lines.append(f"{compact(key)}:{{")
        lines += [f"{compact(field)}:{compact(model[field])}," for field in ("discount", "order", "symbols", "unigram")]
        lines.append('"contexts":[')
        lines.append(",\n".join(compact(c) for c in model["contexts"]))
        lines.append("]}" + ("," if i == 0 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def build_assets(captions: list[str]) -> dict[pathlib.Path, bytes]:
    """The bytes of each stored table, keyed by its path, fitted on ``captions`` (list[str])."""
    return {
        NGRAM_MODEL_PATH: dump_models(ngram.fit_models(captions)).encode("utf-8"),
        DEFLATE_DICT_PATH: build_deflate_dictionary(captions),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored tables, write nothing")
    args = parser.parse_args(argv)
    assets = build_assets(read_caption_lines(TRAIN_CAPTIONS_PATH))
    stale = [p for p, data in assets.items() if not p.exists() or p.read_bytes() != data]
    if args.check:
        for p in stale:
            print(f"stale: {p}")
        return 1 if stale else 0
    for p, data in assets.items():
        p.write_bytes(data)
        print(f"wrote {p} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
