"""Wall-clock of percov2-jax (jit) against diffusers PyTorch (eager and ``torch.compile``) on one CPU.

  python experiments/bench_vs_diffusers.py                            # the full run, < 10 min on 2 idle cores
  python experiments/bench_vs_diffusers.py --quick --out /tmp/bench   # smoke test: tiny sizes, no torch.compile

``--quick``: 2 blocks of width 64, 64 px, 2 repeats, and no torch.compile unless
``--torch-compile`` is given (its cold compiles take minutes even at these sizes); every other
step, the parity checks and the report are the full run's.

Run it on an idle machine. Every number is a wall-clock median, and PyTorch's spin-waiting
OpenMP threads make it many times slower under any competing load (10-20x was seen on 2 cores
while a test suite ran): a busy machine measures the load, not the frameworks. The report warns
when the 1-minute load average at start exceeds 0.5. A contended run of the defaults with
``--repeats 1`` took 8.5 min, most of it torch.compile's cold compiles.

Workloads, with the same weights and inputs on both sides (a seeded random diffusers model,
saved and converted with ``percov2_jax.convert.load_diffusers_component``):

1. MM-DiT forward: ``SD3Transformer2DModel``, ``--layers`` blocks of width ``--width``
   (``--head-dim`` 64), ``--size`` px images (latent ``size/8`` squared x 16, patch 2),
   batch ``--batch``, ``--text-len`` context tokens of width ``--context-dim``.
2. Training step: forward + MSE to a random target + backward + AdamW update (lr 1e-4,
   weight decay 0.01 on both sides; the position table is a buffer in diffusers and is kept
   out of the JAX update too).
3. Euler sampling: ``--steps`` steps with classifier-free guidance; ``--batch // 2`` samples, so
   each step runs the model on the forward workload's batch (``[uncond; cond]``).
   JAX: ``percov2_jax.flow.sample`` (one ``lax.scan``) under jit; PyTorch: a Python loop over
   diffusers' ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
4. VAE encode (posterior mean) and decode: SD3-style ``AutoencoderKL`` with 16 latent
   channels and ``--vae-channels`` at ``--size`` px, batch ``--batch``.

Before timing, each workload's outputs are compared (max |jax - torch| / max |torch|; for the
training step the loss, the gradient norm and the loss after one update). Times: JAX ``lower`` +
``compile`` and the first call are reported apart from the steady state; so is torch's first
call, which for ``torch.compile`` includes compiling (with a fresh inductor cache, as JAX runs
without a persistent compilation cache; the sampling loop reuses the forward workload's compiled
module). After one more untimed call: median, p10 and p90 of ``--repeats`` calls. float32
throughout; torch uses ``os.cpu_count()`` threads, JAX its default CPU thread pool. Ratio =
torch median / JAX median (> 1: JAX is faster). MM-DiT blocks are unrolled in JAX unless
``--scan-layers`` (the training default; XLA's cost analysis then counts the scanned body once).

MFU of the training step = FLOPs per step / (median step time x measured peak), the peak being
the better median GFLOP/s of a ``--matmul-size`` float32 matmul in JAX or torch; FLOPs from
XLA's cost analysis of the compiled step (all ops), cross-checked by the step's jaxpr matmul
count (``percov2_jax.flops.traced_matmul_flops``) and 3x the analytic forward count.

Output: ``bench_vs_diffusers.json`` (config, versions, machine, every raw time) and
``bench_vs_diffusers.md`` in ``--out`` (``_quick`` is appended with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import results_io
import torch
import torch.nn.functional as F

from percov2_jax import flow
from percov2_jax.convert import load_diffusers_component
from percov2_jax.flops import cost_analysis_flops, mmdit_forward_flops, traced_matmul_flops

LATENT_CHANNELS = 16
PATCH = 2
VAE_FACTOR = 8
GUIDANCE = 3.0
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
FROZEN = ("pos_embed", "pos_embed")  # diffusers' buffer; our parameter


# ------------------------------------------------------------------------------ timing


def time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` (which must return only when done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def jax_compile(jitted, *args) -> tuple[Any, dict[str, float]]:
    """AOT-compile ``jitted`` for ``args``: the executable and its lower / compile seconds."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, {"lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at}


