"""Devices we do not have: compile-only TPU topologies from libtpu, and what each device kind
offers (dense bf16 peak, memory per device).

A TPU topology description (``jax.experimental.topologies.get_topology_desc``) gives devices
that XLA's TPU compiler can target from any machine with ``libtpu`` installed, no TPU attached:
``jit(...).lower(...).compile()`` then returns the real per-device memory and cost analysis.
GPUs have no such path here (no CUDA compiler), so GPU kinds are planned on virtual CPU devices,
whose memory numbers are XLA:CPU's (a proxy, flagged as such in every report).

Must be imported before anything initialises JAX's backends when libtpu comes from
``libtpu_path`` (see ``enable_libtpu``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    """One accelerator: ``jax_kind`` the ``device_kind`` JAX reports for it, ``memory_bytes`` per
    device; its dense bf16 ``peak_flops`` come from `percov2_jax.flops`.

    ``topology`` is the libtpu topology prefix (``v5p``) or None when it cannot be compiled for
    here; ``dims`` is the chip grid's rank (3 for v4/v5p tori, 2 for v5e/v6e).
    """

    name: str
    jax_kind: str
    memory_bytes: float
    topology: str | None
    dims: int = 2
    megacore: bool = False

    @property
    def peak_flops(self) -> float:
        from percov2_jax.flops import peak_flops_of_kind

        return peak_flops_of_kind(self.jax_kind)

    @property
    def compiled_for_real(self) -> bool:
        return self.topology is not None


# Memory is HBM per device (one chip; v4 and v5p run in megacore mode, one device per chip).
DEVICE_KINDS: dict[str, DeviceKind] = {
    "tpu_v4": DeviceKind("tpu_v4", "TPU v4", 32 * GIB, "v4", dims=3, megacore=True),
    "tpu_v5e": DeviceKind("tpu_v5e", "TPU v5e", 16 * GIB, "v5e", dims=2),
    "tpu_v5p": DeviceKind("tpu_v5p", "TPU v5p", 95 * GIB, "v5p", dims=3, megacore=True),
    "tpu_v6e": DeviceKind("tpu_v6e", "TPU v6e", 32 * GIB, "v6e", dims=2),
    "h100": DeviceKind("h100", "NVIDIA H100 80GB HBM3", 80e9, None),
    "a100": DeviceKind("a100", "NVIDIA A100-SXM4-80GB", 80e9, None),
}


def device_kind(name: str) -> DeviceKind:
    if name not in DEVICE_KINDS:
        raise ValueError(f"unknown device kind {name!r}; choose one of {sorted(DEVICE_KINDS)}")
    return DEVICE_KINDS[name]


HOST_CHIPS = (2, 2, 1)  # chips per host (x, y, z): 4 chips per TPU VM host


def chip_grid(count: int, dims: int) -> tuple[int, ...]:
    """The most cubic (or square) power-of-two chip grid with ``count`` chips.

    TPU slices come in power-of-two shapes (v5p-128 is 4x4x4 chips; v5e-32 is 4x8). Slices
    smaller than one host (1 or 2 chips) are ``1x1``/``1x2``; a one-host 3-D slice is ``2x2x1``.
    """
    if count < 1 or count & (count - 1):
        raise ValueError(f"TPU slices have a power-of-two number of chips, got {count}")
    if count < 4:
        return (1, count) + (1,) * (dims - 2)
    if dims == 3 and count == 4:
        return (2, 2, 1)
    exponent = int(math.log2(count))
    sizes = [exponent // dims + (1 if i < exponent % dims else 0) for i in range(dims)]
    return tuple(sorted(2**s for s in sizes))


def host_bounds(count: int, dims: int) -> tuple[int, int, int]:
    """Chips per host for a slice of ``count`` chips (the whole slice when it is under one host)."""
    if count < 4:
        return (1, count, 1)
    return HOST_CHIPS


def topology_name(kind: DeviceKind, count: int) -> str:
    """``v5p:4x4x4`` for 64 v5p chips; hosts hold 2x2x1 chips (3-D kinds) or 2x2 (2-D)."""
    if kind.topology is None:
        raise ValueError(f"{kind.name} has no TPU topology")
    grid = chip_grid(count, kind.dims)
    return f"{kind.topology}:" + "x".join(str(g) for g in grid)


def enable_libtpu(libtpu_path: str | None) -> None:
    """Make ``import libtpu`` work, from an installed package or a ``pip --target`` directory.

    Raises with the install command when neither is found. Sets the environment libtpu reads so
    that, with no TPU attached, it only warns (the host and worker names it would otherwise look up).
    """
    candidates = [p for p in (libtpu_path, os.environ.get("PERCOV2_LIBTPU_PATH")) if p]
    for path in candidates:
        if os.path.isdir(os.path.join(path, "libtpu")):
            if path not in sys.path:
                sys.path.insert(0, path)
            break
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "planning for TPU needs libtpu (the TPU compiler; no TPU is used). Install it with "
            "`pip install 'jax[tpu]'` or `make libtpu` (a private copy in .venv/libtpu, passed with "
            f"--libtpu_path or PERCOV2_LIBTPU_PATH); looked in {candidates or 'the environment'}"
        ) from e
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU to guard: plans may run side by side
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")


def tpu_devices(kind: DeviceKind, count: int) -> list:
    """``count`` compile-only devices of a TPU slice of ``kind`` (all hosts of the slice)."""
    from jax.experimental import topologies

    kw = {"chip_config_name": "megacore"} if kind.megacore else {}
    kw.update(chips_per_host_bounds=host_bounds(count, kind.dims), num_slices=1, wrap=(False,) * 3)
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology_name(kind, count), **kw)
    devices = list(topo.devices)
    if len(devices) != count:
        raise RuntimeError(f"topology {topology_name(kind, count)} gave {len(devices)} devices, expected {count}")
    return devices
