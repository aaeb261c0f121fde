"""Image-quality metrics in JAX (issue 6): pixel metrics, LPIPS, Inception features for FID/KID,
CLIP score. Each network is a Flax port with a converter from its published weights."""
