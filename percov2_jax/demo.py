"""`make demo`: stage-1 training of the tiny PerCoV2 on builtin photographs, then a summary.

  python -m percov2_jax.demo --config configs/demo.py --workdir /tmp/percov2_demo

Trains (resuming if ``--workdir`` already holds a run), writes checkpoints to
``WORKDIR/checkpoints``, the reconstruction grid to ``WORKDIR/reconstructions.png`` (originals on
top, decoded from the tokens below) and logs to ``WORKDIR/metrics.jsonl`` and TensorBoard, then
prints what the run reached and what one image costs in bits.
"""

from __future__ import annotations

import json
import os
import zlib

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "demo config file (a stage-1 training config)")
flags.DEFINE_string("workdir", "/tmp/percov2_demo", "where the demo trains and writes its pictures")


def summary(config, workdir: str) -> dict:
    """First and last logged losses, the picture, and the bits of one image at this rate."""
    from percov2_jax import rates
    from percov2_jax.data.builtin import BuiltinPhotos
    from percov2_jax.train.metrics import read_metrics

    records = [r for r in read_metrics(workdir) if "loss" in r]
    rate = rates.get_rate(config.rate)
    rows, cols = rate.token_grid(config.image_size, config.image_size)
    token_bits = rows * cols * rate.bits_per_token
    caption = BuiltinPhotos()[0]["caption"]
    caption_bits = 8 * len(zlib.compress(caption.encode("utf-8"), 9))
    pixels = config.image_size**2
    return {
        "steps": records[-1]["step"] if records else 0,
        "first_loss": records[0]["loss"] if records else None,
        "last_loss": records[-1]["loss"] if records else None,
        "reconstructions": os.path.join(workdir, "reconstructions.png"),
        "checkpoints": os.path.join(workdir, "checkpoints"),
        "tokens": f"{rows}x{cols} x {rate.bits_per_token:g} bits = {token_bits:g} bits (uniform coding)",
        "caption": f"{caption!r}: {caption_bits} bits with zlib",
        "bpp": round((token_bits + caption_bits) / pixels, 5),
    }


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from percov2_jax.train.loop import train_and_evaluate

    train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(json.dumps(summary(FLAGS.config, FLAGS.workdir), indent=2))


if __name__ == "__main__":
    app.run(main)
