"""Code a token map with a masked-image-model prior along a schedule, and decode it back.

Encoder and decoder run *the same computation* at every step: one jitted call of the prior on a
batch of one map ``[1, H, W]`` with the groups before the step revealed, softmax in float32,
then `coder.quantize_probabilities` on the step's positions. So the frequency tables agree bit
for bit on the same binary and device kind (see `coder.quantize_probabilities` for what holds
across machines). The encoder deliberately does not batch the steps: a batched call compiles to
another program whose float rounding may differ from the decoder's step-by-step calls.

Hybrid mode: only the first ``k`` groups are coded; the decoder completes the rest with the
prior (`mim.hybrid_complete`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.entropy import coder
from percov2_jax.entropy.schedules import Schedule


def make_step_probabilities(apply_fn: Callable) -> Callable:
    """``fn(params, tokens [1, H, W] int32, revealed [1, H, W] bool, caption) -> probs [H*W, V] float32``.

    ``apply_fn`` is the prior's ``model.apply``; the result is jitted once per grid shape, and
    comes from `percov2_jax.compilation_cache`'s store while it is on.
    """
    from percov2_jax.compilation_cache import stored

    @jax.jit
    def probabilities(params, tokens, revealed, caption):
        logits = apply_fn({"params": params}, tokens, revealed, caption)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, logits.shape[-1])

    module = getattr(apply_fn, "__self__", None)  # the prior, whose config the program depends on
    return probabilities if module is None else stored(identity=repr(module))(probabilities)


def _caption_batch(caption):
    return None if caption is None else jnp.asarray(caption, jnp.float32).reshape(1, -1)


def _dispatch(probabilities, params, known: np.ndarray, revealed: np.ndarray, caption) -> jax.Array:
    """Start one prior pass (asynchronously). The inputs are copied on the host first: a transfer
    may read its numpy buffer after this returns, and the caller goes on mutating ``revealed``."""
    return probabilities(
        params, jnp.asarray(np.array(known[None], np.int32)), jnp.asarray(np.array(revealed[None])), caption
    )


def _tables(probs: jax.Array, group: np.ndarray, precision: int) -> np.ndarray:
    """Wait for a pass and quantise its probabilities at the group's positions."""
    return coder.quantize_probabilities(np.asarray(jax.device_get(probs))[group], precision=precision)


def encode_with_prior(
    probabilities: Callable,
    params: Any,
    tokens: np.ndarray,
    schedule: Schedule,
    *,
    caption=None,
    groups: int | None = None,
    precision: int = coder.DEFAULT_PRECISION,
) -> tuple[bytes, list[float]]:
    """Range-code ``tokens [H, W]`` group by group; returns ``(payload, bits_per_step)``.

    ``groups``: code only the first ``groups`` schedule groups (hybrid mode); default all.
    ``bits_per_step`` is the ideal code length of each step under the quantised tables.
    """
    tokens = np.asarray(tokens)
    if tokens.shape != (schedule.height, schedule.width):
        raise ValueError(f"tokens {tokens.shape} do not match the {schedule.height}x{schedule.width} schedule")
    count = schedule.num_steps if groups is None else groups
    if not 0 <= count <= schedule.num_steps:
        raise ValueError(f"groups must be in [0, {schedule.num_steps}], got {groups}")
    caption = _caption_batch(caption)
    encoder = coder.TokenEncoder(precision)
    revealed = np.zeros(tokens.shape, bool)
    flat = tokens.reshape(-1)
    bits = []
    # The encoder knows every token, so all passes are dispatched first and the device computes
    # pass g+1.. while the host range-codes group g. Each pass is the decoder's own call (same
    # program, same inputs), so the tables are bit-identical to the decoder's.
    passes = []
    for group in schedule.groups[:count]:
        passes.append(_dispatch(probabilities, params, tokens * revealed, revealed, caption))
        revealed.reshape(-1)[group] = True
    for group, probs in zip(schedule.groups[:count], passes):
        tables = _tables(probs, group, precision)
        symbols = flat[group]
        encoder.encode_step(tables, symbols)
        bits.append(float(-np.sum(np.log2(tables[np.arange(len(group)), symbols] / 2.0**precision))))
    return encoder.finish(), bits


def decode_with_prior(
    probabilities: Callable,
    params: Any,
    payload: bytes,
    schedule: Schedule,
    *,
    caption=None,
    groups: int | None = None,
    precision: int = coder.DEFAULT_PRECISION,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode_with_prior`: ``(tokens [H, W] int32, revealed [H, W] bool)``; positions of
    groups that were not coded are 0 and not revealed (complete them with `mim.hybrid_complete`)."""
    count = schedule.num_steps if groups is None else groups
    if not 0 <= count <= schedule.num_steps:
        raise ValueError(f"groups must be in [0, {schedule.num_steps}], got {groups}")
    caption = _caption_batch(caption)
    decoder = coder.TokenDecoder(payload, precision)
    shape = (schedule.height, schedule.width)
    tokens = np.zeros(shape, np.int32)
    revealed = np.zeros(shape, bool)
    for group in schedule.groups[:count]:
        tables = _tables(_dispatch(probabilities, params, tokens, revealed, caption), group, precision)
        tokens.reshape(-1)[group] = decoder.decode_step(tables)
        revealed.reshape(-1)[group] = True
    decoder.finish()
    return tokens, revealed
