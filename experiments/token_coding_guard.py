"""Token bits of the codec's streams on photographs its prior never saw: uniform coding, the
prior's range-coded payload, the encoder's ``auto`` mode (the shorter of the two), and the prior
with a floor on every probability (a little of the uniform distribution mixed in).

  python experiments/token_coding_guard.py --stage1 /tmp/percov2_demo        # after `make demo`
  python experiments/token_coding_guard.py --stage1 DIR --quick --out /tmp/guard   # smoke test

Model: the stage-1 run of ``--stage1`` and its stage-2 prior (``DIR/prior``), loaded as the codec
loads them (`Codec.from_workdir`). Photographs: scikit-image photos outside the built-in
training catalogue (`percov2_jax.data.builtin`, what ``make demo`` trains on), grey ones
repeated to RGB, each cover-resized and centre-cropped to ``--side`` (a whole map) and cut into
four ``--side / 2`` quarter crops; the catalogue's own photos the same way, for contrast (the
demo's prior was trained on their tokens). Captions are empty, as ``percov2 compress`` codes an
image given none.

Per token map (``qlds`` schedule, the codec's default):
- ``uniform``, ``prior`` and ``auto``: the token bits of the real streams (`Codec.pack` with that
  entropy mode; `bitstream.bit_budget`), and the whole stream's bits;
- ``floor eps``: the ideal code length under the prior's probabilities mixed with the uniform
  distribution, ``(1 - eps) p + eps / V`` (at most ``log2(V / eps)`` bits per token, however
  confident the prior is), from `mim.schedule_log2_probs`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import results_io

FLOORS = (1e-3, 1e-2, 3e-2, 1e-1)
# scikit-image photographs that are not in the built-in catalogue (the demo's training photos).
HELD_OUT = (
    "camera",
    "retina",
    "immunohistochemistry",
    "moon",
    "coins",
    "clock",
    "motorcycle_right",
    "brick",
    "grass",
    "gravel",
)
QUICK_HELD_OUT = ("camera", "retina")


def skimage_photo(name: str) -> np.ndarray:
    """uint8 ``[H, W, 3]``: a scikit-image sample (grey ones repeated to RGB)."""
    from skimage import data

    image = data.stereo_motorcycle()[1] if name == "motorcycle_right" else getattr(data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.dtype != np.uint8:  # e.g. boolean or float samples
        image = np.clip(image.astype(np.float64) * (255.0 if image.max() <= 1 else 1.0), 0, 255).astype(np.uint8)
    return image[..., :3]


def crops(image: np.ndarray, side: int) -> list[np.ndarray]:
    """The centre ``side`` square of the cover-resized image, and its four quarter squares."""
    from percov2_jax.data.pipeline import resize_and_crop

    whole = resize_and_crop(image, (side, side))
    half = side // 2
    return [whole] + [whole[r : r + half, c : c + half] for r in (0, half) for c in (0, half)]


def measure(codec, photos: dict[str, np.ndarray], side: int) -> list[dict]:
    """One row per token map: bits of the uniform, prior and auto streams and the floors' ideal bits."""
    from percov2_jax.codec import bitstream
    from percov2_jax.codec.token_payload import TokenCoding, build_schedule
    from percov2_jax.entropy import mim

    rows = []
    vocab = codec.rate.codebook_size
    embedding = codec.caption_embedding("")
    for name, image in photos.items():
        for index, crop in enumerate(crops(image, side)):
            tokens, size, policy = codec.tokens(crop)
            row = {"photo": name, "crop": index, "grid": list(tokens.shape)}
            for mode in ("uniform", "prior", "auto"):
                data = codec.pack(tokens, size, policy, "", "zlib", TokenCoding(mode))
                budget = bitstream.bit_budget(data)
                row[mode] = {"token_bits": budget["tokens_bits"], "total_bits": budget["total_bits"]}
                if mode == "auto":
                    row["auto_chose"] = bitstream.unpack(data).header.entropy_mode
            schedule = build_schedule(TokenCoding("prior"), *tokens.shape)
            log2_p, _ = mim.schedule_log2_probs(
                codec.prior.model.apply, codec.prior.params, tokens, schedule, embedding
            )
            p = np.exp2(log2_p)
            row["ideal_prior_bits"] = float(-log2_p.sum())
            row["floor_bits"] = {f"{eps:g}": float(-np.log2((1 - eps) * p + eps / vocab).sum()) for eps in FLOORS}
            rows.append(row)
    return rows


