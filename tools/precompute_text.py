"""Encode a dataset's captions once into an ArrayRecord side store of SD3 text embeddings.

  python tools/precompute_text.py --checkpoint sd3_medium_flax --captions captions.jsonl \
      --output /data/coco_text_embeddings [--batch_size 32] [--dtype bfloat16] [--no_t5]

``--captions``: a ``name<TAB>caption`` text file, a JSONL file of ``{"image", "caption"}`` or COCO
caption annotations (see ``percov2_jax.captions.sources``). Every host writes its own shard
(round robin over the sorted ids); training reads them with ``percov2_jax.text.store.TextEmbeddingStore``.
``--captions`` and ``--output`` may be ``gs://`` URLs.
"""

from __future__ import annotations

from absl import app, flags, logging

from percov2_jax.captions.sources import load_captions
from percov2_jax.text.prompt_encoder import PromptEncoder
from percov2_jax.text.store import precompute_text_embeddings

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "checkpoint", None, "percov2-jax checkpoint holding clip_l, clip_g (and t5) + tokenizers", required=True
)
flags.DEFINE_string("captions", None, "captions file (TSV, JSONL or COCO annotations; local or gs://)", required=True)
flags.DEFINE_string("output", None, "directory for the ArrayRecord shards (local or gs://)", required=True)
flags.DEFINE_integer("batch_size", 16, "captions encoded per call")
flags.DEFINE_integer("max_sequence_length", 256, "T5 tokens (SD3 pipeline default 256)")
flags.DEFINE_integer("joint_attention_dim", 4096, "width of the zeros that replace T5 with --no_t5")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "stored dtype")
flags.DEFINE_bool("t5", True, "run T5-XXL (else zeros, as diffusers without text_encoder_3)")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    encoder = PromptEncoder.from_checkpoint(
        FLAGS.checkpoint,
        use_t5=FLAGS.t5,
        max_sequence_length=FLAGS.max_sequence_length,
        joint_attention_dim=FLAGS.joint_attention_dim,
    )
    path = precompute_text_embeddings(
        encoder, load_captions(FLAGS.captions), FLAGS.output, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
