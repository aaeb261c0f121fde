"""Subprocess body of the sharded / multi-process prior tests (tests/test_prior_training.py).

  python tests/prior_check.py --stage1 DIR --workdir W --output OUT \\
      --runs '[[[[1,1,1],3]], [[[4,2,1],2], [[1,2,4],1]]]'

Each run is a list of segments ``[[data, fsdp, tensor], steps]``, trained one after the other
in the run's own workdir (from the checkpoint there, if any, whatever mesh and process count
wrote it), in float64, with a checkpoint between segments and at the end. A segment on another
mesh than the previous one starts a new `PriorTrainer`, which restores that checkpoint onto its
mesh. A segment on the same mesh keeps the trainer and rewinds: it trains its steps once (thrown
away), `restore()`s the checkpoint (state and data position) and trains them again; so restoring
is checked without compiling anything twice. A mesh of n devices uses the first n devices.
Process 0 writes ``OUT_{i}.npz`` (per-step losses, final parameters) for run ``i``.
Multi-process: ``--num-processes N --process-id I --port P`` joins ``jax.distributed`` on
127.0.0.1 first.
"""

from __future__ import annotations

import argparse
import json


def run(stage1_model, stage1: str, workdir: str, segments: list):
    """``(losses, params gathered to host numpy)`` after training ``segments`` in ``workdir``;
    ``stage1_model``: the `Stage1Model` of ``stage1``, loaded once for all runs."""
    import jax
    import numpy as np
    import train_setup
    from jax.experimental import multihost_utils

    from percov2_jax.train.prior import PriorTrainer

    losses, trainer, mesh_of_trainer, start = [], None, None, None
    try:
        for mesh, steps in segments:
            if trainer is not None:
                trainer.save()
            if mesh != mesh_of_trainer:
                if trainer is not None:
                    trainer.close()
                    trainer = None
                config = train_setup.prior_test_config(stage1)
                config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
                config.prior.dtype = config.prior.param_dtype = "float64"
                devices = jax.devices()[: int(np.prod(mesh))]
                trainer, mesh_of_trainer = PriorTrainer(config, workdir, devices, stage1_model), mesh
                start = trainer.step if start is None else start
            else:
                trainer.train_steps(steps)  # moves the state and the data on; restore() must undo both
                trainer.restore()
            assert trainer.step == start + len(losses), (trainer.step, start, len(losses))
            losses += [h["bits_per_token"] for h in trainer.train_steps(steps)]
        trainer.save()
        params = multihost_utils.process_allgather(trainer.params, tiled=True)
    finally:
        if trainer is not None:
            trainer.close()
    return losses, jax.tree.map(np.asarray, params)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage1", required=True, help="the stage-1 workdir whose tokens the prior learns")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--runs", required=True, help="JSON list of runs, each a list of [[data, fsdp, tensor], steps]")
    ap.add_argument("--output", required=True)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    if args.num_processes > 1:
        jax.distributed.initialize(
            f"127.0.0.1:{args.port}", args.num_processes, args.process_id, initialization_timeout=120
        )
    import train_setup

    from percov2_jax.runs.stage1 import load_stage1

    stage1_model = load_stage1(args.stage1)
    for i, segments in enumerate(json.loads(args.runs)):
        losses, params = run(stage1_model, args.stage1, f"{args.workdir}/{i}", segments)
        if jax.process_index() == 0:
            train_setup.save_result(f"{args.output}_{i}.npz", losses, params)
        path = " -> ".join(f"{'x'.join(map(str, mesh))} ({steps})" for mesh, steps in segments)
        print(f"process {args.process_id} run {i} {path}: losses {losses}", flush=True)


if __name__ == "__main__":
    main()
