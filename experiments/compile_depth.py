"""XLA compile time of the SD3 MM-DiT against depth, with and without ``scan_layers``.

  python experiments/compile_depth.py                             # depths 2,8,24; ~8 min on 2 busy cores
  python experiments/compile_depth.py --quick --out /tmp/compile  # smoke test: depths 2,3, one remat policy

For num_layers in ``--depths`` and ``scan_layers`` on / off: wall clock of
``jax.jit(f).lower(*abstract_args).compile()`` for (a) the forward pass (remat "none") and (b) a
train step (``jax.value_and_grad`` of an MSE w.r.t. the params + an ``optax.adamw`` update, one
jit; remat ``--train-remat``). Narrow model for 2 CPU cores: 4 heads x 32, joint dim 64, pooled
dim 32, 16 channels, patch 2; batch 1, latent 32x32, 16 text tokens, float32. Nothing runs:
params, inputs and AdamW state are ``jax.ShapeDtypeStruct``s from ``jax.eval_shape``.

Cold compiles: the persistent cache is off and each compile jits a new function object. Median
of ``--repeats`` (``--other-remat-repeats`` for the second remat policy), fewer if one compile
exceeds ``--one-repeat-over`` s. FLOPs: XLA's cost analysis counts a while (scan) body once;
``traced_matmul_flops`` counts it ``length`` times. At num_layers=2 nothing is scanned (the
last, context-only block never is, and a run of one block is not).

``--quick``: depths 2 and 3 (3 is the shallowest model with a scanned run), one repeat, the
train step under ``dots_no_batch`` only, latent 16x16 and 8 text tokens; still cold compiles.

Output: ``compile_depth.json`` (every compile's times) and ``compile_depth.md`` in ``--out``
(``_quick`` appended with ``--quick``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
import results_io

from percov2_jax.flops import cost_analysis_flops, traced_matmul_flops
from percov2_jax.models import mmdit
from percov2_jax.models.layers import unboxed


def make_config(args, depth: int) -> mmdit.SD3TransformerConfig:
    return mmdit.SD3TransformerConfig(
        sample_size=args.latent,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=depth,
        attention_head_dim=32,
        num_attention_heads=4,
        caption_projection_dim=128,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        pos_embed_max_size=32,
    )


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def workload(args, kind: str, depth: int, scan: bool, remat: str):
    """(a factory of fresh functions to jit, their abstract arguments)."""
    config = make_config(args, depth)
    model = mmdit.SD3Transformer2DModel(config, scan_layers=scan, remat_policy=remat)
    example = (config, args.batch, args.latent, args.latent, args.text_len)
    inputs = abstract(jax.eval_shape(lambda: mmdit.example_inputs(*example)))
    init = lambda: unboxed(model.init(jax.random.key(0), *mmdit.example_inputs(*example))["params"])  # noqa: E731
    params = abstract(jax.eval_shape(init))
    if kind == "forward":  # each factory() call makes a new function object
        return (lambda: lambda params, inputs: model.apply({"params": params}, *inputs)), (params, inputs)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = abstract(jax.eval_shape(tx.init, params))
    target = jax.ShapeDtypeStruct(inputs[0].shape, jnp.float32)

    def factory():
        def train_step(params, opt_state, inputs, target):
            def loss_fn(p):
                return jnp.mean((model.apply({"params": p}, *inputs) - target) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return loss, optax.apply_updates(params, updates), opt_state

        return train_step

    return factory, (params, opt_state, inputs, target)


def measure(args, kind: str, depth: int, scan: bool, remat: str, repeats: int) -> dict:
    factory, fargs = workload(args, kind, depth, scan, remat)
    runs = []
    for _ in range(repeats):
        jitted = jax.jit(factory())  # a new function object: no in-memory cache hit
        start = time.perf_counter()
        lowered, lowered_at = jitted.lower(*fargs), time.perf_counter()
        compiled, end = lowered.compile(), time.perf_counter()
        runs.append({"lower_s": lowered_at - start, "compile_s": end - lowered_at, "total_s": end - start})
        if runs[-1]["total_s"] > args.one_repeat_over:
            break
    return {
        "kind": kind,
        "depth": depth,
        "scan_layers": scan,
        "remat_policy": remat,
        "scanned_runs": [r.name for r in mmdit.block_runs(make_config(args, depth), scan) if r.scanned],
        "repeats": len(runs),
        "median_s": statistics.median(r["total_s"] for r in runs),
        "runs": runs,
        "median_lower_s": statistics.median(r["lower_s"] for r in runs),
        "xla_cost_analysis_flops": cost_analysis_flops(compiled),
        "traced_matmul_flops": traced_matmul_flops(factory(), *fargs),
    }


def _find(ms, *key):  # key = (kind, remat, depth, scan)
    return next(m for m in ms if (m["kind"], m["remat_policy"], m["depth"], m["scan_layers"]) == key)


def _slopes(ms) -> list[float]:  # seconds per added layer between consecutive depths
    return [(b["median_s"] - a["median_s"]) / (b["depth"] - a["depth"]) for a, b in zip(ms, ms[1:])]


def _span(ms) -> str:
    lo, hi = ms[0], ms[-1]
    return (
        f"{hi['median_s'] / lo['median_s']:.1f}x from {lo['depth']} to {hi['depth']} layers "
        f"({lo['median_s']:.1f} -> {hi['median_s']:.1f} s)"
    )


def conclusion(report) -> str:
    ms, depths, out = report["measurements"], report["config"]["depths"], []
    for kind, remat in (("forward", "none"), ("train", report["config"]["train_remat"][0])):
        scan = [_find(ms, kind, remat, d, True) for d in depths]
        unroll = [_find(ms, kind, remat, d, False) for d in depths]
        really = [m for m in scan if m["scanned_runs"]] or scan  # depth 2 has no scanned run
        r = really[-1]["median_s"] / really[0]["median_s"]
        shape = "flat" if r < 1.3 else "sub-linear" if r < 0.5 * really[-1]["depth"] / really[0]["depth"] else "~linear"
        per = _slopes(unroll)
        how = (
            "about linearly"
            if max(per) < 1.5 * min(per)
            else "faster than linearly"
            if per[-1] > per[0]
            else "slower than linearly"
        )
        out.append(
            f"{'Forward' if kind == 'forward' else 'Train-step'} compile with scan is {shape} in depth: "
            f"{_span(really)} among depths with a scanned run ({_span(scan)} including the unscanned "
            f"{depths[0]}-layer model); unrolled it grows {how}, {_span(unroll)}, at "
            f"{' / '.join(f'{p:.2f}' for p in per)} s per added layer (scan: "
            f"{' / '.join(f'{p:.2f}' for p in _slopes(scan))})."
        )
        if not scan[0]["scanned_runs"]:  # the same program twice: a measure of the noise
            out.append(
                f"(At {depths[0]} layers both cells compile the same program: {scan[0]['median_s']:.2f} vs "
                f"{unroll[0]['median_s']:.2f} s is run-to-run noise under this load.)"
            )
    return " ".join(out)


def markdown(report) -> str:
    cfg, mach, ms = report["config"], report["machine"], report["measurements"]
    depths, remat = cfg["depths"], cfg["train_remat"][0]
    short = (
        "; ".join(
            f"{m['kind']} {m['remat_policy']} {m['depth']} layers scan={m['scan_layers']}: {m['repeats']}"
            for m in ms
            if m["repeats"] < cfg["repeats"]
        )
        or "none"
    )
    quick = " — QUICK smoke run" if cfg["quick"] else ""
    lines = [
        f"# MM-DiT compile time vs depth (scan_layers on / off){quick}\n",
        f"Command: `{report['command']}`\n",
        f"Machine: {results_io.describe_machine(mach)} {results_io.describe_versions(report['versions'])}.\n",
        f"Model: width 128 (4 heads x 32), joint dim 64, pooled dim 32, 16 channels, patch 2; batch "
        f"{cfg['batch']}, latent {cfg['latent']}x{cfg['latent']}, {cfg['text_len']} text tokens, float32. Train "
        f"step = value_and_grad of MSE + AdamW, remat `{remat}`; forward remat `none`. Seconds of lower + "
        f"compile (cold: no persistent cache, a fresh function each time), median of {cfg['repeats']}; * = "
        f"fewer repeats (a compile over {cfg['one_repeat_over']:.0f} s is not repeated; other remat policies "
        f"get {cfg['other_remat_repeats']}): {short}. At depth 2 nothing is scanned (the last block "
        "never is), so both columns compile the same program.\n",
    ]
    if mach["load_average_at_start"][0] > 0.5 or mach["load_average_at_end"][0] > 0.5:
        lines.append(
            "**The machine was not idle (see the load average): absolute times are inflated; "
            "the ratios between depths are the result.**\n"
        )
    lines += [
        "| layers | forward, scan | forward, unrolled | train step, scan | train step, unrolled |",
        "|---:|---:|---:|---:|---:|",
    ]
    cols = [("forward", "none", True), ("forward", "none", False), ("train", remat, True), ("train", remat, False)]
    for d in depths:
        cells = [_find(ms, *c[:2], d, c[2]) for c in cols]
        lines.append(
            f"| {d} | "
            + " | ".join(f"{m['median_s']:.2f}" + "*" * (m["repeats"] < cfg["repeats"]) for m in cells)
            + " |"
        )
    for lo in depths[:-1]:
        ratio = [_find(ms, k, r, depths[-1], sc)["median_s"] / _find(ms, k, r, lo, sc)["median_s"] for k, r, sc in cols]
        lines.append(f"| ratio {depths[-1]} / {lo} | " + " | ".join(f"{r:.1f}x" for r in ratio) + " |")
    lines[-1] += "\n"
    lines += [
        conclusion(report) + "\n",
        "All measurements (seconds; lower = tracing + lowering to "
        "StableHLO, the rest is XLA; FLOPs in GFLOP — XLA's cost analysis counts a while-loop (scan) body "
        "once, the jaxpr matmul count counts it `length` times):\n",
        "| function | remat | layers | scan | repeats | median s | all s | lower s | XLA GFLOP | jaxpr matmul GFLOP |",
        "|---|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for m in ms:
        xla = "—" if m["xla_cost_analysis_flops"] is None else f"{m['xla_cost_analysis_flops'] / 1e9:.3f}"
        every = ", ".join(f"{r['total_s']:.2f}" for r in m["runs"])
        lines.append(
            f"| {m['kind']} | {m['remat_policy']} | {m['depth']} | {m['scan_layers']} | {m['repeats']} | "
            f"{m['median_s']:.2f} | {every} | {m['median_lower_s']:.2f} | {xla} | "
            f"{m['traced_matmul_flops'] / 1e9:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="2,8,24", help="num_layers values, ascending")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one-repeat-over", type=float, default=60.0, help="no repeats after a compile this slow (s)")
    ap.add_argument("--train-remat", default="dots_no_batch,none", help="train-step remat policies; first = table")
    ap.add_argument("--other-remat-repeats", type=int, default=1, help="repeats of the other --train-remat policies")
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    results_io.add_output_arguments(ap, "depths 2,3, one repeat, one train-step remat policy, latent 16x16")
    args = ap.parse_args(argv)
    if args.quick:  # depth 3 is the shallowest with a scanned run, so the scan and unrolled columns still differ
        args.depths, args.repeats, args.train_remat, args.latent, args.text_len = "2,3", 1, "dots_no_batch", 16, 8
    args.depths = [int(d) for d in args.depths.split(",")]
    args.train_remat = args.train_remat.split(",")
    return args


def main(argv=None):
    args = parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    report = {
        "command": results_io.command(),
        "config": vars(args),
        "machine": results_io.machine(),
        "versions": results_io.versions("jax", "jaxlib", "flax", "optax"),
        "measurements": [],
    }
    print(f"{report['machine']['cpu']}, load {report['machine']['load_average_at_start']}", flush=True)
    started = time.perf_counter()
    grid = [("forward", "none")] + [("train", r) for r in args.train_remat[::-1]]
    for kind, remat in grid:
        for scan in (True, False):  # the unrolled deepest train step of the main policy comes last
            for depth in args.depths:
                main_policy = kind == "forward" or remat == args.train_remat[0]
                repeats = args.repeats if main_policy else args.other_remat_repeats
                m = measure(args, kind, depth, scan, remat, repeats)
                report["measurements"].append(m)
                print(
                    f"{kind:7s} remat={remat:13s} depth={depth:2d} scan={scan!s:5s} "
                    f"median {m['median_s']:.2f} s of {[round(r['total_s'], 2) for r in m['runs']]}",
                    flush=True,
                )
    report["total_s"] = time.perf_counter() - started
    results_io.finish_machine(report["machine"])
    results_io.write_report(args.out, results_io.stem("compile_depth", args.quick), report, markdown(report))


if __name__ == "__main__":
    main()
