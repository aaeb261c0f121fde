"""Kodak (24 images) at 512 x 512, with the operating-mode sweep of PerCoV2's Fig. 1.

  python -m percov2_jax.evaluate --config configs/eval_kodak.py --workdir /tmp/eval_kodak \
      --config.checkpoint=STAGE1_WORKDIR --config.dataset.root=/data/kodak \
      --config.metrics.lpips_backbone=... --config.metrics.lpips_heads=...
  (native 768 x 512: --config.dataset.preprocess=native)

Kodak has no captions: the decoder gets "" unless config.dataset.captions names a caption file
(conditioning "gt" then uses it). FID/KID on 24 images are not meaningful (PerCo reports only
LPIPS and MS-SSIM on Kodak), so they are off; the CLIP score needs captions.
Captions are coded with zlib, the papers' coder (`percov2 compress` uses the shorter
word-ngram-v1), so the bpp compares with the papers'; the summary also gives the bpp as the
papers count it (caption + tokens, no header or checksum).
"""

from percov2_jax.evaluation.defaults import base_eval_config


def get_config():
    c = base_eval_config()
    c.dataset.name = "kodak"
    c.dataset.conditioning = "none"
    c.metrics.names = "psnr,ms_ssim,lpips"  # [paper] PerCoV2 Fig. 7: PSNR, LPIPS, MS-SSIM
    # [ours] Fig. 1's grid is unstated: a few steps x guidance pairs (docs/method.md §6.3)
    c.modes = (
        dict(sample_steps=20, guidance_scale=3.0),
        dict(sample_steps=5, guidance_scale=3.0),
        dict(sample_steps=2, guidance_scale=1.0),
        dict(sample_steps=20, guidance_scale=1.0),
    )
    c.shard_size = 8  # [ours]
    c.caption_coder = "zlib"  # [paper] the papers code captions with zlib (set in the defaults too)
    return c
