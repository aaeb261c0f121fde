"""A trained stage-2 prior read back from its run: its ``MIMConfig``, its parameters and what it
records about the stage-1 model whose tokens it learned."""

from __future__ import annotations

import os
from typing import Any

import jax

from percov2_jax.entropy import mim
from percov2_jax.runs import checkpointing
from percov2_jax.runs.layout import RunDir


def load_prior(workdir: str | os.PathLike | RunDir, step: int | None = None) -> tuple[mim.MaskedTokenPrior, Any]:
    """``(model, params)`` of a stage-2 run (the latest step by default), the parameters on this
    process's first device whatever mesh wrote them."""
    run = RunDir(workdir)
    step = checkpointing.latest_step(run, step)
    config = checkpointing.read_json(run, checkpointing.PRIOR_CONFIG, step)
    if config is None:
        raise ValueError(f"{run.root}: checkpoint {step} is not a stage-2 prior (no {checkpointing.PRIOR_CONFIG})")
    model = mim.MaskedTokenPrior(mim.MIMConfig.from_dict(config))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = checkpointing.state_metadata(run, step)["params"]
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    return model, checkpointing.restore_subtree(run, step, {"params": target})["params"]


def read_prior_meta(workdir: str | os.PathLike | RunDir, step: int | None = None) -> dict:
    """What a stage-2 checkpoint records about its stage-1 model: ``stage1_model_id`` and the
    ``stage1`` run's path."""
    run = RunDir(workdir)
    meta = checkpointing.read_json(run, checkpointing.META, step)
    if meta is None:
        raise ValueError(f"{run.root}: not a stage-2 prior checkpoint (no {checkpointing.META} item)")
    return dict(meta)
