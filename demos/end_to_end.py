"""`make demo`: the whole codec on the builtin photographs, from nothing, in bounded time.

  python demos/end_to_end.py --config configs/demo.py --prior_config configs/prior_demo.py \\
      --workdir /tmp/percov2_demo

1. Stage 1 (``--config``): the stand-in for the SD3 VAE is fitted on the builtin photos (with
   configs/demo.py the convolutional autoencoder of models/conv_autoencoder.py, about half a
   minute, kept in ``WORKDIR/conv_autoencoder.npz``), then the tiny PerCoV2 (hyper-encoder, VQ,
   MM-DiT) trains on them: checkpoints in ``WORKDIR/checkpoints``, a training grid in
   ``WORKDIR/reconstructions.png``.
2. Stage 2 (``--prior_config``): the masked-image-model prior on the frozen tokens, in
   ``WORKDIR/prior``.
3. The codec: every builtin photo (centre crop at the training size) is compressed with the
   prior (``WORKDIR/streams/*.pcv2``; try ``percov2 info``), decompressed, and measured: a
   per-image table of caption / token / header bits, bpp and PSNR (printed and written to
   ``WORKDIR/codec.json``), and ``WORKDIR/codec.png`` with originals on top and decoded images
   below. Each step resumes if ``WORKDIR`` already holds it.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "stage-1 training config")
config_flags.DEFINE_config_file("prior_config", "configs/prior_demo.py", "stage-2 prior config")
flags.DEFINE_string("workdir", "/tmp/percov2_demo", "where the demo trains and writes its pictures")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of one shape."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def codec_report(workdir: str, image_size: int) -> dict:
    """Compress / decompress every builtin photo with the trained codec; returns the table."""
    from tqdm import tqdm

    from percov2_jax.codec import bitstream
    from percov2_jax.codec.api import Codec
    from percov2_jax.data.builtin import BuiltinPhotos
    from percov2_jax.data.pipeline import resize_and_crop
    from percov2_jax.train.image_grid import reconstruction_grid, save_png

    codec = Codec.from_workdir(workdir)
    photos = BuiltinPhotos()
    streams = os.path.join(workdir, "streams")
    os.makedirs(streams, exist_ok=True)
    rows, originals, decoded = [], [], []
    for i in tqdm(range(len(photos)), desc="codec"):
        item = photos[i]
        image = resize_and_crop(item["image"], (image_size, image_size))
        data = codec.compress(image, item["caption"])
        uniform = codec.compress(image, item["caption"], entropy_mode="uniform")
        name = item["id"].replace("/", "_")  # e.g. skimage_astronaut
        with open(os.path.join(streams, f"{name}.pcv2"), "wb") as f:
            f.write(data)
        out = codec.decompress(data)
        budget, ubudget = bitstream.bit_budget(data), bitstream.bit_budget(uniform)
        rows.append(
            {
                "image": name,
                "caption_bits": budget["caption_bits"],
                "token_bits": budget["tokens_bits"],
                "uniform_token_bits": ubudget["tokens_bits"],
                "overhead_bits": budget["header_bits"] + budget["padding_bits"] + budget["checksum_bits"],
                "total_bits": budget["total_bits"],
                "bpp": round(budget["total_bpp"], 5),
                "uniform_bpp": round(ubudget["total_bpp"], 5),
                "psnr": round(psnr(image, out), 2),
                "token_coding": bitstream.unpack(data).header.entropy_mode,  # what auto chose
            }
        )
        originals.append(image)
        decoded.append(out)
    grid = os.path.join(workdir, "codec.png")
    save_png(grid, reconstruction_grid(np.stack(originals), np.stack(decoded), max_images=len(originals)))
    tokens = sum(r["token_bits"] for r in rows)
    uniform_tokens = sum(r["uniform_token_bits"] for r in rows)
    return {
        "images": rows,
        "picture": grid,
        "streams": streams,
        "mean_bpp": round(float(np.mean([r["bpp"] for r in rows])), 5),
        "mean_uniform_bpp": round(float(np.mean([r["uniform_bpp"] for r in rows])), 5),
        "mean_psnr": round(float(np.mean([r["psnr"] for r in rows])), 2),
        "token_saving_vs_uniform": f"{100.0 * (1 - tokens / uniform_tokens):.1f}%",
        "schedule": f"{codec.coding.schedule} ({codec.coding.entropy_mode})",
        "prior_coded_images": sum(r["token_coding"] == "prior" for r in rows),
    }


def print_table(report: dict) -> None:
    print(f"{'image':12s} {'caption':>8s} {'tokens':>7s} {'uniform':>8s} {'overhead':>9s} {'bpp':>8s} {'PSNR':>6s}")
    for r in report["images"]:
        print(
            f"{r['image']:12s} {r['caption_bits']:8d} {r['token_bits']:7d} {r['uniform_token_bits']:8d} "
            f"{r['overhead_bits']:9d} {r['bpp']:8.5f} {r['psnr']:6.2f}"
        )
    print(
        f"mean bpp {report['mean_bpp']} (uniform token coding: {report['mean_uniform_bpp']}), mean PSNR "
        f"{report['mean_psnr']} dB; the prior ({report['schedule']}, sent for {report['prior_coded_images']} of "
        f"{len(report['images'])} images) saves {report['token_saving_vs_uniform']} of the token bits"
    )
    print("(these are the photos both models trained on; experiments/entropy_schedules.md has held-out photos)")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from percov2_jax.runs.layout import RunDir
    from percov2_jax.train.loop import train_and_evaluate
    from percov2_jax.train.monitoring import read_metrics
    from percov2_jax.train.prior import train_prior

    workdir = os.path.abspath(FLAGS.workdir)
    run = RunDir(workdir)
    train_and_evaluate(FLAGS.config, run)
    prior_config = FLAGS.prior_config
    prior_config.stage1 = workdir
    train_prior(prior_config, run.prior)
    report = codec_report(workdir, int(FLAGS.config.image_size))
    stage1 = [r for r in read_metrics(run) if "loss" in r]
    stage2 = [r for r in read_metrics(run.prior) if "bits_per_token" in r]
    report["stage1"] = {
        "steps": stage1[-1]["step"] if stage1 else 0,
        "first_loss": stage1[0]["loss"] if stage1 else None,
        "last_loss": stage1[-1]["loss"] if stage1 else None,
    }
    report["stage2"] = {
        "steps": stage2[-1]["step"] if stage2 else 0,
        "first_bits_per_token": stage2[0]["bits_per_token"] if stage2 else None,
        "last_bits_per_token": stage2[-1]["bits_per_token"] if stage2 else None,
    }
    with open(os.path.join(workdir, "codec.json"), "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    print(json.dumps({k: v for k, v in report.items() if k != "images"}, indent=2))


if __name__ == "__main__":
    app.run(main)
