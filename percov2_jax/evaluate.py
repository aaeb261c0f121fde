"""Evaluate a trained codec on a dataset: ``python -m percov2_jax.evaluate``.

  python -m percov2_jax.evaluate --config configs/eval_coco30k.py --checkpoint STAGE1_WORKDIR \\
      --dataset coco30k --data_dir /data/coco/train2017 \\
      --annotations /data/coco/annotations/captions_train2017.json --workdir /tmp/eval_coco
  python -m percov2_jax.evaluate --config configs/eval_kodak.py --checkpoint ... --data_dir /data/kodak \\
      --modes "steps=20,guidance=3;steps=5,guidance=1" --workdir /tmp/eval_kodak

Every image goes through ``Codec.compress`` -> ``.pcv2`` bytes -> ``Codec.decompress`` (so bpp is
what a user gets) under each operating mode, and is scored (PSNR, MS-SSIM, LPIPS per image; FID,
KID and CLIP score over the dataset). The work is split into shards over processes and resumes
where it stopped: run the same command again. Outputs in ``--workdir``: ``summary.json`` /
``summary.md``, ``records.jsonl`` / ``records.md``, ``rate_distortion.png``,
``rate_perception.png``, ``operating_modes.png``; see `percov2_jax.evaluation.runner`.

Multi-host: start the same command on every host with ``--distributed`` (TPU pods, SLURM) or the
coordinator flags; ``--workdir`` must be a filesystem every host sees.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from percov2_jax.train import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "evaluation config (configs/eval_*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "where shards, tables and plots go (an interrupted run resumes from it)")
flags.DEFINE_string("checkpoint", None, "stage-1 training workdir (overrides config.checkpoint)")
flags.DEFINE_enum("dataset", None, ["coco30k", "kodak", "folder", "tfds", "builtin"],
                  "dataset kind (overrides config.dataset.name)")
flags.DEFINE_string("data_dir", None, "image folder or TFDS directory (overrides config.dataset.root)")
flags.DEFINE_string("image_list", None, "file of image names, one per line (overrides config.dataset.image_list)")
flags.DEFINE_string("annotations", None, "COCO captions_*.json (overrides config.dataset.annotations)")
flags.DEFINE_string("modes", None, "operating modes, e.g. 'steps=20,guidance=3;steps=2,guidance=1' "
                                   "(overrides config.modes; see percov2_jax.evaluation.modes)")
flags.DEFINE_string("label", None, "run label in tables and plots (overrides config.label)")
flags.DEFINE_integer("max_shards", None, "stop after this many shards on each process (resume later)")
flags.DEFINE_bool("progress", True, "show a progress bar")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    distributed.initialize(FLAGS)
    from percov2_jax.evaluation.run import effective_config, evaluate

    config = effective_config(FLAGS.config, {
        "checkpoint": FLAGS.checkpoint, "dataset.name": FLAGS.dataset, "dataset.root": FLAGS.data_dir,
        "dataset.image_list": FLAGS.image_list, "dataset.annotations": FLAGS.annotations, "modes": FLAGS.modes,
        "label": FLAGS.label})
    summary = evaluate(config, FLAGS.workdir, max_shards=FLAGS.max_shards, show_progress=FLAGS.progress)
    if summary is not None:
        with open(os.path.join(FLAGS.workdir, "summary.md"), encoding="utf-8") as f:
            print(f.read())


if __name__ == "__main__":
    app.run(main)
