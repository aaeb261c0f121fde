"""MSCOCO-30k as PerCo / PerCoV2 evaluate it: 30,000 COCO-2017 train images at 512 x 512.

  python -m percov2_jax.evaluate --config configs/eval_coco30k.py --workdir /tmp/eval_coco30k \
      --config.checkpoint=STAGE1_WORKDIR --config.dataset.root=/data/coco/train2017 \
      --config.dataset.annotations=/data/coco/annotations/captions_train2017.json \
      --config.metrics.inception=/w/pt_inception-2015-12-05-6726825d.pth \
      --config.metrics.lpips_backbone=/w/alexnet-owt-7be5be79.pth --config.metrics.lpips_heads=/w/alex.pth \
      --config.metrics.clip_model=/w/clip-vit-large-patch14

The image list is PerCo's (fetched and cached, or config.dataset.image_list). Captions: the decoder is
conditioned on the first ground-truth caption and the CLIP score uses another one
(config.dataset.conditioning; "file" for BLIP-2 / Molmo captions). Captions are coded with zlib,
the papers' coder (`percov2 compress` uses the shorter word-ngram-v1), so the bpp compares with
the papers'; the summary also gives the bpp as the papers count it (caption + tokens).
"""

from percov2_jax.evaluation.defaults import base_eval_config


def get_config():
    c = base_eval_config()
    c.dataset.name = "coco30k"
    # [paper, PerCo] 20 steps, CFG 3 at the lowest rates; PerCoV2's own: unstated
    c.modes = (dict(sample_steps=20, guidance_scale=3.0),)
    c.shard_size = 256  # [ours]
    c.caption_coder = "zlib"  # [paper] the papers code captions with zlib (set in the defaults too)
    return c
