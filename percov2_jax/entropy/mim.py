"""The masked-image-model (MIM) prior over hyper-latent token maps (docs/method.md §4.2, §5).

A MaskGIT-style bidirectional transformer: it sees a token map in which only the ``revealed``
positions carry their token, every other position a learned mask embedding, and predicts a
categorical distribution over the V codes at every position. With a coding schedule
(``percov2_jax.entropy.schedules``) it codes group ``i`` given groups ``< i``; the ideal code
length of an image is ``sum_i sum_{j in G_i} -log2 p(y_j | y_{G<i})``.

Design (choices where the sources are silent; docs/method.md §4.2, §9):

- Input: token embedding ``[V, D]`` plus a separate learned mask embedding (the "index V" token
  of the usual ``V + 1`` table, held apart so the ``V``-row table shards evenly over
  ``vocab``). Unrevealed token values are never read: they are selected away with
  ``jnp.where`` before any arithmetic, so logits do not depend on them, exactly.
- Positions: learned *factorised* embeddings, ``row[r] + col[c]`` from two ``[max_side, D]``
  tables, so one set of parameters serves every grid up to ``max_side`` on each side
  (8x8, 12x8, 32x32, 48x32 ...).
- Caption conditioning (``caption_dim`` set): the pooled caption embedding ``[B, P]`` is
  projected to one extra token prepended to the sequence (all layers attend to it; its output
  is dropped). With ``caption=None`` a learned "null caption" token takes its place, so one
  model can also code without a caption (and be trained with caption dropout). A prepended
  token keeps the blocks identical to the unconditional model; adaptive LayerNorm would add
  ``O(D^2)`` modulation parameters per block for a one-vector condition.
- Blocks: pre-LN, ``x + attn(LN(x))``, ``x + mlp(LN(x))``; ``Attention`` and ``FeedForward``
  from ``percov2_jax.models.attention`` (tanh-GELU MLP of width ``mlp_ratio * D``). Final
  LayerNorm and a dense layer to V logits, returned in float32.

Training (M2T): uniformly random masked fraction in [5 %, 99 %] (or MaskGIT's cosine ratio),
cross-entropy in bits on the masked positions only, which is the expected code length.

Coding helpers take ``apply_fn = model.apply`` (called as ``apply_fn({"params": params},
tokens, revealed, caption)``; pass ``jax.jit(model.apply)`` to compile once per shape) and work
on one image ``[H, W]``. The actual range coder is ``percov2_jax.entropy.coder``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.entropy.schedules import Schedule
from percov2_jax.models.attention import Attention, FeedForward
from percov2_jax.models.layers import Dtype, LayerNorm, config_from_dict, config_to_dict, dense, embed

_LN2 = math.log(2.0)
MASK_SCHEMES = ("uniform", "cosine")
_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


def transformer_config_problems(config) -> list[str]:
    """What is wrong with the transformer fields a prior config shares (`MIMConfig`, the VAR's
    ``VARConfig``): sizes, head split, vocabulary, caption width, dropout; [] when nothing."""
    problems = []
    for name in ("vocab_size", "width", "num_layers", "num_heads", "mlp_ratio", "max_side"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{name} must be a positive int, got {value!r}")
    if not problems and config.width % config.num_heads:
        problems.append(f"width ({config.width}) must be divisible by num_heads ({config.num_heads})")
    if not problems and config.vocab_size < 2:
        problems.append(f"vocab_size must be >= 2, got {config.vocab_size}")
    caption_dim = config.caption_dim
    if caption_dim is not None and (
        not isinstance(caption_dim, int) or isinstance(caption_dim, bool) or caption_dim <= 0
    ):
        problems.append(f"caption_dim must be None or a positive int, got {caption_dim!r}")
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {config.dropout}")
    return problems


@dataclasses.dataclass(frozen=True)
class MIMConfig:
    """Shape of the MIM prior. Defaults: M2T's "Base" transformer (12 x 768, 12 heads) over a
    256-code vocabulary; ``caption_dim=None`` is unconditional."""

    vocab_size: int = 256
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    max_side: int = 64
    caption_dim: int | None = None
    dropout: float = 0.0

    def __post_init__(self):
        problems = transformer_config_problems(self)
        if problems:
            raise ValueError("invalid MIMConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MIMConfig:
        """From a ``to_dict`` dict; ``_``-prefixed keys are ignored, unknown keys raise."""
        return config_from_dict(cls, d, "MaskedTokenPrior")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "MaskedTokenPrior")


# --------------------------------------------------------------------------------------------
# The model


class _Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``; ``[B, L, D]``."""

    config: MIMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(cfg.width, eps=1e-6, name="norm1", **kw)(x)
        h, _ = Attention(cfg.width, cfg.num_heads, cfg.head_dim, name="attn", **kw)(h)
        x = x + self._dropout(h, train)
        h = LayerNorm(cfg.width, eps=1e-6, name="norm2", **kw)(x)
        h = FeedForward(cfg.width, cfg.mlp_ratio, name="mlp", **kw)(h)
        x = x + self._dropout(h, train)
        return nn.with_logical_constraint(x, _ACTIVATION)

    def _dropout(self, x: jax.Array, train: bool) -> jax.Array:
        if self.config.dropout == 0.0:
            return x
        return nn.Dropout(self.config.dropout)(x, deterministic=not train)


