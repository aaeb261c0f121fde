"""Training checkpoints of both stages: one orbax ``CheckpointManager`` with named items.

Items: ``state`` (step, params, optimizer state, VQ statistics, EMA: sharded arrays, restored
straight onto their shardings), ``data`` (the data iterator's global position: one JSON
object that any process layout can resume from),
``config`` (the run's config as JSON) and, in stage-2 runs, ``prior_config`` (the prior's
``MIMConfig``) and ``meta`` (which stage-1 model made its tokens). Saves may be asynchronous;
orbax writes each step into a temporary directory and renames it only when every item of every
process is complete, so a run killed during a save restarts from the last complete step.

Training restores the whole state (`restore`); inference reads only what it needs
(`restore_subtree`: e.g. the parameters, never the optimizer moments) and the JSON items.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from percov2_jax.runs.layout import RunDir

STATE, DATA, CONFIG, PRIOR_CONFIG, META = "state", "data", "config", "prior_config", "meta"
JSON_ITEMS = (CONFIG, PRIOR_CONFIG, META)


def make_manager(run: RunDir, *, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """A manager over ``run.checkpoints`` (created if missing) keeping the newest ``max_to_keep`` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    handlers = {
        STATE: ocp.StandardCheckpointHandler(),
        **{name: ocp.JsonCheckpointHandler() for name in (DATA, *JSON_ITEMS)},
    }
    return ocp.CheckpointManager(run.checkpoints, options=options, item_handlers=handlers)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: Any,
    config: Any,
    *,
    force: bool = False,
    **json_items: Any,
) -> bool:
    """Queue a save of ``step``; ``json_items``: more JSON items (``prior_config``, ``meta``).
    Returns whether a save was started."""
    args = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_json(config))}
    if data_iterator is not None:
        # The position is global (`percov2_jax.data.pipeline.BatchIterator`): orbax writes the
        # JSON once, from the primary process.
        args[DATA] = ocp.args.JsonSave(data_iterator.get_state())
    for name, value in json_items.items():
        if name not in JSON_ITEMS:
            raise ValueError(f"unknown checkpoint item {name!r}; JSON items are {JSON_ITEMS}")
        args[name] = ocp.args.JsonSave(value)
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(
    manager: ocp.CheckpointManager, abstract_state: Any, shardings: Any, data_iterator: Any, step: int | None = None
) -> tuple[int, Any]:
    """Restore ``step`` (default: the latest complete one) onto ``shardings``; the data iterator
    is restored in place, whatever process layout saved it. Returns ``(step, state)``."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {manager.directory}")
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    args = {STATE: ocp.args.StandardRestore(target)}
    if data_iterator is not None:
        args[DATA] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    if data_iterator is not None:
        data_iterator.set_state(restored[DATA])
    return step, restored[STATE]


def latest_step(run: RunDir, step: int | None = None) -> int:
    """``step`` if given and complete, else the newest complete step; FileNotFoundError naming the
    run when there is none."""
    manager = ocp.CheckpointManager(run.checkpoints)
    try:
        steps = manager.all_steps()
    finally:
        manager.close()
    if not steps:
        raise FileNotFoundError(f"{run.root}: no complete checkpoint in {run.checkpoints}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"{run.root}: no checkpoint of step {step} (it has {sorted(steps)})")
    return step


def _item_path(run: RunDir, step: int, item: str) -> epath.Path:
    return run.checkpoints / str(step) / item


def read_json(run: RunDir, item: str = CONFIG, step: int | None = None) -> dict | None:
    """A JSON item (``config``, ``prior_config``, ``meta``) of ``step`` (default: the latest);
    None when that checkpoint has no such item."""
    step = latest_step(run, step)
    if not _item_path(run, step, item).exists():
        return None
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(_item_path(run, step, item))


def state_metadata(run: RunDir, step: int) -> Any:
    """The saved train state's tree of array metadata (shapes and dtypes; None for absent fields)."""
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return checkpointer.metadata(_item_path(run, step, STATE)).item_metadata.tree


def restore_subtree(run: RunDir, step: int, target: dict[str, Any]) -> dict[str, Any]:
    """The parts of the saved train state that ``target`` names (e.g. ``{"params": ..., "vq_stats":
    ...}``, a tree of ``jax.ShapeDtypeStruct`` with shardings), read straight onto their shardings;
    nothing else (optimizer moments) is read."""
    restore_args = jax.tree_util.tree_map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(
            _item_path(run, step, STATE),
            args=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True),
        )


def config_json(config: Any) -> dict:
    """A config (``ConfigDict`` or plain) as a JSON-able dict."""
    if hasattr(config, "to_json"):
        return json.loads(config.to_json())
    return json.loads(json.dumps(config))
