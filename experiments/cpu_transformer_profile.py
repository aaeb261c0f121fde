"""Where XLA:CPU spends the MM-DiT's time, against diffusers eager and torch.compile on the same CPU.

  python experiments/cpu_transformer_profile.py                                  # 3-5 min on 2 idle cores
  python experiments/cpu_transformer_profile.py --quick --out /tmp/mmdit_profile # smoke test, tiny model

Model, weights and inputs are ``bench_vs_diffusers``'s (same defaults: 6 unrolled blocks of width
384, 256² images, batch 2, 154 context tokens, float32), so this explains that benchmark's MM-DiT
forward and training-step rows. The training step is the benchmark's: MSE against a fixed target,
then AdamW (optax / ``torch.optim.AdamW``, same hyper-parameters), no remat.

1. **Timing**: JAX (jit), diffusers eager and ``torch.compile`` (inductor) in alternating blocks
   within one process (``xla_cpu_trace.alternate``), medians over ``--rounds``; outputs (forward)
   and first losses (training step) checked against eager first.
2. **Parts**: JAX from a thunk trace (``xla_cpu_trace.thunk_trace``), torch from
   ``torch.profiler`` self times, both grouped into: dense matmuls (the linear layers), attention
   (JAX: everything under the attention's core, i.e. batched dots, softmax and head layout;
   torch: the scaled-dot-product kernel and its backward), copies and transposes, the optimizer
   and loss, and the rest (elementwise work and norms: XLA's fusions, eager aten ops, inductor's
   fused C++ kernels).
3. **Matmul throughput**: each side's dense-matmul FLOPs (from the shapes) over its matmul time,
   against the measured peak of a ``--matmul-size`` float32 matmul; and the largest matmul shapes
   side by side.

``--quick``: the benchmark's quick sizes, one round of one call, no torch.compile (its cold
compiles take minutes even at tiny sizes).

Output: ``cpu_transformer_profile.json`` and ``.md`` in ``--out`` (``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import results_io
import torch
import xla_cpu_trace
from bench_vs_diffusers import (
    bench_matmul_peak,
    build_mmdit,
    jax_train_setup,
    mmdit_inputs,
    nchw,
    nhwc,
    rel_err,
    rel_scalar,
    torch_inputs,
    torch_train_step,
)
from bench_vs_diffusers import parse_args as bench_args

# XLA:CPU with YNNPACK limited to reductions: XLA's own kernels run dots and convolutions.
YNN_REDUCE_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
ALT = "JAX, YNNPACK for reductions only"
# Kernel libraries XLA:CPU may hand a dot to (``matmul_libraries`` reports which one ran).
LIBRARIES = {
    "default": {},
    "YNNPACK for reductions only": YNN_REDUCE_ONLY,
    "oneDNN dots": {
        "xla_cpu_use_onednn": True,
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
        **YNN_REDUCE_ONLY,
    },
}
MATMUL_SHAPES = [(512, 384, 384), (308, 384, 384), (512, 384, 1536), (512, 1536, 384)]
PARTS = ("dense matmuls", "attention", "elementwise and norms", "copies and transposes", "loss and optimizer")
# The attention module's own linear layers (and q/k norms): everything else under ``/attn/`` is
# the attention core.
_ATTN_LAYERS = re.compile(r"/attn/(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out_0|to_add_out|norm_\w+)/")
_MODEL_SCOPE = "SD3Transformer2DModel"


def jax_part(op_name: str, kind: str) -> str:
    """The part of a JAX thunk, from its kind and the flax module path in its ``op_name``."""
    if kind == "bdot" or ("/attn/" in op_name and not _ATTN_LAYERS.search(op_name)):
        return "attention"
    if kind == "dot":
        return "dense matmuls"
    if op_name and _MODEL_SCOPE not in op_name:
        return "loss and optimizer"
    if kind == "copy/transpose":
        return "copies and transposes"
    return "elementwise and norms"


def torch_part(op: str) -> str:
    if op in xla_cpu_trace.MATMUL_OPS:
        return "dense matmuls"
    if re.search(r"scaled_dot_product|flash_attention|efficient_attention", op):
        return "attention"
    if op in ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous"):
        return "copies and transposes"
    if "_foreach" in op or op.startswith("Optimizer.") or "mse_loss" in op:
        return "loss and optimizer"
    return "elementwise and norms"


def jax_parts(trace: dict) -> dict:
    parts = dict.fromkeys(PARTS, 0.0)
    for _, op_name, kind, ms in trace["instructions"]:
        parts[jax_part(op_name, kind)] += ms
    return parts


def torch_parts(profile: dict) -> dict:
    parts = dict.fromkeys(PARTS, 0.0)
    for op, ms in profile["ops_ms"].items():
        parts[torch_part(op)] += ms
    parts["loss and optimizer"] += sum(profile["scope_ms"].values())  # every op under optimizer.step()
    return parts


def matmul_throughput(shapes_ms: dict, flops: dict) -> dict:
    """Time, GFLOP and GFLOP/s of the matmuls in ``shapes_ms`` (shape -> ms; ``flops``: shape -> FLOPs)."""
    ms = sum(shapes_ms.values())
    total = sum(flops[k] for k in shapes_ms)
    return {"ms": ms, "gflop": total / 1e9, "gflops": total / (ms * 1e-3) / 1e9 if ms else 0.0}


# ------------------------------------------------------------------------------ workloads


def forward_workload(args, torch_model, compiled_model, module, params) -> dict:
    x = mmdit_inputs(args, args.batch, seed=2)
    xt = torch_inputs(x)
    jargs = jax.device_put((params, x["latents"], x["context"], x["pooled"], x["timestep"]))

    def lower(options):
        return jax.jit(lambda p, *a: module.apply({"params": p}, *a)).lower(*jargs).compile(compiler_options=options)

    compiled, alt = lower({}), lower(YNN_REDUCE_ONLY)
    traced = lower(xla_cpu_trace.TRACE)
    with torch.no_grad():
        ref = torch_model(*xt, return_dict=False)[0]
        fns = {
            "JAX": lambda: jax.block_until_ready(compiled(*jargs)),
            ALT: lambda: jax.block_until_ready(alt(*jargs)),
            "torch eager": lambda: torch_model(*xt, return_dict=False)[0],
        }
        parity = {"JAX": rel_err(compiled(*jargs), nhwc(ref)), ALT: rel_err(alt(*jargs), nhwc(ref))}
        if compiled_model is not None:
            fns["torch.compile"] = lambda: compiled_model(*xt, return_dict=False)[0]
            parity["torch.compile"] = rel_err(nhwc(fns["torch.compile"]()), nhwc(ref))
    return measure(args, fns, parity, traced.as_text(), lambda: jax.block_until_ready(traced(*jargs)), grad=False)


def train_workload(args, torch_model, module, params) -> dict:
    x, target, tx, _, step, trainable, frozen, batch = jax_train_setup(args, module, params)

    def jax_runner(options):
        state = [jax.tree.map(jnp.copy, trainable), tx.init(trainable)]
        compiled = step.lower(state[0], state[1], frozen, batch).compile(compiler_options=options)
        losses = []

        def run():
            state[0], state[1], loss = compiled(state[0], state[1], frozen, batch)
            losses.append(float(jax.block_until_ready(loss)))

        return compiled, run, losses

    _, jax_step, jax_losses = jax_runner({})
    _, alt_step, alt_losses = jax_runner(YNN_REDUCE_ONLY)
    traced, traced_step, _ = jax_runner(xla_cpu_trace.TRACE)
    xt, target_t = torch_inputs(x), nchw(target)
    fns, firsts = {"JAX": jax_step, ALT: alt_step}, {"JAX": jax_losses, ALT: alt_losses}
    sides = {"torch eager": False, **({"torch.compile": True} if args.torch_compile else {})}
    for name, compile_it in sides.items():
        fns[name], _, firsts[name] = torch_train_step(torch_model, xt, target_t, compile_it)
    with torch.enable_grad():
        for fn in fns.values():  # the first step of each, from the same weights (compiles torch.compile's)
            fn()
    ref = firsts["torch eager"][0]
    parity = {k: rel_scalar(v[0], ref) for k, v in firsts.items() if k != "torch eager"}
    return measure(args, fns, parity, traced.as_text(), traced_step, grad=True)


def matmul_libraries(args) -> dict:
    """One float32 matmul ``[M, K] x [K, N]`` per shape, compiled with each of ``LIBRARIES``' options
    and timed against ``torch.matmul`` in alternating blocks; which library fusions the compiled
    HLO holds (none: XLA's own Eigen dot)."""
    shapes = [(32, 64, 256)] if args.quick else MATMUL_SHAPES
    out = {}
    for m, k, n in shapes:
        rng = np.random.RandomState(m + k + n)
        a, b = rng.randn(m, k).astype(np.float32), rng.randn(k, n).astype(np.float32)
        ja, jb = jax.device_put(a), jax.device_put(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns, ran, errors = {"torch": lambda ta=ta, tb=tb: ta @ tb}, {}, {}
        for name, options in LIBRARIES.items():
            try:
                compiled = jax.jit(jnp.matmul).lower(ja, jb).compile(compiler_options=options)
            except Exception as e:  # an option this jaxlib does not know
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            ran[name] = xla_cpu_trace.hlo_summary(compiled.as_text())["library_fusions"]
            fns[name] = lambda c=compiled, ja=ja, jb=jb: jax.block_until_ready(c(ja, jb))
        times, _ = xla_cpu_trace.alternate(fns, args.rounds, 1 if args.quick else 20)
        out[f"{m}x{k} by {k}x{n}"] = {"time": times, "library_fusions": ran, "errors": errors}
    return out


def measure(args, fns: dict, parity: dict, hlo_text: str, traced_call, grad: bool) -> dict:
    times, loads = xla_cpu_trace.alternate(fns, args.rounds, args.block, grad=grad)
    trace = xla_cpu_trace.thunk_trace(hlo_text, traced_call, args.profile_calls)
    dense = {k: v for k, v in trace["by_shape_ms"].items() if k.startswith("dot ")}
    out = {
        "time": times,
        "load_1min_per_round": loads,
        "parity_rel_vs_eager": parity,
        "hlo": xla_cpu_trace.hlo_summary(hlo_text),
        "parts_ms": {"JAX": jax_parts(trace)},
        "wall_under_profiler_ms": {"JAX": trace["wall_ms_under_trace"]},
        "profiled_ms": {"JAX": trace["traced_ms"]},
        "matmuls": {"JAX": matmul_throughput(dense, trace["shape_flops"])},
        "matmul_shapes_ms": {"JAX": dense},
        "jax_trace_by_kind_ms": trace["by_kind_ms"],
    }
    for name, fn in fns.items():
        if name.startswith("JAX"):
            continue
        prof = xla_cpu_trace.torch_profile(fn, args.profile_calls, grad=grad, scopes=("Optimizer.step",))
        out["wall_under_profiler_ms"][name] = prof["wall_ms_under_profiler"]
        out["profiled_ms"][name] = prof["total_ms"]
        out["parts_ms"][name] = torch_parts(prof)
        dense = {k: v for k, v in prof["matmul_by_shape_ms"].items() if not k.startswith(("bmm", "baddbmm"))}
        out["matmuls"][name] = matmul_throughput(dense, prof["matmul_flops"])
        out["matmul_shapes_ms"][name] = dense
        out[f"{name} top ops ms"] = prof["top_ops_ms"]
    return out


# ------------------------------------------------------------------------------ report


def _ms(t: dict) -> str:
    return f"{t['median_ms']:.1f} ({t['p10_ms']:.1f}–{t['p90_ms']:.1f})"


def markdown(report: dict) -> str:
    cfg = report["config"]
    quick = " — QUICK smoke sizes" if cfg["quick"] else ""
    peak = report["matmul_peak"]["peak_gflops"]
    lines = [f"# The MM-DiT on XLA:CPU against PyTorch: where the time goes{quick}", ""]
    lines += results_io.provenance(report)
    lines += [
        f"Config: {cfg['layers']} blocks of width {cfg['width']} ({cfg['width'] // cfg['head_dim']} heads x "
        f"{cfg['head_dim']}), {cfg['size']} px, batch {cfg['batch']}, {cfg['text_len']} context tokens, float32, "
        f"unrolled; {cfg['rounds']} rounds of alternating blocks of {cfg['block']} timed calls; profiles over "
        f"{cfg['profile_calls']} calls. Matmul peak ({report['matmul_peak']['n']}² float32, better of JAX and "
        f"torch): {peak:.0f} GFLOP/s.",
        "",
    ]
    lines += results_io.busy_warning(report["machine"], "every time below shares the cores with that load.")
    for title, key in (("MM-DiT forward", "forward"), ("training step (fwd + bwd + AdamW)", "train")):
        r = report["workloads"][key]
        sides, profiled = list(r["time"]), list(r["parts_ms"])
        eager = r["time"]["torch eager"]["median_ms"]
        lines += [
            f"## {title}",
            "",
            "1-minute load average after each round: " + ", ".join(f"{x:.2f}" for x in r["load_1min_per_round"]) + ".",
            "",
            "| | median ms (p10–p90) | eager / this | rel. difference from eager |",
            "|---|---:|---:|---:|",
        ]
        for side in sides:
            diff = r["parity_rel_vs_eager"].get(side)
            diff = "" if diff is None else f"{diff:.1e}"
            lines.append(f"| {side} | {_ms(r['time'][side])} | {eager / r['time'][side]['median_ms']:.2f} | {diff} |")
        lines += [
            "",
            "Parts (ms per call; JAX from the thunk trace, torch from torch.profiler self times):",
            "",
            "| part | " + " | ".join(profiled) + " |",
            "|---|" + "---:|" * len(profiled),
        ]
        for part in PARTS:
            lines.append(f"| {part} | " + " | ".join(f"{r['parts_ms'][s][part]:.1f}" for s in profiled) + " |")
        for label, key in (("profiled, total", "profiled_ms"), ("wall under the profiler", "wall_under_profiler_ms")):
            lines.append(f"| {label} | " + " | ".join(f"{r[key][s]:.1f}" for s in profiled) + " |")
        lines += [
            "",
            "Dense matmuls (the linear layers; FLOPs from the shapes):",
            "",
            "| | ms | GFLOP | GFLOP/s | of the peak |",
            "|---|---:|---:|---:|---:|",
        ]
        for side in profiled:
            m = r["matmuls"][side]
            share = m["gflops"] / peak
            lines.append(f"| {side} | {m['ms']:.1f} | {m['gflop']:.2f} | {m['gflops']:.0f} | {share:.0%} |")
        lines += ["", "Largest matmuls by time (ms per call, summed over layers):", ""]
        top = [dict(list(r["matmul_shapes_ms"][s].items())[:10]) for s in profiled]
        lines += results_io.side_by_side(profiled, top)
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in r["jax_trace_by_kind_ms"].items())
        lines += ["", f"JAX thunk time by kind (ms): {kinds}.", ""]
    names = list(LIBRARIES)
    lines += [
        "## One matmul, by XLA:CPU kernel library",
        "",
        "Median ms (ratio torch / this; > 1: JAX faster); the library fusions in the compiled HLO below "
        "(none: XLA's own Eigen dot).",
        "",
        "| shape | torch | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for shape, r in report["matmul_libraries"].items():
        torch_ms = r["time"]["torch"]["median_ms"]
        cells = [
            f"{r['time'][n]['median_ms']:.2f} ({torch_ms / r['time'][n]['median_ms']:.2f})" if n in r["time"] else "n/a"
            for n in names
        ]
        lines.append(f"| {shape} | {torch_ms:.2f} | " + " | ".join(cells) + " |")
    first = next(iter(report["matmul_libraries"].values()))
    ran = ", ".join(f"{n}: {', '.join(v) or 'none'}" for n, v in first["library_fusions"].items())
    lines += ["", f"Library fusions: {ran}.", ""]
    lines += [f"- {n}: {e}" for n, e in first["errors"].items()]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of alternating blocks")
    ap.add_argument("--block", type=int, default=3, help="timed calls per block")
    ap.add_argument("--profile-calls", type=int, default=3)
    ap.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=None)
    results_io.add_output_arguments(ap, "the benchmark's tiny sizes, one round of one call, no torch.compile")
    args, rest = ap.parse_known_args(argv)
    model = bench_args([*rest, *(["--quick"] if args.quick else [])])
    shared = ("layers", "width", "head_dim", "size", "batch", "text_len", "context_dim", "matmul_size", "scan_layers")
    for key in shared:
        setattr(args, key, getattr(model, key))
    if args.quick:
        args.rounds, args.block, args.profile_calls = 1, 1, 1
    if args.torch_compile is None:
        args.torch_compile = not args.quick
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    jax.config.update("jax_enable_compilation_cache", False)
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # inductor's kernels as their own profiler events
    report = {
        "command": results_io.command(),
        "config": vars(args),
        "machine": results_io.machine(),
        "versions": results_io.versions("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "numpy"),
        "workloads": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch_model, module, params = build_mmdit(args, os.path.join(tmp, "transformer"))
        params = jax.device_put(params)
        print("matmul peak ...", flush=True)
        report["matmul_peak"] = bench_matmul_peak(args.matmul_size, 5 if args.quick else 10)
        print("forward ...", flush=True)
        compiled = torch.compile(torch_model) if args.torch_compile else None
        report["workloads"]["forward"] = forward_workload(args, torch_model, compiled, module, params)
        print("training step ...", flush=True)
        report["workloads"]["train"] = train_workload(args, torch_model, module, params)
        print("matmuls by library ...", flush=True)
        report["matmul_libraries"] = matmul_libraries(args)
    report["total_s"] = time.perf_counter() - started
    results_io.finish_machine(report["machine"])
    name = results_io.stem("cpu_transformer_profile", args.quick)
    results_io.write_report(args.out, name, report, markdown(report))


if __name__ == "__main__":
    main()
