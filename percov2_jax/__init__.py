"""percov2-jax: the PerCoV2 perceptual image codec (SD3 backbone) in JAX/Flax."""

__version__ = "0.1.0"
