"""Peak host memory of ``percov2 convert``, which converts and writes one component at a time.

  python experiments/convert_memory.py                          # ~250 M parameters, float32 and bfloat16
  python experiments/convert_memory.py --quick --out /tmp/cm    # smoke test: a tiny pipeline, float32

Builds offline a diffusers SD3 pipeline folder of random weights (default torch init): an
MM-DiT, a VAE, CLIP-L- and bigG-like text encoders and a T5 v1.1-like encoder, the largest
component, saved in float16 in several shards with a ``model.safetensors.index.json`` (as the
release's ``text_encoder_3``). Then ``percov2 convert`` runs in a subprocess once per target
``--dtypes`` entry, and a baseline subprocess converts a tiny VAE (the same imports, JAX
runtime, orbax and tensorstore threads, and nothing big). A child's peak resident memory is
``ru_maxrss`` of ``os.wait4`` on it (the kernel's high-water mark, not a sample), started from
a small launcher interpreter: a child forked from this script would inherit its high-water mark.

Reported: peak RSS, baseline, their difference, the largest component's and all components'
sizes in the target dtype (from ``pretrained.plan``, i.e. the converter's own parameter
trees), and (peak - baseline) / largest, (peak - baseline) / total. Streaming keeps the first
ratio near 1 and the second well below it; a converter holding every component would put
the second near 1.

Output: ``convert_memory.json`` and ``convert_memory.md`` in ``--out`` (``_quick`` appended with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import results_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1e6

# Widths and depths of the random pipeline; the T5 is the largest, as in the release.
FULL = dict(
    transformer=dict(num_layers=4, num_attention_heads=6, caption_projection_dim=384),
    vae=(32, 64, 128, 128),
    clip_l=dict(hidden_size=384, num_hidden_layers=4, vocab_size=49408),
    clip_g=dict(hidden_size=512, num_hidden_layers=4, vocab_size=49408),
    # T5-XXL's proportions: its largest arrays are a few percent of it (embedding 2.7 %).
    t5=dict(d_model=1024, d_ff=2816, num_layers=12, num_heads=16, vocab_size=8192),
    t5_shard="100MB",
)
QUICK = dict(
    transformer=dict(num_layers=2, num_attention_heads=2, caption_projection_dim=128),
    vae=(16, 32),
    clip_l=dict(hidden_size=64, num_hidden_layers=2, vocab_size=1000),
    clip_g=dict(hidden_size=96, num_hidden_layers=2, vocab_size=1000),
    t5=dict(d_model=128, d_ff=256, num_layers=2, num_heads=2, vocab_size=2000),
    t5_shard="200KB",
)


def _vae(channels):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip(hidden_size: int, num_hidden_layers: int, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            projection_dim=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=hidden_size // 64 or 1,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            eos_token_id=2,
        )
    )


def build_pipeline(root: str, sizes: dict) -> dict:
    """Save the random pipeline under ``root``; returns ``{component: {"source_dtype", "files", "disk_bytes"}}``."""
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5_width = sizes["t5"]["d_model"]
    clip_width = sizes["clip_l"]["hidden_size"] + sizes["clip_g"]["hidden_size"]
    models = {
        "transformer": SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            attention_head_dim=64,
            joint_attention_dim=t5_width,
            pooled_projection_dim=clip_width,
            out_channels=16,
            pos_embed_max_size=32,
            **sizes["transformer"],
        ),
        "vae": _vae(sizes["vae"]),
        "text_encoder": _clip(**sizes["clip_l"]),
        "text_encoder_2": _clip(**sizes["clip_g"]),
        "text_encoder_3": T5EncoderModel(
            T5Config(d_kv=64, feed_forward_proj="gated-gelu", **sizes["t5"])
        ).half(),  # the release stores T5-XXL in float16
    }
    out = {}
    for sub, model in models.items():
        folder = os.path.join(root, sub)
        shard = {"max_shard_size": sizes["t5_shard"]} if sub == "text_encoder_3" else {}
        model.save_pretrained(folder, **shard)
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        out[sub] = {
            "source_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "files": files,
            "index": any(f.endswith(".safetensors.index.json") for f in os.listdir(folder)),
            "disk_bytes": sum(os.path.getsize(os.path.join(folder, f)) for f in files),
        }
        del model
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline"}, f)
    return out


def build_baseline(root: str) -> str:
    """A tiny VAE component folder: converting it loads every library a big conversion loads."""
    folder = os.path.join(root, "tiny_vae")
    _vae((16,)).save_pretrained(folder)
    return folder


# Runs argv[2:] and writes its peak RSS (kB) to argv[1]. A child's ru_maxrss starts from the
# resident size of the process it was forked from (the kernel carries the high-water mark over
# exec), and this script holds torch and JAX: so a small fresh interpreter starts the child.
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], log_path: str) -> dict:
    """Run ``cmd``, its output to ``log_path``: exit code, its peak RSS (bytes) and wall time."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.setdefault("JAX_PLATFORMS", "cpu")
    rss_path = log_path + ".maxrss"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(
            [sys.executable, "-c", LAUNCHER, rss_path, *cmd], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    wall = time.perf_counter() - started
    with open(log_path) as f:
        output = f.read()
    with open(rss_path) as f:
        peak = int(f.read()) * 1024  # kilobytes on Linux
    return {"returncode": code, "peak_rss_bytes": peak, "wall_s": wall, "output_tail": output[-2000:]}


def convert_cmd(src: str, dst: str, dtype: str) -> list[str]:
    return [sys.executable, "-m", "percov2_jax.cli", "convert", "--input", src, "--output", dst, "--dtype", dtype]


def component_sizes(src: str, dtypes: list[str]) -> dict:
    """``{component: {"params": n, "bytes": {dtype: b}}}`` from the converter's plan (no tensor read)."""
    from percov2_jax import pretrained

    out: dict = {}
    for dtype in dtypes:
        for name, planned in pretrained.plan(src, dtype=dtype).items():
            entry = out.setdefault(name, {"params": planned.param_count, "bytes": {}})
            entry["bytes"][dtype] = planned.nbytes
    return out


def measure(args, tmp: str) -> dict:
    sizes = QUICK if args.quick else FULL
    src = os.path.join(tmp, "pipeline")
    sources = build_pipeline(src, sizes)
    baseline_src = build_baseline(tmp)
    components = component_sizes(src, args.dtypes)
    for sub, name in (
        ("transformer", "transformer"),
        ("vae", "vae"),
        ("text_encoder", "clip_l"),
        ("text_encoder_2", "clip_g"),
        ("text_encoder_3", "t5"),
    ):
        components[name].update(sources[sub])
    print(json.dumps({k: {"params": v["params"], "files": v["files"]} for k, v in components.items()}), flush=True)
    baseline = run_measured(convert_cmd(baseline_src, os.path.join(tmp, "baseline_out"), "float32"), f"{tmp}/b.log")
    if baseline["returncode"]:
        raise SystemExit(f"baseline conversion failed:\n{baseline['output_tail']}")
    print(f"baseline: peak RSS {baseline['peak_rss_bytes'] / MB:.0f} MB", flush=True)
    runs = []
    for dtype in args.dtypes:
        dst = os.path.join(tmp, f"out_{dtype}")
        run = run_measured(convert_cmd(src, dst, dtype), os.path.join(tmp, f"{dtype}.log"))
        if run["returncode"]:
            raise SystemExit(f"percov2 convert --dtype {dtype} failed:\n{run['output_tail']}")
        written = [name for name in components if f"{name}: " in run["output_tail"]]
        if sorted(written) != sorted(components) or not os.path.isdir(os.path.join(dst, "manifest")):
            raise SystemExit(f"percov2 convert --dtype {dtype} did not write every component:\n{run['output_tail']}")
        largest = max(components, key=lambda n: components[n]["bytes"][dtype])
        above = run["peak_rss_bytes"] - baseline["peak_rss_bytes"]
        run.update(
            dtype=dtype,
            largest=largest,
            largest_bytes=components[largest]["bytes"][dtype],
            total_bytes=sum(c["bytes"][dtype] for c in components.values()),
            above_baseline_bytes=above,
        )
        run["above_over_largest"] = above / run["largest_bytes"]
        run["above_over_total"] = above / run["total_bytes"]
        runs.append(run)
        print(f"{dtype}: peak RSS {run['peak_rss_bytes'] / MB:.0f} MB in {run['wall_s']:.0f} s", flush=True)
    return {"components": components, "baseline": baseline, "runs": runs}


def markdown(report: dict) -> str:
    cfg = report["config"]
    quick = " — QUICK smoke sizes (the ratios mean nothing at this size)" if cfg["quick"] else ""
    lines = [
        f"# Peak host memory of `percov2 convert`{quick}",
        "",
        *results_io.provenance(report),
        *results_io.busy_warning(report["machine"], "wall times are slower; memory is not affected"),
        "A random diffusers SD3 pipeline folder converted by `percov2 convert` in a subprocess; peak RSS is the "
        "child's `ru_maxrss` (os.wait4 in a small launcher process). Baseline: the same command converting a tiny VAE "
        f"({report['baseline']['peak_rss_bytes'] / MB:.0f} MB peak RSS: Python, JAX, orbax, tensorstore).",
        "",
        "| component | parameters | stored as | files | on disk (MB) | "
        + " | ".join(f"{d} (MB)" for d in cfg["dtypes"])
        + " |",
        "|---|---:|---|---:|---:|" + "---:|" * len(cfg["dtypes"]),
    ]
    for name, c in report["components"].items():
        index = " + index" if c["index"] else ""
        lines.append(
            f"| {name} | {c['params']:,} | {c['source_dtype']} | {len(c['files'])}{index} | "
            f"{c['disk_bytes'] / MB:.0f} | " + " | ".join(f"{c['bytes'][d] / MB:.0f}" for d in cfg["dtypes"]) + " |"
        )
    lines += [
        "",
        "| target dtype | peak RSS (MB) | peak − baseline (MB) | largest component (MB) | all components (MB) "
        "| (peak − baseline) / largest | (peak − baseline) / total | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['dtype']} | {r['peak_rss_bytes'] / MB:.0f} | {r['above_baseline_bytes'] / MB:.0f} | "
            f"{r['largest_bytes'] / MB:.0f} ({r['largest']}) | {r['total_bytes'] / MB:.0f} | "
            f"{r['above_over_largest']:.2f} | {r['above_over_total']:.2f} | {r['wall_s']:.0f} |"
        )
    lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dtypes", type=lambda s: s.split(","), default=None, help="target dtypes (default float32,bfloat16)"
    )
    results_io.add_output_arguments(ap, "a tiny pipeline (a few MB), float32 only")
    args = ap.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    report = {
        "command": results_io.command(),
        "config": vars(args),
        "machine": results_io.machine(),
        "versions": results_io.versions("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "torch", "transformers"),
    }
    with tempfile.TemporaryDirectory(prefix="convert_memory-") as tmp:
        report.update(measure(args, tmp))
    results_io.finish_machine(report["machine"])
    report["total_s"] = time.perf_counter() - started
    results_io.write_report(args.out, results_io.stem("convert_memory", args.quick), report, markdown(report))


if __name__ == "__main__":
    main()
