"""Bytes per caption for each caption coder on the held-out captions, against the papers' zlib.

  python experiments/caption_coding.py                           # the table
  python experiments/caption_coding.py --corruption              # also: what each decoder detects
  python experiments/caption_coding.py --quick --out /tmp/caps   # smoke test: every 10th caption, both tables

Evaluation set: ``percov2_jax/captions/data/eval_captions.txt`` (152 hand-written BLIP-2-style
captions, disjoint from the training captions the stored tables were fitted on). Times are
medians over the captions, single-threaded Python, for information only.

Damaged data (``--corruption``): every caption's bytes truncated at each length, padded with one
random byte, and with each single bit flipped; each decode is an error (detected), the same text
(harmless) or another text (silent).

Output: ``caption_coding.json`` (every caption's size) and ``caption_coding.md`` in ``--out``
(``_quick`` appended with ``--quick``).
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import time

import results_io

from percov2_jax.captions import CODERS, CaptionDecodeError, get_coder
from percov2_jax.captions.fit import EVAL_CAPTIONS_PATH, TRAIN_CAPTIONS_PATH, read_caption_lines

BROTLI = "(brotli q11, reference)"
DAMAGE = ("truncated", "padded", "bit flip")


def median_ms(fn, items) -> float:
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def sizes(captions: list[str]) -> dict[str, dict]:
    """Per coder: every caption's size in bytes and the median encode / decode ms (round trips asserted)."""
    rows = {}
    for name in CODERS:
        coder = get_coder(name)
        encoded = [coder.encode(c) for c in captions]
        assert [coder.decode(d) for d in encoded] == captions, name
        rows[name] = {
            "bytes": [len(d) for d in encoded],
            "encode_ms": median_ms(coder.encode, captions),
            "decode_ms": median_ms(coder.decode, encoded),
        }
    try:  # a reference point, not a registered coder
        import brotli

        rows[BROTLI] = {
            "bytes": [len(brotli.compress(c.encode("utf-8"), quality=11, mode=brotli.MODE_TEXT)) for c in captions],
            "encode_ms": None,
            "decode_ms": None,
        }
    except ImportError:
        pass
    zlib_total = sum(rows["zlib"]["bytes"])
    for row in rows.values():
        b = row["bytes"]
        row.update(
            mean_bytes=statistics.mean(b),
            median_bytes=statistics.median(b),
            max_bytes=max(b),
            total_bits=8 * sum(b),
            vs_zlib=sum(b) / zlib_total,
        )
    return rows


def corruption(captions: list[str]) -> dict[str, dict]:
    """Per coder and kind of damage: how many decodes were an error / the same text / a WRONG text."""
    rng = random.Random(0)
    out = {}
    for name in CODERS:
        coder = get_coder(name)
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for text in captions:
            data = coder.encode(text)
            for kind, damaged in damaged_copies(data, rng):
                try:
                    counts[kind]["same" if coder.decode(damaged) == text else "WRONG"] += 1
                except CaptionDecodeError:
                    counts[kind]["error"] += 1
        out[name] = {kind: {k: counts[kind][k] for k in ("error", "same", "WRONG")} for kind in DAMAGE}
    return out


def damaged_copies(data: bytes, rng: random.Random):
    """``(kind, bytes)``: every truncation, one random byte appended, every single-bit flip."""
    for cut in range(len(data)):
        yield "truncated", data[:cut]
    yield "padded", data + bytes([rng.randrange(256)])
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        yield "bit flip", bytes(flipped)


def _ms(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    quick = " — QUICK smoke run" if report["config"]["quick"] else ""
    c = report["captions"]
    lines = [
        f"# Caption coders: bytes per caption{quick}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {results_io.describe_machine(report['machine'])} Python {report['machine']['python']}.",
        "",
        f"{c['count']} evaluation captions, mean {c['mean_words']:.1f} words, {c['mean_utf8_bytes']:.1f} UTF-8 "
        "bytes. Times: median ms per caption, single-threaded Python, for information only.",
        "",
        "| coder | mean B | median B | max B | total bits | vs zlib | encode ms | decode ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["coders"].items():
        lines.append(
            f"| {name} | {r['mean_bytes']:.2f} | {r['median_bytes']:.1f} | {r['max_bytes']} | "
            f"{r['total_bits']} | {r['vs_zlib']:.3f} | {_ms(r['encode_ms'])} | {_ms(r['decode_ms'])} |"
        )
    if report["corruption"] is not None:
        lines += [
            "",
            "Damaged data, decodes that were an error (detected) / the same text (harmless) / a WRONG text (silent):",
            "",
            "| coder | " + " | ".join(DAMAGE) + " |",
            "|---|---|---|---|",
        ]
        for name, kinds in report["corruption"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{kinds[k]['error']} / {kinds[k]['same']} / {kinds[k]['WRONG']}" for k in DAMAGE)
                + " |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corruption", action="store_true", help="also count detected corruptions")
    results_io.add_output_arguments(parser, "every 10th evaluation caption, with --corruption")
    args = parser.parse_args(argv)
    if args.quick:
        args.corruption = True
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    captions = read_caption_lines(EVAL_CAPTIONS_PATH)
    train = set(read_caption_lines(TRAIN_CAPTIONS_PATH))
    assert not train & set(captions), "evaluation captions must not be training captions"
    if args.quick:
        captions = captions[::10]
    report = {
        "command": results_io.command(),
        "config": vars(args),
        "machine": results_io.machine(),
        "captions": {
            "file": EVAL_CAPTIONS_PATH.name,
            "count": len(captions),
            "mean_words": statistics.mean(len(c.split()) for c in captions),
            "mean_utf8_bytes": statistics.mean(len(c.encode()) for c in captions),
        },
    }
    report["coders"] = sizes(captions)
    report["corruption"] = corruption(captions) if args.corruption else None
    results_io.finish_machine(report["machine"])
    report["total_s"] = time.perf_counter() - started
    results_io.write_report(args.out, results_io.stem("caption_coding", args.quick), report, markdown(report))


if __name__ == "__main__":
    main()
