"""The evaluation run: every image compressed to a real ``.pcv2`` stream and decompressed under
each operating mode, scored, in shards spread over processes, resumable.

Work split. The dataset's items (in its fixed order) are cut into shards of ``shard_size``;
shard ``s`` belongs to process ``s mod P``. A process runs its shards on its own devices (the
codec and metric networks sit on a mesh of its local devices; batches split over the mesh's
``(data, fsdp)`` axes), with no collective until all its shards are done: a slow host never
stalls the others mid-run, and decoding is embarrassingly parallel. Within a shard, images of one
size are batched ``batch_size`` at a time (padded to a multiple of the mesh's batch axes).

Determinism. Every image's stream and reconstruction depend only on the image, its captions, the
model and the mode: the decoder starts each row from the same seeded noise, as
``Codec.decompress`` does for one image. Shards hold the same images whatever the number of
processes, so 1 and N processes with the same per-process device count give identical records.

Files in ``workdir``: a folder all processes see, or a Cloud Storage URL (``gs://bucket/eval``;
anything `percov2_jax.storage` takes), so hosts need no shared filesystem:

- ``run.json``: the run's identity (dataset digest, model ids, modes, metric weights, shard size,
  coding). A run resumed with another identity is refused, naming what changed.
- ``shards/shard_NNNNN.json`` (+ ``.npz``): one finished shard: per-image records, the images that
  could not be read (``missing`` / ``corrupt``, with the error), and the Inception and CLIP
  embeddings for the dataset metrics. Written atomically (locally a temporary file renamed; on
  object storage one object written whole) after the ``.npz``; a shard whose ``.json`` exists is
  skipped on resume, so nothing is redone.
- After every shard exists, process 0 aggregates: ``summary.json`` / ``summary.md`` (per mode: mean
  bpp split into caption / tokens / header, mean PSNR, MS-SSIM, LPIPS, CLIP score; FID and KID
  between the originals and the reconstructions), ``records.jsonl`` / ``records.md`` and the
  plots. It checks that every dataset index appears exactly once, as a record or a failure.

Reading errors (a listed file that is missing, a file that does not decode) are recorded and
counted in the summary, never dropped; any other error stops the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from percov2_jax import storage
from percov2_jax.evaluation.modes import Mode

RUN_FILE = "run.json"
SHARD_DIR = "shards"


# ------------------------------------------------------------------------------ identity, shards


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    """Consecutive index ranges of ``shard_size`` covering ``range(num_items)``."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [range(s, min(s + shard_size, num_items)) for s in range(0, num_items, shard_size)]


def shards_of_process(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """The shards process ``process_index`` of ``process_count`` runs: ``s mod P == p``."""
    return [s for s in range(num_shards) if s % process_count == process_index]


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _dumps(value: Any) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True, default=_json_default).encode()


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def check_run_file(workdir: str, identity: dict, write: bool) -> None:
    """Refuse a workdir holding another run; ``write``: record ``identity`` if it has none."""
    path = storage.path(workdir) / RUN_FILE
    if path.exists():
        old = json.loads(storage.read_text(path))
        changed = _differences(old, json.loads(_dumps(identity)))
        if changed:
            raise ValueError(
                f"{workdir} holds another evaluation run; resuming would mix results. Changed: "
                + "; ".join(changed[:10])
                + ". Use a new --workdir."
            )
    elif write:
        storage.write_bytes(path, _dumps(identity))


def shard_path(workdir: str, shard: int, ext: str = "json") -> str:
    return os.fspath(storage.path(workdir) / SHARD_DIR / f"shard_{shard:05d}.{ext}")


def shard_done(workdir: str, shard: int, run_fingerprint: str) -> bool:
    path = shard_path(workdir, shard)
    if not storage.path(path).exists():
        return False
    found = json.loads(storage.read_text(path)).get("fingerprint")
    if found != run_fingerprint:
        raise ValueError(f"{path} belongs to another run (fingerprint {found}, this run {run_fingerprint})")
    return True


# ------------------------------------------------------------------------------ one shard