def timed_first_then_repeats(
    fn: Callable[[], Any], repeats: int, after_first: Callable[[], Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """First call (timed apart), ``after_first()`` untimed, one untimed warm-up, then ``repeats`` timed calls."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    if after_first is not None:
        after_first()
    fn()
    return out, {"first_call_s": first, **results_io.spread_ms(time_calls(fn, repeats), raw=True)}


def jax_bench(jitted, args: tuple, repeats: int) -> tuple[Any, dict[str, Any]]:
    args = jax.device_put(args)  # no host-to-device copy inside the timed calls (torch reads numpy's memory)
    compiled, compile_times = jax_compile(jitted, *args)
    out, stats = timed_first_then_repeats(lambda: jax.block_until_ready(compiled(*args)), repeats)
    return out, {**compile_times, **stats}


def torch_bench(
    fn: Callable[[], Any], repeats: int, grad: bool = False, after_first: Callable[[], Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    with torch.set_grad_enabled(grad):
        return timed_first_then_repeats(fn, repeats, after_first)


def guarded(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``{"error": ...}`` if it raises (torch.compile may be unavailable offline)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the reason is the result
        print(f"  {what} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return {"error": f"{type(e).__name__}: {str(e)[:2000]}", "traceback": traceback.format_exc()[-4000:]}


# ------------------------------------------------------------------------------ models and data


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded variance-preserving weights: matrices N(0, 1/fan_in), norm scales ~1, small biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
    return module.eval()


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def torch_inputs(x: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """``mmdit_inputs`` as the positional arguments of diffusers' ``SD3Transformer2DModel``."""
    return (
        nchw(x["latents"]),
        torch.from_numpy(x["context"]),
        torch.from_numpy(x["pooled"]),
        torch.from_numpy(x["timestep"]),
    )


def rel_scalar(ours: float, ref: float) -> float:
    return abs(float(ours) - float(ref)) / abs(float(ref))


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def build_mmdit(args, folder: str):
    from diffusers import SD3Transformer2DModel

    latent = args.size // VAE_FACTOR
    torch_model = randomize_(
        SD3Transformer2DModel(
            sample_size=latent,
            patch_size=PATCH,
            in_channels=LATENT_CHANNELS,
            num_layers=args.layers,
            attention_head_dim=args.head_dim,
            num_attention_heads=args.width // args.head_dim,
            joint_attention_dim=args.context_dim,
            caption_projection_dim=args.width,
            pooled_projection_dim=args.context_dim,
            out_channels=LATENT_CHANNELS,
            pos_embed_max_size=latent // PATCH,
        ),
        seed=0,
    )
    torch_model.save_pretrained(folder)
    module, params = load_diffusers_component(folder, scan_layers=args.scan_layers)
    return torch_model, module, params


def build_vae(args, folder: str):
    from diffusers import AutoencoderKL

    n = len(args.vae_channels)
    torch_vae = randomize_(
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(args.vae_channels),
            layers_per_block=2,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=32,
            sample_size=args.size,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5305,
        ),
        seed=1,
    )
    torch_vae.save_pretrained(folder)
    module, params = load_diffusers_component(folder)
    return torch_vae, module, params


def mmdit_inputs(args, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    latent = args.size // VAE_FACTOR
    return {
        "latents": rng.randn(batch, latent, latent, LATENT_CHANNELS).astype(np.float32),
        "context": rng.randn(batch, args.text_len, args.context_dim).astype(np.float32),
        "pooled": rng.randn(batch, args.context_dim).astype(np.float32),
        "timestep": rng.uniform(0, 1000, batch).astype(np.float32),
    }


# ------------------------------------------------------------------------------ workloads


def bench_forward(args, torch_model, compiled_model, module, params) -> dict:
    x = mmdit_inputs(args, args.batch, seed=2)
    xt = torch_inputs(x)
    forward = jax.jit(lambda p, *a: module.apply({"params": p}, *a))
    ours, result = jax_bench(forward, (params, x["latents"], x["context"], x["pooled"], x["timestep"]), args.repeats)
    ref, result_eager = torch_bench(lambda: torch_model(*xt, return_dict=False)[0], args.repeats)
    out = {"jax": result, "torch_eager": result_eager, "parity_rel_max": rel_err(ours, nhwc(ref))}
    if compiled_model is not None:

        def compiled_run():
            c_out, stats = torch_bench(lambda: compiled_model(*xt, return_dict=False)[0], args.repeats)
            return {**stats, "parity_rel_max_vs_eager": rel_err(nhwc(c_out), nhwc(ref))}

        out["torch_compile"] = guarded("torch.compile forward", compiled_run)
    return out


def split_frozen(params: dict) -> tuple[dict, Any]:
    trainable = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    frozen = trainable[FROZEN[0]].pop(FROZEN[1])
    return trainable, frozen


class TrainSetup(NamedTuple):
    """The benchmark's JAX training step and what it runs on: ``train_step`` (MSE against
    ``target``, then AdamW ``tx``), ``step`` (it jitted, donating parameters and optimizer state),
    the trainable parameters and the frozen position table, and the device batch."""

    x: dict[str, np.ndarray]
    target: np.ndarray
    tx: Any
    train_step: Callable
    step: Any
    trainable: dict
    frozen: Any
    batch: dict


def jax_train_setup(args, module, params) -> TrainSetup:
    x = mmdit_inputs(args, args.batch, seed=3)
    target = np.random.RandomState(4).randn(*x["latents"].shape).astype(np.float32)
    tx = optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])

    def loss_fn(trainable, frozen, batch):
        merged = {**trainable, FROZEN[0]: {**trainable[FROZEN[0]], FROZEN[1]: frozen}}
        out = module.apply({"params": merged}, batch["latents"], batch["context"], batch["pooled"], batch["timestep"])
        return jnp.mean((out - batch["target"]) ** 2)

    def train_step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    trainable, frozen = split_frozen(params)
    step = jax.jit(train_step, donate_argnums=(0, 1))
    return TrainSetup(x, target, tx, train_step, step, trainable, frozen, jax.device_put({**x, "target": target}))


