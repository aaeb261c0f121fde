"""Training images: sources (builtin photographs, image folders, TFDS array_record) and the
deterministic, per-process grain input pipeline."""
