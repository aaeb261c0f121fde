"""Evaluate a trained codec on a dataset: ``python -m percov2_jax.evaluate``.

  python -m percov2_jax.evaluate --config configs/eval_coco30k.py --workdir /tmp/eval_coco \\
      --config.checkpoint=STAGE1_WORKDIR --config.dataset.root=/data/coco/train2017 \\
      --config.dataset.annotations=/data/coco/annotations/captions_train2017.json
  python -m percov2_jax.evaluate --config configs/eval_kodak.py --workdir /tmp/eval_kodak \\
      --config.checkpoint=STAGE1_WORKDIR --config.dataset.root=/data/kodak

Every image goes through ``Codec.compress`` -> ``.pcv2`` bytes -> ``Codec.decompress`` (so bpp is
what a user gets) under each operating mode of ``config.modes``, and is scored (PSNR, MS-SSIM,
LPIPS per image; FID, KID and CLIP score over the dataset). The work is split into shards over
processes and resumes where it stopped: run the same command again. Outputs in ``--workdir``:
``summary.json`` / ``summary.md``, ``records.jsonl`` / ``records.md`` and the charts; see
`percov2_jax.evaluation.job`.

Multi-host: the same command on every host with ``--distributed`` or the coordinator flags
(`percov2_jax.jobs`); ``--workdir`` must be a filesystem every host sees.
"""

from __future__ import annotations

from absl import flags

from percov2_jax import jobs

jobs.define_flags(
    "evaluation config file (configs/eval_*.py)",
    "where shards, tables and plots go (an interrupted run resumes from it)",
)
flags.DEFINE_integer("max_shards", None, "stop after this many shards on each process (resume later)")
flags.DEFINE_bool("progress", True, "show a progress bar")


def main() -> None:
    from percov2_jax.evaluation.job import evaluate, summary_markdown

    summary = evaluate(
        jobs.FLAGS.config, jobs.FLAGS.workdir, max_shards=jobs.FLAGS.max_shards, show_progress=jobs.FLAGS.progress
    )
    if summary is not None:
        print(summary_markdown(jobs.FLAGS.workdir))


if __name__ == "__main__":
    jobs.run(main)