def torch_train_step(torch_model, xt: tuple, target_t: torch.Tensor, compile_it: bool):
    """diffusers' side of the training step on a copy of ``torch_model``: MSE, backward,
    ``torch.optim.AdamW`` with the same hyper-parameters. Returns ``(step, model, losses)``: one step
    per call, the trained copy, and each step's loss appended to ``losses``."""
    model = copy.deepcopy(torch_model).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=ADAMW["lr"],
        betas=(ADAMW["b1"], ADAMW["b2"]),
        eps=ADAMW["eps"],
        weight_decay=ADAMW["weight_decay"],
    )
    forward = torch.compile(model) if compile_it else model
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(*xt, return_dict=False)[0], target_t)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    return step, model, losses


def bench_train(args, torch_model, module, params) -> dict:
    x, target, tx, train_step, step, trainable, frozen, batch = jax_train_setup(args, module, params)
    state = [jax.tree.map(jnp.copy, trainable), tx.init(trainable)]
    compiled, compile_times = jax_compile(step, state[0], state[1], frozen, batch)
    xla_flops = cost_analysis_flops(compiled)
    matmul_flops = traced_matmul_flops(train_step, state[0], state[1], frozen, batch)

    losses, grad_norm = [], []

    def jax_step():
        state[0], state[1], loss = compiled(state[0], state[1], frozen, batch)
        losses.append(jax.block_until_ready(loss))

    def first_grad_norm():  # after one step Adam's first moment is (1 - b1)·grad: no extra compile needed
        grad_norm.append(float(optax.global_norm(state[1][0].mu)) / (1 - ADAMW["b1"]))

    _, stats = timed_first_then_repeats(jax_step, args.repeats, after_first=first_grad_norm)
    result = {"jax": {**compile_times, **stats}}

    xt = torch_inputs(x)
    target_t = nchw(target)

    def torch_run(model, compile_it: bool):
        t_step, model, t_losses = torch_train_step(model, xt, target_t, compile_it)
        norm = []

        def first_grad_norm():  # the first step's gradients are still in .grad
            norm.append(math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters())))

        _, stats = torch_bench(t_step, args.repeats, grad=True, after_first=first_grad_norm)
        return {**stats, "loss_step0": t_losses[0], "loss_step1": t_losses[1], "grad_norm_step0": norm[0]}

    eager = torch_run(torch_model, False)
    result["torch_eager"] = eager
    result["parity"] = {
        "loss_step0_rel": rel_scalar(losses[0], eager["loss_step0"]),
        "loss_after_one_update_rel": rel_scalar(losses[1], eager["loss_step1"]),
        "grad_norm_rel": rel_scalar(grad_norm[0], eager["grad_norm_step0"]),
        "jax_loss_step0": float(losses[0]),
        "torch_loss_step0": eager["loss_step0"],
    }
    if args.torch_compile:
        result["torch_compile"] = guarded("torch.compile training step", lambda: torch_run(torch_model, True))
    latent = args.size // VAE_FACTOR
    forward_matmuls = mmdit_forward_flops(module.config, args.batch, latent, latent, args.text_len)
    result["flops"] = {
        "xla_cost_analysis": xla_flops,
        "jaxpr_matmuls": float(matmul_flops),
        "analytic_forward_matmuls": float(forward_matmuls),
        "scan_layers": args.scan_layers,
        "note": (
            "XLA counts a while-loop (scan) body once, so with scan_layers the cost analysis "
            "undercounts; MFU then uses the jaxpr matmul count"
        )
        if args.scan_layers
        else "",
    }
    return result


