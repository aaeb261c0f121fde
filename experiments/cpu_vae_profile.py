"""Where XLA:CPU spends the SD3 VAE's time, against diffusers (PyTorch eager) on the same CPU.

  python experiments/cpu_vae_profile.py                                # the full run, 3-5 min on 2 cores
  python experiments/cpu_vae_profile.py --quick --out /tmp/vae_profile # smoke test: tiny VAE, seconds

The VAE and weights are ``bench_vs_diffusers``'s (a seeded random diffusers ``AutoencoderKL``,
16 latent channels, ``--vae-channels`` at ``--size`` px, batch ``--batch``, converted with
``load_diffusers_component``); float32. Encode is the posterior mean, decode the unscaled
latents, as in that benchmark: neither side samples, scales or converts dtypes.

1. **Whole model**: JAX (jit, the library's ``Conv2D`` formulations) against torch eager.
2. **Profile**: the compiled HLO (fusions, convolutions with their layouts and how many run as
   YNNPACK fusions, copies and transposes, reductions) and, from a ``jax.profiler`` trace of an
   executable compiled with ``xla_cpu_enable_xprof_traceme``, the time of every thunk summed by
   kind (convolutions by shape, elementwise fusions, reductions, dots, copies). XLA:CPU's own
   (Eigen) convolutions leave no trace event: what the trace misses is reported as untraced.
   PyTorch: ``torch.profiler`` totals per aten op (convolutions by input shape).
3. **Variants**, timed against the current code: the formulations before ``Conv2D`` (nearest
   upsampling by ``jnp.repeat`` then a 3x3 conv; 1x1 and 3-channel convs as convolutions), each
   change alone, other upsampling formulations, and XLA:CPU compile options (YNNPACK fusions
   limited to reductions, i.e. XLA's own convolutions and dots; no YNNPACK at all).

Timing: the variants of a table run in alternating blocks within one process (per round, for
each variant in turn: one untimed call, then ``--block`` timed calls), so load from elsewhere
falls on all of them alike; medians over ``--rounds`` rounds. Blocks keep each side's thread
pool warm: back-to-back single calls of JAX and torch slow each other down (torch's OpenMP
threads and XLA's pools contend for the same 2 cores). The load average is recorded at start
and end; the report warns when the machine was busy.

``--quick``: VAE channels (32, 32), 32 px, batch 1, one round of one call, and only the variants
current and before; every step above still runs.

Output: ``cpu_vae_profile.json`` and ``cpu_vae_profile.md`` in ``--out`` (``_quick`` appended
with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import results_io
import torch
import xla_cpu_trace
from bench_vs_diffusers import build_vae, nchw, nhwc, rel_err

from percov2_jax.models import vae
from percov2_jax.models.layers import conv as flax_conv

# YNNPACK fusion kinds XLA:CPU may use (xla_cpu_experimental_ynn_fusion_type); this jaxlib's
# default also hands it every convolution and dot.
YNN_REDUCE_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
YNN_NONE = {"xla_cpu_experimental_ynn_fusion_type": ""}


# ------------------------------------------------------------------------------ formulations


class RepeatUpsample2D(nn.Module):
    """Before ``Conv2D(upsample=True)``: ``jnp.repeat`` x2 on both axes, then a 3x3 ``nn.Conv``."""

    channels: int
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return flax_conv(self.channels, 3, padding=((1, 1), (1, 1)), name="conv", **kw)(x)


class BroadcastUpsample2D(RepeatUpsample2D):
    """Nearest x2 as a broadcast + reshape (one fusion), then a 3x3 ``nn.Conv``."""

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return flax_conv(self.channels, 3, padding=((1, 1), (1, 1)), name="conv", **kw)(x)


class ConvWeights(nn.Module):
    """A 3x3 conv's ``kernel`` and ``bias`` under ``layers.conv``'s names, returned unapplied."""

    features: int
    in_features: int
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self):
        shape = (3, 3, self.in_features, self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
        return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)


class ZeroTapUpsample2D(RepeatUpsample2D):
    """Sub-pixel with a 3x3 kernel (zeros where a phase has no tap): the upsampled conv's FLOPs on the
    low-resolution map with 4 x out channels, then one depth-to-space transpose."""

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        o = self.channels
        kernel, bias = ConvWeights(o, c, self.param_dtype, name="conv")()

        def phases(k, axis):
            k0, k1, k2 = jnp.split(k, 3, axis=axis)
            z = jnp.zeros_like(k0)
            return jnp.stack([jnp.concatenate([k0, k1 + k2, z], axis), jnp.concatenate([z, k0 + k1, k2], axis)])

        folded = jnp.transpose(phases(phases(kernel, 0), 2), (2, 3, 4, 1, 0, 5)).reshape(3, 3, c, 4 * o)
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, folded, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)
        return y.reshape(b, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o) + bias


def plain_conv(features, kernel_size, *, name, dtype, param_dtype, upsample=False, **kw):
    """Before ``Conv2D``: every conv an ``nn.Conv`` (``layers.conv``); ``upsample`` stays ``Conv2D``'s."""
    if upsample:
        return vae.Conv2D(features, kernel_size, upsample=True, name=name, dtype=dtype, param_dtype=param_dtype, **kw)
    return flax_conv(features, kernel_size, name=name, dtype=dtype, param_dtype=param_dtype, **kw)


