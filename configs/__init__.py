"""Run configs: ``ml_collections`` files with ``get_config()``, given to a job as
``--config configs/NAME.py`` and overridden with ``--config.FIELD=VALUE``. Configs that build on
another import it (``from configs import tiny``).

Schemas and defaults, each value tagged with its source: ``percov2_jax/train/defaults.py``
(stage 1), ``percov2_jax/train/prior_defaults.py`` (stage 2), ``percov2_jax/evaluation/defaults.py``
(evaluation).
"""
