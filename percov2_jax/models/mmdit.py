"""The SD3 MM-DiT (diffusers ``SD3Transformer2DModel``) in Flax linen, NHWC.

Covers SD3-medium, SD3.5-large (``qk_norm="rms_norm"``) and SD3.5-medium
(``dual_attention_layers``). Parameter names mirror diffusers (``transformer_blocks.3.attn.to_out.0``
becomes ``transformer_blocks_3/attn/to_out_0``), so the converter is a short rule table.

With ``scan_layers=True`` every homogeneous run of two or more blocks (plain joint blocks,
SD3.5-medium's dual-attention blocks) is one ``nn.scan`` whose parameters are stacked on a
leading ``layers`` axis under the name ``transformer_blocks_{first}_to_{last}``; the last,
context-only block is never scanned. ``scan_block_params`` / ``unscan_block_params`` convert
parameter trees between the two layouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from percov2_jax.models.attention import Attention, FeedForward
from percov2_jax.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from percov2_jax.models.layers import Dtype, config_from_dict, config_to_dict, dense, layer_norm, modulate, remat_policy
from percov2_jax.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX


@dataclasses.dataclass(frozen=True)
class SD3TransformerConfig:
    """Field names and defaults are those of diffusers' ``SD3Transformer2DModel`` config.json."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        problems = []
        if self.num_layers < 1:
            problems.append(f"num_layers must be >= 1, got {self.num_layers}")
        if self.caption_projection_dim != self.inner_dim:
            problems.append(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal num_attention_heads * "
                f"attention_head_dim ({self.inner_dim})"
            )
        if self.qk_norm not in (None, "rms_norm"):
            problems.append(f"qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers - 1]
        if bad:
            problems.append(
                f"dual_attention_layers {bad} must lie in [0, num_layers - 1) (the last block is context-only)"
            )
        if self.pos_embed_max_size is None or self.pos_embed_max_size < 1:
            problems.append("pos_embed_max_size must be a positive int (SD3 crops its position table)")
        if (self.inner_dim // 2) % 2:
            problems.append(f"inner dim {self.inner_dim} must be divisible by 4 for the 2-D sin-cos table")
        if problems:
            raise ValueError("invalid SD3TransformerConfig: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SD3TransformerConfig:
        """From a diffusers config.json dict; ``_``-prefixed keys are ignored, unknown keys raise."""
        return config_from_dict(cls, d, "SD3Transformer2DModel")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "SD3Transformer2DModel")


# The released transformers' config.json values (facts), by the name a config's ``model.variant``
# uses; a run with a converted checkpoint takes the checkpoint's own config instead.
RELEASES: dict[str, SD3TransformerConfig] = {
    # stabilityai/stable-diffusion-3-medium-diffusers
    "sd3-medium": SD3TransformerConfig(
        num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192
    ),
    # stabilityai/stable-diffusion-3.5-medium: dual attention in blocks 0-12, qk RMS norm
    "sd3.5-medium": SD3TransformerConfig(
        num_layers=24,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    # stabilityai/stable-diffusion-3.5-large: qk RMS norm
    "sd3.5-large": SD3TransformerConfig(
        num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm"
    ),
}


@dataclasses.dataclass(frozen=True)
class BlockRun:
    """A run of consecutive blocks ``[start, stop)`` of one kind ("joint", "dual" or "last")."""

    start: int
    stop: int
    kind: str
    scanned: bool

    @property
    def name(self) -> str:
        if self.scanned:
            return f"transformer_blocks_{self.start}_to_{self.stop - 1}"
        return f"transformer_blocks_{self.start}"


def block_runs(config: SD3TransformerConfig, scan_layers: bool) -> list[BlockRun]:
    """The block layout: unscanned blocks one by one, scanned runs of length >= 2 stacked."""

    def kind(i):
        if i == config.num_layers - 1:
            return "last"
        return "dual" if i in config.dual_attention_layers else "joint"

    runs: list[BlockRun] = []
    i = 0
    while i < config.num_layers:
        j = i + 1
        while scan_layers and j < config.num_layers and kind(j) == kind(i) and kind(i) != "last":
            j += 1
        if j - i >= 2:
            runs.append(BlockRun(i, j, kind(i), True))
        else:
            runs.extend(BlockRun(k, k + 1, kind(k), False) for k in range(i, j))
        i = j
    return runs


def locate_block(
    path: tuple[str, ...], config: SD3TransformerConfig, scan_layers: bool
) -> tuple[tuple[str, ...], int | None]:
    """Map an unscanned parameter path to its place in the chosen layout: (path, stack index or None)."""
    head = path[0]
    if not head.startswith("transformer_blocks_") or not scan_layers:
        return path, None
    try:
        index = int(head[len("transformer_blocks_") :])
    except ValueError:
        return path, None
    for run in block_runs(config, True):
        if run.start <= index < run.stop:
            if run.scanned:
                return (run.name,) + path[1:], index - run.start
            return path, None
    return path, None


class JointTransformerBlock(nn.Module):
    """One MM-DiT block: ``(hidden [B, Li, D], context [B, Lc, D], temb [B, D]) -> (context, hidden)``.

    Returns ``context=None`` for the last (``context_pre_only``) block, as diffusers.
    """

    dim: int
    num_attention_heads: int
    attention_head_dim: int
    context_pre_only: bool = False
    qk_norm: str | None = None
    use_dual_attention: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_kw = dict(
            dim=self.dim,
            num_heads=self.num_attention_heads,
            head_dim=self.attention_head_dim,
            qk_norm=self.qk_norm,
            implementation=self.attention_implementation,
            **kw,
        )
        self.norm1 = (
            SD35AdaLayerNormZeroX(self.dim, **kw) if self.use_dual_attention else AdaLayerNormZero(self.dim, **kw)
        )
        self.norm1_context = (
            AdaLayerNormContinuous(self.dim, **kw) if self.context_pre_only else AdaLayerNormZero(self.dim, **kw)
        )
        self.attn = Attention(joint=True, context_pre_only=self.context_pre_only, **attn_kw)
        if self.use_dual_attention:
            self.attn2 = Attention(joint=False, **attn_kw)
        self.ff = FeedForward(self.dim, **kw)
        if not self.context_pre_only:
            self.ff_context = FeedForward(self.dim, **kw)

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, temb: jax.Array):
        if self.use_dual_attention:
            norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_h2, gate_msa2 = self.norm1(hidden_states, temb)
        else:
            norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        if self.context_pre_only:
            norm_c = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)

        attn_out, ctx_attn_out = self.attn(norm_h, norm_c)
        hidden_states = hidden_states + gate_msa[:, None] * attn_out
        if self.use_dual_attention:
            attn_out2, _ = self.attn2(norm_h2)
            hidden_states = hidden_states + gate_msa2[:, None] * attn_out2
        ff_out = self.ff(modulate(layer_norm(hidden_states), shift_mlp, scale_mlp))
        hidden_states = hidden_states + gate_mlp[:, None] * ff_out
        hidden_states = nn.with_logical_constraint(
            hidden_states, ("activation_batch", "activation_length", "activation_embed")
        )

        if self.context_pre_only:
            return None, hidden_states
        encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * ctx_attn_out
        ctx_ff = self.ff_context(modulate(layer_norm(encoder_hidden_states), c_shift_mlp, c_scale_mlp))
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * ctx_ff
        encoder_hidden_states = nn.with_logical_constraint(
            encoder_hidden_states, ("activation_batch", "activation_length", "activation_embed")
        )
        return encoder_hidden_states, hidden_states


class _ScanStep(JointTransformerBlock):
    """The block as a scan body: ``((hidden, context), temb) -> ((hidden, context), None)``."""

    def __call__(self, carry, temb):  # type: ignore[override]
        hidden_states, encoder_hidden_states = carry
        encoder_hidden_states, hidden_states = super().__call__(hidden_states, encoder_hidden_states, temb)
        return (hidden_states, encoder_hidden_states), None


class SD3Transformer2DModel(nn.Module):
    """SD3 MM-DiT. ``__call__(hidden_states [B, H, W, C_in], encoder_hidden_states [B, L, joint_dim],
    pooled_projections [B, pooled_dim], timestep [B] or scalar on the 0..1000 scale)
    -> [B, H, W, out_channels]`` in ``dtype``.

    Options: ``scan_layers`` (stack homogeneous block runs), ``remat_policy`` (a name in
    ``layers.REMAT_POLICIES``), ``dtype`` (compute) and ``param_dtype``,
    ``attention_implementation`` (passed to ``jax.nn.dot_product_attention``).
    """

    config: SD3TransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if hidden_states.ndim != 4 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(f"hidden_states must be NHWC [B, H, W, {cfg.in_channels}], got {hidden_states.shape}")
        b, height, width, _ = hidden_states.shape
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))

        x = PatchEmbed(
            cfg.patch_size,
            cfg.inner_dim,
            cfg.pos_embed_max_size,
            base_size=cfg.sample_size // cfg.patch_size,
            name="pos_embed",
            **kw,
        )(hidden_states.astype(self.dtype))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        temb = CombinedTimestepTextProjEmbeddings(cfg.inner_dim, name="time_text_embed", **kw)(
            timestep, pooled_projections
        )
        ctx = dense(cfg.caption_projection_dim, ("cond_in", "embed"), name="context_embedder", **kw)(
            encoder_hidden_states.astype(self.dtype)
        )

        policy = remat_policy(self.remat_policy)
        block_kw = dict(
            dim=cfg.inner_dim,
            num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim,
            qk_norm=cfg.qk_norm,
            attention_implementation=self.attention_implementation,
            **kw,
        )
        for run in block_runs(cfg, self.scan_layers):
            flags = dict(context_pre_only=run.kind == "last", use_dual_attention=run.kind == "dual")
            if run.scanned:
                step = _ScanStep
                if self.remat_policy != "none":
                    step = nn.remat(step, policy=policy, prevent_cse=False)
                scanned = nn.scan(
                    step,
                    variable_axes={"params": 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast,),
                    length=run.stop - run.start,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                (x, ctx), _ = scanned(name=run.name, **block_kw, **flags)((x, ctx), temb)
            else:
                block = JointTransformerBlock
                if self.remat_policy != "none":
                    block = nn.remat(block, policy=policy)
                ctx, x = block(name=run.name, **block_kw, **flags)(x, ctx, temb)

        x = AdaLayerNormContinuous(cfg.inner_dim, name="norm_out", **kw)(x, temb)
        p, c = cfg.patch_size, cfg.out_channels
        x = dense(p * p * c, ("embed", "patch_out"), name="proj_out", **kw)(x)
        h, w = height // p, width // p
        x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * p, w * p, c)


