"""The explicit-hierarchical VAR prior, PerCoV2's comparison model (docs/method.md §1.1, §4.6).

PerCoV2's own prior (``mim.py`` with the ``implicit_var`` schedule) codes ONE token map
coarse-to-fine; the hierarchy is only in the coding order. The explicit VAR it is compared with
predicts a multi-scale token pyramid ``[S] -> 1x1 -> 2x2 -> 4x4 -> 6x6 -> 8x8`` with a
block-causal transformer, and the last scale is the single-scale token map.

Our reading (the sources leave the tokenizer open; docs/method.md §4.6):

- The pyramid is NOT residual. Scale ``k``'s tokens are the codebook indices (the codec's own
  nearest-code quantiser) of the pre-quantisation hyper-latent features, area-averaged to scale
  ``k``'s shape (`scale_shapes`). The last scale is the full-resolution map, never resized, so
  its tokens are exactly the ones the codec sends otherwise.
- The coarse scales are side information that must be transmitted too: VAR's cost is the code
  length summed over ALL scales, reported per final-grid token (``bits / (H * W)``) so it reads
  like the MIM's bits per token.

Model (`VARPrior`): the sequence is all scales concatenated (``1 + 4 + 16 + 36 + 64 = 121``
positions at 8x8). Block 0's input is a start token (the projected caption, or the learned
``start_embed`` when there is no caption, which then doubles as the "null caption"); block
``k >= 1``'s input is the embedding of scale ``k - 1``'s tokens, nearest-upsampled to shape
``k``. Every block adds a learned scale embedding and factorised positions ``row[r] + col[c]``
in its own grid coordinates. Attention is block-causal (block ``k`` sees blocks ``<= k``), and
block ``k``'s output predicts scale ``k``, so one teacher-forced pass gives every scale's logits.
Pre-LN blocks as in ``mim.py``; masked contributions are exact zeros, so block ``k``'s logits do
not depend on scales ``>= k`` at all, bit for bit.

Coding mirrors ``token_coding.py``: step ``k`` runs the same jitted program on the pyramid with
scales ``>= k`` zeroed and codes scale ``k`` with block ``k``'s quantised softmax.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.entropy import coder
from percov2_jax.entropy.mim import token_log2_probs, transformer_config_problems
from percov2_jax.models.attention import FeedForward, dot_product_attention
from percov2_jax.models.layers import Dtype, LayerNorm, config_from_dict, config_to_dict, dense, embed

_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


# --------------------------------------------------------------------------------------------
# The token pyramid


def scale_shapes(height: int, width: int, scales: Sequence[int] = (1, 2, 4, 6, 8)) -> tuple[tuple[int, int], ...]:
    """Grid shape of every scale: ``(max(1, round(height * s_k / s_K)), same for width)``, with
    ``s_K = scales[-1]`` and rounding half up in exact integer arithmetic.

    Raises ValueError unless the token counts strictly increase and the last shape is
    ``(height, width)``. E.g. 12x8 with the defaults: (2, 1), (3, 2), (6, 4), (9, 6), (12, 8).
    """
    try:
        height, width = operator.index(height), operator.index(width)
        scales = tuple(operator.index(s) for s in scales)
    except TypeError as err:
        raise ValueError(f"height, width and scales must be integers: {err}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"grid must be positive, got {height}x{width}")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty sequence of positive integers, got {scales}")
    last = scales[-1]
    shapes = tuple(
        (max(1, (2 * height * s + last) // (2 * last)), max(1, (2 * width * s + last) // (2 * last))) for s in scales
    )
    counts = [h * w for h, w in shapes]
    if any(b <= a for a, b in zip(counts, counts[1:])):
        raise ValueError(
            f"scales {scales} on a {height}x{width} grid give shapes {shapes} whose token counts "
            f"{counts} do not strictly increase"
        )
    if shapes[-1] != (height, width):
        raise ValueError(f"the last scale's shape {shapes[-1]} is not the grid {height}x{width}")
    return shapes


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """Box-filter weights ``[n_out, n_in]`` float64: the fraction of output cell ``i`` covered by
    input cell ``j`` (rows sum to 1). Overlaps are integers in units of ``1 / n_out``, so exact."""
    i = np.arange(n_out)[:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.minimum((i + 1) * n_in, (j + 1) * n_out) - np.maximum(i * n_in, j * n_out)
    return np.maximum(overlap, 0) / n_in


def area_downsample(features: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Exact area average of ``features [B, H, W, D]`` to ``[B, h, w, D]`` (any ``h <= H``, ``w <= W``)."""
    _, height, width, _ = features.shape
    h, w = shape
    if not (0 < h <= height and 0 < w <= width):
        raise ValueError(f"cannot area-downsample {height}x{width} to {h}x{w}")
    if (h, w) == (height, width):
        return features
    rows = jnp.asarray(area_weights(height, h), features.dtype)
    cols = jnp.asarray(area_weights(width, w), features.dtype)
    return jnp.einsum("hi,bijd,wj->bhwd", rows, features, cols, precision=jax.lax.Precision.HIGHEST)


