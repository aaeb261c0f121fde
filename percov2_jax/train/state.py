"""The train state and its sharding: built once abstractly, then created (or restored) directly
on the mesh, so no host ever holds a full copy of the model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
from flax import struct
from flax.core import unfreeze
from jax.sharding import Mesh, NamedSharding

from percov2_jax import sharding as sharding_lib
from percov2_jax.models.layers import unboxed
from percov2_jax.train.optimizer import make_optimizer


@struct.dataclass
class TrainState:
    """Everything that changes during stage-1 training.

    ``params`` float32 master weights; ``vq_stats`` the VQ codebook and EMA statistics;
    ``ema_params`` an exponential moving average of ``params`` or ``None``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    vq_stats: Any
    ema_params: Any = None


@struct.dataclass
class StateSpec:
    """Static companions of a ``TrainState``: its shardings, optimizer, mask and schedule."""

    shardings: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    mask: Any = struct.field(pytree_node=False)
    schedule: Callable = struct.field(pytree_node=False)
    abstract: Any = struct.field(pytree_node=False)


def build_state_spec(model: nn.Module, example_inputs: tuple, optim_cfg, mesh: Mesh, *, ema: bool) -> StateSpec:
    """Abstract state, optimizer and shardings for ``model`` on ``mesh`` (no arrays allocated)."""
    abstract_vars, var_shardings = sharding_lib.abstract_variables(model, example_inputs, mesh)
    params = abstract_vars["params"]
    param_shardings = unfreeze(var_shardings["params"])
    tx, mask, schedule = make_optimizer(optim_cfg, params)
    opt_abstract = jax.eval_shape(tx.init, params)
    replicated = sharding_lib.replicated(mesh)
    opt_shardings = _like_params(opt_abstract, params, param_shardings, replicated)
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        vq_stats=unfreeze(var_shardings.get("vq_stats", {})),
        ema_params=param_shardings if ema else None,
    )
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jax.numpy.int32),
        params=params,
        opt_state=opt_abstract,
        vq_stats=abstract_vars.get("vq_stats", {}),
        ema_params=params if ema else None,
    )
    return StateSpec(shardings=shardings, tx=tx, mask=mask, schedule=schedule, abstract=abstract)


def _like_params(tree: Any, params: Any, param_shardings: Any, default: NamedSharding) -> Any:
    """Shardings for an optimizer state: a leaf whose trailing dict keys name a parameter of the same
    shape (Adam's ``mu``/``nu`` mirror the param tree) takes that parameter's sharding."""
    flat = {
        tuple(k.key for k in path): (leaf.shape, shard)
        for (path, leaf), shard in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(param_shardings)
        )
    }

    def pick(path, leaf):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        match = flat.get(tuple(keys))
        return match[1] if match is not None and match[0] == leaf.shape else default

    return jax.tree_util.tree_map_with_path(pick, tree)


def create_train_state(
    model: nn.Module,
    example_inputs: tuple,
    spec: StateSpec,
    seed: int,
    init_params: Callable[..., Any] | None = None,
    init_args: tuple = (),
) -> TrainState:
    """Initialise the state directly onto ``spec.shardings``.

    ``init_params(params, *init_args) -> params`` may replace parts of the fresh parameters inside
    the same jitted function (e.g. insert pretrained SD3 weights widened for the token channels);
    ``init_args`` are passed as jit arguments (already placed arrays), never baked in as constants.
    """

    def init(key, *args):
        k_params, k_vq = jax.random.split(key)
        variables = unboxed(model.init({"params": k_params, "vq": k_vq}, *example_inputs))
        params = variables["params"]
        if init_params is not None:
            params = init_params(params, *args)
        return TrainState(
            step=jax.numpy.zeros((), jax.numpy.int32),
            params=params,
            opt_state=spec.tx.init(params),
            vq_stats=variables.get("vq_stats", {}),
            ema_params=params if spec.shardings.ema_params is not None else None,
        )

    return jax.jit(init, out_shardings=spec.shardings)(jax.random.key(seed), *init_args)