class MaskedTokenPrior(nn.Module):
    """``(tokens [B, H, W] int, revealed [B, H, W] bool, caption [B, P] | None) -> logits
    [B, H, W, V]`` float32. ``H, W <= max_side``; values of unrevealed tokens are ignored.

    Parameters (logical axes): ``token_embed [V, D]`` (vocab, embed), ``mask_embed [D]``
    (embed), ``row_embed``/``col_embed [max_side, D]`` (pos, embed), ``caption_proj``
    (cond_in, embed) and ``null_caption [D]`` (embed) if ``caption_dim`` is set,
    ``block_{i}`` (see ``_Block``), ``final_norm`` (norm), ``to_logits [D, V]`` (embed, vocab).
    Dropout (``train=True`` and ``config.dropout > 0``) needs a ``dropout`` rng.
    """

    config: MIMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, tokens: jax.Array, revealed: jax.Array, caption: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if tokens.ndim != 3 or revealed.shape != tokens.shape:
            raise ValueError(f"tokens and revealed must both be [B, H, W], got {tokens.shape} and {revealed.shape}")
        b, h, w = tokens.shape
        if h > cfg.max_side or w > cfg.max_side:
            raise ValueError(f"token grid {h}x{w} exceeds max_side={cfg.max_side}")

        revealed = revealed.astype(bool)
        safe_tokens = jnp.where(revealed, tokens, 0).astype(jnp.int32)
        x = embed(cfg.vocab_size, cfg.width, ("vocab", "embed"), name="token_embed", **kw)(safe_tokens)
        mask_embed = self.param(
            "mask_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (cfg.width,),
            self.param_dtype,
        )
        x = jnp.where(revealed[..., None], x, mask_embed.astype(x.dtype))
        rows = embed(cfg.max_side, cfg.width, ("pos", "embed"), name="row_embed", **kw)(jnp.arange(h))
        cols = embed(cfg.max_side, cfg.width, ("pos", "embed"), name="col_embed", **kw)(jnp.arange(w))
        x = (x + rows[None, :, None, :] + cols[None, None, :, :]).astype(self.dtype)
        x = x.reshape(b, h * w, cfg.width)

        n_prefix = 0
        if cfg.caption_dim is not None:
            x = jnp.concatenate([self._caption_token(caption, b), x], axis=1)
            n_prefix = 1
        elif caption is not None:
            raise ValueError("this prior has caption_dim=None; pass caption=None")
        x = nn.with_logical_constraint(x, _ACTIVATION)
        if cfg.dropout > 0.0:
            x = nn.Dropout(cfg.dropout)(x, deterministic=not train)

        for i in range(cfg.num_layers):
            x = _Block(cfg, name=f"block_{i}", **kw)(x, train)

        x = LayerNorm(cfg.width, eps=1e-6, name="final_norm", **kw)(x[:, n_prefix:])
        logits = dense(cfg.vocab_size, ("embed", "vocab"), name="to_logits", **kw)(x)
        return logits.astype(jnp.float32).reshape(b, h, w, cfg.vocab_size)

    def _caption_token(self, caption: jax.Array | None, batch: int) -> jax.Array:
        """One prefix token ``[B, 1, D]``: the projected caption, or the learned null caption."""
        cfg = self.config
        if caption is None:
            null = self.param(
                "null_caption",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                (cfg.width,),
                self.param_dtype,
            )
            # Create the projection too, so params have the same tree with and without a caption.
            if self.is_initializing():
                dense(
                    cfg.width, ("cond_in", "embed"), name="caption_proj", dtype=self.dtype, param_dtype=self.param_dtype
                )(jnp.zeros((1, cfg.caption_dim), self.dtype))
            return jnp.broadcast_to(null.astype(self.dtype), (batch, 1, cfg.width))
        if caption.shape != (batch, cfg.caption_dim):
            raise ValueError(f"caption must be [B, caption_dim] = [{batch}, {cfg.caption_dim}], got {caption.shape}")
        if self.is_initializing():
            self.param(
                "null_caption",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                (cfg.width,),
                self.param_dtype,
            )
        token = dense(
            cfg.width, ("cond_in", "embed"), name="caption_proj", dtype=self.dtype, param_dtype=self.param_dtype
        )(caption.astype(self.dtype))
        return token[:, None, :]


