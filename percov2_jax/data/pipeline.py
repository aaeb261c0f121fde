"""The stage-1 input pipeline: images + captions -> per-process batches, on grain.

  it = make_train_iterator(source, global_batch_size=32, image_size=256, seed=0)
  batch = next(it)   # {"image": float32 [32 / process_count, 256, 256, 3] in [-1, 1] (NHWC),
                     #  "caption": str array [b], "id": str array [b]}

``source`` is any random-access record source (`percov2_jax.data.sources`): ``len(source)`` and
``source[i] -> {"image": uint8 [H, W, 3], "caption": str, "id": str}``.

Global order. One stream of examples is defined for the whole job, independent of the number of
processes: the source shuffled with ``seed`` (a new permutation every epoch), repeated
``num_epochs`` times (forever with None), each example cropped and flipped with a random
generator seeded by ``seed`` and the example's position in that stream. Global batch ``k`` is
stream rows ``[k*B, (k+1)*B)``; process ``p`` of ``P`` reads rows ``[k*B + p*b, k*B + (p+1)*b)``
with ``b = B / P``. So the processes' batches, concatenated in process order, are exactly the
batch of a one-process run with the same seed and step: the global stream does not depend on
the number of processes. Global batches do not stop at epoch boundaries; with a
finite ``num_epochs`` the last incomplete global batch is dropped.

Preprocessing (Pillow): the image is resized so that it covers ``image_size`` (the short side
becomes the target size for a square target) with antialiased bilinear filtering — Pillow's
``BILINEAR`` widens the filter when it shrinks — then cropped to ``image_size`` at a uniformly
random offset (``random_crop``) or in the centre, and mirrored left-right with probability 1/2
(``random_flip``). Images smaller than the crop are upscaled the same way. Pixels map to
``x / 127.5 - 1``.

Checkpointing. ``get_state()`` returns ``{"step", "config"}``: the number of global batches
read and the settings that define the stream, the same in every process. ``set_state(state)``
continues at that global batch (grain reads it by index), whatever the process count, process
index or worker count that saved it; it refuses a state written for another stream (batch size,
seed, image size, source size...). So one JSON object, written once, is the data position of a
whole job, and a run saved on P processes resumes exactly on P' (`percov2_jax.runs.checkpointing`
stores it as an orbax JSON item next to the train state).

Evaluation (`make_eval_iterator`): source order, centre crop, no flip, one pass. The last global
batch is **padded** so every example is seen exactly once: padding rows have a zero image
(-1.0 after scaling), caption ``""``, id ``""`` and ``mask`` False; real rows have ``mask`` True.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

# The PerCoV2 token grid: the VAE downsamples by 8 and the hyper-encoder patches further, so
# image sides must be multiples of 64.
IMAGE_SIZE_MULTIPLE = 64


# ----------------------------------------------------------------------------------------------
# Validation


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``image_size`` (int or (H, W)) -> (H, W); ValueError unless positive multiples of 64."""
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        hw = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, Sequence)
        and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
    ):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size must be an int or a pair (H, W) of ints, got {image_size!r}")
    if any(v <= 0 or v % IMAGE_SIZE_MULTIPLE for v in hw):
        raise ValueError(
            f"image_size must be a positive multiple of {IMAGE_SIZE_MULTIPLE} (the PerCoV2 token "
            f"grid), got {image_size!r}"
        )
    return hw


