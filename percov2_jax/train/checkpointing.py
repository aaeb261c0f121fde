"""Training checkpoints: one orbax ``CheckpointManager`` with named items.

Items: ``state`` (params, optimizer state, VQ statistics, EMA, step: sharded arrays, restored
straight onto their shardings), ``data`` (the grain iterator state, one file per process) and
``config`` (the run's config as JSON). Saves are asynchronous; orbax writes each step into a
temporary directory and renames it only when every item of every process is complete, so a run
killed during a save restarts from the last complete step.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE, DATA, CONFIG = "state", "data", "config"


def make_manager(directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """A manager over ``directory`` (created if missing) keeping the newest ``max_to_keep`` steps."""
    import grain

    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True)
    handlers = {STATE: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any, config: Any,
         *, force: bool = False) -> bool:
    """Queue a save of ``step`` (asynchronous); returns whether a save was started."""
    import grain

    args = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(_config_json(config))}
    if data_iterator is not None:
        args[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, shardings: Any, data_iterator: Any,
            step: int | None = None) -> tuple[int, Any]:
    """Restore ``step`` (default: the latest complete one) onto ``shardings``; the data iterator
    is restored in place. Returns ``(step, state)``."""
    import grain

    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {manager.directory}")
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    args = {STATE: ocp.args.StandardRestore(target)}
    if data_iterator is not None:
        args[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return step, restored[STATE]


def read_config(directory: str, step: int | None = None) -> dict:
    """The config JSON stored with a checkpoint (the latest step by default)."""
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_handlers={CONFIG: ocp.JsonCheckpointHandler()})
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    return manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]


def _config_json(config: Any) -> dict:
    if hasattr(config, "to_json"):
        return json.loads(config.to_json())
    return json.loads(json.dumps(config))
