"""Name tables for the SD3 VAE: diffusers -> Flax rules, and the original LDM names
(``first_stage_model.*``) -> diffusers names.

Facts from diffusers' ``convert_ldm_vae_checkpoint``: decoder ``up.{k}`` is
``up_blocks.{n-1-k}`` (index reversed); ``nin_shortcut`` is ``conv_shortcut``; the mid-block
attention's 1x1 convs ``q/k/v/proj_out`` become Linear ``to_q/to_k/to_v/to_out.0``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from percov2_jax.convert.core import ConversionError, Rule, SourceTensor

RULES = (
    Rule(r".*\.(?:norm1|norm2|group_norm|conv_norm_out)\.weight", "scale", "identity"),
    Rule(r".*\.attentions\.0\.(?:to_q|to_k|to_v|to_out\.0)\.weight", "kernel", "linear"),
    Rule(r".*\.weight", "kernel", "conv"),
    Rule(r".*\.bias", "bias", "identity"),
)

PREFIX = "first_stage_model."

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _rename(key: str, num_up: int) -> tuple[str | None, bool]:
    """Original LDM name -> (diffusers name, is a 1x1-conv attention weight to squeeze)."""
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key)
    if m:
        part, name, leaf = m.groups()
        return f"{part}.mid_block.attentions.0.{_ATTN[name]}.{leaf}", name != "norm" and leaf == "weight"
    rules = (
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"),
        (
            r"encoder\.down\.(\d+)\.downsample\.conv\.(.*)",
            lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}",
        ),
        (
            r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)",
            lambda m: f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}",
        ),
        (
            r"decoder\.up\.(\d+)\.upsample\.conv\.(.*)",
            lambda m: f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}",
        ),
        (r"(encoder|decoder)\.mid\.block_([12])\.(.*)", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"),
        (r"(encoder|decoder)\.norm_out\.(.*)", lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(.*)", lambda m: m[0]),
        (r"(quant_conv|post_quant_conv)\.(weight|bias)", lambda m: m[0]),
    )
    for pattern, fn in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return fn(m).replace("nin_shortcut", "conv_shortcut"), False
    return None, False


def _num_up(shapes: Mapping[str, tuple[int, ...]]) -> int:
    idx = [int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def original_to_diffusers(
    shapes: Mapping[str, tuple[int, ...]], load: Callable[[str], np.ndarray]
) -> Iterator[SourceTensor]:
    """Translate LDM (prefix-stripped) names to diffusers ``SourceTensor``s; unknown keys pass through."""
    num_up = _num_up(shapes)
    for key, shape in shapes.items():
        new_key, squeeze = _rename(key, num_up)
        if new_key is None:
            yield SourceTensor(key, shape, lambda k=key: load(k))
        elif squeeze and len(shape) == 4:
            yield SourceTensor(new_key, tuple(shape[:2]), lambda k=key: load(k)[:, :, 0, 0])
        else:
            yield SourceTensor(new_key, tuple(shape), lambda k=key: load(k))


def infer_config(shapes: Mapping[str, tuple[int, ...]], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config from LDM (prefix-stripped) keys.

    Read off the weights: channels, ``block_out_channels``, ``layers_per_block``,
    ``latent_channels``, quant convs, mid-block attention. Not stored in the weights and set
    to the SD3 release's values unless overridden: ``norm_num_groups`` 32,
    ``scaling_factor`` 1.5305, ``shift_factor`` 0.0609, ``sample_size`` 1024.
    """
    if "encoder.conv_in.weight" not in shapes or "decoder.conv_in.weight" not in shapes:
        raise ConversionError("VAE checkpoint lacks encoder.conv_in / decoder.conv_in")
    downs = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not downs:
        raise ConversionError("VAE checkpoint has no encoder.down.* blocks")
    block_out = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in downs]
    layers = len({m.group(1) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    config = dict(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        down_block_types=["DownEncoderBlock2D"] * len(block_out),
        up_block_types=["UpDecoderBlock2D"] * len(block_out),
        block_out_channels=block_out,
        layers_per_block=layers,
        act_fn="silu",
        latent_channels=shapes["decoder.conv_in.weight"][1],
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        force_upcast=True,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_block_add_attention=any(k.startswith("encoder.mid.attn_1.") for k in shapes),
    )
    config.update(overrides or {})
    return config
