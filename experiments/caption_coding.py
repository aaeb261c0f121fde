"""Bytes per caption for each caption coder on the held-out captions, against the papers' zlib.

  python experiments/caption_coding.py                # the table
  python experiments/caption_coding.py --corruption   # also: what each decoder detects

Evaluation set: ``percov2_jax/captions/data/eval_captions.txt`` (152 hand-written BLIP-2-style
captions, disjoint from the training captions the stored tables were fitted on). Times are
medians over the captions, single-threaded Python, for information only.
"""

from __future__ import annotations

import argparse
import collections
import platform
import random
import statistics
import time

from percov2_jax.captions import CODERS, CaptionDecodeError, get_coder
from percov2_jax.captions.fit import EVAL_CAPTIONS_PATH, TRAIN_CAPTIONS_PATH, read_caption_lines


def median_ms(fn, items) -> float:
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def size_table(captions: list[str]) -> None:
    rows = {}
    for name in CODERS:
        coder = get_coder(name)
        encoded = [coder.encode(c) for c in captions]
        assert [coder.decode(d) for d in encoded] == captions, name
        rows[name] = ([len(d) for d in encoded], median_ms(coder.encode, captions), median_ms(coder.decode, encoded))
    try:  # a reference point, not a registered coder
        import brotli

        sizes = [len(brotli.compress(c.encode("utf-8"), quality=11, mode=brotli.MODE_TEXT)) for c in captions]
        rows["(brotli q11, reference)"] = (sizes, float("nan"), float("nan"))
    except ImportError:
        pass
    zlib_total = sum(rows["zlib"][0])
    print(f"{'coder':26s} {'mean B':>7s} {'median':>6s} {'max B':>5s} {'total bits':>10s} {'vs zlib':>7s} "
          f"{'enc ms':>6s} {'dec ms':>6s}")
    for name, (sizes, enc_ms, dec_ms) in rows.items():
        print(f"{name:26s} {statistics.mean(sizes):7.2f} {statistics.median(sizes):6.1f} {max(sizes):5d} "
              f"{8 * sum(sizes):10d} {sum(sizes) / zlib_total:7.3f} {enc_ms:6.3f} {dec_ms:6.3f}")


def corruption_table(captions: list[str]) -> None:
    """Per coder: how truncations, one-byte paddings and single-bit flips decode."""
    rng = random.Random(0)
    print("\noutcome of damaged data: error (detected) / same text (harmless) / WRONG text (silent)")
    for name in CODERS:
        coder = get_coder(name)
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

        def outcome(kind: str, data: bytes, text: str) -> None:
            try:
                counts[kind]["same" if coder.decode(data) == text else "WRONG"] += 1
            except CaptionDecodeError:
                counts[kind]["error"] += 1

        for text in captions:
            data = coder.encode(text)
            for cut in range(len(data)):
                outcome("truncated", data[:cut], text)
            outcome("padded", data + bytes([rng.randrange(256)]), text)
            for bit in range(8 * len(data)):
                flipped = bytearray(data)
                flipped[bit // 8] ^= 1 << (bit % 8)
                outcome("bit flip", bytes(flipped), text)
        cells = []
        for kind in ("truncated", "padded", "bit flip"):
            c = counts[kind]
            cells.append(f"{kind} {c['error']}/{c['same']}/{c['WRONG']}")
        print(f"{name:22s} " + "   ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corruption", action="store_true", help="also count detected corruptions")
    args = parser.parse_args()
    captions = read_caption_lines(EVAL_CAPTIONS_PATH)
    train = set(read_caption_lines(TRAIN_CAPTIONS_PATH))
    assert not train & set(captions), "evaluation captions must not be training captions"
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}")
    print(f"{len(captions)} evaluation captions, mean {statistics.mean(len(c.split()) for c in captions):.1f} "
          f"words, {statistics.mean(len(c.encode()) for c in captions):.1f} UTF-8 bytes\n")
    size_table(captions)
    if args.corruption:
        corruption_table(captions)


if __name__ == "__main__":
    main()
