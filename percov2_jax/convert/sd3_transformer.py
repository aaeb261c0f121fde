"""Name tables for the SD3 MM-DiT: diffusers -> Flax rules, and the original Stability
single-file names (``model.diffusion_model.*``) -> diffusers names.

Facts from diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``: qkv tensors are
split in three along the output axis; the last block's context adaLN and the final adaLN are
stored (shift, scale) and diffusers wants (scale, shift) ("swap_scale_shift").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from percov2_jax.convert.core import ConversionError, Rule, SourceTensor

# diffusers key -> Flax leaf. Order matters: first full match wins.
RULES = (
    Rule(r"pos_embed\.pos_embed", "pos_embed", "identity"),
    Rule(r"pos_embed\.proj\.weight", "kernel", "conv"),
    Rule(r".*\.norm_(?:added_)?[qk]\.weight", "scale", "identity"),
    Rule(r".*\.weight", "kernel", "linear"),
    Rule(r".*\.bias", "bias", "identity"),
)

# Original single-file name (after stripping the prefix) -> diffusers name, for 1:1 renames.
# ``{i}`` is a block index. qkv splits and scale/shift swaps are handled in ``original_to_diffusers``.
_RENAMES = (
    (r"pos_embed", "pos_embed.pos_embed"),
    (r"x_embedder\.proj\.(weight|bias)", r"pos_embed.proj.\1"),
    (r"t_embedder\.mlp\.0\.(weight|bias)", r"time_text_embed.timestep_embedder.linear_1.\1"),
    (r"t_embedder\.mlp\.2\.(weight|bias)", r"time_text_embed.timestep_embedder.linear_2.\1"),
    (r"y_embedder\.mlp\.0\.(weight|bias)", r"time_text_embed.text_embedder.linear_1.\1"),
    (r"y_embedder\.mlp\.2\.(weight|bias)", r"time_text_embed.text_embedder.linear_2.\1"),
    (r"context_embedder\.(weight|bias)", r"context_embedder.\1"),
    (r"final_layer\.linear\.(weight|bias)", r"proj_out.\1"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"norm_out.linear.\1"),  # + swap_scale_shift
    (r"joint_blocks\.(\d+)\.x_block\.attn\.ln_([qk])\.weight", r"transformer_blocks.\1.attn.norm_\2.weight"),
    (
        r"joint_blocks\.(\d+)\.context_block\.attn\.ln_([qk])\.weight",
        r"transformer_blocks.\1.attn.norm_added_\2.weight",
    ),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.ln_([qk])\.weight", r"transformer_blocks.\1.attn2.norm_\2.weight"),
    (r"joint_blocks\.(\d+)\.x_block\.attn\.proj\.(weight|bias)", r"transformer_blocks.\1.attn.to_out.0.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.proj\.(weight|bias)", r"transformer_blocks.\1.attn2.to_out.0.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.proj\.(weight|bias)", r"transformer_blocks.\1.attn.to_add_out.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.adaLN_modulation\.1\.(weight|bias)", r"transformer_blocks.\1.norm1.linear.\2"),
    (
        r"joint_blocks\.(\d+)\.context_block\.adaLN_modulation\.1\.(weight|bias)",
        r"transformer_blocks.\1.norm1_context.linear.\2",
    ),
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.fc1\.(weight|bias)", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.fc2\.(weight|bias)", r"transformer_blocks.\1.ff.net.2.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.fc1\.(weight|bias)", r"transformer_blocks.\1.ff_context.net.0.proj.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.fc2\.(weight|bias)", r"transformer_blocks.\1.ff_context.net.2.\2"),
)
# Fused qkv tensors, split into three diffusers tensors.
_QKV = (
    (
        r"joint_blocks\.(\d+)\.x_block\.attn\.qkv\.(weight|bias)",
        r"transformer_blocks.\1.attn.{}.\2",
        ("to_q", "to_k", "to_v"),
    ),
    (
        r"joint_blocks\.(\d+)\.context_block\.attn\.qkv\.(weight|bias)",
        r"transformer_blocks.\1.attn.{}.\2",
        ("add_q_proj", "add_k_proj", "add_v_proj"),
    ),
    (
        r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.(weight|bias)",
        r"transformer_blocks.\1.attn2.{}.\2",
        ("to_q", "to_k", "to_v"),
    ),
)

PREFIX = "model.diffusion_model."


def swap_scale_shift(a: np.ndarray) -> np.ndarray:
    """Swap the two halves along axis 0: original (shift, scale) <-> diffusers (scale, shift)."""
    shift, scale = np.split(a, 2, axis=0)
    return np.concatenate([scale, shift], axis=0)


def _num_layers(shapes: Mapping[str, tuple[int, ...]]) -> int:
    idx = [int(m.group(1)) for k in shapes if (m := re.match(r"joint_blocks\.(\d+)\.", k))]
    if not idx:
        raise ConversionError("no joint_blocks.* keys: not an SD3 MM-DiT checkpoint")
    return max(idx) + 1


def original_to_diffusers(
    shapes: Mapping[str, tuple[int, ...]], load: Callable[[str], np.ndarray]
) -> Iterator[SourceTensor]:
    """Translate original (prefix-stripped) names and shapes to diffusers ``SourceTensor``s.

    Keys that match no known pattern are passed through unchanged, so that ``plan`` reports
    them as unknown together with every other problem.
    """
    last = _num_layers(shapes) - 1
    for key, shape in shapes.items():
        qkv = next(((re.fullmatch(p, key), t, n) for p, t, n in _QKV if re.fullmatch(p, key)), None)
        if qkv is not None:
            m, template, names = qkv
            if shape[0] % 3:
                yield SourceTensor(key, shape, lambda k=key: load(k))  # reported as a shape mismatch
                continue
            n = shape[0] // 3
            for j, name in enumerate(names):
                new_key = m.expand(template.format(name))
                yield SourceTensor(
                    new_key, (n,) + tuple(shape[1:]), lambda k=key, j=j, n=n: load(k)[j * n : (j + 1) * n]
                )
            continue
        new_key = None
        for pattern, repl in _RENAMES:
            m = re.fullmatch(pattern, key)
            if m:
                new_key = m.expand(repl)
                break
        if new_key is None:
            yield SourceTensor(key, shape, lambda k=key: load(k))
            continue
        # The two AdaLayerNormContinuous modulations are stored (shift, scale) in the original.
        swap = key.startswith("final_layer.adaLN_modulation.") or key.startswith(
            f"joint_blocks.{last}.context_block.adaLN_modulation."
        )
        if swap:
            yield SourceTensor(new_key, shape, lambda k=key: swap_scale_shift(load(k)))
        else:
            yield SourceTensor(new_key, shape, lambda k=key: load(k))


def infer_config(
    shapes: Mapping[str, tuple[int, ...]], load: Callable[[str], np.ndarray], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Infer a diffusers ``SD3Transformer2DModel`` config from original (prefix-stripped) keys.

    Read off the weights: patch size, channels, depth, widths, ``pos_embed_max_size``,
    ``qk_norm`` (``ln_q`` keys), ``dual_attention_layers`` (``attn2`` keys), and ``sample_size``
    (from the position table's first column frequency). ``attention_head_dim`` is read from
    the qk-norm scale when present, else it is 64 (every SD3/SD3.5 release); pass
    ``overrides`` for anything else.
    """
    overrides = dict(overrides or {})
    required = [
        "x_embedder.proj.weight",
        "context_embedder.weight",
        "y_embedder.mlp.0.weight",
        "final_layer.linear.weight",
        "pos_embed",
    ]
    absent = [k for k in required if k not in shapes]
    if absent:
        raise ConversionError(f"SD3 single-file checkpoint lacks {absent}")
    inner, in_channels, p, _ = shapes["x_embedder.proj.weight"]
    ln_q = [k for k in shapes if k.endswith("attn.ln_q.weight")]
    head_dim = shapes[ln_q[0]][0] if ln_q else 64
    head_dim = overrides.get("attention_head_dim", head_dim)
    if inner % head_dim or inner < head_dim:
        raise ConversionError(
            f"cannot infer the head count: width {inner} is not a multiple of attention_head_dim={head_dim} "
            "(64 unless the checkpoint has qk-norm); pass config_overrides={'transformer': {'attention_head_dim': ...}}"
        )
    num_positions = shapes["pos_embed"][1]
    max_size = math.isqrt(num_positions)
    if max_size * max_size != num_positions:
        raise ConversionError(f"pos_embed has {num_positions} positions, not a square grid")
    # Table row (0, 1), channel 0 is sin(base_size / max_size): recover base_size exactly.
    table = np.asarray(load("pos_embed"), np.float64).reshape(max_size * max_size, -1)
    base_size = int(round(math.asin(float(np.clip(table[1, 0], -1, 1))) * max_size)) if max_size > 1 else 64
    config = dict(
        sample_size=base_size * p,
        patch_size=p,
        in_channels=in_channels,
        num_layers=_num_layers(shapes),
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=shapes["context_embedder.weight"][1],
        caption_projection_dim=shapes["context_embedder.weight"][0],
        pooled_projection_dim=shapes["y_embedder.mlp.0.weight"][1],
        out_channels=shapes["final_layer.linear.weight"][0] // (p * p),
        pos_embed_max_size=max_size,
        dual_attention_layers=sorted(
            {int(re.match(r"joint_blocks\.(\d+)\.", k).group(1)) for k in shapes if ".x_block.attn2." in k}
        ),
        qk_norm="rms_norm" if ln_q else None,
    )
    config.update(overrides)
    return config
