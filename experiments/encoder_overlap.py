"""Prior-coded token encoding: every group's prior pass dispatched up front (the device works
while the host range-codes, as ``token_coding.encode_with_prior`` does) against one pass at a
time (dispatch, wait, code; what it did before), side by side in one run.

  python experiments/encoder_overlap.py [--workdir /tmp/percov2_demo] [--repeats 15]
  python experiments/encoder_overlap.py --quick --workdir /tmp/percov2_demo --out /tmp/overlap  # 128 px, qlds

Model: the ``make demo`` workdir with its stage-2 prior. Tokens: the built-in photos'
(``codec.tokens``) at each size; both encoders must give the same bytes. Alternating runs,
medians; the machine and its load average are recorded.

Output: ``encoder_overlap.json`` (every raw time) and ``encoder_overlap.md`` in ``--out``
(``_quick`` appended with ``--quick``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import results_io
from codec_latency import square_photos

from percov2_jax.codec import api, token_payload
from percov2_jax.codec.token_payload import TokenCoding
from percov2_jax.entropy import coder, token_coding


def sequential(probabilities, params, tokens, schedule, caption, precision=coder.DEFAULT_PRECISION) -> bytes:
    """One pass at a time: dispatch, wait, code (the encoder before the overlap). Each pass is the
    same jitted call on the same inputs as in `token_coding.encode_with_prior`, so the bytes agree."""
    caption = None if caption is None else jnp.asarray(caption, jnp.float32).reshape(1, -1)
    encoder = coder.TokenEncoder(precision)
    revealed = np.zeros(tokens.shape, bool)
    flat = tokens.reshape(-1)
    for group in schedule.groups:
        known = np.asarray((tokens * revealed)[None], np.int32)
        probs = probabilities(params, jnp.asarray(known), jnp.asarray(revealed[None].copy()), caption)
        tables = coder.quantize_probabilities(np.asarray(jax.device_get(probs))[group], precision=precision)
        encoder.encode_step(tables, flat[group])
        revealed.reshape(-1)[group] = True
    return encoder.finish()


def measure(codec, size: int, schedule_name: str, repeats: int) -> dict:
    """Both encoders on the first photo's tokens at ``size``: alternating runs, same bytes asserted."""
    prior = codec.prior
    _, image, caption = square_photos(size)[0]
    tokens = np.asarray(codec.tokens(image)[0])
    embedding = codec.caption_embedding(caption)  # None for a prior without captions
    schedule = token_payload.build_schedule(TokenCoding(entropy_mode="prior", schedule=schedule_name), *tokens.shape)

    def overlapped():
        return token_coding.encode_with_prior(prior.probabilities, prior.params, tokens, schedule, caption=embedding)[0]

    def one_by_one():
        return sequential(prior.probabilities, prior.params, tokens, schedule, embedding)

    if overlapped() != one_by_one():
        raise AssertionError(f"{size} {schedule_name}: the two encoders give different bytes")
    times = {"overlapped": [], "sequential": []}
    for _ in range(repeats):
        for label, fn in (("sequential", one_by_one), ("overlapped", overlapped)):
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    row = {
        "size": size,
        "tokens": f"{tokens.shape[0]}x{tokens.shape[1]}",
        "schedule": schedule_name,
        "groups": len(schedule.groups),
        **{k: float(np.median(v)) * 1e3 for k, v in times.items()},
        "raw_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
    }
    row["speedup"] = row["sequential"] / row["overlapped"]
    return row


def markdown(report: dict) -> str:
    quick = " — QUICK smoke run" if report["config"]["quick"] else ""
    lines = [
        f"# Prior-coded encoding: passes dispatched up front vs one at a time{quick}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {results_io.describe_machine(report['machine'])} "
        f"{results_io.describe_versions(report['versions'])}. Medians of {report['repeats']} alternating runs; "
        "same bytes asserted.",
        "",
    ]
    lines += results_io.busy_warning(report["machine"], "the times measure the contention as well.")
    lines += [
        "| image | tokens | schedule | groups | one at a time ms | dispatched up front ms | speed-up |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['size']}² | {r['tokens']} | {r['schedule']} | {r['groups']} | {r['sequential']:.1f} | "
        f"{r['overlapped']:.1f} | {r['speedup']:.2f}x |"
        for r in report["rows"]
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/percov2_demo", help="stage-1 workdir with prior/ (make demo)")
    ap.add_argument("--sizes", default="128,512", help="square image sides in px")
    ap.add_argument("--schedules", default="qlds,checkerboard")
    ap.add_argument("--repeats", type=int, default=15)
    results_io.add_output_arguments(ap, "128 px, the qlds schedule, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.schedules, args.repeats = "128", "qlds", 2
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.schedules = args.schedules.split(",")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    codec = api.Codec.from_workdir(args.workdir)
    if codec.prior is None:
        raise SystemExit(f"no stage-2 prior in {args.workdir}/prior")
    report = {
        "command": results_io.command(),
        "config": vars(args),
        "machine": results_io.machine(),
        "versions": results_io.versions("jax", "jaxlib", "constriction"),
        "repeats": args.repeats,
        "rows": [],
    }
    for size in args.sizes:
        for name in args.schedules:
            row = measure(codec, size, name, args.repeats)
            report["rows"].append(row)
            print(size, name, f"{row['sequential']:.1f} -> {row['overlapped']:.1f} ms", flush=True)
    results_io.finish_machine(report["machine"])
    report["total_s"] = time.perf_counter() - started
    results_io.write_report(args.out, results_io.stem("encoder_overlap", args.quick), report, markdown(report))


if __name__ == "__main__":
    main()
