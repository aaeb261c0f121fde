"""Data: image sources (builtin photographs, folders, TFDS array_record), the grain input
pipeline, and side stores (precomputed text embeddings)."""
