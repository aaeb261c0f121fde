"""Image-quality metrics in JAX: pixel metrics (PSNR, SSIM, MS-SSIM), LPIPS, Inception features
for FID/KID, and the CLIP score. Each network is a Flax port; its converter from the published
weights is in `percov2_jax.convert`."""
