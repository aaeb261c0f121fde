"""Encode a dataset's captions once into an ArrayRecord side store of SD3 text embeddings.

The store for a training run, keyed by the run's own example ids (any ``data.source``: builtin,
folder, tfds), with the run's text settings::

  python tools/precompute_text.py --config configs/sd3_medium_ultralow.py \
      --config.pretrained.checkpoint=sd3_medium_flax --config.data.source=tfds \
      --config.data.path=gs://BUCKET/tfds/my_images --output gs://BUCKET/text/my_images

then train with ``--config.text.kind=precomputed --config.text.store=gs://BUCKET/text/my_images``.
The encoders come from ``--checkpoint``, else the config's ``text.checkpoint``, else its
``pretrained.checkpoint``; the T5 length and ``use_t5`` from ``config.text``, the widths from the
run's transformer (the checkpoint's own unless ``config.model.transformer`` sets them).

A store from a caption file instead (keys: the file's image names)::

  python tools/precompute_text.py --checkpoint sd3_medium_flax --captions captions.jsonl \
      --output /data/coco_text_embeddings [--max_sequence_length 256] [--no_t5]

``--captions``: a ``name<TAB>caption`` text file, a JSONL file of ``{"image", "caption"}`` or COCO
caption annotations (see ``percov2_jax.captions.sources``). Every host writes its own shard
(round robin over the sorted ids); training reads them with ``percov2_jax.text.store.TextEmbeddingStore``.
Paths may be ``gs://`` URLs.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a stage-1 training config: its data source, text settings, checkpoint")
flags.DEFINE_string("checkpoint", None, "percov2-jax checkpoint holding clip_l, clip_g (and t5) + tokenizers")
flags.DEFINE_string("captions", None, "without --config: a captions file (TSV, JSONL or COCO; local or gs://)")
flags.DEFINE_string("output", None, "directory for the ArrayRecord shards (local or gs://)", required=True)
flags.DEFINE_integer("batch_size", 16, "captions encoded per call")
flags.DEFINE_integer("max_sequence_length", 256, "T5 tokens (SD3 pipeline default 256), without --config")
flags.DEFINE_integer("joint_attention_dim", 4096, "width of the zeros that replace T5 with --no_t5, without --config")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "stored dtype")
flags.DEFINE_bool("t5", True, "run T5-XXL (else zeros, as diffusers without text_encoder_3), without --config")


def _from_config(config) -> tuple[str, dict, dict]:
    """(checkpoint, {id: caption}, encoder settings) for a training config."""
    from percov2_jax import build
    from percov2_jax.data.sources import source_captions

    checkpoint = FLAGS.checkpoint or config.text.checkpoint or config.pretrained.checkpoint
    if not checkpoint:
        raise app.UsageError("no text encoders: pass --checkpoint, or set text.checkpoint or pretrained.checkpoint")
    transformer = build.transformer_config(config)
    settings = {
        "use_t5": bool(config.text.use_t5),
        "max_sequence_length": int(config.text.max_sequence_length),
        "joint_attention_dim": transformer.joint_attention_dim,
    }
    return checkpoint, source_captions(build.build_data_source(config), progress=True), settings


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from percov2_jax.captions.sources import load_captions
    from percov2_jax.text.prompt_encoder import PromptEncoder
    from percov2_jax.text.store import precompute_text_embeddings

    if (FLAGS.config is None) == (FLAGS.captions is None):
        raise app.UsageError("pass one of --config (a training run's data source) or --captions (a caption file)")
    if FLAGS.config is not None:
        checkpoint, captions, settings = _from_config(FLAGS.config)
    else:
        if not FLAGS.checkpoint:
            raise app.UsageError("--captions needs --checkpoint (the text encoders)")
        checkpoint, captions = FLAGS.checkpoint, load_captions(FLAGS.captions)
        settings = {
            "use_t5": FLAGS.t5,
            "max_sequence_length": FLAGS.max_sequence_length,
            "joint_attention_dim": FLAGS.joint_attention_dim,
        }
    encoder = PromptEncoder.from_checkpoint(checkpoint, **settings)
    path = precompute_text_embeddings(encoder, captions, FLAGS.output, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype)
    print(f"wrote {path} ({len(captions)} captions)")


if __name__ == "__main__":
    app.run(main)