@dataclasses.dataclass
class Evaluator:
    """Scores images with one codec under several modes (see the module docstring).

    ``codec``: a loaded `percov2_jax.codec.api.Codec`; ``suite``: a `MetricSuite`;
    ``batch_size``: images per encoder / decoder call on this process."""

    codec: Any
    suite: Any
    modes: Sequence[Mode]
    batch_size: int = 4
    caption_coder: str = "zlib"

    def __post_init__(self):
        self._codecs = {
            m.name: dataclasses.replace(self.codec, sample_steps=m.sample_steps, guidance_scale=m.guidance_scale)
            for m in self.modes
        }

    def evaluate(self, dataset, indices: Sequence[int], progress=None) -> tuple[list, list, dict]:
        """Score ``dataset`` items ``indices`` -> ``(records, failures, arrays)``.

        ``records``: one dict per readable image and mode; ``failures``: ``{index, id, kind,
        error}`` for items that could not be read; ``arrays``: ``index [n]`` and embeddings
        ``[n, D]`` float32 keyed ``original/inception``, ``{mode}/inception``, ``original/clip``,
        ``{mode}/clip``, ``caption/clip`` (rows in ``index`` order)."""
        from percov2_jax.data.sources import ImageDecodeError

        items, failures = [], []
        for index in indices:
            try:
                item = dataset.load(index)
            except FileNotFoundError as e:  # MissingImageError is one
                failures.append({"index": int(index), "id": dataset.ids[index], "kind": "missing", "error": str(e)})
            except ImageDecodeError as e:
                failures.append({"index": int(index), "id": dataset.ids[index], "kind": "corrupt", "error": str(e)})
            else:
                items.append((int(index), item))
        if progress is not None:
            progress.update(len(failures))
        records, arrays = [], {}
        for batch in _batches(items, self.batch_size):
            records += self._evaluate_batch(batch, arrays)
            if progress is not None:
                progress.update(len(batch))
        order = np.argsort(arrays["index"]) if arrays else None
        arrays = {k: np.asarray(v)[order] for k, v in arrays.items()} if arrays else {"index": np.zeros(0, np.int64)}
        records.sort(key=lambda r: (r["index"], [m.name for m in self.modes].index(r["mode"])))
        return records, failures, arrays

    def _evaluate_batch(self, batch, arrays: dict) -> list[dict]:
        from percov2_jax.codec import bitstream

        indices = [i for i, _ in batch]
        images = [item["image"] for _, item in batch]
        captions = [item["caption"] for _, item in batch]
        _append(arrays, "index", np.asarray(indices, np.int64))
        suite = self.suite
        if suite.wants_inception:
            _append(arrays, "original/inception", suite.inception_features(images))
        if suite.wants_clip:
            original_clip = suite.clip_image_embeds(images)
            text_clip = suite.clip_text_embeds([item["score_caption"] for _, item in batch])
            _append(arrays, "original/clip", original_clip)
            _append(arrays, "caption/clip", text_clip)
        streams_by_coding: dict = {}
        records = []
        for mode in self.modes:
            codec = self._codecs[mode.name]
            if mode.coding not in streams_by_coding:
                streams_by_coding[mode.coding] = codec.compress_batch(
                    images, captions, self.caption_coder, **mode.coding_overrides
                )
            streams = streams_by_coding[mode.coding]
            reconstructions = codec.decompress_batch(streams)
            shapes = {(a.shape, b.shape) for a, b in zip(images, reconstructions) if a.shape != b.shape}
            if shapes:
                raise RuntimeError(f"decoded size differs from the input: {sorted(shapes)}")
            per_image = suite.per_image(np.stack(images), np.stack(reconstructions))
            clip_scores = None
            if suite.wants_clip:
                embeds = suite.clip_image_embeds(reconstructions)
                _append(arrays, f"{mode.name}/clip", embeds)
                clip_scores = _clip_scores(embeds, text_clip)
            if suite.wants_inception:
                _append(arrays, f"{mode.name}/inception", suite.inception_features(reconstructions))
            for row, (index, item) in enumerate(batch):
                budget = bitstream.bit_budget(streams[row])
                record = {
                    "index": index,
                    "id": item["id"],
                    "mode": mode.name,
                    "bytes": len(streams[row]),
                    "height": int(budget["height"]),
                    "width": int(budget["width"]),
                    "bpp": budget["total_bpp"],
                    "bpp_caption": budget["caption_bpp"],
                    "bpp_tokens": budget["tokens_bpp"],
                    "bpp_header": budget["total_bpp"] - budget["caption_bpp"] - budget["tokens_bpp"],
                    "bpp_paper": budget["paper_bpp"],
                    "entropy_mode": bitstream.unpack(streams[row]).header.entropy_mode,
                    "caption": item["caption"],
                }
                for name, values in per_image.items():
                    record[name] = values[row]
                if clip_scores is not None:
                    record["clip_score"] = clip_scores[row]
                records.append(record)
        return records


def _append(arrays: dict, key: str, value: np.ndarray) -> None:
    arrays[key] = np.concatenate([arrays[key], value]) if key in arrays else np.asarray(value)


def _clip_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> list[float]:
    from percov2_jax.metrics.clip_score import clip_score

    return [float(v) for v in np.asarray(clip_score(image_embeds, text_embeds), np.float64)]


def _batches(items: list, batch_size: int) -> list[list]:
    """Items grouped by image shape (first-seen order), cut into batches of ``batch_size``."""
    groups: dict = {}
    for index, item in items:
        groups.setdefault(item["image"].shape, []).append((index, item))
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


# ------------------------------------------------------------------------------ the run


