"""Planning runs on machines we do not have: ahead-of-time compilation for TPU slices and GPU
kinds, per-device memory, FLOPs and step times (``python -m percov2_jax.plan``)."""
