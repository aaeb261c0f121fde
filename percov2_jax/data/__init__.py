"""Data: side stores and (later) input pipelines."""