def bench_sampling(args, torch_model, compiled_model, module, params) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = max(args.batch // 2, 1)
    cond, uncond = mmdit_inputs(args, n, seed=5), mmdit_inputs(args, n, seed=6)
    noise = np.random.RandomState(7).randn(*cond["latents"].shape).astype(np.float32)
    jcond = {"context": cond["context"], "pooled": cond["pooled"]}
    juncond = {"context": uncond["context"], "pooled": uncond["pooled"]}

    def velocity(p, x, t, c):
        return module.apply({"params": p}, x, c["context"], c["pooled"], t)

    sampler = jax.jit(
        lambda p, z, c, u: flow.sample(
            lambda x, t, cc: velocity(p, x, t, cc), z, c, u, num_steps=args.steps, guidance_scale=GUIDANCE
        )
    )
    ours, result = jax_bench(sampler, (params, noise, jcond, juncond), args.repeats)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=flow.SHIFT)
    context = torch.from_numpy(np.concatenate([uncond["context"], cond["context"]]))
    pooled = torch.from_numpy(np.concatenate([uncond["pooled"], cond["pooled"]]))

    def torch_sample(model):
        scheduler.set_timesteps(args.steps)
        x = nchw(noise)
        for t in scheduler.timesteps:
            # contiguous, like the forward workload's timestep, so torch.compile's stride guards hold
            v = model(torch.cat([x, x]), context, pooled, t.expand(2 * n).contiguous(), return_dict=False)[0]
            v_uncond, v_cond = v.chunk(2)
            x = scheduler.step(v_uncond + GUIDANCE * (v_cond - v_uncond), t, x, return_dict=False)[0]
        return x

    ref, eager = torch_bench(lambda: torch_sample(torch_model), args.repeats)
    out = {
        "jax": result,
        "torch_eager": eager,
        "parity_rel_max": rel_err(ours, nhwc(ref)),
        "samples": n,
        "model_batch": 2 * n,
    }
    if compiled_model is not None:

        def compiled_run():
            c_out, stats = torch_bench(lambda: torch_sample(compiled_model), args.repeats)
            return {
                **stats,
                "parity_rel_max_vs_eager": rel_err(nhwc(c_out), nhwc(ref)),
                "note": "reuses the forward workload's compiled module (same shapes)",
            }

        out["torch_compile"] = guarded("torch.compile sampling", compiled_run)
    return out