def init_params(model: MaskedTokenPrior, rng: jax.Array, height: int = 8, width: int = 8) -> Any:
    """Boxed (logically partitioned) parameters of ``model``; the tree is the same for any grid."""
    tokens = jnp.zeros((1, height, width), jnp.int32)
    revealed = jnp.zeros((1, height, width), bool)
    return jax.jit(model.init)(rng, tokens, revealed, None)["params"]  # jitted: eager init is slow


# --------------------------------------------------------------------------------------------
# Training


def sample_training_masks(
    rng: jax.Array, batch: int, height: int, width: int, scheme: str = "uniform", low: float = 0.05, high: float = 0.99
) -> jax.Array:
    """Random training masks: bool ``[B, H, W]``, True = revealed. Jit-safe (shapes static).

    Each image masks ``m`` of its ``N = H * W`` positions, chosen uniformly at random:

    - ``"uniform"`` (M2T): fraction ``r ~ U[low, high)``, ``m = round(r N)`` clipped to
      ``[ceil(low N), floor(high N)]``, so ``m / N`` lies in ``[low, high]`` (and ``m >= 1``).
    - ``"cosine"`` (MaskGIT): ``u ~ U[0, 1)``, ``m = ceil(cos(pi u / 2) N)``, at least 1; so
      ``P(m / N <= x) = 1 - 2 arccos(x) / pi`` at ``x = m / N``. ``low``/``high`` are unused.
    """
    n = height * width
    key_ratio, key_order = jax.random.split(rng)
    u = jax.random.uniform(key_ratio, (batch,))
    if scheme == "uniform":
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
        lo = max(1, math.ceil(low * n - 1e-9))
        hi = max(lo, math.floor(high * n + 1e-9))
        num_masked = jnp.clip(jnp.round((low + (high - low) * u) * n), lo, hi)
    elif scheme == "cosine":
        num_masked = jnp.clip(jnp.ceil(jnp.cos(0.5 * jnp.pi * u) * n), 1, n)
    else:
        raise ValueError(f"unknown mask scheme {scheme!r}; choose one of {MASK_SCHEMES}")
    scores = jax.random.uniform(key_order, (batch, n))
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # a uniform random permutation
    revealed = ranks >= num_masked.astype(jnp.int32)[:, None]
    return revealed.reshape(batch, height, width)


def token_log2_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log2 p(tokens)`` under ``logits [..., V]``: float32 ``[...]``."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked / _LN2


