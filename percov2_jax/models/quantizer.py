"""Cosine-similarity vector quantizer with an EMA codebook, as PerCo (SD) uses it.

The reference is lucidrains' vector-quantize-pytorch 1.15.3 (the version in PerCo's
requirements.txt): ``VectorQuantize(dim=320, codebook_size=V, codebook_dim=32,
use_cosine_sim=True)`` with its defaults decay 0.8, eps 1e-5, no k-means init,
``threshold_ema_dead_code=0``, commitment weight 1 (PerCo does not add the loss to training).

Forward, per token ``x [dim]``:
  z = l2norm(project_in(x))                      [codebook_dim]
  k = argmax_c <z, codebook[c]>                   (codebook rows are unit vectors)
  q = codebook[k];  quantized = project_out(z + stop_gradient(q - z))   (straight-through)
  commit_loss = mean((stop_gradient(q) - z)^2)

EMA update (``train=True``, collection ``vq_stats`` mutable), with n_c = #tokens assigned to c:
  cluster_size <- lerp(cluster_size, n_c, 1 - decay)
  embed_avg    <- lerp(embed_avg, sum_{tokens of c} z, 1 - decay)
  smoothed     =  (cluster_size + eps) / (sum(cluster_size) + V eps) * sum(cluster_size)
  codebook     <- l2norm(embed_avg / smoothed)
then, if ``dead_code_threshold > 0``, codes with cluster_size < threshold restart from random
batch vectors (``vq`` rng). The returned ``quantized`` uses the codebook from *before* the update.

All batch reductions are plain sums over the (global) batch, so under ``jax.jit`` with sharded
arrays the statistics are global without any per-device collective.

If ``codebook_dim == dim`` there are no projections (the reference's ``nn.Identity``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from percov2_jax.models.layers import Dtype, config_from_dict, config_to_dict, dense

STATS = "vq_stats"  # the mutable collection holding the codebook and EMA statistics
_CODE_AXES = ("codebook", "code_dim")


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """VQ shape and EMA constants (vector-quantize-pytorch names: ``threshold_ema_dead_code`` =
    ``dead_code_threshold``; ``reset_cluster_size`` defaults to the threshold, as there)."""

    dim: int = 320
    codebook_size: int = 256
    codebook_dim: int = 32
    decay: float = 0.8
    eps: float = 1e-5
    dead_code_threshold: float = 0.0
    reset_cluster_size: float | None = None

    def __post_init__(self):
        problems = []
        for name in ("dim", "codebook_size", "codebook_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.decay < 1.0:
            problems.append(f"decay must be in [0, 1), got {self.decay}")
        if self.eps <= 0:
            problems.append(f"eps must be positive, got {self.eps}")
        if self.dead_code_threshold < 0:
            problems.append(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}")
        if problems:
            raise ValueError("invalid QuantizerConfig: " + "; ".join(problems))

    @property
    def has_projections(self) -> bool:
        return self.codebook_dim != self.dim

    @property
    def reset_size(self) -> float:
        return self.dead_code_threshold if self.reset_cluster_size is None else self.reset_cluster_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantizerConfig:
        """From a ``to_dict`` dict; ``_``-prefixed keys are ignored, unknown keys raise."""
        return config_from_dict(cls, d, "CosineVectorQuantizer")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "CosineVectorQuantizer")


@struct.dataclass
class QuantizerOutput:
    """``quantized [B, h, w, dim]`` (dtype), ``indices`` int32 ``[B, h, w]``, and float32 scalars:
    ``commit_loss`` (reported only), ``usage`` (fraction of the V codes used by the batch) and
    ``perplexity`` (exp of the entropy of the batch code histogram, in [1, V])."""

    quantized: jax.Array
    indices: jax.Array
    commit_loss: jax.Array
    usage: jax.Array
    perplexity: jax.Array

    def metrics(self) -> dict[str, jax.Array]:
        return {"vq_commit_loss": self.commit_loss, "vq_usage": self.usage, "vq_perplexity": self.perplexity}


def l2norm(x: jax.Array) -> jax.Array:
    """``x / max(|x|, 1e-12)`` over the last axis (torch ``F.normalize``)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def code_histogram(indices: jax.Array, codebook_size: int, dtype: Dtype = jnp.float32) -> jax.Array:
    """Counts ``[V]`` of each code in ``indices`` (any shape)."""
    return jnp.zeros((codebook_size,), dtype).at[indices.reshape(-1)].add(1)


