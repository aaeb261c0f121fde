"""The optimizer: AdamW with warm-up and a schedule, gradient clipping, and trainable subsets.

Frozen parameters get ``optax.set_to_zero`` (no optimizer state is kept for them) and are
left out of the gradient norm. The SD3 position table ``transformer/pos_embed/pos_embed`` is a
buffer in diffusers and is always frozen.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import traverse_util

from percov2_jax.models.layers import unboxed

TRAINABLE_MODES = ("all", "linear", "hyper_encoder")
ALWAYS_FROZEN = (("transformer", "pos_embed", "pos_embed"),)
# Modules that are new in PerCoV2 (not part of pretrained SD3): trained in every mode. The patch
# embedding is here because its zero-initialised token slices must learn, or z_l never enters.
NEW_MODULES = (("hyper_encoder",), ("quantizer",), ("null_text",), ("transformer", "pos_embed", "proj"))


def _startswith(path: tuple[str, ...], prefixes) -> bool:
    return any(path[: len(p)] == p for p in prefixes)


def trainable_mask(params: Any, mode: str) -> Any:
    """A tree of bools like ``params``: True where the parameter is trained.

    Modes: ``all`` (everything but the position table), ``linear`` (the MM-DiT's dense layers,
    PerCo's recipe of tuning about 15% of the denoiser, plus the new modules) and
    ``hyper_encoder`` (only the new modules).
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"unknown trainable mode {mode!r}; choose one of {TRAINABLE_MODES}")
    flat = traverse_util.flatten_dict(unboxed(params))
    kernels = {path[:-1] for path, value in flat.items() if path[-1] == "kernel" and getattr(value, "ndim", 0) == 2}

    def trained(path, value) -> bool:
        if _startswith(path, ALWAYS_FROZEN):
            return False
        if mode == "all" or _startswith(path, NEW_MODULES):
            return True
        if mode == "linear":
            return path[:-1] in kernels and path[-1] in ("kernel", "bias")
        return False

    mask = {path: trained(path, value) for path, value in flat.items()}
    return traverse_util.unflatten_dict(mask)


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warm-up to ``cfg.learning_rate`` then ``constant`` | ``cosine`` | ``linear`` decay to
    ``cfg.end_learning_rate_factor * lr`` at ``cfg.decay_steps`` (defaults to the run length)."""
    lr, warmup = float(cfg.learning_rate), int(cfg.warmup_steps)
    decay_steps = max(int(cfg.decay_steps) - warmup, 1)
    end = lr * float(cfg.get("end_learning_rate_factor", 0.0))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    else:
        raise ValueError(f"unknown learning-rate schedule {cfg.schedule!r}; choose constant, cosine or linear")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(cfg, params: Any) -> tuple[optax.GradientTransformation, Any, optax.Schedule]:
    """``(tx, mask, schedule)`` for the config block ``cfg`` (``config.optim``) and a params tree."""
    schedule = learning_rate_schedule(cfg)
    mask = trainable_mask(params, cfg.trainable)
    if not any(jax.tree_util.tree_leaves(mask)):
        raise ValueError(f"trainable mode {cfg.trainable!r} selects no parameters")
    adamw = optax.adamw(
        schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps), weight_decay=float(cfg.weight_decay)
    )
    train = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)), adamw) if cfg.grad_clip else adamw
    labels = jax.tree_util.tree_map(lambda m: "train" if m else "freeze", mask)
    tx = optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)
    return tx, mask, schedule