def pyramid_tokens(
    features: jax.Array, quantize_fn: Callable[[jax.Array], jax.Array], shapes: Sequence[tuple[int, int]]
) -> list[jax.Array]:
    """Token pyramid of ``features [B, H, W, D]`` float: one int32 ``[B, h_k, w_k]`` per shape.

    ``quantize_fn(features [B, h, w, D]) -> indices [B, h, w]`` is the codec's nearest-code
    function. The last shape must be ``(H, W)``; it is not resized, so its tokens are exactly
    ``quantize_fn(features)``.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [B, H, W, D], got {features.shape}")
    shapes = [tuple(s) for s in shapes]
    if not shapes or shapes[-1] != tuple(features.shape[1:3]):
        raise ValueError(f"the last shape must be the feature grid {features.shape[1:3]}, got {shapes}")
    return [jnp.asarray(quantize_fn(area_downsample(features, s)), jnp.int32) for s in shapes]


def sequence_layout(shapes: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Index arrays of the concatenated sequence, ``L = sum h_k w_k`` positions, scales in order
    and each scale row-major: ``scale``, ``row``, ``col`` ``[L]`` (the position's own grid
    coordinates) and ``source [L - h_0 w_0]``: for every position of scales ``k >= 1``, the index
    into the concatenated flat scales ``0 .. K-2`` of the scale-``(k-1)`` token under its centre,
    ``floor((r + 1/2) h_{k-1} / h_k)`` (nearest upsampling in integer arithmetic)."""
    scale, row, col, source = [], [], [], []
    offset = 0
    for k, (h, w) in enumerate(shapes):
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        scale.append(np.full(h * w, k))
        row.append(r.ravel())
        col.append(c.ravel())
        if k:
            ph, pw = shapes[k - 1]
            source.append(offset + ((2 * r + 1) * ph // (2 * h)) * pw + (2 * c + 1) * pw // (2 * w))
            offset += ph * pw
    return {
        "scale": np.concatenate(scale),
        "row": np.concatenate(row),
        "col": np.concatenate(col),
        "source": np.concatenate([s.ravel() for s in source]) if source else np.zeros(0, np.int64),
    }


def block_causal_mask(shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool ``[L, L]``, ``L = sum h_k w_k``: True where the query's scale >= the key's scale."""
    block = np.repeat(np.arange(len(shapes)), [h * w for h, w in shapes])
    return block[:, None] >= block[None, :]


# --------------------------------------------------------------------------------------------
# The model


@dataclasses.dataclass(frozen=True)
class VARConfig:
    """Shape of the VAR prior; transformer defaults as `mim.MIMConfig`. ``scales`` are the
    relative scale sizes of `scale_shapes`; ``caption_dim=None`` is unconditional."""

    vocab_size: int = 256
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    max_side: int = 64
    scales: tuple[int, ...] = (1, 2, 4, 6, 8)
    caption_dim: int | None = None
    dropout: float = 0.0

    def __post_init__(self):
        problems = transformer_config_problems(self)
        scales = tuple(self.scales) if isinstance(self.scales, (list, tuple)) else None
        if (
            not scales
            or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in scales)
            or any(b <= a for a, b in zip(scales, scales[1:]))
        ):
            problems.append(
                f"scales must be a non-empty strictly increasing sequence of positive ints, got {self.scales!r}"
            )
        else:
            object.__setattr__(self, "scales", scales)
        if problems:
            raise ValueError("invalid VARConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VARConfig:
        """From a ``to_dict`` dict; ``_``-prefixed keys are ignored, unknown keys raise."""
        return config_from_dict(cls, d, "VARPrior")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "VARPrior")


class _Block(nn.Module):
    """Pre-LN block with block-causal attention: ``[B, L, D]``, mask ``[L, L]`` bool."""

    config: VARConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, length, _ = x.shape
        h = LayerNorm(cfg.width, eps=1e-6, name="norm1", **kw)(x)
        # Parameter names as `models.attention.Attention` (to_q/k/v, to_out_0), one mask added.
        q, k, v = (
            dense(cfg.width, ("embed", "heads"), name=n, **kw)(h).reshape(b, length, cfg.num_heads, -1)
            for n in ("to_q", "to_k", "to_v")
        )
        h = dot_product_attention(q, k, v, mask=mask[None, None]).reshape(b, length, cfg.width)
        h = dense(cfg.width, ("heads", "embed"), name="to_out_0", **kw)(h)
        x = x + self._dropout(h, train)
        h = LayerNorm(cfg.width, eps=1e-6, name="norm2", **kw)(x)
        h = FeedForward(cfg.width, cfg.mlp_ratio, name="mlp", **kw)(h)
        x = x + self._dropout(h, train)
        return nn.with_logical_constraint(x, _ACTIVATION)

    def _dropout(self, x: jax.Array, train: bool) -> jax.Array:
        if self.config.dropout == 0.0:
            return x
        return nn.Dropout(self.config.dropout)(x, deterministic=not train)


class VARPrior(nn.Module):
    """``(pyramid [[B, h_k, w_k] int], caption [B, P] | None) -> [logits [B, h_k, w_k, V] float32]``.

    The pyramid's shapes must be ``scale_shapes(H, W, config.scales)`` with ``H, W <= max_side``.
    Logits of scale ``k`` depend only on scales ``< k`` (and the caption).

    Parameters (logical axes): ``token_embed [V, D]`` (vocab, embed), ``start_embed [D]``
    (embed), ``scale_embed [K, D]`` and ``row_embed``/``col_embed [max_side, D]`` (pos, embed),
    ``caption_proj`` (cond_in, embed) if ``caption_dim`` is set, ``block_{i}``, ``final_norm``,
    ``to_logits [D, V]`` (embed, vocab). Dropout (``train=True``) needs a ``dropout`` rng.
    """

    config: VARConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, pyramid: Sequence[jax.Array], caption: jax.Array | None = None, train: bool = False
    ) -> list[jax.Array]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pyramid = list(pyramid)
        if not pyramid or any(t.ndim != 3 for t in pyramid):
            raise ValueError(f"pyramid must be a non-empty list of [B, h, w] maps, got {[t.shape for t in pyramid]}")
        b, height, width = pyramid[-1].shape
        shapes = [tuple(t.shape[1:]) for t in pyramid]
        if len(shapes) != len(cfg.scales) or tuple(shapes) != scale_shapes(height, width, cfg.scales):
            raise ValueError(f"pyramid shapes {shapes} are not scale_shapes({height}, {width}, {cfg.scales})")
        if height > cfg.max_side or width > cfg.max_side:
            raise ValueError(f"token grid {height}x{width} exceeds max_side={cfg.max_side}")

        token_embed = embed(cfg.vocab_size, cfg.width, ("vocab", "embed"), name="token_embed", **kw)
        row_embed = embed(cfg.max_side, cfg.width, ("pos", "embed"), name="row_embed", **kw)
        col_embed = embed(cfg.max_side, cfg.width, ("pos", "embed"), name="col_embed", **kw)
        scale_embed = self.param(
            "scale_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("pos", "embed")),
            (len(cfg.scales), cfg.width),
            self.param_dtype,
        )
        # One gather per table over the whole sequence (a loop over scales compiles slower).
        layout = sequence_layout(shapes)
        start = self._start_token(caption, b)
        x = jnp.broadcast_to(start[:, None, :], (b, shapes[0][0] * shapes[0][1], cfg.width))
        if len(shapes) > 1:
            previous = jnp.concatenate([t.reshape(b, -1) for t in pyramid[:-1]], axis=1).astype(jnp.int32)
            x = jnp.concatenate([x, token_embed(previous[:, layout["source"]])], axis=1)
        x = (
            x
            + jnp.take(scale_embed, layout["scale"], axis=0).astype(self.dtype)
            + row_embed(layout["row"])
            + col_embed(layout["col"])
        )
        x = nn.with_logical_constraint(x.astype(self.dtype), _ACTIVATION)
        if cfg.dropout > 0.0:
            x = nn.Dropout(cfg.dropout)(x, deterministic=not train)

        mask = jnp.asarray(block_causal_mask(shapes))
        for i in range(cfg.num_layers):
            x = _Block(cfg, name=f"block_{i}", **kw)(x, mask, train)
        x = LayerNorm(cfg.width, eps=1e-6, name="final_norm", **kw)(x)
        logits = dense(cfg.vocab_size, ("embed", "vocab"), name="to_logits", **kw)(x).astype(jnp.float32)
        offsets = np.cumsum([0] + [h * w for h, w in shapes])
        return [
            logits[:, offsets[k] : offsets[k + 1]].reshape(b, h, w, cfg.vocab_size) for k, (h, w) in enumerate(shapes)
        ]

    def _start_token(self, caption: jax.Array | None, batch: int) -> jax.Array:
        """``[B, D]``: the projected caption, or ``start_embed`` (also the null caption)."""
        cfg = self.config
        start = self.param(
            "start_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (cfg.width,),
            self.param_dtype,
        )
        start = jnp.broadcast_to(start.astype(self.dtype), (batch, cfg.width))
        if cfg.caption_dim is None:
            if caption is not None:
                raise ValueError("this prior has caption_dim=None; pass caption=None")
            return start
        proj = dense(
            cfg.width, ("cond_in", "embed"), name="caption_proj", dtype=self.dtype, param_dtype=self.param_dtype
        )
        if caption is None:
            if self.is_initializing():  # same parameter tree with and without a caption
                proj(jnp.zeros((1, cfg.caption_dim), self.dtype))
            return start
        if caption.shape != (batch, cfg.caption_dim):
            raise ValueError(f"caption must be [B, caption_dim] = [{batch}, {cfg.caption_dim}], got {caption.shape}")
        return proj(caption.astype(self.dtype))


def init_params(model: VARPrior, rng: jax.Array, height: int = 8, width: int = 8) -> Any:
    """Boxed (logically partitioned) parameters of ``model``; the tree is the same for any grid."""
    pyramid = [jnp.zeros((1, h, w), jnp.int32) for h, w in scale_shapes(height, width, model.config.scales)]
    return jax.jit(model.init)(rng, pyramid, None)["params"]  # jitted: eager init is slow


# --------------------------------------------------------------------------------------------
# Training and code lengths


def pyramid_log2_probs(
    apply_fn: Callable, params: Any, pyramid: Sequence[jax.Array], caption: jax.Array | None = None
) -> list[jax.Array]:
    """``log2 p`` of the true tokens, float32 ``[B, h_k, w_k]`` per scale; ``apply_fn = model.apply``.
    The negated sum over all scales is the ideal code length of each image."""
    logits = apply_fn({"params": params}, list(pyramid), caption)
    return [token_log2_probs(l, t) for l, t in zip(logits, pyramid)]


def var_loss(
    apply_fn: Callable,
    params: Any,
    pyramid: Sequence[jax.Array],
    caption: jax.Array | None = None,
    *,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(bits per final token, metrics)``: the cross-entropy in bits of ALL scales divided by the
    final grid's ``H * W``, averaged over the batch. Differentiable in ``params``.

    ``rng`` given: train mode with it as the dropout rng. Metrics: ``bits_per_token`` (the loss)
    and ``bits_scale_{k}``, scale ``k``'s share (they sum to the loss).
    """
    pyramid = list(pyramid)
    if rng is None:
        logits = apply_fn({"params": params}, pyramid, caption, False)
    else:
        logits = apply_fn({"params": params}, pyramid, caption, True, rngs={"dropout": rng})
    b, h, w = pyramid[-1].shape
    vocab = logits[0].shape[-1]
    bits = -token_log2_probs(
        jnp.concatenate([l.reshape(b, -1, vocab) for l in logits], axis=1),
        jnp.concatenate([t.reshape(b, -1) for t in pyramid], axis=1),
    )  # [B, L]
    offsets = np.cumsum([0] + [t.shape[1] * t.shape[2] for t in pyramid])
    metrics = {f"bits_scale_{k}": bits[:, offsets[k] : offsets[k + 1]].sum() / (b * h * w) for k in range(len(pyramid))}
    loss = sum(metrics.values())
    metrics["bits_per_token"] = loss
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Range coding, one scale per step


def make_scale_probabilities(apply_fn: Callable) -> Callable:
    """``fn(params, pyramid (tuple of [1, h_k, w_k] int32), caption [1, P] | None) -> tuple of
    probs [h_k * w_k, V] float32``, jitted once per grid shape. Coding step ``k`` calls it with
    scales ``>= k`` zeroed and reads entry ``k``, in the encoder and the decoder alike."""

    @jax.jit
    def probabilities(params, pyramid, caption):
        logits = apply_fn({"params": params}, list(pyramid), caption)
        return tuple(jax.nn.softmax(l, axis=-1).reshape(-1, l.shape[-1]) for l in logits)

    return probabilities


def _scale_tables(
    probabilities: Callable, params: Any, known: Sequence[np.ndarray], k: int, caption, precision: int
) -> np.ndarray:
    """Quantised tables ``[h_k * w_k, V]`` of step ``k`` from scales ``< k`` (the rest zeroed)."""
    pyramid = tuple(jnp.asarray((t if i < k else np.zeros_like(t))[None], jnp.int32) for i, t in enumerate(known))
    probs = probabilities(params, pyramid, caption)[k]
    return coder.quantize_probabilities(np.asarray(jax.device_get(probs)), precision=precision)


def _caption_batch(caption):
    return None if caption is None else jnp.asarray(caption, jnp.float32).reshape(1, -1)


def encode_with_var(
    probabilities: Callable,
    params: Any,
    pyramid: Sequence[np.ndarray],
    *,
    caption=None,
    precision: int = coder.DEFAULT_PRECISION,
) -> tuple[bytes, list[float]]:
    """Range-code a pyramid (list of ``[h_k, w_k]`` int) scale by scale: ``(payload,
    bits_per_scale)``, the latter the ideal code length of each scale under the quantised tables.
    ``probabilities`` is `make_scale_probabilities`' function; ``caption [P]`` or None."""
    pyramid = [np.asarray(t) for t in pyramid]
    if not pyramid or any(t.ndim != 2 or t.dtype.kind not in "iu" for t in pyramid):
        raise ValueError("pyramid must be a non-empty list of [h, w] integer maps")
    caption = _caption_batch(caption)
    encoder = coder.TokenEncoder(precision)
    bits = []
    for k, tokens in enumerate(pyramid):
        tables = _scale_tables(probabilities, params, pyramid, k, caption, precision)
        symbols = tokens.reshape(-1)
        encoder.encode_step(tables, symbols)
        bits.append(float(-np.sum(np.log2(tables[np.arange(symbols.size), symbols] / 2.0**precision))))
    return encoder.finish(), bits


def decode_with_var(
    probabilities: Callable,
    params: Any,
    payload: bytes,
    shapes: Sequence[tuple[int, int]],
    *,
    caption=None,
    precision: int = coder.DEFAULT_PRECISION,
) -> list[np.ndarray]:
    """Inverse of `encode_with_var`: the pyramid, a list of int32 ``[h_k, w_k]`` of ``shapes``.
    Raises `coder.CodingError` on data the encoder cannot have written for these tables."""
    caption = _caption_batch(caption)
    decoder = coder.TokenDecoder(payload, precision)
    pyramid = [np.zeros(tuple(s), np.int32) for s in shapes]
    for k, zeros in enumerate(pyramid):
        tables = _scale_tables(probabilities, params, pyramid, k, caption, precision)
        pyramid[k] = decoder.decode_step(tables).reshape(zeros.shape)
    decoder.finish()
    return pyramid
