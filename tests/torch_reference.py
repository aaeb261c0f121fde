"""PyTorch references for the parity tests: tiny diffusers models with every weight random,
weight transfer through the production rule tables, and the inverse renames that fabricate an
original-format (Stability single-file) checkpoint from a diffusers one."""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import numpy as np
import torch

from percov2_jax.convert import core, sd3_transformer, sd3_vae

# Tiny MM-DiT configs for the three SD3 variants. Latents in the tests are 10x14 (non-square,
# 5x7 tokens) and the 12x12 position table is cropped off-centre-by-rounding.
SD3_BASE = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    out_channels=16,
    pos_embed_max_size=12,
)
SD3_VARIANTS = {
    "sd3_medium": dict(num_layers=3),
    "sd35_large": dict(num_layers=3, qk_norm="rms_norm"),
    "sd35_medium": dict(num_layers=5, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.0609,
    scaling_factor=1.5305,
)


def randomize_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Give every parameter a random value at a realistic, variance-preserving scale.

    Matrices and kernels ~ N(0, gain^2 / fan_in); 1-D ``weight``s (norm scales) ~ N(1, 0.2^2);
    biases ~ N(0, 0.1^2). Buffers (the SD3 position table) are left as built.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(np.prod(p.shape[1:])))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_sd3(variant: str, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return randomize_(SD3Transformer2DModel(**SD3_BASE, **SD3_VARIANTS[variant]), seed)


def tiny_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomize_(AutoencoderKL(**{**VAE_CONFIG, **overrides}), seed)


def sources_of(state_dict) -> list[core.SourceTensor]:
    return [core.SourceTensor(k, tuple(v.shape), lambda v=v: v.detach().cpu().numpy()) for k, v in state_dict.items()]


def flax_params_from_torch(
    torch_module, flax_module, *flax_inputs, rules=sd3_transformer.RULES, prefix="", dtype=np.float32
):
    """Convert ``torch_module``'s state dict into ``flax_module``'s params through ``rules`` (strict).

    ``prefix`` is the submodule's name in the full model (``"pos_embed."``), so that the
    full-model rule table applies to a submodule's state dict.
    """
    init = lambda: flax_module.init(jax.random.key(0), *flax_inputs)
    target = core.flatten_shapes(nn.meta.unbox(jax.eval_shape(init)["params"]))
    depth = len(core.flax_module_path(prefix.rstrip(".")))
    sources = sources_of({prefix + k: v for k, v in torch_module.state_dict().items()})
    assignments = core.plan(sources, rules, target, locate=lambda path: (path[depth:], None))
    return core.assemble(assignments, target, dtype=dtype)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def max_rel_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the error relative to the output scale."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ---- inverse renames: diffusers -> original Stability single-file names -------------------


def sd3_to_original(state_dict: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """Undo diffusers' SD3 conversion: fuse q/k/v, swap (scale, shift) back, rename to ``model.diffusion_model.*``."""
    sd = dict(state_dict)
    out = {}
    last = num_layers - 1
    simple = {
        "pos_embed.pos_embed": "pos_embed",
        "pos_embed.proj.": "x_embedder.proj.",
        "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
        "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
        "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
        "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
        "context_embedder.": "context_embedder.",
        "proj_out.": "final_layer.linear.",
    }
    block = {
        "attn.norm_q.": "x_block.attn.ln_q.",
        "attn.norm_k.": "x_block.attn.ln_k.",
        "attn.norm_added_q.": "context_block.attn.ln_q.",
        "attn.norm_added_k.": "context_block.attn.ln_k.",
        "attn2.norm_q.": "x_block.attn2.ln_q.",
        "attn2.norm_k.": "x_block.attn2.ln_k.",
        "attn.to_out.0.": "x_block.attn.proj.",
        "attn2.to_out.0.": "x_block.attn2.proj.",
        "attn.to_add_out.": "context_block.attn.proj.",
        "norm1.linear.": "x_block.adaLN_modulation.1.",
        "norm1_context.linear.": "context_block.adaLN_modulation.1.",
        "ff.net.0.proj.": "x_block.mlp.fc1.",
        "ff.net.2.": "x_block.mlp.fc2.",
        "ff_context.net.0.proj.": "context_block.mlp.fc1.",
        "ff_context.net.2.": "context_block.mlp.fc2.",
    }
    fused = {
        "attn.to_": ("x_block.attn.qkv.", ("to_q", "to_k", "to_v")),
        "attn.add_": ("context_block.attn.qkv.", ("add_q_proj", "add_k_proj", "add_v_proj")),
        "attn2.to_": ("x_block.attn2.qkv.", ("to_q", "to_k", "to_v")),
    }

    def swap(a):
        scale, shift = np.split(a, 2, axis=0)
        return np.concatenate([shift, scale], axis=0)

    for i in range(num_layers):
        pre = f"transformer_blocks.{i}."
        for attn, (target, names) in fused.items():
            attn_mod = attn.split(".")[0]
            for leaf in ("weight", "bias"):
                keys = [f"{pre}{attn_mod}.{n}.{leaf}" for n in names]
                if all(k in sd for k in keys):
                    out[f"joint_blocks.{i}.{target}{leaf}"] = np.concatenate([sd.pop(k) for k in keys], axis=0)
        for key in [k for k in sd if k.startswith(pre)]:
            rest = key[len(pre) :]
            for src, dst in block.items():
                if rest.startswith(src):
                    value = sd.pop(key)
                    if i == last and src == "norm1_context.linear.":
                        value = swap(value)
                    out[f"joint_blocks.{i}.{dst}{rest[len(src) :]}"] = value
                    break
    for key in list(sd):
        if key.startswith("norm_out.linear."):
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = swap(sd.pop(key))
            continue
        for src, dst in simple.items():
            if key.startswith(src):
                out[dst + key[len(src) :]] = sd.pop(key)
                break
    assert not sd, f"inverse SD3 renames left keys: {sorted(sd)}"
    return {sd3_transformer.PREFIX + k: v for k, v in out.items()}


def vae_to_original(state_dict: dict[str, np.ndarray], num_blocks: int) -> dict[str, np.ndarray]:
    """Undo diffusers' LDM VAE conversion (reversed up-block index, 1x1 conv attention weights)."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state_dict.items():
        new = key
        m = re.fullmatch(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key
        )
        if m:
            part, name, leaf = m.groups()
            new = f"{part}.mid.attn_1.{attn[name]}.{leaf}"
            if leaf == "weight" and name != "group_norm":
                value = value[:, :, None, None]
        else:
            new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
            new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
            new = re.sub(
                r"decoder\.up_blocks\.(\d+)\.resnets\.",
                lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.",
                new,
            )
            new = re.sub(
                r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.",
                new,
            )
            new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
            new = new.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        out[sd3_vae.PREFIX + new] = value
    return out
