"""Kodak (24 images) at 512 x 512, with the operating-mode sweep of PerCoV2's Fig. 1.

  python -m percov2_jax.evaluate --config configs/eval_kodak.py --checkpoint STAGE1_WORKDIR \
      --data_dir /data/kodak --workdir /tmp/eval_kodak --config.metrics.lpips_backbone=... \
      --config.metrics.lpips_heads=...
  (native 768 x 512: --config.dataset.preprocess=native)

Kodak has no captions: the decoder gets "" unless config.dataset.captions names a caption file
(conditioning "gt" then uses it). FID/KID on 24 images are not meaningful (PerCo reports only
LPIPS and MS-SSIM on Kodak), so they are off; the CLIP score needs captions.
"""

from percov2_jax.evaluation.defaults import base_eval_config


def get_config():
    c = base_eval_config()
    c.dataset.name = "kodak"
    c.dataset.conditioning = "none"
    c.metrics.names = "psnr,ms_ssim,lpips"  # [paper] PerCoV2 Fig. 7: PSNR, LPIPS, MS-SSIM
    # [ours] Fig. 1's grid is unstated: a few steps x guidance pairs from the method notes (§6)
    c.modes = "steps=20,guidance=3;steps=5,guidance=3;steps=2,guidance=1;steps=20,guidance=1"
    c.shard_size = 8  # [ours]
    return c
