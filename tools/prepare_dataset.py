"""Write an image folder (+ captions) as a TFDS dataset in the array_record format.

  python tools/prepare_dataset.py --image_dir /data/coco_subset/train2017 \
      --captions /data/coco/annotations/captions_train2017.json --output_dir /data/tfds \
      --name coco_subset [--split train] [--require_captions]
  python tools/prepare_dataset.py --split_dir train=/data/x/train --split_dir validation=/data/x/val \
      --captions captions.tsv --output_dir /data/tfds --name x

The dataset lands in ``OUTPUT_DIR/NAME/VERSION`` and is read, without TensorFlow, by
``percov2_jax.data.sources.TfdsSource(OUTPUT_DIR/NAME, split)`` or ``TfdsSource(NAME, split,
data_dir=OUTPUT_DIR)``. ``--image_dir``, ``--split_dir`` and ``--captions`` may be ``gs://`` URLs.
ArrayRecord files cannot be written into a bucket directly: with a ``gs://`` ``--output_dir`` the
dataset is prepared in a local temporary directory (room for the whole dataset needed) and then
uploaded, ``dataset_info.json`` last, so that an interrupted upload is not taken for a dataset.

Images and captions are found as by ``ImageFolderSource`` (recursive, sorted, caption file
formats in its docstring). Features: ``image`` (``tfds.features.Image``, 3 channels), ``caption``
and ``id`` (the path relative to the split's folder), in the folder's sorted order. Every image
is decoded first (a corrupt file stops the run, naming it). RGB JPEG files without an EXIF
rotation are stored byte for byte (``--keep_jpeg``); every other image is stored as the lossless
PNG of its RGB conversion (grayscale, alpha over white, 16-bit scaled to 8 bits), so what
``TfdsSource`` returns equals what ``ImageFolderSource`` returns, pixel for pixel.
"""

from __future__ import annotations

import io
import os
import tempfile
import types
from collections.abc import Mapping

from PIL import Image

from percov2_jax import storage
from percov2_jax.data.sources import ImageFolderSource, read_image

_EXIF_ORIENTATION = 0x0112


def _image_bytes(path: str, keep_jpeg: bool) -> bytes:
    """The bytes to store for one image file, local or ``gs://`` (original JPEG bytes or a PNG of
    its RGB pixels)."""
    data = storage.read_bytes(path)
    pixels = read_image(data, name=path)  # decodes fully: a corrupt file raises ImageDecodeError naming it
    if keep_jpeg:
        with Image.open(io.BytesIO(data)) as image:
            plain_jpeg = (
                image.format == "JPEG" and image.mode == "RGB" and image.getexif().get(_EXIF_ORIENTATION, 1) == 1
            )
        if plain_jpeg:
            return data
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _builder_class(name: str, version: str, splits: Mapping[str, ImageFolderSource], keep_jpeg: bool, description: str):
    import tensorflow_datasets as tfds

    def body(ns):
        ns["__module__"] = __name__
        ns["name"] = name
        ns["VERSION"] = tfds.core.Version(version)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=description,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "caption": tfds.features.Text(),
                        "id": tfds.features.Text(),
                    }
                ),
                # Keep the folder's sorted order; training shuffles globally anyway.
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in splits}

        def _generate_examples(self, split):
            source = splits[split]
            for path, caption, example_id in zip(source.paths, source.captions, source.ids):
                yield example_id, {"image": _image_bytes(path, keep_jpeg), "caption": caption, "id": example_id}

        ns.update(_info=_info, _split_generators=_split_generators, _generate_examples=_generate_examples)

    class_name = "".join(part.capitalize() for part in name.split("_")) or "ImageFolder"
    return types.new_class(class_name, (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True}, body)


