"""How far bfloat16 is from float32, for the Flax SD3 MM-DiT / VAE and for diffusers itself.

  python experiments/bf16_error.py

Same random weights on both sides (a diffusers model saved and converted): the error of
bf16 compute against each implementation's own float32 output, max |d| / max |ref| and
mean |d| / mean |ref|. Random variance-preserving weights: these numbers describe the arithmetic,
not the trained SD3 weights.
"""

from __future__ import annotations

import math
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import SD3Transformer2DModel as TorchSD3

from percov2_jax.convert import load_diffusers_component


def randomize_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return f"{np.abs(a - b).max() / np.abs(b).max():.2e} / {np.abs(a - b).mean() / np.abs(b).mean():.2e}"


def to_torch(x, dtype):
    x = np.asarray(x)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x)).to(dtype)


def main():
    torch.set_num_threads(2)
    print(f"machine: {platform.machine()} CPU, {jax.device_count()} jax device(s), jax {jax.__version__}, torch {torch.__version__}")
    folder = tempfile.mkdtemp()
    torch_model = randomize_(TorchSD3(sample_size=64, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=64,
                                      num_attention_heads=4, joint_attention_dim=512, caption_projection_dim=256,
                                      pooled_projection_dim=256, out_channels=16, pos_embed_max_size=32), 0)
    torch_model.save_pretrained(folder)
    f32, params = load_diffusers_component(folder, scan_layers=True)
    bf16, _ = load_diffusers_component(folder, scan_layers=True, dtype=jnp.bfloat16)
    rng = np.random.RandomState(0)
    x, ctx, pooled = rng.randn(2, 32, 32, 16).astype(np.float32), rng.randn(2, 40, 512).astype(np.float32), \
        rng.randn(2, 256).astype(np.float32)
    print("MM-DiT: 6 blocks, width 256, 16x16 image tokens + 40 context tokens; max rel / mean rel vs own float32")
    print("timestep | percov2-jax bf16 compute (f32 params) | diffusers bf16 (model.to(bfloat16))")
    torch_bf16 = TorchSD3.from_pretrained(folder).to(torch.bfloat16).eval()
    for t in (50.0, 500.0, 950.0):
        ts = np.full((2,), t, np.float32)
        ref = jax.jit(f32.apply)({"params": params}, x, ctx, pooled, ts)
        ours = jax.jit(bf16.apply)({"params": params}, x, ctx, pooled, ts)
        with torch.no_grad():
            t32 = torch_model(to_torch(x, torch.float32), to_torch(ctx, torch.float32), to_torch(pooled, torch.float32),
                              torch.from_numpy(ts)).sample.float().numpy()
            t16 = torch_bf16(to_torch(x, torch.bfloat16), to_torch(ctx, torch.bfloat16), to_torch(pooled, torch.bfloat16),
                             torch.from_numpy(ts)).sample.float().numpy()
        print(f"{t:8.0f} | {rel(ours, ref):>37s} | {rel(t16, t32)}")

    vfolder = tempfile.mkdtemp()
    tv = randomize_(TorchVAE(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16,
                             norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False), 1)
    tv.save_pretrained(vfolder)
    v32, vparams = load_diffusers_component(vfolder)
    v16, _ = load_diffusers_component(vfolder, dtype=jnp.bfloat16)
    images = rng.uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    m32, _ = v32.apply({"params": vparams}, images, method="encode")
    m16, _ = v16.apply({"params": vparams}, images, method="encode")
    d32 = v32.apply({"params": vparams}, m32, method="decode")
    d16 = v16.apply({"params": vparams}, m32, method="decode")
    tv16 = TorchVAE.from_pretrained(vfolder).to(torch.bfloat16).eval()
    with torch.no_grad():
        tm32 = tv.encode(to_torch(images, torch.float32)).latent_dist.mean
        tm16 = tv16.encode(to_torch(images, torch.bfloat16)).latent_dist.mean.float()
        td32 = tv.decode(tm32).sample
        td16 = tv16.decode(tm32.to(torch.bfloat16)).sample.float()
    print("VAE (4 levels, 128x128 image)  | percov2-jax bf16 compute | diffusers bf16")
    print(f"encode mean                     | {rel(m16, m32):>23s} | {rel(tm16.numpy(), tm32.numpy())}")
    print(f"decode                          | {rel(d16, d32):>23s} | {rel(td16.numpy(), td32.numpy())}")


if __name__ == "__main__":
    main()