def usage_and_perplexity(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fraction of codes with a nonzero count, and ``exp(-sum p log p)`` of ``p = counts / sum``."""
    p = counts / jnp.maximum(counts.sum(), 1)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0))
    return jnp.mean(counts > 0).astype(jnp.float32), jnp.exp(entropy).astype(jnp.float32)


def _init_codebook(key: jax.Array, shape: tuple[int, int], dtype: Dtype) -> jax.Array:
    # The reference draws kaiming-uniform entries and l2-normalises the rows; the bound does not
    # matter after normalisation, so U(-1, 1) gives the same distribution of directions.
    return l2norm(jax.random.uniform(key, shape, dtype, -1.0, 1.0))


class CosineVectorQuantizer(nn.Module):
    """Params ``project_in`` (kernel ``[dim, codebook_dim]``) and ``project_out`` (kernel
    ``[codebook_dim, dim]``); collection ``vq_stats``: ``codebook [V, codebook_dim]`` (unit rows),
    ``cluster_size [V]``, ``embed_avg [V, codebook_dim]``, stored in ``promote(param_dtype,
    float32)``. Codebook search, losses and EMA statistics run in ``promote(dtype, float32)``.

    The codebook is initialised from the ``params`` rng; dead-code restarts draw from ``vq``.
    """

    config: QuantizerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=None)  # setup names them
        if cfg.has_projections:
            self.project_in = dense(cfg.codebook_dim, ("vq_in", "code_dim"), **kw)
            self.project_out = dense(cfg.dim, ("code_dim", "vq_in"), **kw)
        store = jnp.promote_types(self.param_dtype, jnp.float32)
        shape = (cfg.codebook_size, cfg.codebook_dim)
        self.codebook = self.variable(
            STATS,
            "codebook",
            nn.with_logical_partitioning(lambda: _init_codebook(self.make_rng("params"), shape, store), _CODE_AXES),
        )
        # The reference starts embed_avg as a copy of the codebook and every cluster at size 1.
        self.embed_avg = self.variable(
            STATS, "embed_avg", nn.with_logical_partitioning(lambda: self.codebook.value, _CODE_AXES)
        )
        self.cluster_size = self.variable(
            STATS,
            "cluster_size",
            nn.with_logical_partitioning(lambda: jnp.ones((cfg.codebook_size,), store), ("codebook",)),
        )

    @property
    def _stats_dtype(self) -> Any:
        return jnp.promote_types(self.dtype, jnp.float32)

    def _project_out(self, codes: jax.Array) -> jax.Array:
        codes = codes.astype(self.dtype)
        return self.project_out(codes) if self.config.has_projections else codes

    def __call__(self, x: jax.Array, *, train: bool) -> QuantizerOutput:
        """``x [B, h, w, dim]`` (any leading shape) -> ``QuantizerOutput``.

        ``train=True`` runs the EMA update (and dead-code restarts), which needs ``vq_stats``
        mutable: ``apply(..., mutable=["vq_stats"])``. Gradients reach ``x`` by straight-through
        in both modes; ``train=False`` is the reference's frozen codebook.
        """
        cfg = self.config
        if x.shape[-1] != cfg.dim:
            raise ValueError(f"quantizer input must be [..., {cfg.dim}], got shape {x.shape}")
        updating = train and not self.is_initializing()
        if updating and not self.is_mutable_collection(STATS):
            raise ValueError(f"train=True updates the codebook: apply with mutable=['{STATS}'] (or use train=False)")
        stats = self._stats_dtype
        lead = x.shape[:-1]
        h = x.reshape(-1, cfg.dim).astype(self.dtype)
        if cfg.has_projections:
            h = self.project_in(h)
        z = l2norm(h.astype(stats))  # [N, d]
        codebook = jax.lax.stop_gradient(self.codebook.value.astype(stats))
        indices = jnp.argmax(z @ codebook.T, axis=-1).astype(jnp.int32)  # cosine similarity
        q = codebook[indices]
        commit_loss = jnp.mean(jnp.square(q - z)).astype(jnp.float32)
        quantized = self._project_out(z + jax.lax.stop_gradient(q - z))
        counts = code_histogram(indices, cfg.codebook_size, stats)
        usage, perplexity = usage_and_perplexity(counts)
        if updating:
            self._ema_update(jax.lax.stop_gradient(z), indices, counts)
        return QuantizerOutput(
            quantized=quantized.reshape(*lead, cfg.dim),
            indices=indices.reshape(lead),
            commit_loss=commit_loss,
            usage=usage,
            perplexity=perplexity,
        )

    def _ema_update(self, z: jax.Array, indices: jax.Array, counts: jax.Array) -> None:
        """One EMA step of the reference's ``CosineSimCodebook.forward`` from ``z [N, d]``."""
        cfg = self.config
        store = self.cluster_size.value.dtype
        w = 1.0 - cfg.decay
        embed_sum = jax.ops.segment_sum(z, indices, num_segments=cfg.codebook_size)  # [V, d]
        cluster_size = self.cluster_size.value.astype(z.dtype)
        embed_avg = self.embed_avg.value.astype(z.dtype)
        # torch's lerp_(end, w) for w < 0.5 is old + w * (end - old); same formula, same rounding.
        cluster_size = cluster_size + w * (counts - cluster_size)
        embed_avg = embed_avg + w * (embed_sum - embed_avg)
        total = cluster_size.sum()
        smoothed = (cluster_size + cfg.eps) / (total + cfg.codebook_size * cfg.eps) * total  # Laplace smoothing
        # For unit codes the per-row division by ``smoothed`` only rescales rows, which the l2norm
        # undoes; it is kept so the arithmetic (and rounding) follows the reference.
        codebook = l2norm(embed_avg / smoothed[:, None])
        if cfg.dead_code_threshold > 0:
            codebook, embed_avg, cluster_size = self._restart_dead_codes(z, codebook, embed_avg, cluster_size)
        self.cluster_size.value = cluster_size.astype(store)
        self.embed_avg.value = embed_avg.astype(store)
        self.codebook.value = codebook.astype(store)

    def _restart_dead_codes(self, z, codebook, embed_avg, cluster_size):
        """Codes with (updated) ``cluster_size < dead_code_threshold`` become random batch vectors
        ``s`` with ``embed_avg = s * reset`` and ``cluster_size = reset`` (reference ``expire_codes_``).

        The k-th dead code takes the ``(k mod N)``-th vector of one random permutation of the N
        batch vectors: distinct vectors while there are at most N dead codes (the reference's
        ``randperm``), otherwise every vector at least once (the reference draws with
        replacement there). Fixed shapes, so it stays jittable.
        """
        cfg = self.config
        dead = cluster_size < cfg.dead_code_threshold
        n = z.shape[0]
        order = jax.random.permutation(self.make_rng("vq"), n)
        rank = jnp.cumsum(dead.astype(jnp.int32)) - 1
        sampled = l2norm(z[order[jnp.mod(rank, n)]])  # [V, d]
        reset = jnp.asarray(cfg.reset_size, z.dtype)
        codebook = jnp.where(dead[:, None], sampled, codebook)
        embed_avg = jnp.where(dead[:, None], sampled * reset, embed_avg)
        cluster_size = jnp.where(dead, reset, cluster_size)
        return codebook, embed_avg, cluster_size

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """``indices [B, h, w]`` int -> ``[B, h, w, dim]`` (the reference's ``get_output_from_indices``)."""
        codes = self.codebook.value[indices].astype(self._stats_dtype)
        return self._project_out(codes)
