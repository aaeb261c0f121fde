"""Does a sharded MM-DiT forward equal the single-device one on *your* devices, for every mesh?

  python experiments/mesh_self_check.py                            # on a TPU/GPU host: its devices
  python experiments/mesh_self_check.py --virtual-devices 8        # on a CPU host: 8 virtual devices
  python experiments/mesh_self_check.py --quick --out /tmp/mesh    # smoke test: 1 mesh, 4 devices

For each (data, fsdp, tensor) factorisation of the device count (or each of ``--meshes``) it runs
a tiny random MM-DiT (unscanned and scanned blocks) with parameters on their logical-axis
shardings and the batch split over (data, fsdp), and reports the error relative to the output
scale against the same model on one device. Anything above ~1e-5 is a miscompilation, not
rounding.

Each mesh runs twice: without and with the models' activation constraints
(``sharding.activation_constraints``, as the train steps and the codec trace them).

Measured 2026-11-22, jax/jaxlib 0.10.2, XLA:CPU with 8 virtual devices on 2 cores: every mesh
with at most two non-trivial axes agrees to ~5e-7, with or without constraints. (2, 2, 2) is
wrong by ~0.8 (relative) for the unscanned model either way (the attention output differs
although q, k and v agree), and by ~0.9 for the scanned model once the activation constraints
are on. The tests therefore use 4x2x1 and 1x2x4 meshes; on a TPU/GPU host run this check on
the real devices before trusting a three-axis mesh.

``--virtual-devices N`` (the default 4 with ``--quick``) gives XLA's CPU platform N devices, as
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` does; it has to be set before JAX starts,
so this script imports JAX only after reading its arguments.
``--quick`` checks one mesh, ``(1, 2, n/2)`` of the n devices, with 3 blocks (the shallowest
model that still has a scanned run).

Output: ``mesh_self_check.json`` and ``mesh_self_check.md`` in ``--out`` (``_quick`` appended with
``--quick``). A wrong mesh is a result, not a failure: the exit status is 0 either way.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import time

import numpy as np
import results_io

TOLERANCE = 1e-5  # relative; float32 rounding of a resharded forward stays near 1e-6


def model_config(num_layers: int = 4):
    from percov2_jax.models.mmdit import SD3TransformerConfig

    # 4 layers: a scanned run of 3 blocks before the context-only last block (3 still scans a run of 2)
    return SD3TransformerConfig(
        sample_size=16,
        patch_size=2,
        in_channels=32,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=16,
    )


def all_meshes(n: int) -> list[tuple[int, int, int]]:
    return [
        (data, fsdp, n // (data * fsdp))
        for data, fsdp in itertools.product(range(1, n + 1), repeat=2)
        if n % (data * fsdp) == 0
    ]


def quick_mesh(n: int) -> tuple[int, int, int]:
    """The tests' fsdp x tensor mesh (1x2x4 on 8 devices) scaled to ``n`` devices."""
    return (1, 2, n // 2) if n >= 4 and n % 2 == 0 else (1, n, 1)


def fresh_forward(model):
    """``model.apply`` as a new function object: jit traces it again, under the activation
    constraints in force (they are read while tracing), instead of reusing an earlier trace."""
    return lambda p, *a: model.apply(p, *a)


def check(meshes, batch: int, num_layers: int = 4) -> list[dict]:
    """Relative error of every (scan, constraints, mesh) forward against one device."""
    import flax.linen as nn
    import jax

    from percov2_jax import sharding
    from percov2_jax.models.mmdit import SD3Transformer2DModel

    config = model_config(num_layers)
    rng = np.random.RandomState(0)
    inputs = (
        rng.randn(batch, 8, 8, config.in_channels).astype(np.float32),
        rng.randn(batch, 8, config.joint_attention_dim).astype(np.float32),
        rng.randn(batch, config.pooled_projection_dim).astype(np.float32),
        np.full((batch,), 500.0, np.float32),
    )
    rows = []
    for scan in (False, True):
        model = SD3Transformer2DModel(config, scan_layers=scan)
        # jitted: one program instead of op-by-op dispatch, and one the persistent compilation cache can keep
        boxed = jax.jit(model.init)(jax.random.key(0), *inputs)["params"]
        params = nn.meta.unbox(boxed)
        one = jax.devices()[0]
        ref = np.asarray(jax.jit(model.apply)({"params": jax.device_put(params, one)}, *jax.device_put(inputs, one)))
        for shape in meshes:
            if batch % (shape[0] * shape[1]):
                print(f"mesh {shape}: batch {batch} does not split over data x fsdp; skipped", flush=True)
                continue
            mesh = sharding.make_mesh(*shape)
            p = jax.device_put(params, sharding.logical_shardings(boxed, mesh))
            x = [jax.device_put(a, sharding.batch_sharding(mesh)) for a in inputs]
            for constrained in (False, True):  # the models' activation constraints off / on (as trained)
                with sharding.activation_constraints(mesh) if constrained else contextlib.nullcontext():
                    out = jax.jit(fresh_forward(model), out_shardings=sharding.replicated(mesh))({"params": p}, *x)
                err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
                rows.append(
                    {
                        "scan_layers": scan,
                        "constraints": constrained,
                        "mesh": list(shape),
                        "relative_error": err,
                        "agrees": err < TOLERANCE,
                    }
                )
                flag = "" if err < TOLERANCE else "   <-- WRONG"
                print(
                    f"scan_layers={scan!s:5}  constraints={constrained!s:5}  mesh data x fsdp x tensor = "
                    f"{shape[0]} x {shape[1]} x {shape[2]}: relative error {err:.1e}{flag}",
                    flush=True,
                )
    return rows


def markdown(report: dict) -> str:
    quick = " — QUICK smoke run" if report["config"]["quick"] else ""
    wrong = [r for r in report["rows"] if not r["agrees"]]
    lines = [
        f"# Sharded MM-DiT forward vs one device{quick}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {results_io.describe_machine(report['machine'])} {report['devices']} devices "
        f"({report['device_kind']}); {results_io.describe_versions(report['versions'])}. Batch "
        f"{report['batch']}; relative error = max |sharded - one device| / max |one device|; above "
        f"{TOLERANCE:.0e} is a miscompilation, not rounding.",
        "",
        "| mesh (data x fsdp x tensor) | scan_layers | activation constraints | relative error | agrees |",
        "|---|---|---|---:|---|",
    ]
    lines += [
        f"| {' x '.join(map(str, r['mesh']))} | {r['scan_layers']} | {r['constraints']} | "
        f"{r['relative_error']:.1e} | {'yes' if r['agrees'] else '**NO**'} |"
        for r in report["rows"]
    ]
    lines += [
        "",
        f"{len(wrong)} of {len(report['rows'])} disagree." if wrong else f"All {len(report['rows'])} agree.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meshes", default=None, help="DxFxT,... (default: every factorisation of the device count)")
    ap.add_argument(
        "--virtual-devices",
        type=int,
        default=None,
        help="give XLA's CPU platform this many devices (default 4 with --quick)",
    )
    ap.add_argument("--layers", type=int, default=4, help="MM-DiT blocks")
    results_io.add_output_arguments(ap, "one fsdp x tensor mesh of 4 virtual devices, 3 blocks")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers = 3
        if args.virtual_devices is None:
            args.virtual_devices = 4
    if args.meshes is not None:
        args.meshes = [tuple(int(s) for s in m.split("x")) for m in args.meshes.split(",")]
        if any(len(m) != 3 for m in args.meshes):
            ap.error("--meshes wants DxFxT entries, e.g. 4x2x1,1x2x4")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.virtual_devices:  # before JAX starts: XLA reads the flag once
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.virtual_devices}"
        )
    import jax

    started = time.perf_counter()
    n = jax.device_count()
    meshes = args.meshes or ([quick_mesh(n)] if args.quick else all_meshes(n))
    batch = 8 if 8 % n == 0 or n % 8 == 0 else n
    print(f"{n} devices ({jax.devices()[0].device_kind}), jax {jax.__version__}, batch {batch}", flush=True)
    report = {
        "command": results_io.command(),
        "config": {**vars(args), "meshes": meshes},
        "machine": results_io.machine(),
        "versions": results_io.versions("jax", "jaxlib", "flax"),
        "devices": n,
        "device_kind": jax.devices()[0].device_kind,
        "batch": batch,
        "tolerance": TOLERANCE,
    }
    report["rows"] = check(meshes, batch, args.layers)
    results_io.finish_machine(report["machine"])
    report["total_s"] = time.perf_counter() - started
    results_io.write_report(args.out, results_io.stem("mesh_self_check", args.quick), report, markdown(report))


if __name__ == "__main__":
    main()
