"""Precomputed SD3 text embeddings in ArrayRecord files, keyed by example id.

Large-scale training should not run T5-XXL every step: ``precompute_text_embeddings`` encodes a
dataset's captions once (each host its own shard) and ``TextEmbeddingStore`` reads them back by
example id, or by record index as a grain data source.

Layout of ``DIR``: ``text_embeddings-{i:05d}-of-{n:05d}.array_record`` (one record per example:
a msgpack dict ``{"id", "caption", "prompt_embeds" [77 + L, D], "pooled" [P]}``) and, per shard, a
``.index.json`` with the ids in record order plus the settings (dtype, T5 length, use of T5).
``DIR`` may be local or ``gs://``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from flax import serialization
from tqdm.auto import tqdm

from percov2_jax import storage
from percov2_jax.text.prompt_encoder import PromptEncoder

PATTERN = "text_embeddings-{index:05d}-of-{count:05d}.array_record"


EMPTY_PROMPT_ID = "__empty_prompt__"


def _shard_ids(ids: list[str], shard_index: int, shard_count: int) -> list[str]:
    return ids[shard_index::shard_count]


def precompute_text_embeddings(
    encoder: PromptEncoder,
    captions: Mapping[str, str],
    output_dir: str,
    *,
    batch_size: int = 16,
    dtype: str = "float32",
    shard_index: int | None = None,
    shard_count: int | None = None,
    progress: bool = True,
) -> str:
    """Encode ``captions`` (id -> caption) into ``output_dir`` (str, local or ``gs://``); returns
    the shard path written (str).

    Hosts split the ids (sorted) round-robin by ``jax.process_index()`` unless ``shard_index`` /
    ``shard_count`` are given. ``dtype`` is the stored dtype (``float32``, ``bfloat16``, ``float16``).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside [0, {shard_count})")
    store_dtype = np.dtype(jax.numpy.dtype(dtype))
    # Every store carries the empty prompt: the embedding used for dropped captions and CFG.
    captions = {**captions, EMPTY_PROMPT_ID: ""}
    ids = _shard_ids(sorted(captions), shard_index, shard_count)
    path = os.path.join(output_dir, PATTERN.format(index=shard_index, count=shard_count))
    with tempfile.TemporaryDirectory(prefix="percov2-text-") as tmp:
        # ArrayRecordWriter writes local files only: a shard bound for a bucket is written here, then
        # uploaded whole (before its index, which readers need to use it).
        local = os.path.join(tmp, os.path.basename(path)) if storage.is_url(path) else path
        if local == path:
            os.makedirs(output_dir, exist_ok=True)
        writer = ArrayRecordWriter(local, "group_size:1")
        try:
            for start in tqdm(range(0, len(ids), batch_size), desc=f"text shard {shard_index}", disable=not progress):
                batch = ids[start : start + batch_size]
                texts = [captions[i] for i in batch]
                # Pad the last batch to a full one so every call reuses one compiled shape.
                padded = texts + [""] * (batch_size - len(texts))
                embeds, pooled = jax.device_get(encoder(padded))
                for j, example_id in enumerate(batch):
                    writer.write(
                        serialization.msgpack_serialize(
                            {
                                "id": example_id,
                                "caption": texts[j],
                                "prompt_embeds": np.asarray(embeds[j]).astype(store_dtype),
                                "pooled": np.asarray(pooled[j]).astype(store_dtype),
                            }
                        )
                    )
        finally:
            writer.close()
        if local != path:
            storage.write_bytes(path, storage.read_bytes(local))
    index = {
        "ids": ids,
        "dtype": store_dtype.name,
        "max_sequence_length": encoder.max_sequence_length,
        "use_t5": encoder.use_t5,
    }
    storage.write_text(path + ".index.json", json.dumps(index))
    return path


class TextEmbeddingStore:
    """Read-only access to a directory (str, local or ``gs://``) written by ``precompute_text_embeddings``.

    ``store[example_id]`` -> ``{"prompt_embeds", "pooled", "caption", "id"}``; ``store.get(i)`` by
    record index (also ``__len__``/``records``, so it serves as a grain random-access source via
    ``store.as_grain_source()``).
    """

    def __init__(self, directory: str):
        from array_record.python.array_record_module import ArrayRecordReader

        paths = sorted(os.fspath(p) for p in storage.path(directory).glob("text_embeddings-*-of-*.array_record"))
        if not paths:
            raise FileNotFoundError(f"{directory}: no text_embeddings-*.array_record shards")
        counts = {p.rsplit("-of-", 1)[1].split(".")[0] for p in paths}
        if len(counts) != 1 or len(paths) != int(counts.pop()):
            raise ValueError(f"{directory}: incomplete or mixed shard set {[os.path.basename(p) for p in paths]}")
        self._readers, self._where, self._order = [], {}, []
        self.settings = None
        for shard, path in enumerate(paths):
            index = json.loads(storage.read_text(path + ".index.json"))
            settings = {k: v for k, v in index.items() if k != "ids"}
            if self.settings not in (None, settings):
                raise ValueError(f"{path}: settings {settings} differ from the other shards' {self.settings}")
            self.settings = settings
            reader = ArrayRecordReader(path)
            if reader.num_records() != len(index["ids"]):
                raise ValueError(f"{path}: {reader.num_records()} records but its index lists {len(index['ids'])}")
            self._readers.append(reader)
            for row, example_id in enumerate(index["ids"]):
                if example_id in self._where:
                    raise ValueError(f"{directory}: example id {example_id!r} stored twice")
                self._where[example_id] = (shard, row)
                self._order.append(example_id)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._where

    def ids(self) -> list[str]:
        return list(self._order)

    def _read(self, shard: int, row: int) -> dict:
        return serialization.msgpack_restore(self._readers[shard].read([row])[0])

    def __getitem__(self, example_id: str) -> dict:
        if example_id not in self._where:
            raise KeyError(f"example id {example_id!r} has no precomputed text embedding")
        return self._read(*self._where[example_id])

    def get(self, index: int) -> dict:
        return self[self._order[index]]

    def records(self) -> Iterator[dict]:
        for example_id in self._order:
            yield self[example_id]

    def as_grain_source(self):
        """A grain ``RandomAccessDataSource`` over the records (index -> record dict)."""
        store = self

        class _Source:
            def __len__(self):
                return len(store)

            def __getitem__(self, index):
                return store.get(int(index))

        return _Source()
