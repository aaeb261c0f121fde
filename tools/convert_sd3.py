"""Convert an SD3 checkpoint (PyTorch) into a percov2-jax orbax checkpoint.

  python tools/convert_sd3.py --input /path/to/stable-diffusion-3-medium-diffusers \
      --output /path/to/sd3_medium_flax --components transformer,vae
  python tools/convert_sd3.py --input sd3_medium.safetensors --output sd3_flax --dtype bfloat16

SRC is a diffusers pipeline folder, one diffusers component folder, or an original single
``.safetensors`` file. Load the result with ``percov2_jax.checkpoints.load(DST)``.
"""

from __future__ import annotations

import json

from absl import app, flags

from percov2_jax.convert.to_checkpoint import convert_to_checkpoint

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "diffusers pipeline/component folder or single .safetensors file", required=True)
flags.DEFINE_string("output", None, "orbax checkpoint directory to write", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "dtype the parameters are stored in")
flags.DEFINE_bool("scan_layers", False, "store the MM-DiT blocks stacked for scan_layers=True")
flags.DEFINE_list("components", None, "components to convert (default: all in the input)")
flags.DEFINE_multi_string("override", [], "config field the weights do not determine, e.g. "
                          "transformer.attention_head_dim=64 or vae.norm_num_groups=32 (value parsed as JSON)")
flags.DEFINE_bool("overwrite", False, "replace an existing output directory")


def parse_overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        component, dot, field = key.partition(".")
        if not sep or not dot:
            raise app.UsageError(f"--override must look like component.field=value, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(component, {})[field] = parsed
    return out


def main(argv):
    del argv
    summary = convert_to_checkpoint(FLAGS.input, FLAGS.output, dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers,
                                    components=FLAGS.components, config_overrides=parse_overrides(FLAGS.override),
                                    overwrite=FLAGS.overwrite)
    for name, info in summary.items():
        print(f"{name}: {info['params']:,} parameters")
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
