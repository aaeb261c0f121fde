"""A smoke evaluation of a tiny-config run on 2 CPU cores, without any downloaded weights.

  python -m percov2_jax.evaluate --config configs/eval_tiny.py --workdir /tmp/eval_tiny \
      --config.checkpoint=/tmp/percov2_demo

The built-in photographs at 192 x 192 (MS-SSIM needs 160 px), two operating modes, LPIPS and the
Inception network with random weights (the code path is the real one; LPIPS / FID / KID numbers
are meaningless and every report says "random"). CLIP score is off: it needs a CLIP folder
(--config.metrics.clip_model=...).
"""

from percov2_jax.evaluation.defaults import base_eval_config


def get_config():
    c = base_eval_config()
    c.dataset.name = "builtin"
    c.dataset.size = 192
    c.modes = (dict(sample_steps=4, guidance_scale=3.0), dict(sample_steps=1, guidance_scale=1.0))
    c.metrics.names = "psnr,ms_ssim,lpips,fid,kid"
    c.metrics.random_weights = True
    c.metrics.kid_subsets = 10
    c.metrics.fid_method = "eigh"  # scipy's sqrtm of a 2048^2 product takes ~14 s on 2 cores
    c.batch_size = 2
    c.shard_size = 4
    return c