def bench_vae(args, torch_vae, module, params) -> dict:
    images = np.random.RandomState(8).uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode")[0])
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))

    def t_encode(x):
        return torch_vae.encode(x).latent_dist.mean

    def t_decode(z):
        return torch_vae.decode(z).sample

    images_t = nchw(images)
    out = {}
    mean, enc_jax = jax_bench(encode, (params, images), args.repeats)
    ref_mean, enc_eager = torch_bench(lambda: t_encode(images_t), args.repeats)
    out["encode"] = {"jax": enc_jax, "torch_eager": enc_eager, "parity_rel_max": rel_err(mean, nhwc(ref_mean))}
    latents = np.asarray(nhwc(ref_mean))  # both decoders get the same latents
    latents_t = nchw(latents)
    decoded, dec_jax = jax_bench(decode, (params, latents), args.repeats)
    ref_decoded, dec_eager = torch_bench(lambda: t_decode(latents_t), args.repeats)
    out["decode"] = {"jax": dec_jax, "torch_eager": dec_eager, "parity_rel_max": rel_err(decoded, nhwc(ref_decoded))}
    if args.torch_compile:
        cases = (("encode", t_encode, images_t, ref_mean), ("decode", t_decode, latents_t, ref_decoded))
        for name, fn, arg, ref in cases:

            def compiled_run(fn=fn, arg=arg, ref=ref, name=name):
                compiled = torch.compile(fn)
                c_out, stats = torch_bench(lambda: compiled(arg), args.repeats)
                return {**stats, "parity_rel_max_vs_eager": rel_err(nhwc(c_out), nhwc(ref))}

            out[name]["torch_compile"] = guarded(f"torch.compile VAE {name}", compiled_run)
    return out


def bench_matmul_peak(n: int, repeats: int) -> dict:
    """Median GFLOP/s of an ``n x n`` float32 matmul, JAX and torch."""
    flops = 2.0 * n**3
    rng = np.random.RandomState(9)
    a, b = rng.randn(n, n).astype(np.float32), rng.randn(n, n).astype(np.float32)
    _, jax_stats = jax_bench(jax.jit(jnp.matmul), (a, b), repeats)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    _, torch_stats = torch_bench(lambda: at @ bt, repeats)
    out = {"n": n, "flops": flops}
    for name, stats in (("jax", jax_stats), ("torch", torch_stats)):
        out[name] = {**stats, "gflops_median": flops / (stats["median_ms"] * 1e-3) / 1e9}
    out["peak_gflops"] = max(out["jax"]["gflops_median"], out["torch"]["gflops_median"])
    return out


# ------------------------------------------------------------------------------ report


