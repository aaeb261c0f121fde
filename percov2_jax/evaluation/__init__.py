"""Sharded, resumable evaluation of the codec on a dataset (``python -m percov2_jax.evaluate``).

Modules: `job` (one evaluation from its config), `shards` (the work split over processes, shard
files, resume, aggregation), `datasets` (MSCOCO-30k, Kodak, folders, TFDS, builtin), `modes`
(operating modes), `metric_suite` (the metric networks on a mesh), `report` (markdown tables),
`chart_specs` and `plots` (rate-distortion / rate-perception charts).
"""