def conv_only_1x1_as_dot(features, kernel_size, *, name, dtype, param_dtype, **kw):
    """``Conv2D``'s dot for 1x1 convs only."""
    if kernel_size == 1:
        return vae.Conv2D(features, kernel_size, name=name, dtype=dtype, param_dtype=param_dtype, **kw)
    return plain_conv(features, kernel_size, name=name, dtype=dtype, param_dtype=param_dtype, **kw)


def conv_only_rgb_as_dot(features, kernel_size, *, name, dtype, param_dtype, **kw):
    """``Conv2D``'s patches-and-dot for the 3-channel conv_in only (1x1 stay convolutions)."""
    if kernel_size == 3 and name == "conv_in":
        return vae.Conv2D(features, kernel_size, name=name, dtype=dtype, param_dtype=param_dtype, **kw)
    return plain_conv(features, kernel_size, name=name, dtype=dtype, param_dtype=param_dtype, **kw)


class FusedNormResnetBlock2D(vae.ResnetBlock2D):
    """ResnetBlock2D with GroupNorm's variance from one pass (E[x²] - E[x]²), so its two sums read
    the same input and nothing centred is written between them."""

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(OnePassGroupNorm(self.groups, name="norm1", **kw)(x))
        h = vae.conv(self.out_channels, 3, name="conv1", **kw)(h)
        h = nn.silu(OnePassGroupNorm(self.groups, name="norm2", **kw)(h))
        h = vae.conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = vae.conv(self.out_channels, 1, padding="VALID", name="conv_shortcut", **kw)(x)
        return x + h


