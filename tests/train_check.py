"""Run by test_train.py in fresh processes: train the test config on given meshes (one process
with virtual CPU devices, or several processes joined by jax.distributed) and save the per-step
losses and the final parameters for comparison with the single-device run.

  python tests/train_check.py --workdir W --output OUT --runs '[[[1,1,1],3], [[4,1,1],1]]'

Run ``i`` is ``[[data, fsdp, tensor], steps]``: it trains ``steps`` steps in ``W/i`` on the first
``data*fsdp*tensor`` devices, resuming from the checkpoint there if one exists (written by any
mesh and process count), and checkpoints at the end. Process 0 writes ``OUT_{i}.npz``.
"""

from __future__ import annotations

import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--runs", required=True, help="JSON list of [[data, fsdp, tensor], steps]")
    ap.add_argument("--output", required=True, help="npz path prefix (one file per run)")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--x64", action="store_true", help="float64 params and compute")
    args = ap.parse_args()

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)

    if args.num_processes > 1:
        jax.distributed.initialize(
            f"127.0.0.1:{args.port}", args.num_processes, args.process_id, initialization_timeout=120
        )
    import train_setup

    for i, ((data, fsdp, tensor), steps) in enumerate(json.loads(args.runs)):
        config = train_setup.test_config(x64=args.x64)
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
        devices = jax.devices()[: data * fsdp * tensor]
        losses, params = train_setup.run_steps(config, f"{args.workdir}/{i}", steps, devices=devices, save=True)
        if jax.process_index() == 0:
            train_setup.save_result(f"{args.output}_{i}.npz", losses, params)
        print(f"process {args.process_id} mesh {data}x{fsdp}x{tensor}: losses {losses}", flush=True)


if __name__ == "__main__":
    main()