def prepare(
    splits: Mapping[str, ImageFolderSource],
    output_dir: str | os.PathLike,
    *,
    name: str = "image_folder",
    version: str = "1.0.0",
    keep_jpeg: bool = True,
    description: str = "",
) -> str:
    """Write ``splits`` (split name -> ImageFolderSource) to ``output_dir/name/version`` (local or
    ``gs://``); returns that path (str)."""

    if not splits:
        raise ValueError("no splits to write")
    if not name or not name.replace("_", "a").isalnum() or not name[0].isalpha() or name.lower() != name:
        raise ValueError(f"dataset name must be snake_case (lower-case letters, digits, _), got {name!r}")
    final = os.path.join(os.fspath(output_dir), name, version)
    if (storage.path(final) / "dataset_info.json").exists():
        raise FileExistsError(f"{final} already holds a prepared dataset; remove it or pick another --version")
    if storage.is_url(output_dir):
        return _prepare_and_upload(
            splits, final, name=name, version=version, keep_jpeg=keep_jpeg, description=description
        )
    description = description or "Images and captions from " + ", ".join(
        f"{split}: {source.root} ({len(source)} images)" for split, source in splits.items()
    )
    builder = _builder_class(name, version, splits, keep_jpeg, description)(
        data_dir=os.fspath(output_dir), file_format="array_record"
    )
    with tempfile.TemporaryDirectory() as downloads:
        builder.download_and_prepare(download_dir=downloads)
    return builder.data_dir


def _prepare_and_upload(splits: Mapping[str, ImageFolderSource], final: str, **options) -> str:
    """`prepare` into a local temporary directory, then upload the dataset to the URL ``final``
    (ArrayRecordWriter writes local files only)."""
    with tempfile.TemporaryDirectory(prefix="percov2-tfds-") as local:
        print(f"preparing in {local} (ArrayRecord files cannot be written to {final} directly)")
        written = storage.path(prepare(splits, local, **options))
        # dataset_info.json marks a prepared dataset: uploaded last, once every shard is there.
        files = sorted(storage.files_under(written), key=lambda f: f.name == "dataset_info.json")
        for file in files:
            target = f"{final}/{file.relative_to(written).as_posix()}"
            data = file.read_bytes()
            print(f"uploading {target} ({len(data):,} bytes)")
            storage.write_bytes(target, data)
    return final


def _define_flags():
    from absl import flags

    flags.DEFINE_string("image_dir", None, "folder of images for --split (local or gs://)")
    flags.DEFINE_string("split", "train", "split name for --image_dir")
    flags.DEFINE_multi_string("split_dir", [], "SPLIT=DIR, repeatable (instead of --image_dir)")
    flags.DEFINE_string(
        "captions", None, "caption file (local or gs://): JSON {relative path: caption}, TSV, JSONL or COCO"
    )
    flags.DEFINE_bool("require_captions", False, "fail if an image has no caption")
    flags.DEFINE_string("output_dir", None, "TFDS data_dir to write into (local or gs://)", required=True)
    flags.DEFINE_string("name", "image_folder", "dataset name (snake_case)")
    flags.DEFINE_string("version", "1.0.0", "dataset version")
    flags.DEFINE_bool("keep_jpeg", True, "store RGB JPEG files as they are instead of re-encoding them as PNG")
    return flags.FLAGS


def main(argv):
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    dirs = {}
    if FLAGS.image_dir:
        dirs[FLAGS.split] = FLAGS.image_dir
    for entry in FLAGS.split_dir:
        split, sep, directory = entry.partition("=")
        if not sep or not split or not directory:
            raise SystemExit(f"--split_dir wants SPLIT=DIR, got {entry!r}")
        if split in dirs:
            raise SystemExit(f"split {split!r} given twice")
        dirs[split] = directory
    if not dirs:
        raise SystemExit("give --image_dir or --split_dir SPLIT=DIR")
    splits = {
        split: ImageFolderSource(directory, FLAGS.captions, require_captions=FLAGS.require_captions)
        for split, directory in dirs.items()
    }
    for split, source in splits.items():
        captioned = sum(bool(c) for c in source.captions)
        print(f"{split}: {len(source)} images from {source.root}, {captioned} with captions")
    path = prepare(splits, FLAGS.output_dir, name=FLAGS.name, version=FLAGS.version, keep_jpeg=FLAGS.keep_jpeg)
    print(f"wrote {path}")
    print(f"read it with TfdsSource({os.path.dirname(path)!r}, split=...)")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