def masked_cross_entropy_bits(logits: jax.Array, tokens: jax.Array, revealed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy in bits on the masked (not revealed) positions.

    ``logits [B, H, W, V]``, ``tokens`` and ``revealed [B, H, W]``. Returns ``(mean bits per
    masked token over the whole batch, total bits per image [B])``.
    """
    masked = ~revealed.astype(bool)
    bits = jnp.where(masked, -token_log2_probs(logits, tokens), 0.0)
    per_image = bits.sum(axis=(1, 2))
    mean = per_image.sum() / jnp.maximum(masked.sum(), 1)
    return mean, per_image


def prior_loss(
    apply_fn: Callable,
    params: Any,
    tokens: jax.Array,
    rng: jax.Array,
    caption: jax.Array | None = None,
    *,
    scheme: str = "uniform",
    low: float = 0.05,
    high: float = 0.99,
    train: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sample masks, run the prior, and return ``(bits per masked token, metrics)``.

    ``apply_fn = model.apply``; differentiate with ``jax.grad(prior_loss, argnums=1,
    has_aux=True)``. ``rng`` drives the masks (and dropout, if any). Metrics:
    ``bits_per_token``, ``bits_per_image`` (mean over the batch of the masked tokens' bits)
    and ``masked_fraction``.
    """
    mask_rng, dropout_rng = jax.random.split(rng)
    b, h, w = tokens.shape
    revealed = sample_training_masks(mask_rng, b, h, w, scheme, low, high)
    logits = apply_fn({"params": params}, tokens, revealed, caption, train, rngs={"dropout": dropout_rng})
    mean, per_image = masked_cross_entropy_bits(logits, tokens, revealed)
    metrics = {"bits_per_token": mean, "bits_per_image": per_image.mean(), "masked_fraction": 1.0 - revealed.mean()}
    return mean, metrics


# --------------------------------------------------------------------------------------------
# Coding with a schedule


def step_logits(
    apply_fn: Callable, params: Any, tokens: jax.Array, revealed: jax.Array, caption: jax.Array | None = None
) -> jax.Array:
    """The prior's logits ``[B, H, W, V]`` for one coding step (``revealed`` = groups < i)."""
    return apply_fn({"params": params}, tokens, revealed, caption)


def schedule_log2_probs(
    apply_fn: Callable, params: Any, tokens: Any, schedule: Schedule, caption: Any | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ideal code length of one token map under ``schedule``, all steps in ONE model call.

    ``tokens [H, W]``, ``caption [P]`` or None. The S partial maps (``schedule.masks()``) run as
    a batch of S. Returns ``(log2_probs, bits_per_step)``: float64 ``[H, W]``, the log2
    probability of each true token at the step that codes it, and float64 ``[S]``, the bits of
    each step (``-sum`` of its group's log2 probs). ``-log2_probs.sum()`` is the image's bits.
    """
    tokens = np.asarray(tokens)
    if tokens.shape != (schedule.height, schedule.width):
        raise ValueError(f"tokens {tokens.shape} do not match the {schedule.height}x{schedule.width} schedule")
    masks = schedule.masks()
    s = schedule.num_steps
    batch_tokens = jnp.broadcast_to(jnp.asarray(tokens, jnp.int32), (s, *tokens.shape))
    batch_caption = None if caption is None else jnp.broadcast_to(jnp.asarray(caption), (s, np.shape(caption)[-1]))
    logits = step_logits(apply_fn, params, batch_tokens, jnp.asarray(masks), batch_caption)
    log2_all = _numpy_log2_probs(np.asarray(logits), np.broadcast_to(tokens, (s, *tokens.shape)))  # [S, H, W]
    step_of = schedule.step_of
    log2_probs = np.take_along_axis(log2_all, step_of[None], axis=0)[0]
    bits_per_step = -np.bincount(step_of.ravel(), weights=log2_probs.ravel(), minlength=s)
    return log2_probs, bits_per_step


def _numpy_log2_probs(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``token_log2_probs`` in float64 NumPy (no per-shape compile on the coding path)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(x).sum(axis=-1))
    picked = np.take_along_axis(x, tokens[..., None].astype(np.int64), axis=-1)[..., 0]
    return (picked - log_norm) / _LN2


def hybrid_complete(
    apply_fn: Callable,
    params: Any,
    tokens: Any,
    schedule: Schedule,
    k: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    caption: Any | None = None,
) -> np.ndarray:
    """Hybrid generation (docs/method.md §5): keep groups ``< k`` of ``tokens [H, W]``
    verbatim and fill groups ``k .. S-1`` one step at a time with the prior.

    Step ``i`` conditions on everything revealed so far (transmitted plus generated) and sets
    group ``i`` to the argmax (``temperature == 0``) or to a sample of ``softmax(logits / T)``:
    one ``jax.random.categorical`` draw at every position with key
    ``jax.random.fold_in(jax.random.key(seed), i)``, of which the group's positions are kept. Values of
    ``tokens`` outside the first ``k`` groups are never read. Returns int32 ``[H, W]``. Reproducible for a fixed
    seed on the same binary and device kind; float differences across devices can flip an
    argmax or a sample.
    """
    s = schedule.num_steps
    if not 0 <= k <= s:
        raise ValueError(f"k must be in [0, {s}], got {k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tokens = np.asarray(tokens)
    if tokens.shape != (schedule.height, schedule.width):
        raise ValueError(f"tokens {tokens.shape} do not match the {schedule.height}x{schedule.width} schedule")
    out = np.zeros(schedule.num_positions, np.int32)
    for group in schedule.groups[:k]:
        out[group] = tokens.ravel()[group]
    masks = schedule.masks()
    batch_caption = None if caption is None else jnp.asarray(caption)[None]
    key = jax.random.key(seed)
    for i in range(k, s):
        logits = step_logits(
            apply_fn, params, jnp.asarray(out.reshape(1, *tokens.shape)), jnp.asarray(masks[i][None]), batch_caption
        )
        flat_logits = logits.reshape(-1, logits.shape[-1])  # [H*W, V]
        if temperature == 0.0:
            chosen = np.argmax(np.asarray(flat_logits), axis=-1)
        else:  # one draw per position, of which the group's are kept: a fixed shape, one compile
            chosen = np.asarray(jax.random.categorical(jax.random.fold_in(key, i), flat_logits / temperature, axis=-1))
        group = schedule.groups[i]
        out[group] = chosen[group].astype(np.int32)
    return out.reshape(tokens.shape)
