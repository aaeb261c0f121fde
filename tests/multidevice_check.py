"""Run by test_sharded.py in fresh processes (XLA_FLAGS set by the parent): load a converted
SD3 straight onto a (data=1, fsdp=2, tensor=4) mesh, run it under the logical-axis rules,
and compare with the reference output. One process with 8 devices, or several processes
joined by jax.distributed (multi-host)."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--t5", required=True)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()

    import jax

    if args.num_processes > 1:
        jax.distributed.initialize(
            f"127.0.0.1:{args.port}", args.num_processes, args.process_id, initialization_timeout=120
        )
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from percov2_jax import pretrained, sharding
    from percov2_jax.convert import load_diffusers_component, load_transformers_component

    assert jax.device_count() == 8, jax.devices()
    # Not 2 x 2 x 2: XLA:CPU (jax 0.10.2) miscompiles the MM-DiT on three non-trivial mesh axes
    # (experiments/mesh_self_check.py); fsdp and tensor both shard the weights here.
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    data = dict(np.load(args.inputs))
    replicated = NamedSharding(mesh, P())

    def global_array(x):
        return jax.make_array_from_callback(x.shape, replicated, lambda idx: x[idx])

    inputs = [global_array(data[k]) for k in ("latents", "context", "pooled", "timestep")]
    for source in ("folder", "checkpoint"):
        if source == "folder":
            module, params = load_diffusers_component(args.folder, mesh=mesh, scan_layers=True)
        else:
            module, params = pretrained.load(args.checkpoint, mesh=mesh)["transformer"]
        # Parameters sit on their logical-axis shardings: q/k/v kernels are (embed -> fsdp, heads -> tensor).
        to_q = (
            params["transformer_blocks_0_to_1"]["attn"]["to_q"]["kernel"]
            if source == "folder"
            else params["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
        )
        spec = to_q.sharding.spec
        assert tuple(spec)[-2:] == ("fsdp", "tensor"), (source, spec)
        assert len(to_q.addressable_shards) == 8 // args.num_processes
        with sharding.activation_constraints(mesh):
            out = jax.jit(module.apply, out_shardings=replicated)({"params": params}, *inputs)
        out = np.asarray(out.addressable_data(0))
        err = np.abs(out - data["reference"]).max() / np.abs(data["reference"]).max()
        print(f"process {args.process_id} {source}: relative error {err:.2e}", flush=True)
        if not err <= 1e-5:
            sys.exit(1)

    # The T5 encoder shards the same way: vocab and heads/mlp over tensor, embed over fsdp.
    module, params = load_transformers_component(args.t5, mesh=mesh)
    assert tuple(params["shared"]["embedding"].sharding.spec) == ("tensor", "fsdp"), params["shared"][
        "embedding"
    ].sharding
    ids = global_array(data["t5_ids"])
    with sharding.activation_constraints(mesh):
        out = jax.jit(lambda p, i: module.apply({"params": p}, i).last_hidden_state, out_shardings=replicated)(
            params, ids
        )
    out = np.asarray(out.addressable_data(0))
    err = np.abs(out - data["t5_reference"]).max() / np.abs(data["t5_reference"]).max()
    print(f"process {args.process_id} t5: relative error {err:.2e}", flush=True)
    if not err <= 1e-5:
        sys.exit(1)


if __name__ == "__main__":
    main()