def versions() -> dict:
    return results_io.versions("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "numpy")


def _ms(stats) -> str:
    return f"{stats['median_ms']:.1f} ({stats['p10_ms']:.1f}–{stats['p90_ms']:.1f})"


def markdown(report: dict) -> str:
    cfg, mach, w = report["config"], report["machine"], report["workloads"]
    rows = [
        ("MM-DiT forward", w["forward"]),
        ("training step (fwd+bwd+AdamW)", w["train"]),
        (f"Euler sampling, {cfg['steps']} steps, CFG", w["sampling"]),
        ("VAE encode", w["vae"]["encode"]),
        ("VAE decode", w["vae"]["decode"]),
    ]
    quick = " — QUICK smoke sizes" if cfg["quick"] else ""
    lines = [
        f"# percov2-jax vs diffusers (PyTorch), wall clock on CPU{quick}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {results_io.describe_machine(mach)} No accelerator; torch threads {mach['torch_threads']}, "
        f"JAX default CPU thread pool. {results_io.describe_versions(report['versions'])}.",
        "",
        f"Config: MM-DiT {cfg['layers']} blocks, width {cfg['width']} ({cfg['width'] // cfg['head_dim']} heads x "
        f"{cfg['head_dim']}), {cfg['size']} px (latent {cfg['size'] // VAE_FACTOR}² x {LATENT_CHANNELS}, "
        f"{(cfg['size'] // VAE_FACTOR // PATCH) ** 2} image tokens), {cfg['text_len']} context tokens of width "
        f"{cfg['context_dim']}, batch {cfg['batch']}, scan_layers={cfg['scan_layers']}; sampling "
        f"{w['sampling']['samples']} sample(s), model batch {w['sampling']['model_batch']}; VAE channels "
        f"{tuple(cfg['vae_channels'])}, batch {cfg['batch']}. float32. {cfg['repeats']} timed repeats after a "
        "first call and one warm-up.",
        "",
        "Times in ms: median (p10–p90). Ratio = PyTorch median / JAX median (> 1: JAX faster). "
        "Compile s: JAX lower + compile / torch.compile first call (includes one run).",
        "",
    ]
    lines += results_io.busy_warning(
        mach,
        "PyTorch's spin-waiting OpenMP threads slow it down many times over "
        "under competing load, so these numbers do not measure the frameworks.",
    )
    lines += [
        "| workload | JAX median ms | PyTorch eager median ms | ratio | torch.compile median ms | ratio "
        "| compile s (JAX / torch.compile) | max rel diff JAX vs torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        j, e, c = r["jax"], r["torch_eager"], r.get("torch_compile")
        if c is None:
            c_ms, c_ratio, c_s = "not run", "", "—"
        elif "error" in c:
            c_ms, c_ratio, c_s = "failed", "", "—"
        else:
            c_ms, c_ratio, c_s = _ms(c), f"{c['median_ms'] / j['median_ms']:.2f}", f"{c['first_call_s']:.1f}"
        parity = r.get("parity_rel_max")
        if parity is None:
            p = r["parity"]
            parity_text = (
                f"loss {p['loss_step0_rel']:.1e}, grad norm {p['grad_norm_rel']:.1e}, "
                f"loss after update {p['loss_after_one_update_rel']:.1e}"
            )
        else:
            parity_text = f"{parity:.1e}"
        lines.append(
            f"| {name} | {_ms(j)} | {_ms(e)} | {e['median_ms'] / j['median_ms']:.2f} | {c_ms} | {c_ratio} | "
            f"{j['lower_s'] + j['compile_s']:.1f} / {c_s} | {parity_text} |"
        )
    peak, fl, train = report["matmul_peak"], w["train"]["flops"], w["train"]
    use_xla = not fl["scan_layers"] and fl["xla_cost_analysis"] is not None
    step_flops = fl["xla_cost_analysis"] if use_xla else fl["jaxpr_matmuls"]
    lines += [
        "",
        f"Matmul peak ({peak['n']}² float32): JAX {peak['jax']['gflops_median']:.1f} GFLOP/s, torch "
        f"{peak['torch']['gflops_median']:.1f} GFLOP/s (medians); peak used = {peak['peak_gflops']:.1f} GFLOP/s.",
        "",
    ]
    xla = fl["xla_cost_analysis"] / 1e9 if fl["xla_cost_analysis"] else float("nan")
    flops_text = (
        f"{step_flops / 1e9:.2f} GFLOP per step ({'XLA cost analysis' if use_xla else 'jaxpr matmuls'}; "
        f"XLA {xla:.2f}, jaxpr matmuls {fl['jaxpr_matmuls'] / 1e9:.2f}, "
        f"3 x analytic forward matmuls {3 * fl['analytic_forward_matmuls'] / 1e9:.2f})"
    )
    mfu = [f"Training-step MFU: {flops_text}."]
    for label, key in (("JAX", "jax"), ("PyTorch eager", "torch_eager"), ("torch.compile", "torch_compile")):
        stats = train.get(key)
        if stats and "median_ms" in stats:
            rate = step_flops / (stats["median_ms"] * 1e-3) / 1e9
            mfu.append(f"{label}: {rate:.1f} GFLOP/s = {100 * rate / peak['peak_gflops']:.0f}% MFU.")
    lines.append(" ".join(mfu))
    notes = [f"torch.compile: {report['torch_compile_status']}."]
    compiled_parity = []
    for name, r in rows:
        c = r.get("torch_compile") or {}
        if "parity_rel_max_vs_eager" in c:
            compiled_parity.append(f"{name} {c['parity_rel_max_vs_eager']:.1e}")
        elif "loss_step0" in c:
            compiled_parity.append(f"{name} loss {rel_scalar(c['loss_step0'], r['torch_eager']['loss_step0']):.1e}")
    if compiled_parity:
        notes.append("torch.compile vs eager, max rel diff: " + ", ".join(compiled_parity) + ".")
    notes.append(
        "torch AdamW runs with its CPU defaults (neither foreach nor fused: a loop over tensors); the "
        "torch.compile step compiles the model (forward and backward), not the optimizer."
    )
    if fl["note"]:
        notes.append(fl["note"] + ".")
    lines += ["", "Notes: " + " ".join(notes), ""]
    return "\n".join(lines)


def torch_compile_status(workloads: dict, enabled: bool, quick: bool) -> str:
    if not enabled:
        return (
            "not run (--quick: its cold compiles take minutes; add --torch-compile)"
            if quick
            else "not run (--no-torch-compile)"
        )
    entries = [
        workloads["forward"].get("torch_compile"),
        workloads["train"].get("torch_compile"),
        workloads["sampling"].get("torch_compile"),
        workloads["vae"]["encode"].get("torch_compile"),
        workloads["vae"]["decode"].get("torch_compile"),
    ]
    errors = [e["error"] for e in entries if isinstance(e, dict) and "error" in e]
    if errors:
        return f"failed on {len(errors)} workload(s): {errors[0][:300]}"
    return "worked (inductor, default mode, CPU)"


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384, help="heads x head_dim")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--size", type=int, default=256, help="image side in px (latent = size / 8)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=154, help="context tokens (77 CLIP + 77 T5 by default)")
    ap.add_argument("--context-dim", type=int, default=256, help="joint_attention_dim and pooled_projection_dim")
    ap.add_argument("--steps", type=int, default=8, help="Euler steps of the sampling workload")
    ap.add_argument("--vae-channels", type=lambda s: [int(c) for c in s.split(",")], default=[32, 64, 64, 64])
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--scan-layers", action="store_true", help="JAX: lax.scan over the blocks (training default)")
    ap.add_argument(
        "--torch-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile (default: on, off with --quick)",
    )
    results_io.add_output_arguments(ap, "tiny sizes and 2 repeats, no torch.compile, for a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.layers, args.width, args.head_dim, args.size = 2, 2, 64, 32, 64
        args.text_len, args.context_dim, args.steps, args.vae_channels, args.matmul_size = 16, 32, 2, [32, 32], 512
    if args.torch_compile is None:  # torch.compile's cold compiles alone take minutes even at the quick sizes
        args.torch_compile = not args.quick
    if args.width % args.head_dim:
        ap.error(f"--width {args.width} is not a multiple of --head-dim {args.head_dim}")
    if args.size % (VAE_FACTOR * PATCH):
        ap.error(f"--size must be a multiple of {VAE_FACTOR * PATCH}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    # Cold compiles on both sides: JAX's persistent compilation cache off (an environment such as
    # the test suite's may turn it on), and a fresh inductor cache, so torch.compile's first call
    # is not a hit from an earlier run either.
    jax.config.update("jax_enable_compilation_cache", False)
    inductor_cache = tempfile.mkdtemp(prefix="bench_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
    torch.manual_seed(0)
    report = {
        "command": results_io.command(),
        "config": vars(args),
        "machine": results_io.machine(),
        "versions": versions(),
        "workloads": {},
    }
    print(
        f"{report['machine']['cpu']}, {os.cpu_count()} cores; {results_io.describe_versions(report['versions'])}",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch_model, module, params = build_mmdit(args, os.path.join(tmp, "transformer"))
        torch_vae, vae_module, vae_params = build_vae(args, os.path.join(tmp, "vae"))
    compiled_model = torch.compile(torch_model) if args.torch_compile else None  # compiles on first call
    w = report["workloads"]
    try:
        for name, run in (
            ("matmul_peak", lambda: bench_matmul_peak(args.matmul_size, args.repeats)),
            ("forward", lambda: bench_forward(args, torch_model, compiled_model, module, params)),
            ("train", lambda: bench_train(args, torch_model, module, params)),
            ("sampling", lambda: bench_sampling(args, torch_model, compiled_model, module, params)),
            ("vae", lambda: bench_vae(args, torch_vae, vae_module, vae_params)),
        ):
            t0 = time.perf_counter()
            print(f"{name} ...", flush=True)
            w[name] = run()
            print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        shutil.rmtree(inductor_cache, ignore_errors=True)
    report["matmul_peak"] = w.pop("matmul_peak")
    report["torch_compile_status"] = torch_compile_status(w, args.torch_compile, args.quick)
    report["total_s"] = time.perf_counter() - started
    report["torch_inductor_cache_dir"] = inductor_cache + " (fresh, cold; removed)"
    results_io.finish_machine(report["machine"])
    results_io.write_report(args.out, results_io.stem("bench_vs_diffusers", args.quick), report, markdown(report))


if __name__ == "__main__":
    main()