def _process_layout(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """(per-process batch, process_index, process_count), defaulting to jax's process layout."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if (
        isinstance(global_batch_size, bool)
        or not isinstance(global_batch_size, (int, np.integer))
        or global_batch_size <= 0
    ):
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}: "
            "every process must read the same number of examples per step"
        )
    return global_batch_size // process_count, int(process_index), int(process_count)


def _sub_seeds(seed: int) -> tuple[int, int]:
    """Independent 32-bit seeds for the shuffle and the augmentation, from ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    shuffle_seed, augment_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(shuffle_seed), int(augment_seed)


# ----------------------------------------------------------------------------------------------
# Per-example transforms (module-level classes, so grain can pickle them into worker processes)


def resize_and_crop(
    image: np.ndarray,
    hw: tuple[int, int],
    rng: np.random.Generator | None = None,
    random_crop: bool = False,
    random_flip: bool = False,
) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [H, W, 3]: cover-resize (bilinear, antialiased), crop, maybe flip.

    ``rng`` is needed for ``random_crop`` / ``random_flip``; it draws the crop offsets (row, then
    column) before the flip.
    """
    height, width = hw
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    if random_crop:
        top = int(rng.integers(0, new_h - height + 1))
        left = int(rng.integers(0, new_w - width + 1))
    else:
        top, left = (new_h - height) // 2, (new_w - width) // 2
    image = image[top : top + height, left : left + width]
    if random_flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


class _TrainExample:
    def __init__(self, hw: tuple[int, int], random_crop: bool, random_flip: bool):
        self.hw, self.random_crop, self.random_flip = hw, random_crop, random_flip

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        image = resize_and_crop(record["image"], self.hw, rng, self.random_crop, self.random_flip)
        return {"image": image, "caption": record["caption"], "id": record["id"]}


class _EvalExample:
    def __init__(self, hw: tuple[int, int]):
        self.hw = hw

    def __call__(self, record: dict) -> dict:
        return {
            "image": resize_and_crop(record["image"], self.hw),
            "caption": record["caption"],
            "id": record["id"],
            "mask": True,
        }


def _scale_images(batch: dict) -> dict:
    """uint8 images -> float32 in [-1, 1]."""
    return {**batch, "image": batch["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)}


class _ProcessRows(grain.MapDataset):
    """This process's rows of every global batch of ``parent``.

    Element ``i`` is ``parent[(i // b) * B + p * b + i % b]``. Only whole global batches are
    kept, unless ``padding`` is given: then the last one is completed with ``padding`` elements.
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        padding: dict | None = None,
    ):
        super().__init__(parent)
        self._global, self._index = global_batch_size, process_index
        self._local = global_batch_size // process_count
        self._padding = padding
        total = len(parent)
        if padding is None:
            self._steps = total // global_batch_size
        else:
            self._steps = -(-total // global_batch_size)
        self._parent_length = total

    def __len__(self) -> int:
        return self._steps * self._local

    def __str__(self) -> str:
        return f"_ProcessRows(global_batch_size={self._global}, process_index={self._index})"

    def _global_index(self, index: int) -> int:
        step, row = divmod(index, self._local)
        return step * self._global + self._index * self._local + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        position = self._global_index(index)
        if self._padding is not None and position >= self._parent_length:
            return dict(self._padding)
        return self._parent[position]


# ----------------------------------------------------------------------------------------------
# The iterator


class BatchIterator:
    """Batches of one process, with a position that does not depend on the process layout.

    ``step``: batches returned so far, which is also the global batch the next one belongs to.
    ``num_batches``: batches in total (None when infinite). ``config``: the settings that define
    the global stream (seed, batch size, image size, source size, augmentations...);
    ``layout``: this process's place in it (process index and count, grain workers), which may
    change between a save and a restore.

    Nothing is read until the first ``next``: the grain pipeline (threads, worker processes)
    opens then, at batch ``step``, so a restored iterator starts where the state says.
    """

    def __init__(self, open_at: Callable[[int], Iterator[dict]], config: dict, layout: dict, num_batches: int | None):
        self._open_at, self._it = open_at, None
        self.config, self.layout, self.num_batches, self.step = config, layout, num_batches, 0

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict:
        if self.num_batches is not None and self.step >= self.num_batches:
            raise StopIteration
        if self._it is None:
            self._it = self._open_at(self.step)
        batch = next(self._it)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """``{"step", "config"}``, JSON-able and the same in every process: a global position."""
        return {"step": self.step, "config": dict(self.config)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue at ``state["step"]``; the state may come from any process layout. ValueError
        if it was saved for another stream."""
        saved = state.get("config") if isinstance(state, dict) else None
        if saved is None or "step" not in state:
            raise ValueError(f"not a {type(self).__name__} state (want keys step, config): {state!r:.200}")
        differ = {k: (saved.get(k), v) for k, v in self.config.items() if saved.get(k) != v}
        if differ:
            raise ValueError(
                "the iterator state was saved for another pipeline configuration: "
                + ", ".join(f"{k} saved {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
            )
        self.close()
        self.step = int(state["step"])

    def close(self) -> None:
        """Stop grain's threads and worker processes (reopened by the next ``next``)."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def __str__(self) -> str:
        return f"BatchIterator({self.config}, {self.layout})"


def _allow_worker_processes() -> None:
    # grain's worker processes read an absl flag; outside absl.app.run the flags are unparsed and
    # reading one raises UnparsedFlagAccessError. Marking them parsed keeps every default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _iterate(
    ds: grain.MapDataset,
    batch_size: int,
    read_options: grain.ReadOptions | None,
    worker_count: int,
    config: dict,
    layout: dict,
    num_batches: int | None,
) -> BatchIterator:
    if isinstance(worker_count, bool) or not isinstance(worker_count, (int, np.integer)) or worker_count < 0:
        raise ValueError(f"worker_count must be a non-negative int, got {worker_count!r}")
    # Batch before to_iter_dataset so that grain's worker processes (which take every
    # worker_count-th element) split whole batches and keep their order.
    batches = ds.batch(batch_size, drop_remainder=True).map(_scale_images)
    read_options = read_options or grain.ReadOptions(num_threads=8, prefetch_buffer_size=8)

    def open_at(start: int) -> Iterator[dict]:
        # Batch k of every process is global batch k, so starting at a batch index is exact for
        # any process layout: this is what lets a run resume on another slice.
        it_ds = batches[start:].to_iter_dataset(read_options)
        if worker_count:
            _allow_worker_processes()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
        return iter(it_ds)

    return BatchIterator(open_at, config, {**layout, "worker_count": int(worker_count)}, num_batches)


def make_train_iterator(
    source,
    *,
    global_batch_size: int,
    image_size: int | Sequence[int],
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle: bool = True,
    random_crop: bool = True,
    random_flip: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> BatchIterator:
    """Training batches for this process (see the module docstring for the order and transforms).

    Args:
      source: random-access records ``{"image": uint8 [H, W, 3], "caption": str, "id": str}``.
      global_batch_size: B, examples per step over all processes; divisible by process_count.
      image_size: int or (H, W), positive multiples of 64.
      seed: non-negative int; the same seed gives the same batches.
      process_index, process_count: default ``jax.process_index()``, ``jax.process_count()``.
      shuffle, random_crop, random_flip: the augmentations; without them the stream is the source
        order with centre crops.
      num_epochs: passes over the source; None repeats forever.
      worker_count: grain worker processes (0: threads in this process). Same batches either way.
      read_options: grain thread prefetching in this process (or in each worker); default
        8 threads and 8 batches in flight.
    Returns:
      `BatchIterator` of ``{"image": float32 [b, H, W, 3], "caption": str [b], "id": str [b]}``,
      ``b = global_batch_size // process_count``.
    """
    hw = image_hw(image_size)
    local, process_index, process_count = _process_layout(global_batch_size, process_index, process_count)
    shuffle_seed, augment_seed = _sub_seeds(seed)
    if num_epochs is not None and (
        isinstance(num_epochs, bool) or not isinstance(num_epochs, (int, np.integer)) or num_epochs <= 0
    ):
        raise ValueError(f"num_epochs must be a positive int or None, got {num_epochs!r}")
    num_records = len(source)
    if num_records == 0:
        raise ValueError(f"the source {source!r} is empty")
    if num_epochs is not None and num_records * num_epochs < global_batch_size:
        raise ValueError(
            f"{num_epochs} epoch(s) of {num_records} examples do not fill one global batch of {global_batch_size}"
        )
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(_TrainExample(hw, random_crop, random_flip), seed=augment_seed)
    ds = _ProcessRows(ds, global_batch_size, process_index, process_count)
    num_batches = None if num_epochs is None else num_records * num_epochs // global_batch_size
    config = {
        "kind": "train",
        "num_records": num_records,
        "global_batch_size": int(global_batch_size),
        "image_size": list(hw),
        "seed": int(seed),
        "shuffle": bool(shuffle),
        "random_crop": bool(random_crop),
        "random_flip": bool(random_flip),
        "num_epochs": num_epochs,
    }
    layout = {"process_index": process_index, "process_count": process_count}
    return _iterate(ds, local, read_options, worker_count, config, layout, num_batches)


def make_eval_iterator(
    source,
    *,
    global_batch_size: int,
    image_size: int | Sequence[int],
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> BatchIterator:
    """One pass over ``source`` in order with centre crops; the last global batch is padded.

    Returns:
      `BatchIterator` of ``{"image": float32 [b, H, W, 3], "caption": str [b], "id": str [b],
      "mask": bool [b]}`` (``mask`` False marks padding rows), ``ceil(len(source) / B)`` batches.
    """
    hw = image_hw(image_size)
    local, process_index, process_count = _process_layout(global_batch_size, process_index, process_count)
    num_records = len(source)
    if num_records == 0:
        raise ValueError(f"the source {source!r} is empty")
    padding = {"image": np.zeros((*hw, 3), np.uint8), "caption": "", "id": "", "mask": False}
    ds = grain.MapDataset.source(source).map(_EvalExample(hw))
    ds = _ProcessRows(ds, global_batch_size, process_index, process_count, padding=padding)
    config = {
        "kind": "eval",
        "num_records": num_records,
        "global_batch_size": int(global_batch_size),
        "image_size": list(hw),
    }
    layout = {"process_index": process_index, "process_count": process_count}
    return _iterate(ds, local, read_options, worker_count, config, layout, -(-num_records // global_batch_size))


__all__ = [
    "BatchIterator",
    "IMAGE_SIZE_MULTIPLE",
    "image_hw",
    "make_eval_iterator",
    "make_train_iterator",
    "resize_and_crop",
]
