"""How far bfloat16 is from float32, for the Flax SD3 MM-DiT / VAE and for diffusers itself.

  python experiments/bf16_error.py                           # 6 blocks of width 256; a 4-level VAE at 128 px
  python experiments/bf16_error.py --quick --out /tmp/bf16   # smoke test: 3 blocks of width 64; 2 levels at 32 px

Same random weights on both sides (a diffusers model saved and converted): the error of
bf16 compute against each implementation's own float32 output, max |d| / max |ref| and
mean |d| / mean |ref|. Random variance-preserving weights: these numbers describe the arithmetic,
not the trained SD3 weights.

MM-DiT: ``--layers`` blocks (scanned, as trained), ``--heads`` x 64, latent ``--latent`` squared
x 16 (patch 2), ``--text-len`` context tokens of width 512, pooled width 256, batch 2, at
timesteps 50, 500 and 950; percov2-jax computes in bf16 with float32 parameters, diffusers runs
``model.to(torch.bfloat16)``. VAE: SD3-style ``AutoencoderKL`` (16 latent channels) with
``--vae-channels``, one ``--image`` px image: the posterior mean, and the decode of the float32
mean.

Output: ``bf16_error.json`` and ``bf16_error.md`` in ``--out`` (``_quick`` appended with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import results_io
import torch
from bench_vs_diffusers import randomize_

from percov2_jax.convert import load_diffusers_component

TIMESTEPS = (50.0, 500.0, 950.0)
HEAD_DIM = 64
CONTEXT_DIM, POOLED_DIM = 512, 256


def rel(ours, ref) -> dict[str, float]:
    """max |d| / max |ref| and mean |d| / mean |ref| in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    d = np.abs(ours - ref)
    return {"max_rel": float(d.max() / np.abs(ref).max()), "mean_rel": float(d.mean() / np.abs(ref).mean())}


def to_torch(x, dtype) -> torch.Tensor:
    x = np.asarray(x)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x)).to(dtype)


def mmdit_errors(args, folder: str, rng: np.random.RandomState) -> list[dict]:
    from diffusers import SD3Transformer2DModel as TorchSD3

    width = args.heads * HEAD_DIM
    torch_model = randomize_(
        TorchSD3(
            sample_size=2 * args.latent,
            patch_size=2,
            in_channels=16,
            num_layers=args.layers,
            attention_head_dim=HEAD_DIM,
            num_attention_heads=args.heads,
            joint_attention_dim=CONTEXT_DIM,
            caption_projection_dim=width,
            pooled_projection_dim=POOLED_DIM,
            out_channels=16,
            pos_embed_max_size=args.latent,
        ),
        0,
    )
    torch_model.save_pretrained(folder)
    f32, params = load_diffusers_component(folder, scan_layers=True)
    bf16, _ = load_diffusers_component(folder, scan_layers=True, dtype=jnp.bfloat16)
    torch_bf16 = TorchSD3.from_pretrained(folder).to(torch.bfloat16).eval()
    x = rng.randn(2, args.latent, args.latent, 16).astype(np.float32)
    ctx = rng.randn(2, args.text_len, CONTEXT_DIM).astype(np.float32)
    pooled = rng.randn(2, POOLED_DIM).astype(np.float32)
    apply32, apply16 = jax.jit(f32.apply), jax.jit(bf16.apply)  # one compile each for every timestep
    rows = []
    for t in TIMESTEPS:
        ts = np.full((2,), t, np.float32)
        ref = apply32({"params": params}, x, ctx, pooled, ts)
        ours = apply16({"params": params}, x, ctx, pooled, ts)
        with torch.no_grad():
            t32 = (
                torch_model(
                    to_torch(x, torch.float32),
                    to_torch(ctx, torch.float32),
                    to_torch(pooled, torch.float32),
                    torch.from_numpy(ts),
                )
                .sample.float()
                .numpy()
            )
            t16 = (
                torch_bf16(
                    to_torch(x, torch.bfloat16),
                    to_torch(ctx, torch.bfloat16),
                    to_torch(pooled, torch.bfloat16),
                    torch.from_numpy(ts),
                )
                .sample.float()
                .numpy()
            )
        rows.append({"timestep": t, "percov2_jax": rel(ours, ref), "diffusers": rel(t16, t32)})
        print(f"MM-DiT t={t:.0f}: {rows[-1]}", flush=True)
    return rows


def vae_call(vae, method: str):
    """``vae.apply`` jitted, ``fn(params, x)``: one XLA program per call, like the MM-DiT, rather
    than op-by-op dispatch."""
    return jax.jit(lambda p, x: vae.apply({"params": p}, x, method=method))