class OnePassGroupNorm(nn.Module):
    num_groups: int
    epsilon: float = 1e-6
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
        flat = x.reshape(b, -1, c)
        count = flat.shape[1] * (c // g)
        s1 = flat.sum(axis=1).reshape(b, g, -1).sum(-1) / count
        s2 = (flat * flat).sum(axis=1).reshape(b, g, -1).sum(-1) / count
        mean, var = s1, jnp.maximum(s2 - s1 * s1, 0.0)
        rstd = jax.lax.rsqrt(var + self.epsilon)
        mean, rstd = (jnp.repeat(v, c // g, axis=1)[:, None, :] for v in (mean, rstd))
        return ((flat - mean) * rstd * scale + bias).reshape(x.shape).astype(self.dtype)


# A variant: (description, XLA compile options, names in percov2_jax.models.vae to replace while tracing).
BEFORE = dict(conv=plain_conv, Upsample2D=RepeatUpsample2D)
VARIANTS = {
    "current": ("this code: `Conv2D` (sub-pixel upsampling, 1x1 and RGB convs as dots)", {}, {}),
    "before": ("every conv an nn.Conv, upsampling by jnp.repeat (the code before Conv2D)", {}, BEFORE),
    "before + 1x1 as dot": (
        "the 1x1 shortcut convs as dots, nothing else",
        {},
        {**BEFORE, "conv": conv_only_1x1_as_dot},
    ),
    "before + RGB conv_in as dot": (
        "the 3-channel conv_in as patches @ kernel, nothing else",
        {},
        {**BEFORE, "conv": conv_only_rgb_as_dot},
    ),
    "before + sub-pixel upsample": ("Conv2D(upsample=True), nothing else", {}, {"conv": plain_conv}),
    "broadcast upsample": (
        "current, but nearest x2 by broadcast + reshape, then conv",
        {},
        {"Upsample2D": BroadcastUpsample2D},
    ),
    "zero-tap sub-pixel": (
        "current, but the sub-pixel conv as 3x3 (zeros) + depth-to-space",
        {},
        {"Upsample2D": ZeroTapUpsample2D},
    ),
    "one-pass GroupNorm": (
        "current, GroupNorm variance as E[x²] - E[x]²",
        {},
        {"ResnetBlock2D": FusedNormResnetBlock2D},
    ),
    "current, YNN reductions only": (
        "current; compile option xla_cpu_experimental_ynn_fusion_type=REDUCE (XLA's own convs and dots)",
        YNN_REDUCE_ONLY,
        {},
    ),
    "current, no YNN": ("current; compile option: no YNNPACK fusions at all", YNN_NONE, {}),
    "before, YNN reductions only": ("before; compile option YNN reductions only", YNN_REDUCE_ONLY, BEFORE),
}

QUICK_VARIANTS = ["current", "before"]


@contextlib.contextmanager
def patched(names: dict):
    """Replace names in ``percov2_jax.models.vae`` (the modules look them up when traced)."""
    old = {n: getattr(vae, n) for n in names}
    for n, v in names.items():
        setattr(vae, n, v)
    try:
        yield
    finally:
        for n, v in old.items():
            setattr(vae, n, v)


def compile_part(module, params, arg, part: str, options: dict, names: dict):
    if part == "encode":
        fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode")[0])
    else:
        fn = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    with patched(names):
        lowered = fn.lower(params, arg)
    return lowered.compile(compiler_options=options)


# ------------------------------------------------------------------------------ profile


def jax_call(compiled, params, arg):
    return lambda: jax.block_until_ready(compiled(params, arg))


def trace_breakdown(compiled, params, arg, calls: int) -> dict:
    """Per-thunk times (ms per call) from a profiler trace, summed by kind; convolutions by shape."""
    trace = xla_cpu_trace.thunk_trace(compiled.as_text(), jax_call(compiled, params, arg), calls)
    convs = {k[5:]: ms for k, ms in trace["by_shape_ms"].items() if k.startswith("conv ")}
    keep = ("wall_ms_under_trace", "traced_ms", "untraced_ms", "by_kind_ms")
    return {**{k: trace[k] for k in keep}, "conv_by_shape_ms": convs}


# ------------------------------------------------------------------------------ main


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        torch_vae, module, params = build_vae(args, os.path.join(tmp, "vae"))
    params = jax.device_put(params)
    images = np.random.RandomState(8).uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    images_t = nchw(images)
    with torch.no_grad():
        ref_mean = torch_vae.encode(images_t).latent_dist.mean
        latents = np.asarray(nhwc(ref_mean))
        latents_t = nchw(latents)
        ref_decoded = torch_vae.decode(latents_t).sample
    parts = {
        "encode": (jax.device_put(images), lambda: torch_vae.encode(images_t).latent_dist.mean, nhwc(ref_mean)),
        "decode": (jax.device_put(latents), lambda: torch_vae.decode(latents_t).sample, nhwc(ref_decoded)),
    }
    out = {"parts": {}}
    for part, (arg, torch_fn, ref) in parts.items():
        print(f"{part} ...", flush=True)
        variants, compiled = {}, {}
        for name in args.variants:
            _, options, names = VARIANTS[name]
            start = time.perf_counter()
            compiled[name] = compile_part(module, params, arg, part, options, names)
            variants[name] = {
                "compile_s": time.perf_counter() - start,
                "rel_err_vs_torch": rel_err(compiled[name](params, arg), ref),
                "hlo": xla_cpu_trace.hlo_summary(compiled[name].as_text()),
            }
        fns = {"torch eager": torch_fn, **{k: jax_call(c, params, arg) for k, c in compiled.items()}}
        times, loads = xla_cpu_trace.alternate(fns, args.rounds, args.block)
        for name in args.variants:
            variants[name]["time"] = times[name]
        print("  profiling", flush=True)
        traced = compile_part(module, params, arg, part, xla_cpu_trace.TRACE, {})
        profile = {
            "jax_current": trace_breakdown(traced, params, arg, args.profile_calls),
            "torch_eager": xla_cpu_trace.torch_profile(torch_fn, args.profile_calls),
        }
        if "current, YNN reductions only" in args.variants:
            traced = compile_part(module, params, arg, part, {**xla_cpu_trace.TRACE, **YNN_REDUCE_ONLY}, {})
            profile["jax_current_ynn_reductions_only"] = trace_breakdown(traced, params, arg, args.profile_calls)
        out["parts"][part] = {
            "torch_eager": times["torch eager"],
            "variants": variants,
            "profile": profile,
            "load_1min_per_round": loads,
        }
    return out


def _ms(t: dict) -> str:
    return f"{t['median_ms']:.1f} ({t['p10_ms']:.1f}–{t['p90_ms']:.1f})"


def markdown(report: dict) -> str:
    cfg, mach = report["config"], report["machine"]
    quick = " — QUICK smoke sizes" if cfg["quick"] else ""
    lines = [f"# The SD3 VAE on XLA:CPU against PyTorch: where the time goes{quick}", ""]
    lines += results_io.provenance(report)
    lines += [
        f"Config: VAE channels {tuple(cfg['vae_channels'])}, {cfg['size']} px, batch {cfg['batch']}, 16 latent "
        f"channels, float32; {cfg['rounds']} rounds of alternating blocks of {cfg['block']} timed calls "
        f"(after one untimed call each); torch threads {mach.get('torch_threads')}, JAX's default CPU pool.",
        "",
    ]
    lines += results_io.busy_warning(mach, "every time below shares the cores with that load (alike for all variants).")
    for part, r in report["parts"].items():
        torch_ms = r["torch_eager"]["median_ms"]
        lines += [
            f"## {part}",
            "",
            "1-minute load average after each round: " + ", ".join(f"{x:.2f}" for x in r["load_1min_per_round"]) + ".",
            "",
            "Ratio = torch eager median / this median (> 1: JAX faster). Rel err: max |JAX - torch| / max |torch|.",
            "",
            "| variant | median ms (p10–p90) | ratio | compile s | convs (YNN fusions) | fusions "
            "| copies+transposes | rel err |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| torch eager | {_ms(r['torch_eager'])} | 1.00 | | | | | |",
        ]
        for name, v in r["variants"].items():
            h = v["hlo"]
            ynn = h["library_fusions"].get("__ynn_fusion", 0)
            fusions = sum(h["fusions_by_kind"].values())
            lines.append(
                f"| {name} | {_ms(v['time'])} | {torch_ms / v['time']['median_ms']:.2f} | {v['compile_s']:.1f} | "
                f"{h['convolutions']} ({ynn} YNN total) | {fusions} | {h['copies'] + h['transposes']} | "
                f"{v['rel_err_vs_torch']:.1e} |"
            )
        lines += ["", "Variants:", ""]
        lines += [f"- **{name}**: {VARIANTS[name][0]}" for name in r["variants"]]
        prof = r["profile"]
        lines += [
            "",
            f"Profile of one {part} (ms per call; JAX from thunk trace events, torch from torch.profiler):",
            "",
        ]
        lines += [
            "| kind | JAX current | JAX current, YNN reductions only | torch eager (aten op) |",
            "|---|---:|---:|---|",
        ]
        cur, alt = prof["jax_current"], prof.get("jax_current_ynn_reductions_only")
        torch_top = list(prof["torch_eager"]["top_ops_ms"].items())
        kinds = list(dict.fromkeys([*cur["by_kind_ms"], *(alt["by_kind_ms"] if alt else {})]))
        rows = [*kinds, "untraced (Eigen convs, gaps)", "wall under trace"]
        for i, kind in enumerate(rows):
            if kind == "untraced (Eigen convs, gaps)":
                a, b = cur["untraced_ms"], alt["untraced_ms"] if alt else None
            elif kind == "wall under trace":
                a, b = cur["wall_ms_under_trace"], alt["wall_ms_under_trace"] if alt else None
            else:
                a, b = cur["by_kind_ms"].get(kind, 0.0), (alt["by_kind_ms"].get(kind, 0.0) if alt else None)
            t = f"{torch_top[i][0]} {torch_top[i][1]:.1f}" if i < len(torch_top) else ""
            lines.append(f"| {kind} | {a:.1f} | {'' if b is None else f'{b:.1f}'} | {t} |")
        lines += ["", "Convolutions by shape (ms per call, summed over layers):", ""]
        lines += results_io.side_by_side(
            ["JAX current (YNN fusions)", "torch eager input * weight (NCHW)"],
            [cur["conv_by_shape_ms"], prof["torch_eager"]["conv_by_shape_ms"]],
        )
        lines.append("")
    flags = report.get("xla_cpu_flags", [])
    lines += [
        "## XLA:CPU options in this jaxlib",
        "",
        "Backend choices among them: " + ", ".join(f"`{f}`" for f in flags if re.search(r"onednn|xnn|ynn|eigen", f)),
        "",
        f"All {len(flags)}: " + ", ".join(f"`{f}`" for f in flags),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae-channels", type=lambda s: [int(c) for c in s.split(",")], default=[32, 64, 64, 64])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of alternating blocks")
    ap.add_argument("--block", type=int, default=2, help="timed calls per block")
    ap.add_argument("--profile-calls", type=int, default=3)
    ap.add_argument(
        "--variants", type=lambda s: s.split(","), default=None, help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    results_io.add_output_arguments(ap, "tiny VAE at 32 px, one round of one call")
    args = ap.parse_args(argv)
    if args.quick:
        args.vae_channels, args.size, args.batch, args.rounds, args.block, args.profile_calls = [32, 32], 32, 1, 1, 1, 1
    if args.variants is None:
        args.variants = QUICK_VARIANTS if args.quick else list(VARIANTS)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    if "current" not in args.variants:
        args.variants.insert(0, "current")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    jax.config.update("jax_enable_compilation_cache", False)
    report = {
        "command": results_io.command(),
        "config": vars(args),
        "machine": results_io.machine(),
        "versions": results_io.versions("jax", "jaxlib", "flax", "torch", "diffusers", "numpy"),
    }
    started = time.perf_counter()
    report.update(run(args))
    report["xla_cpu_flags"] = xla_cpu_trace.xla_cpu_flags()
    report["total_s"] = time.perf_counter() - started
    results_io.finish_machine(report["machine"])
    results_io.write_report(args.out, results_io.stem("cpu_vae_profile", args.quick), report, markdown(report))


if __name__ == "__main__":
    main()
