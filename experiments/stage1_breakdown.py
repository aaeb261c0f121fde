"""Where the project's stage-1 training step spends its time on an accelerator: variants of the
step, its parts timed alone, and a device profile, in one run.

  PYTHONPATH=/tmp/site:. python3 experiments/stage1_breakdown.py --out OUT   # on the accelerator (docs/performance.md)
  python experiments/stage1_breakdown.py --quick --out /tmp/stage1           # smoke test on CPU: tiny sizes

Sizes, weights and the step are ``accelerator_bench.py``'s (``configs/sd3_medium_ultralow.py``:
SD3-medium at 512², random weights; ``percov2_jax.train.step.make_train_step`` on one device) at
one batch, ``--batch`` (16: the largest that fitted an H200 beside its state). In budget order:

1. **The step as shipped** (float32 VAE, remat ``dots_no_batch``), with MFU against the chip's
   datasheet bf16 peak; model FLOPs are the matmuls of the step without remat.
2. **A device profile** of that step: ``jax.profiler`` trace of ``--profile-calls`` steps, every
   device kernel's time summed by kind (matmul, attention, convolution, reduction,
   copy/transpose, collective, other fusions) and the longest kernels by name; the device's busy
   time against the wall-clock step says how much is launch gaps or host work.
3. **Parts timed alone** at the same batch: the VAE encode as the step runs it (posterior
   sample, scaled) in float32 and in bfloat16, and the clipped AdamW update over the whole state.
4. **Variants**: ``--variants``, each ``REMAT:VAE_DTYPE`` (default: the VAE in bfloat16; remat
   ``dots`` and ``none``, which save more and recompute less; both changes together). A variant
   whose compiled memory does not fit the free device memory runs at half the batch, and says so.

Tasks start only while ``--budget-s`` (counted from the start, compiles included) covers their
estimated cost; the report is rewritten after each, so a run stopped early keeps what it measured.
``--quick``: the benchmark's tiny sizes, batch 2, one profiled call, on CPU (a thunk trace).

Output: ``stage1_breakdown.json`` and ``stage1_breakdown.md`` in ``--out`` (``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time
from collections.abc import Callable

import jax
import results_io
from accelerator_bench import (
    FIT,
    Setup,
    error_entry,
    extra_bytes,
    free_device_bytes,
    gib,
    jax_compile,
    random_variables,
    timed_calls,
)
from stage1_program import Stage1Program

from percov2_jax.flops import peak_flops_per_device

DEFAULT_VARIANTS = ("dots_no_batch:bfloat16", "dots:float32", "none:float32", "dots:bfloat16")
# Rough seconds on one H200, compiles included (a stage-1 compile took 59 s there).
ESTIMATE_S = {"shipped": 90, "profile": 20, "parts": 40, "variant": 75}
# Kernel or op name -> kind; the first pattern that matches wins (cuDNN's convolution kernels
# are "implicit gemm"s, so convolutions are tested before matmuls).
KINDS = (
    ("attention", r"fmha|flash|sdpa|attention|\bmha"),
    ("convolution", r"conv(?!ert)|fprop|dgrad|wgrad|winograd"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|matmul|cublas|\bdot"),
    ("collective", r"all-reduce|all_reduce|allreduce|nccl|all-gather|reduce-scatter"),
    ("reduction", r"reduce|reduction"),
    ("copy/transpose", r"copy|transpose|memcpy|memset|dynamic-update-slice"),
)
# XLA:CPU leaves a trace event per thunk only with this option (the quick run on CPU).
CPU_TRACE = {"xla_cpu_enable_xprof_traceme": True}


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other fusion/elementwise")


# ------------------------------------------------------------------------------ measurements


def measure(program: Stage1Program, batch: int, remat: str, vae: str, free: int | None, quick: bool) -> dict:
    """Compile one variant (halving the batch while it does not fit) and time it."""
    step, tried = program.step(remat, vae), {}
    while True:
        options = CPU_TRACE if jax.devices()[0].platform == "cpu" else None
        start = time.perf_counter()
        compiled = step.lower(*program.args(batch, vae)).compile(compiler_options=options)
        need = extra_bytes(compiled)
        tried[batch] = {"compile_s": time.perf_counter() - start, "extra_bytes": need}
        if free is None or need is None or need < FIT * free or batch == 1:
            break
        batch //= 2
    stats = timed_calls(program.call(compiled, batch, vae), jax.block_until_ready, quick)
    return {
        "remat": remat,
        "vae_dtype": vae,
        "batch": batch,
        "tried": tried,
        "compiled": compiled,
        "jax": {**stats, "compile_s": tried[batch]["compile_s"], "images_per_s": batch / (stats["median_ms"] * 1e-3)},
    }


def device_profile(call: Callable[[], object], calls: int) -> dict:
    """Kernel time per step by kind and by name, from a ``jax.profiler`` trace of ``calls`` steps.

    On a GPU or TPU the kernels are the events of the device planes (``/device:...``); on CPU, the
    thunk events of the host threads. Per-line totals are kept too, to check what was counted."""
    jax.block_until_ready(call())
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        with jax.profiler.trace(folder):
            for _ in range(calls):
                jax.block_until_ready(call())
        wall = (time.perf_counter() - start) / calls
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith("/device:") and "CPU" not in p.name]
    lines, by_name = {}, collections.Counter()
    for plane in device or [p for p in planes if p.name.startswith("/host:")]:
        for line in plane.lines:
            total = sum(e.duration_ns for e in line.events) / 1e6 / calls
            lines[f"{plane.name} | {line.name}"] = total
            if not _kernel_line(line.name, bool(device)):
                continue
            for event in line.events:
                if device or "::" not in event.name:  # on CPU, thread-pool waits are not work
                    by_name[event.name] += event.duration_ns / 1e6 / calls
    by_kind = collections.Counter()
    for name, ms in by_name.items():
        by_kind[kind_of(name)] += ms
    busy = sum(by_name.values())
    return {
        "wall_ms_per_step_under_trace": wall * 1e3,
        "kernel_ms_per_step": busy,
        "by_kind_ms": dict(by_kind.most_common()),
        "top_kernels_ms": dict(by_name.most_common(25)),
        "kernel_count": len(by_name),
        "lines_ms": lines,
    }


def _kernel_line(name: str, device: bool) -> bool:
    """The lines whose events are kernels: a GPU's streams, a TPU's "XLA Ops"; on CPU, the worker
    threads (not the Python thread, whose events enclose the others)."""
    if device:
        return name.startswith("Stream") or name == "XLA Ops"
    return name != "python"


def parts(program: Stage1Program, batch: int, quick: bool) -> dict:
    """The VAE encode in each dtype and the optimizer update, each jitted alone."""
    out = {}
    image = program.data(batch)["image"]
    key = jax.random.key(3)
    for dtype in ("float32", "bfloat16"):
        codec, vae = program.codec(dtype), program.frozen(dtype)["vae"]
        fn = jax.jit(lambda p, x, k, c=codec: c.apply({"params": p}, x, k, method="encode_to_latents"))
        compiled, compile_s = jax_compile(fn, vae, image, key)
        out[f"vae_encode_{dtype}"] = {
            "compile_s": compile_s,
            **timed_calls(lambda c=compiled, v=vae: c(v, image, key), jax.block_until_ready, quick),
        }
    spec, state = program.spec, program.holder[0]

    def update(params, opt_state):
        import optax

        updates, opt_state = spec.tx.update(params, opt_state, params)  # the params stand in for gradients
        return optax.apply_updates(params, updates), opt_state

    fn = jax.jit(update)
    compiled, compile_s = jax_compile(fn, state.params, state.opt_state)
    out["adamw_update"] = {
        "compile_s": compile_s,
        **timed_calls(lambda: compiled(state.params, state.opt_state), jax.block_until_ready, quick),
    }
    return out


# ------------------------------------------------------------------------------ the run


def run(args, report: dict) -> None:
    setup = Setup(args)
    program = Stage1Program(setup, random_variables)
    device = jax.devices()[0]
    peak = peak_flops_per_device(device)
    free = free_device_bytes()
    report["free_bytes_at_start"] = free
    c = setup.widened
    report["sizes"] = (
        f"configs/sd3_medium_ultralow.py{' shrunk (--quick)' if args.quick else ''}: {c.num_layers} blocks of width "
        f"{c.inner_dim}, {setup.image}² images ({setup.tokens} image + {setup.text_len} caption tokens), VAE "
        f"channels {setup.vae_fields['block_out_channels']}; {setup.config.model.dtype} compute, "
        f"{setup.config.model.param_dtype} weights, random"
    )
    report["datasheet_peak_tflops"] = peak / 1e12 if peak else None
    flops_cache: dict[int, float] = {}

    def with_mfu(entry: dict) -> dict:
        b = entry["batch"]
        if b not in flops_cache:
            flops_cache[b] = program.model_flops(b)
        entry["model_flops"] = flops_cache[b]
        tflops = flops_cache[b] / (entry["jax"]["median_ms"] * 1e-3) / 1e12
        entry["jax"].update(model_tflops=tflops, mfu_datasheet=tflops * 1e12 / peak if peak else None)
        return entry

    def left() -> float:
        return args.budget_s - (time.perf_counter() - report["_started"])

    def task(name: str, estimate: float, fn: Callable[[], object]) -> object:
        if left() < (0 if args.quick else estimate):
            report["skipped"].append(name)
            print(f"{name}: skipped, {left():.0f} s of the budget left", flush=True)
            return None
        print(f"{name} ...", flush=True)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the failure is the task's result
            report["errors"][name] = error_entry(e)
            return None
        finally:
            save(args, report)

    remat, vae = report["shipped"].split(":")
    shipped = task("shipped", ESTIMATE_S["shipped"], lambda: measure(program, args.batch, remat, vae, free, args.quick))
    if shipped is not None:
        compiled = shipped.pop("compiled")
        report["variants"][report["shipped"]] = with_mfu(shipped)
        call = program.call(compiled, shipped["batch"], vae)
        report["profile"] = task("profile", ESTIMATE_S["profile"], lambda: device_profile(call, args.profile_calls))
        del compiled, call
    report["parts"] = task("parts", ESTIMATE_S["parts"], lambda: parts(program, args.batch, args.quick))
    for variant in [v for v in args.variants if v != report["shipped"]]:
        remat, vae = variant.split(":")
        entry = task(
            variant, ESTIMATE_S["variant"], lambda r=remat, v=vae: measure(program, args.batch, r, v, free, args.quick)
        )
        if entry is not None:
            entry.pop("compiled")
            report["variants"][variant] = with_mfu(entry)


# ------------------------------------------------------------------------------ report


def save(args, report: dict, final: bool = False) -> None:
    report["elapsed_s"] = time.perf_counter() - report["_started"]
    out = {k: v for k, v in report.items() if not k.startswith("_")}
    if final:
        results_io.finish_machine(out["machine"])
    results_io.write_report(args.out, results_io.stem("stage1_breakdown", args.quick), out, markdown(out))


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict) -> str:
    quick = " — QUICK smoke sizes, numbers mean nothing" if report["config"]["quick"] else ""
    lines = [f"# Where the stage-1 step's time goes on {report['device_kind']}{quick}", ""]
    lines += results_io.provenance(report)
    lines += [f"Versions: {results_io.describe_versions(report['versions'])}.", "", f"Sizes: {report['sizes']}.", ""]
    lines += [
        "## The step, as shipped and in variants",
        "",
        "| remat | VAE | batch | step ms | images/s | model TFLOP/s | MFU, datasheet | compile s "
        "| memory beside the state |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in report["variants"].items():
        j = v["jax"]
        lines.append(
            f"| {v['remat']}{' (shipped)' if name == report['shipped'] else ''} | {v['vae_dtype']} | {v['batch']} "
            f"| {j['median_ms']:.1f} | {j['images_per_s']:.2f} | {j['model_tflops']:.3g} | {_pct(j['mfu_datasheet'])} "
            f"| {j['compile_s']:.1f} | {gib(v['tried'][v['batch']]['extra_bytes'])} |"
        )
    halved = [
        f"{n} (tried {', '.join(map(str, v['tried']))})" for n, v in report["variants"].items() if len(v["tried"]) > 1
    ]
    if halved:
        lines += ["", "Run at a smaller batch because the larger did not fit: " + "; ".join(halved) + "."]
    lines += ["", f"Free device memory at the start: {gib(report.get('free_bytes_at_start'))}."]
    p = report.get("parts") or {}
    if p:
        lines += ["", "## Parts timed alone (same batch)", "", "| part | ms | compile s |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['median_ms']:.1f} | {v['compile_s']:.1f} |" for k, v in p.items()]
    prof = report.get("profile")
    if prof:
        busy, wall = prof["kernel_ms_per_step"], prof["wall_ms_per_step_under_trace"]
        lines += [
            "",
            "## Device profile of the shipped step",
            "",
            f"Kernels: {busy:.1f} ms per step of {wall:.1f} ms wall-clock under the trace "
            f"({prof['kernel_count']} distinct kernels).",
            "",
            "| kind | ms per step | share of kernel time |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {ms:.1f} | {_pct(ms / busy if busy else None)} |" for k, ms in prof["by_kind_ms"].items()]
        lines += ["", "| longest kernels | kind | ms per step |", "|---|---|---:|"]
        lines += [f"| `{n[:110]}` | {kind_of(n)} | {ms:.2f} |" for n, ms in prof["top_kernels_ms"].items()]
    for name, e in report["errors"].items():
        lines += ["", f"**{name} failed**: {e['error'][:600]}"]
    if report["skipped"]:
        lines += ["", "Skipped (time budget): " + ", ".join(report["skipped"]) + "."]
    lines += ["", f"Budget {report['config']['budget_s']:.0f} s, elapsed {report['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 16; 2 with --quick)")
    ap.add_argument(
        "--variants",
        type=lambda s: [v for v in s.split(",") if v],
        default=None,
        help=f"REMAT:VAE_DTYPE,... (remat: a name in percov2_jax.models.layers.REMAT_POLICIES); default "
        f"{','.join(DEFAULT_VARIANTS)}; with --quick, the shipped remat with a bfloat16 VAE",
    )
    ap.add_argument("--profile-calls", type=int, default=None, help="steps under the trace (default 3; 1 with --quick)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; later tasks are skipped")
    results_io.add_output_arguments(ap, "tiny sizes on CPU, for a smoke test")
    args = ap.parse_args(argv)
    from percov2_jax.models.layers import REMAT_POLICIES

    for v in args.variants or []:
        remat, _, vae = v.partition(":")
        if remat not in REMAT_POLICIES or vae not in ("float32", "bfloat16"):
            ap.error(
                f"--variants: {v!r} is not REMAT:VAE_DTYPE (remat of {sorted(REMAT_POLICIES)}; float32 or bfloat16)"
            )
    args.batch = args.batch or (2 if args.quick else 16)
    args.profile_calls = args.profile_calls or (1 if args.quick else 3)
    if args.variants is None:
        args.variants = ["none:bfloat16"] if args.quick else list(DEFAULT_VARIANTS)  # quick remat: none
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # read when the backend starts
    if args.quick and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    report = {
        "_started": time.perf_counter(),
        "command": results_io.command(),
        "config": vars(args),
        "machine": results_io.machine(),
        "device_kind": jax.devices()[0].device_kind,
        "versions": results_io.versions(
            "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu", "flax", "optax"
        ),
        "variants": {},
        "errors": {},
        "skipped": [],
    }
    from accelerator_bench import bench_config

    report["shipped"] = f"{bench_config(args.quick).model.remat_policy}:float32"
    run(args, report)
    save(args, report, final=True)


if __name__ == "__main__":
    main()