def vae_errors(args, folder: str, rng: np.random.RandomState) -> dict:
    from diffusers import AutoencoderKL as TorchVAE

    n = len(args.vae_channels)
    tv = randomize_(
        TorchVAE(
            block_out_channels=tuple(args.vae_channels),
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            layers_per_block=2,
            latent_channels=16,
            norm_num_groups=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        1,
    )
    tv.save_pretrained(folder)
    v32, vparams = load_diffusers_component(folder)
    v16, _ = load_diffusers_component(folder, dtype=jnp.bfloat16)
    images = rng.uniform(-1, 1, (1, args.image, args.image, 3)).astype(np.float32)
    m32, _ = vae_call(v32, "encode")(vparams, images)
    m16, _ = vae_call(v16, "encode")(vparams, images)
    d32 = vae_call(v32, "decode")(vparams, m32)
    d16 = vae_call(v16, "decode")(vparams, m32)
    tv16 = TorchVAE.from_pretrained(folder).to(torch.bfloat16).eval()
    with torch.no_grad():
        tm32 = tv.encode(to_torch(images, torch.float32)).latent_dist.mean
        tm16 = tv16.encode(to_torch(images, torch.bfloat16)).latent_dist.mean.float()
        td32 = tv.decode(tm32).sample
        td16 = tv16.decode(tm32.to(torch.bfloat16)).sample.float()
    out = {
        "encode_mean": {"percov2_jax": rel(m16, m32), "diffusers": rel(tm16.numpy(), tm32.numpy())},
        "decode": {"percov2_jax": rel(d16, d32), "diffusers": rel(td16.numpy(), td32.numpy())},
    }
    print(f"VAE: {out}", flush=True)
    return out


def _cell(e: dict) -> str:
    return f"{e['max_rel']:.2e} / {e['mean_rel']:.2e}"


def markdown(report: dict) -> str:
    cfg = report["config"]
    quick = " — QUICK smoke sizes" if cfg["quick"] else ""
    lines = [
        f"# bfloat16 vs float32: percov2-jax and diffusers{quick}",
        "",
        *results_io.provenance(report),
        "Random variance-preserving weights, the same on both sides. Each cell: max |bf16 - f32| / max |f32| "
        "/ mean |bf16 - f32| / mean |f32|, against the implementation's own float32 output.",
        "",
        f"MM-DiT: {cfg['layers']} blocks (scanned), width {cfg['heads'] * HEAD_DIM} ({cfg['heads']} heads x "
        f"{HEAD_DIM}), {(cfg['latent'] // 2) ** 2} image tokens + {cfg['text_len']} context tokens, batch 2.",
        "",
        "| timestep | percov2-jax bf16 compute (f32 params) | diffusers bf16 (model.to(bfloat16)) |",
        "|---:|---|---|",
    ]
    lines += [f"| {r['timestep']:.0f} | {_cell(r['percov2_jax'])} | {_cell(r['diffusers'])} |" for r in report["mmdit"]]
    vae = report["vae"]
    lines += [
        "",
        f"VAE: {len(cfg['vae_channels'])} levels {tuple(cfg['vae_channels'])}, one {cfg['image']}x"
        f"{cfg['image']} image.",
        "",
        "| VAE | percov2-jax bf16 compute | diffusers bf16 |",
        "|---|---|---|",
        f"| encode (posterior mean) | {_cell(vae['encode_mean']['percov2_jax'])} | "
        f"{_cell(vae['encode_mean']['diffusers'])} |",
        f"| decode (of the float32 mean) | {_cell(vae['decode']['percov2_jax'])} | "
        f"{_cell(vae['decode']['diffusers'])} |",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="MM-DiT blocks")
    ap.add_argument("--heads", type=int, default=4, help=f"attention heads of {HEAD_DIM}")
    ap.add_argument("--latent", type=int, default=32, help="latent side (image tokens: (latent / 2)^2)")
    ap.add_argument("--text-len", type=int, default=40, help="context tokens")
    ap.add_argument("--vae-channels", type=lambda s: [int(c) for c in s.split(",")], default=[32, 64, 64, 64])
    ap.add_argument("--image", type=int, default=128, help="VAE image side in px")
    results_io.add_output_arguments(ap, "3 blocks of one head, latent 8, a 2-level VAE at 32 px")
    args = ap.parse_args(argv)
    if args.quick:  # 3 blocks: the shallowest model with a scanned run
        args.layers, args.heads, args.latent, args.text_len, args.vae_channels, args.image = 3, 1, 8, 8, [32, 32], 32
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    report = {
        "command": results_io.command(),
        "config": vars(args),
        "machine": results_io.machine(),
        "versions": results_io.versions("jax", "jaxlib", "flax", "torch", "diffusers"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.RandomState(0)  # the MM-DiT inputs, then the VAE image
        report["mmdit"] = mmdit_errors(args, os.path.join(tmp, "transformer"), rng)
        report["vae"] = vae_errors(args, os.path.join(tmp, "vae"), rng)
    results_io.finish_machine(report["machine"])
    report["total_s"] = time.perf_counter() - started
    results_io.write_report(args.out, results_io.stem("bf16_error", args.quick), report, markdown(report))


if __name__ == "__main__":
    main()
