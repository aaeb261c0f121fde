"""A plan's numbers as JSON-ready dicts and a human-readable table."""

from __future__ import annotations

import dataclasses
from typing import Any

from percov2_jax.planning.devices import DEVICE_KINDS, GIB, DeviceKind
from percov2_jax.planning.plan import CompiledCost, step_seconds


def cost_record(cost: CompiledCost, kind: DeviceKind, devices: int, mfu: float) -> dict[str, Any]:
    record = dataclasses.asdict(cost)
    record.update(
        peak_bytes=cost.peak_bytes,
        fits=not cost.out_of_memory and cost.peak_bytes <= kind.memory_bytes,
        memory_bytes=kind.memory_bytes,
        seconds_at_mfu={k.name: step_seconds(cost, k, devices, mfu) for k in DEVICE_KINDS.values()},
    )
    return record


def describe(record: dict[str, Any], header: dict[str, Any]) -> str:
    """Lines for one compiled program."""
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    kind = DEVICE_KINDS[header["device_kind"]]
    where = "TPU compiler" if kind.compiled_for_real else "XLA:CPU (a proxy: no GPU compiler here)"
    mfu = header["mfu"]
    if record.get("out_of_memory"):
        return "\n".join(
            [
                f"{record['name']}  ({where}, {record['compile_seconds']:.0f} s)",
                f"  DOES NOT FIT on one {kind.name} ({gib(record['memory_bytes'])}): the compiler needs at least "
                f"{gib(record['temp_bytes'])} of temporaries per device ({record['out_of_memory']})",
            ]
        )
    lines = [
        f"{record['name']}  ({where}, compiled in {record['compile_seconds']:.0f} s)",
        f"  per device: arguments {gib(record['argument_bytes'])}, outputs {gib(record['output_bytes'])} "
        f"(donated/aliased {gib(record['alias_bytes'])}), temporaries {gib(record['temp_bytes'])}, "
        f"code {gib(record['code_bytes'])}",
        f"  peak {gib(record['peak_bytes'])} of {gib(record['memory_bytes'])} per {kind.name}: "
        + ("fits" if record["fits"] else "DOES NOT FIT"),
        f"  model FLOPs per call (global, matmuls): {record['model_flops']:.3e}; XLA per-device program: "
        + (f"{record['xla_flops']:.3e}" if record["xla_flops"] is not None else "not reported"),
        f"  seconds per call at {mfu:.0%} MFU on {header['devices']} devices: "
        + ", ".join(f"{k} {s:.3g}" for k, s in record["seconds_at_mfu"].items()),
    ]
    return "\n".join(lines)


def markdown_row(record: dict[str, Any], header: dict[str, Any]) -> str:
    """``| device | mesh | program | batch | remat | args | temps | peak | fits | s @ MFU |``"""
    gib = lambda b: f"{b / GIB:.1f}" if b >= 0 else "?"  # noqa: E731
    kind = header["device_kind"]
    if record.get("out_of_memory"):
        return (
            f"| {kind} x{header['devices']} | {header['mesh']} | {record['name']} | "
            f"{header['batch'][record['name']]} | {header['remat_policy']} | ? | > {gib(record['temp_bytes'])} "
            f"| > {gib(record['memory_bytes'])} | no (compiler: out of memory) | - |"
        )
    return (
        f"| {kind} x{header['devices']} | {header['mesh']} | {record['name']} | {header['batch'][record['name']]} "
        f"| {header['remat_policy'] if record['name'].startswith('train_step') else '-'} "
        f"| {gib(record['argument_bytes'])} | {gib(record['temp_bytes'])} "
        f"| {gib(record['peak_bytes'])} / {gib(record['memory_bytes'])} | {'yes' if record['fits'] else 'no'} "
        f"| {record['seconds_at_mfu'][kind]:.2f} |"
    )


MARKDOWN_HEADER = (
    "| devices | mesh | program | global batch | remat | arguments GiB | temporaries GiB | peak / HBM GiB "
    "| fits | s per call @ MFU |\n|---|---|---|---|---|---|---|---|---|---|"
)