def run_shards(
    evaluator: Evaluator,
    dataset,
    workdir: str,
    identity: dict,
    *,
    shard_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_shards: int | None = None,
    max_minutes: float | None = None,
    show_progress: bool = True,
) -> dict:
    """Evaluate this process's unfinished shards; returns ``{"done": [...], "skipped": [...],
    "remaining": [...]}`` (shard numbers). ``max_shards`` / ``max_minutes`` stop early (the next
    run continues)."""
    from tqdm.auto import tqdm

    run_fingerprint = fingerprint(identity)
    ranges = shard_ranges(len(dataset), shard_size)
    mine = shards_of_process(len(ranges), process_index, process_count)
    skipped = [s for s in mine if shard_done(workdir, s, run_fingerprint)]
    todo = [s for s in mine if s not in skipped]
    start, done = time.monotonic(), []
    total = sum(len(ranges[s]) for s in todo)
    with tqdm(total=total, desc=f"evaluate p{process_index}", unit="img", disable=not show_progress) as progress:
        for s in todo:
            if max_shards is not None and len(done) >= max_shards:
                break
            if max_minutes and (time.monotonic() - start) / 60 >= max_minutes:
                break
            records, failures, arrays = evaluator.evaluate(dataset, list(ranges[s]), progress)
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            storage.write_bytes(shard_path(workdir, s, "npz"), buffer.getvalue())
            storage.write_bytes(
                shard_path(workdir, s),
                _dumps(
                    {
                        "fingerprint": run_fingerprint,
                        "shard": s,
                        "indices": [int(i) for i in ranges[s]],
                        "records": records,
                        "failures": failures,
                    }
                ),
            )
            done.append(s)
    return {"done": done, "skipped": skipped, "remaining": [s for s in todo if s not in done]}


def missing_shards(workdir: str, num_items: int, shard_size: int) -> list[int]:
    return [
        s for s in range(len(shard_ranges(num_items, shard_size))) if not storage.path(shard_path(workdir, s)).exists()
    ]


# ------------------------------------------------------------------------------ aggregation

PER_IMAGE_MEANS = (
    "bpp",
    "bpp_caption",
    "bpp_tokens",
    "bpp_header",
    "bpp_paper",
    "psnr",
    "ms_ssim",
    "lpips",
    "clip_score",
)


def load_shards(workdir: str, num_items: int, shard_size: int, run_fingerprint: str) -> tuple[list, list, dict]:
    """All shards -> ``(records, failures, arrays)``; checks that every index ``0..num_items-1``
    appears exactly once (as records or a failure) and that each shard belongs to this run."""
    records, failures, parts = [], [], []
    for s, expected in enumerate(shard_ranges(num_items, shard_size)):
        shard = json.loads(storage.read_text(shard_path(workdir, s)))
        if shard["fingerprint"] != run_fingerprint:
            raise ValueError(f"{shard_path(workdir, s)} belongs to another run")
        if shard["indices"] != list(expected):
            raise ValueError(f"{shard_path(workdir, s)} covers {shard['indices'][:3]}..., expected {expected}")
        seen = {r["index"] for r in shard["records"]} | {f["index"] for f in shard["failures"]}
        both = {r["index"] for r in shard["records"]} & {f["index"] for f in shard["failures"]}
        if seen != set(expected) or both:
            raise ValueError(
                f"{shard_path(workdir, s)}: images not accounted for exactly once "
                f"(missing {sorted(set(expected) - seen)[:5]}, both scored and failed {sorted(both)[:5]})"
            )
        records += shard["records"]
        failures += shard["failures"]
        with np.load(io.BytesIO(storage.read_bytes(shard_path(workdir, s, "npz")))) as z:
            parts.append({k: z[k] for k in z.files})
    arrays = {k: np.concatenate([p[k] for p in parts if k in p]) for k in {k for p in parts for k in p}}
    return records, failures, arrays


def dataset_metrics(
    records: list,
    arrays: dict,
    modes: Sequence[Mode],
    names: Sequence[str],
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    fid_method: str = "sqrtm",
) -> list[dict]:
    """Per mode: the means of the per-image values, FID / KID (originals vs reconstructions, on
    the Inception features) and the CLIP score (mean over images, and of the originals)."""
    from percov2_jax.metrics import fid as fid_lib
    from percov2_jax.metrics.clip_score import clip_score

    clip_original = None  # the same for every mode: the originals against their scored captions
    if "original/clip" in arrays and len(arrays["original/clip"]):
        clip_original = float(
            np.mean(np.asarray(clip_score(arrays["original/clip"], arrays["caption/clip"]), np.float64))
        )
    out = []
    for mode in modes:
        rows = [r for r in records if r["mode"] == mode.name]
        metrics: dict = {}
        for key in PER_IMAGE_MEANS:
            values = [r[key] for r in rows if r.get(key) is not None]
            metrics[key] = float(np.mean(values)) if values else None
        n = len(rows)
        metrics["fid"] = metrics["kid"] = None
        if f"{mode.name}/inception" in arrays and n >= 2:
            real, fake = arrays["original/inception"], arrays[f"{mode.name}/inception"]
            if "fid" in names:
                metrics["fid"] = fid_lib.fid_from_features(real, fake, method=fid_method)
            if "kid" in names:
                metrics["kid"] = fid_lib.kernel_inception_distance(
                    real, fake, num_subsets=kid_subsets, max_subset_size=kid_subset_size, seed=seed
                )
        metrics["clip_score_original"] = clip_original
        metrics["images"] = n
        out.append({**mode.describe(), "metrics": metrics})
    return out