def summarise(rows: list[dict], vocab: int) -> dict:
    """Bits per token of each method over the maps, and the worst excess over uniform per map."""
    tokens = np.array([np.prod(r["grid"]) for r in rows], np.float64)
    n = tokens.sum()
    uniform = np.array([r["uniform"]["token_bits"] for r in rows], np.float64)
    out = {"maps": len(rows), "tokens": int(n), "bits_per_token": {}, "worst_excess_bits": {}, "maps_worse": {}}
    methods = {
        "uniform": uniform,
        "prior": np.array([r["prior"]["token_bits"] for r in rows], np.float64),
        "auto": np.array([r["auto"]["token_bits"] for r in rows], np.float64),
        "prior (ideal)": np.array([r["ideal_prior_bits"] for r in rows]),
    }
    for eps in FLOORS:
        methods[f"floor {eps:g} (ideal)"] = np.array([r["floor_bits"][f"{eps:g}"] for r in rows])
    for name, bits in methods.items():
        out["bits_per_token"][name] = float(bits.sum() / n)
        out["worst_excess_bits"][name] = float(np.max(bits - uniform))
        out["maps_worse"][name] = int(np.sum(bits > uniform))
    total = {m: np.array([r[m]["total_bits"] for r in rows], np.float64) for m in ("uniform", "prior", "auto")}
    out["worst_stream_excess_bits"] = {m: float(np.max(total[m] - total["uniform"])) for m in total}
    out["auto_chose_prior"] = int(sum(r["auto_chose"] == "prior" for r in rows))
    out["log2_vocab"] = float(np.log2(vocab))
    return out


def markdown(report: dict) -> str:
    quick = report["config"]["quick"]
    lines = [
        "# Token coding on unseen photographs: uniform, prior, auto and a probability floor"
        + (" (QUICK)" if quick else ""),
        "",
        *results_io.provenance(report),
        f"Model: `{report['config']['stage1']}` and its prior; rate {report['rate']} (V = {report['vocab']}); "
        f"qlds schedule, empty captions; {report['config']['side']} px maps and their four quarters.",
        "",
        "Bits per token (token payload bits / tokens; uniform is log2 V). `prior`, `auto` and `uniform` "
        "are the real streams' payloads; `(ideal)` rows are code lengths -log2 p, for the floors "
        "under (1 - eps) p + eps / V. Worst excess: the largest (method - uniform) token bits of one map.",
        "",
    ]
    for part in ("held_out", "training"):
        s = report[part]
        title = "Held-out photographs" if part == "held_out" else "The catalogue photographs the demo trains on"
        lines += [f"## {title}: {s['maps']} maps, {s['tokens']} tokens", ""]
        lines += ["| method | bits per token | vs uniform | maps longer than uniform | worst excess (bits) |"]
        lines += ["|---|---:|---:|---:|---:|"]
        u = s["bits_per_token"]["uniform"]
        for name, bits in s["bits_per_token"].items():
            lines.append(
                f"| {name} | {bits:.3f} | {100 * (bits / u - 1):+.1f}% | {s['maps_worse'][name]} of {s['maps']} "
                f"| {s['worst_excess_bits'][name]:+.1f} |"
            )
        w = s["worst_stream_excess_bits"]
        lines += [
            "",
            "Whole streams, worst excess over the uniform stream (bits): "
            f"prior {w['prior']:+.0f}, auto {w['auto']:+.0f}; "
            f"auto sent the prior's coding for {s['auto_chose_prior']} of {s['maps']} maps.",
            "",
        ]
    lines.append(f"Total {report['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage1", required=True, help="a stage-1 workdir with a trained prior in prior/")
    ap.add_argument("--side", type=int, default=512, help="side of the whole-photo maps in px (quick: 128)")
    results_io.add_output_arguments(ap, "two held-out photos and one catalogue photo at 128 px")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    side = 128 if args.quick else args.side
    start = time.perf_counter()
    import jax  # noqa: F401  (recorded in the machine line)

    from percov2_jax.codec.api import Codec
    from percov2_jax.data.builtin import BuiltinPhotos

    codec = Codec.from_workdir(args.stage1)
    if codec.prior is None:
        raise SystemExit(f"{args.stage1} has no trained prior in prior/ (python -m percov2_jax.train_prior)")
    catalogue = BuiltinPhotos()
    training = {catalogue[i]["id"]: catalogue[i]["image"] for i in range(1 if args.quick else len(catalogue))}
    held_out = {name: skimage_photo(name) for name in (QUICK_HELD_OUT if args.quick else HELD_OUT)}
    report = {
        "command": results_io.command(),
        "config": {"stage1": args.stage1, "side": side, "quick": args.quick, "floors": list(FLOORS)},
        "machine": results_io.machine(),
        "versions": results_io.versions("jax", "jaxlib", "flax"),
        "rate": codec.config.rate,
        "vocab": codec.rate.codebook_size,
    }
    for part, photos in (("held_out", held_out), ("training", training)):
        rows = measure(codec, photos, side)
        report[part] = summarise(rows, codec.rate.codebook_size)
        report[part]["rows"] = rows
    report["total_s"] = time.perf_counter() - start
    results_io.finish_machine(report["machine"])
    results_io.write_report(args.out, results_io.stem("token_coding_guard", args.quick), report, markdown(report))


if __name__ == "__main__":
    main()
