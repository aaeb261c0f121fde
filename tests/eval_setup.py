"""Inputs of the evaluation tests: a Kodak-style folder and a small COCO-format folder made from
the built-in photographs (each with a missing and/or a corrupt image), and their configs."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_COCO_LIST = ROOT.parent / "shared" / "data" / "mscoco30k_file_names.txt"


def _photos(n: int) -> list[np.ndarray]:
    from percov2_jax.data.builtin import BuiltinPhotos

    source = BuiltinPhotos()
    return [source[i % len(source)]["image"] for i in range(n)]


def kodak_folder(root: pathlib.Path) -> dict:
    """kodim01..03.png (landscape 96x64, portrait 64x96, landscape 90x60), kodim05.png corrupt,
    kodim04.png listed but absent."""
    root.mkdir(parents=True)
    sizes = [(96, 64), (64, 96), (90, 60)]
    for i, (photo, size) in enumerate(zip(_photos(3), sizes), start=1):
        Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC).save(root / f"kodim{i:02d}.png")
    (root / "kodim05.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing a decoder wants")
    image_list = root.parent / "kodak_list.txt"
    image_list.write_text("\n".join(f"kodim{i:02d}.png" for i in range(1, 6)) + "\n")
    return {"root": str(root), "image_list": str(image_list)}


def coco_folder(root: pathlib.Path) -> dict:
    """The first four names of the MSCOCO-30k list: three JPEGs with COCO caption annotations
    (2, 3 and 1 captions), the fourth absent; the list is PerCo's own when it is available."""
    root.mkdir(parents=True)
    if SHARED_COCO_LIST.exists():
        names = SHARED_COCO_LIST.read_text().split()[:4]
    else:
        names = ["000000000009.jpg", "000000000034.jpg", "000000000049.jpg", "000000000071.jpg"]
    captions = [
        ["a woman in a space suit", "an astronaut with a flag"],
        ["coffee in a white cup", "a cup of coffee on a saucer", "a hot drink"],
        ["a ginger cat looking up"],
    ]
    images, annotations = [], []
    for k, (name, photo, texts) in enumerate(zip(names, _photos(4)[1:], captions)):
        Image.fromarray(photo).resize((80 + 16 * k, 64), Image.Resampling.BICUBIC).save(root / name, quality=90)
        images.append({"id": k + 1, "file_name": name, "height": 64, "width": 80 + 16 * k})
        annotations += [{"id": 100 * (k + 1) + j, "image_id": k + 1, "caption": t} for j, t in enumerate(texts)]
    annotations_path = root.parent / "captions_train2017.json"
    annotations_path.write_text(json.dumps({"images": images, "annotations": annotations}))
    image_list = root.parent / "coco_list.txt"
    image_list.write_text("\n".join(names) + "\n")
    return {"root": str(root), "annotations": str(annotations_path), "image_list": str(image_list)}


def eval_config(stage1: str, dataset: str, paths: dict, clip: dict | None = None):
    """configs/eval_tiny.py on ``dataset`` ("kodak" or "coco30k") at 192x192: two modes (the
    prior at 2 steps + CFG 3, uniform tokens at 1 step), shards of 2 images, batches of 2."""
    from configs import eval_tiny

    c = eval_tiny.get_config()
    c.checkpoint = stage1
    c.dataset.name = dataset
    c.dataset.root = paths["root"]
    c.dataset.image_list = paths["image_list"]
    c.dataset.annotations = paths.get("annotations", "")
    c.dataset.conditioning = "gt" if dataset == "coco30k" else "none"
    c.dataset.strict_list = False
    c.modes = (
        dict(sample_steps=2, guidance_scale=3.0),
        dict(sample_steps=1, guidance_scale=1.0, coding=dict(entropy_mode="uniform")),
    )
    c.metrics.kid_subsets = 5
    c.shard_size = 2
    c.batch_size = 2
    if clip is not None:
        c.metrics.names = "psnr,ms_ssim,lpips,fid,kid,clip_score"
        c.metrics.clip_model = str(clip["folder"])
        c.metrics.clip_tokenizer = str(clip["tokenizer_folder"])
    return c


def comparable(summary: dict) -> dict:
    """A summary without what legitimately differs between runs (time, machine, process count)."""
    out = json.loads(json.dumps(summary))
    for key in ("created", "machine", "process_count", "checkpoint"):
        out["run"].pop(key, None)
    return out


def read_records(workdir: str) -> list[dict]:
    """``WORKDIR/records.jsonl`` (local or gs://) as dicts."""
    from percov2_jax import storage

    return [json.loads(line) for line in storage.read_text(storage.path(workdir) / "records.jsonl").splitlines()]
