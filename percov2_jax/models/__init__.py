"""Pure Flax linen modules (NHWC): the SD3 MM-DiT and the SD3 VAE."""

from percov2_jax.models.mmdit import SD3Transformer2DModel, SD3TransformerConfig
from percov2_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

__all__ = ["SD3Transformer2DModel", "SD3TransformerConfig", "AutoencoderKL", "AutoencoderKLConfig"]
