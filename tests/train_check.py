"""Run by test_train.py in fresh processes: train the test config for a few steps on a given
mesh (one process with 8 virtual devices, or several processes joined by jax.distributed) and
save the per-step losses and the final parameters for comparison with the single-device run."""

from __future__ import annotations

import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--meshes", required=True, help="JSON list of [data, fsdp, tensor]")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--output", required=True, help="npz path prefix (one file per mesh)")
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

    for i, (data, fsdp, tensor) in enumerate(json.loads(args.meshes)):
        config = train_setup.test_config(x64=args.x64)
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
        losses, params = train_setup.run_steps(config, f"{args.workdir}/{i}", args.steps)
        if jax.process_index() == 0:
            train_setup.save_result(f"{args.output}_{i}.npz", losses, params)
        print(f"process {args.process_id} mesh {data}x{fsdp}x{tensor}: losses {losses}", flush=True)


if __name__ == "__main__":
    main()
