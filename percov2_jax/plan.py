"""Plan a run on machines we do not have: compile the stage-1 training step and the decoder ahead
of time for a mesh of TPU (or GPU) devices and print per-device memory, FLOPs and step times.

  python -m percov2_jax.plan --config configs/sd3_medium_ultralow.py --mesh data=1,fsdp=32,tensor=1 \
      --device_kind tpu_v5p [--mfu 0.4] [--programs train,decode,text] [--json plan.json] \
      [--config.model.remat_policy=full] [--config.train.global_batch_size=160]

TPU kinds are compiled by XLA's TPU compiler from libtpu (no TPU needed: ``pip install
'jax[tpu]'``, or ``make libtpu`` for a private copy passed with --libtpu_path). GPU kinds are
compiled for virtual CPU devices: their FLOPs and step times hold, their memory is XLA:CPU's.
Nothing is allocated; see percov2_jax/planning/plan.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import flags

from percov2_jax import jobs

FLAGS = flags.FLAGS
jobs.define_flags("stage-1 config file (configs/*.py)", None, multihost=False)
flags.DEFINE_string("mesh", "data=1,fsdp=-1,tensor=1", "mesh sizes; the product is the device count")
flags.DEFINE_string("device_kind", "tpu_v5p", "tpu_v4 | tpu_v5e | tpu_v5p | tpu_v6e | h100 | a100")
flags.DEFINE_integer("devices", None, "device count when --mesh has a -1 entry")
flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation assumed for the step times")
flags.DEFINE_list(
    "programs",
    ["train", "decode", "text"],
    "which programs to compile: train (caption embeddings given, as with precomputed text), decode, text (the "
    "frozen SD3 text encoders; with it, rows for train and decode with the encoders resident beside them)",
)
flags.DEFINE_integer("decode_batch", None, "images per decode call (default: one per batch shard)")
flags.DEFINE_string("libtpu_path", None, "directory holding a `pip --target` copy of libtpu")
flags.DEFINE_string("json", None, "also write the plan here (local or gs://)")


def parse_mesh(text: str, devices: int | None) -> dict[str, int]:
    """``"data=1,fsdp=-1,tensor=1"`` -> mesh sizes; a ``-1`` entry needs ``devices``."""
    from percov2_jax.sharding import mesh_sizes

    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh wants data=D,fsdp=F,tensor=T, got {text!r}")
        sizes[name.strip()] = int(value)
    if -1 in sizes.values() and devices is None:
        raise ValueError("--mesh has a -1 size: give --devices")
    count = devices if devices is not None else sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    return mesh_sizes(sizes["data"], sizes["fsdp"], sizes["tensor"], count)


def _backends_initialized() -> bool:
    """Whether JAX already made its devices (then XLA_FLAGS can no longer add virtual ones)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # no public API tells

    return xla_bridge.backends_are_initialized()


def main() -> None:
    from percov2_jax.planning import devices as device_lib

    kind = device_lib.device_kind(FLAGS.device_kind)
    sizes = parse_mesh(FLAGS.mesh, FLAGS.devices)
    count = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    unknown = set(FLAGS.programs) - {"train", "decode", "text"}
    if unknown:
        raise ValueError(f"unknown --programs {sorted(unknown)}; choose train, decode, text")
    if kind.compiled_for_real:
        device_lib.topology_name(kind, count)  # a slice shape exists, before loading libtpu
        device_lib.enable_libtpu(FLAGS.libtpu_path)
        os.environ["PERCOV2_PALLAS_INTERPRET"] = "0"  # compile Pallas kernels (splash) for the TPU
    elif not _backends_initialized():
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from percov2_jax import sharding
    from percov2_jax.planning import report
    from percov2_jax.planning.plan import Planner, with_resident

    devices = device_lib.tpu_devices(kind, count) if kind.compiled_for_real else jax.devices()[:count]
    if len(devices) != count:
        raise RuntimeError(f"need {count} devices, have {len(devices)} (start a fresh process for GPU kinds)")
    mesh = sharding.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)
    config = FLAGS.config
    planner = Planner(config, mesh)
    shards = sizes["data"] * sizes["fsdp"]
    decode_batch = FLAGS.decode_batch or shards
    header = dict(
        config=FLAGS["config"].value and flags.FLAGS["config"].config_filename,
        device_kind=kind.name,
        devices=count,
        mesh=",".join(f"{k}={v}" for k, v in sizes.items()),
        mfu=FLAGS.mfu,
        remat_policy=str(config.model.remat_policy),
        dtype=str(config.model.dtype),
        image_size=int(config.image_size),
        params=planner.param_count,
        batch={
            "train_step": int(config.train.global_batch_size),
            "decode": decode_batch,
            "text_encoders": int(config.train.global_batch_size),
            "train_step+text_encoders": int(config.train.global_batch_size),
            "text_encoders@decode": decode_batch,
            "decode+text_encoders": decode_batch,
        },
        text_dtype=str(config.text.get("dtype", "auto")).replace("auto", "bfloat16"),
        decode_steps=int(config.sample.num_steps),
        guidance_scale=float(config.sample.guidance_scale),
        jax_version=jax.__version__,
    )
    print(
        f"{kind.name} x{count} mesh {header['mesh']}: {planner.param_count / 1e9:.3f} B parameters, "
        f"{header['image_size']}^2 images, remat {header['remat_policy']}, compute {header['dtype']}",
        flush=True,
    )
    records, costs = [], {}

    def emit(cost):
        record = report.cost_record(cost, kind, count, FLAGS.mfu)
        records.append(record)
        print(report.describe(record, header), flush=True)

    programs = list(FLAGS.programs)
    if "text" in programs and config.text.kind == "hashed":
        print("text: skipped, text.kind='hashed' runs no text encoders", flush=True)
        programs.remove("text")
    for program in programs:
        if program == "train":
            costs[program] = planner.train_step()
        elif program == "decode":
            costs[program] = planner.decode(decode_batch, header["decode_steps"], header["guidance_scale"])
        else:
            costs[program] = planner.text_encoders(header["batch"]["text_encoders"])
        emit(costs[program])
    # With the encoders on the devices (text.kind="sd3"; the codec always encodes its captions), each
    # program runs while the other's weights stay resident.
    if "text" in costs and "train" in costs:
        emit(with_resident(costs["train"], costs["text"], "train_step+text_encoders"))
    if "text" in costs and "decode" in costs:
        at_decode = planner.text_encoders(decode_batch)
        emit(
            with_resident(
                costs["decode"], dataclasses.replace(at_decode, name="text_encoders@decode"), "decode+text_encoders"
            )
        )
    print(report.MARKDOWN_HEADER)
    for record in records:
        print(report.markdown_row(record, header))
    if FLAGS.json:
        from percov2_jax import storage

        storage.write_text(FLAGS.json, json.dumps({"header": header, "programs": records}, indent=1, sort_keys=True))


if __name__ == "__main__":
    jobs.run(main)
