"""Convert an SD3 checkpoint (PyTorch) into a percov2-jax orbax checkpoint.

  python tools/convert_sd3.py --input /path/to/stable-diffusion-3-medium-diffusers \
      --output /path/to/sd3_medium_flax --components transformer,vae
  python tools/convert_sd3.py --input sd3_medium.safetensors --output sd3_flax --dtype bfloat16

SRC is a diffusers pipeline folder, one diffusers component folder, or an original single
``.safetensors`` file. Load the result with ``percov2_jax.checkpoints.load(DST)``.
"""

from __future__ import annotations

from absl import app, flags, logging

from percov2_jax.convert.to_checkpoint import convert_to_checkpoint, describe, parse_overrides

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "diffusers pipeline/component folder or single .safetensors file", required=True)
flags.DEFINE_string("output", None, "orbax checkpoint directory to write", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "dtype the parameters are stored in")
flags.DEFINE_bool("scan_layers", False, "store the MM-DiT blocks stacked for scan_layers=True")
flags.DEFINE_list("components", None, "components to convert (default: all in the input)")
flags.DEFINE_multi_string("override", [], "config field the weights do not determine, e.g. "
                          "transformer.attention_head_dim=64 or vae.norm_num_groups=32 (value parsed as JSON)")
flags.DEFINE_bool("overwrite", False, "replace an existing output directory")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # orbax logs every file at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        overrides = parse_overrides(FLAGS.override)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    summary = convert_to_checkpoint(FLAGS.input, FLAGS.output, dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers,
                                    components=FLAGS.components, config_overrides=overrides, overwrite=FLAGS.overwrite)
    print(describe(summary, FLAGS.output))


if __name__ == "__main__":
    app.run(main)
