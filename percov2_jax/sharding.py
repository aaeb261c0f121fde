"""Where logical axes live on the device mesh: the one rule table, the mesh builder, and how
batches and replicated values are placed on a mesh.

Every parameter and sharded activation in percov2-jax carries *logical* axis names (what an
axis means: ``embed``, ``heads``, ``mlp`` ...). This module alone decides *where* each logical
axis lives on the physical mesh ``(data, fsdp, tensor)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or axes or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    # Transformer weights: FSDP over the model width, tensor parallel over heads / MLP.
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("adaln", "tensor"),  # the 6D/9D/2D modulation outputs of the adaptive norms
    ("head_dim", None),  # qk-norm scales
    ("cond_in", None),  # inputs of the timestep / pooled-text / caption projections
    ("patch_in", None),  # the patchifier's (p, p, C_in) input side
    ("patch_out", None),  # proj_out's p*p*C_out outputs
    ("pos", None),  # the flattened position table
    ("layers", None),  # the stacked axis of scanned blocks
    # Text encoders.
    ("vocab", "tensor"),  # token tables (49408 CLIP, 32128 T5 rows)
    ("proj", None),  # CLIP's text projection output
    ("rel_buckets", None),  # T5's relative-position bucket table
    # Vector quantizer: small, replicated (EMA statistics are updated from global batch sums).
    ("vq_in", None),
    ("code_dim", None),
    ("codebook", None),
    # Convolutional (VAE, hyper-encoder) weights: small, replicated.
    ("conv_in", None),
    ("conv_out", None),
    ("norm", None),
)


def mesh_sizes(data: int, fsdp: int, tensor: int, device_count: int) -> dict[str, int]:
    """``{"data": D, "fsdp": F, "tensor": T}`` with the one ``-1`` entry (if any) filled so that
    ``D * F * T == device_count``; ValueError names a split that does not fit."""
    sizes = [int(data), int(fsdp), int(tensor)]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis size may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive (or one -1), got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if device_count % known:
            raise ValueError(f"{device_count} devices do not divide into mesh sizes {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = device_count // known
    if int(np.prod(sizes)) != device_count:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {device_count}")
    return dict(zip(MESH_AXES, sizes))


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axes; one size may be -1 (fill the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_shardings(abstract_boxed_params: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a boxed (``nn.LogicallyPartitioned``) parameter tree.

    Args:
      abstract_boxed_params: output of ``jax.eval_shape(module.init, ...)["params"]``.
    Returns the unboxed tree of ``NamedSharding``.
    """
    specs = nn.get_partition_spec(abstract_boxed_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def abstract_variables(module: nn.Module, example_inputs: tuple, mesh: Mesh) -> tuple[Any, Any]:
    """``(abstract, shardings)`` of every variable collection ``module.init(*example_inputs)``
    makes: unboxed ``jax.ShapeDtypeStruct`` trees and the matching NamedShardings from the
    parameters' logical axes. Nothing is allocated."""
    from percov2_jax.models.layers import unboxed

    boxed = abstract_boxed_variables(module, example_inputs)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_AXIS_RULES)
    return unboxed(boxed), shardings


def abstract_boxed_variables(module: nn.Module, example_inputs: tuple) -> Any:
    """``jax.eval_shape`` of ``module.init(*example_inputs)``: every variable collection, its
    leaves boxed with their logical axes (``nn.get_partition_spec`` reads them)."""
    rngs = {"params": jax.random.key(0), "vq": jax.random.key(0)}
    return jax.eval_shape(lambda: module.init(rngs, *example_inputs))


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``abstract`` carrying the matching ``shardings``."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value held whole on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values (the same on every process) -> global arrays replicated over ``mesh``.

    Works across processes, where ``jax.device_put`` cannot target non-addressable devices.
    """
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``(data, fsdp)``, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("activation_batch",), LOGICAL_AXIS_RULES)
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_multiple(mesh: Mesh | None) -> int:
    """Rows a batch must be a multiple of to split over ``(data, fsdp)`` (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


def place_padded_batch(x, mesh: Mesh | None) -> jax.Array:
    """A host batch padded (its last row repeated) to `batch_multiple` rows and placed with
    `batch_sharding` (on the default device without a mesh); callers drop the padding rows.
    For a process-local mesh (the codec, the evaluation)."""
    x = np.asarray(x)
    m = batch_multiple(mesh)
    if len(x) % m:
        x = np.concatenate([x, np.repeat(x[-1:], m - len(x) % m, axis=0)])
    return jax.numpy.asarray(x) if mesh is None else jax.device_put(x, batch_sharding(mesh))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process's rows ``{name: [b, ...]}`` -> global arrays ``[b * process_count, ...]`` split
    over the batch axes of a mesh spanning every process (training)."""
    sharding, count = batch_sharding(mesh), jax.process_count()
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        out[name] = jax.make_array_from_process_local_data(sharding, value, (value.shape[0] * count,) + value.shape[1:])
    return out


@contextlib.contextmanager
def activation_constraints(mesh: Mesh | None) -> Iterator[None]:
    """Trace model code under this for its ``nn.with_logical_constraint`` calls to take effect.

    Outside it flax makes them no-ops (no rules, no mesh), and XLA's sharding propagation alone
    may then keep a batch-sharded activation whole on every device (at SD3-medium size, 32-way
    FSDP, it did: 56.6 GiB of temporaries per device for one image per device). With ``mesh=None``
    (one device, no mesh) nothing is constrained.
    """
    if mesh is None:
        yield
        return
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def constrain_batch(x: jax.Array) -> jax.Array:
    """Split ``x``'s leading axis over the batch axes (no-op outside `activation_constraints`).

    For arrays whose sharding XLA cannot infer from the inputs: the sampler's noise (drawn for
    one image and broadcast) and the latents entering the VAE decoder.
    """
    return nn.with_logical_constraint(x, ("activation_batch",) + (None,) * (x.ndim - 1))