def example_inputs(
    config: SD3TransformerConfig,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    context_length: int = 1,
):
    """Zero inputs of the right shapes, for ``init`` and ``jax.eval_shape``."""
    height = height or 2 * config.patch_size
    width = width or 2 * config.patch_size
    return (
        jnp.zeros((batch, height, width, config.in_channels), jnp.float32),
        jnp.zeros((batch, context_length, config.joint_attention_dim), jnp.float32),
        jnp.zeros((batch, config.pooled_projection_dim), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
    )


def scan_block_params(params: Mapping[str, Any], config: SD3TransformerConfig) -> dict[str, Any]:
    """Unscanned params (``transformer_blocks_{i}``) to the ``scan_layers=True`` layout."""
    out = {k: v for k, v in params.items() if not k.startswith("transformer_blocks_")}
    for run in block_runs(config, True):
        if run.scanned:
            layers = [params[f"transformer_blocks_{i}"] for i in range(run.start, run.stop)]
            out[run.name] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        else:
            out[run.name] = params[run.name]
    return out


def unscan_block_params(params: Mapping[str, Any], config: SD3TransformerConfig) -> dict[str, Any]:
    """``scan_layers=True`` params back to one ``transformer_blocks_{i}`` subtree per block."""
    out = {k: v for k, v in params.items() if not k.startswith("transformer_blocks_")}
    for run in block_runs(config, True):
        if run.scanned:
            for i in range(run.start, run.stop):
                out[f"transformer_blocks_{i}"] = jax.tree.map(lambda x, j=i - run.start: x[j], params[run.name])
        else:
            out[run.name] = params[run.name]
    return out
