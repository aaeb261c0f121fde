"""Evaluation datasets (percov2_jax.evaluation.datasets): listing and order, missing and corrupt
images, preprocessing (PerCo's bicubic resize without cropping), COCO captions and the choice of
conditioning and scored captions, the MSCOCO-30k list, Kodak, TFDS and describe()."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from percov2_jax import storage
from percov2_jax.data.sources import ImageDecodeError
from percov2_jax.evaluation import datasets
from percov2_jax.evaluation.datasets import (
    KODAK_IDS,
    EvalDataset,
    MissingCaptionError,
    MissingImageError,
    Preprocess,
    builtin_dataset,
    coco30k,
    coco30k_dataset,
    fetch_coco30k_list,
    folder_dataset,
    kodak_dataset,
    read_coco_captions,
    read_image_list,
    select_captions,
    tfds_dataset,
    validate_coco30k_list,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_COCO30K = os.path.join(ROOT, "..", "shared", "data", "mscoco30k_file_names.txt")
BICUBIC = Image.Resampling.BICUBIC


def _pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: a gradient plus noise, so resizes and crops differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin((x + y) / 3)], axis=-1)
    return np.clip(base + rng.normal(0, 15, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(path: pathlib.Path, h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = _pixels(h, w, seed)
    Image.fromarray(pixels).save(path)
    return pixels


# ----------------------------------------------------------------------------------------------
# Folders, image lists, missing and corrupt files


def test_folder_lists_sorted_relative_paths_skipping_hidden(tmp_path):
    for name in ("b.png", "a.jpg", "sub/c.PNG", "sub/deeper/d.webp", ".hidden.png", ".cache/e.png"):
        _save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = folder_dataset(tmp_path)
    assert ds.ids == ["a.jpg", "b.png", "sub/c.PNG", "sub/deeper/d.webp"] and len(ds) == 4
    item = ds.load(1)
    assert item["id"] == "b.png" and item["image"].dtype == np.uint8 and item["image"].shape == (12, 16, 3)
    assert item["original_size"] == (12, 16)
    assert item["captions"] == [] and item["caption"] == "" and item["score_caption"] == ""
    assert item["score_caption_is_conditioning"] is False
    with pytest.raises(IndexError, match="4 items"):
        ds.load(4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        folder_dataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        folder_dataset(tmp_path / "absent", image_list=["a.jpg"])


def test_folder_finds_tiff_images(tmp_path):
    pixels = _save(tmp_path / "scan.tif")
    _save(tmp_path / "sub" / "page.TIFF", seed=1)
    ds = folder_dataset(tmp_path)
    assert ds.ids == ["scan.tif", "sub/page.TIFF"]
    np.testing.assert_array_equal(ds.load(0)["image"], pixels)


def test_image_list_order_and_missing_names(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png"):
        _save(tmp_path / "images" / name)
    (tmp_path / "list.txt").write_text("# evaluation order\nsub/c.png\n\n./a.png\n  gone.png  \nb.png\n")
    ds = folder_dataset(tmp_path / "images", image_list=tmp_path / "list.txt")
    assert ds.ids == ["sub/c.png", "a.png", "gone.png", "b.png"]
    assert ds.missing_ids() == ["gone.png"]
    assert ds.load(0)["id"] == "sub/c.png" and ds.load(3)["id"] == "b.png"
    with pytest.raises(MissingImageError, match="gone.png") as info:
        ds.load(2)
    assert isinstance(info.value, FileNotFoundError)
    assert folder_dataset(tmp_path / "images", image_list=["b.png", "a.png"]).ids == ["b.png", "a.png"]


def test_image_list_rejects_duplicates_and_names_outside_root(tmp_path):
    (tmp_path / "list.txt").write_text("a.png\nb.png\n./a.png\nc.png\nb.png\n")
    with pytest.raises(ValueError, match=r"more than once: a.png, b.png"):
        read_image_list(tmp_path / "list.txt")
    with pytest.raises(ValueError, match="more than once: x.png"):
        read_image_list(["x.png", "x.png"])
    with pytest.raises(ValueError, match="relative"):
        read_image_list(["../x.png"])
    (tmp_path / "comments.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no image names"):
        read_image_list(tmp_path / "comments.txt")


def test_corrupt_file_raises_decode_error_naming_it(tmp_path):
    _save(tmp_path / "good.png")
    (tmp_path / "x.png").write_bytes(b"this is not a PNG file at all")
    ds = folder_dataset(tmp_path)
    assert ds.ids == ["good.png", "x.png"] and ds.missing_ids() == []
    with pytest.raises(ImageDecodeError, match="x.png"):
        ds.load(1)
    ds.load(0)


# ----------------------------------------------------------------------------------------------
# Preprocessing


def test_resize_is_pil_bicubic_without_cropping():
    image = _pixels(20, 36)
    got = Preprocess("resize", 16)(image)
    expected = np.asarray(Image.fromarray(image).resize((16, 16), BICUBIC))
    assert got.shape == (16, 16, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(Preprocess()(_pixels(512, 768))[..., 0].shape, (512, 512))


def test_center_crop_of_a_two_to_one_image():
    image = _pixels(24, 48)  # H=24, W=48: shortest side 24 -> 16 gives 16 x 32, columns 8..24 kept
    got = Preprocess("center_crop", 16)(image)
    resized = np.asarray(Image.fromarray(image).resize((32, 16), BICUBIC))
    np.testing.assert_array_equal(got, resized[:, 8:24])
    tall = Preprocess("center_crop", 16)(_pixels(48, 24))
    np.testing.assert_array_equal(tall, np.asarray(Image.fromarray(_pixels(48, 24)).resize((16, 32), BICUBIC))[8:24])


def test_native_and_invalid_preprocess():
    image = _pixels(7, 9)
    assert Preprocess("native", None)(image) is image
    assert Preprocess("native", 512).size is None  # size is ignored for native
    for mode, size in (
        ("bilinear", 512),
        ("resize", 0),
        ("resize", -3),
        ("center_crop", None),
        ("resize", 12.0),
        ("resize", True),
    ):
        with pytest.raises(ValueError, match="mode|size"):
            Preprocess(mode, size)
    with pytest.raises(ValueError, match="uint8 image"):
        Preprocess("resize", 8)(image.astype(np.float32))
    assert json.loads(json.dumps(Preprocess("center_crop", 8).describe()))["resample"] == "bicubic"


# ----------------------------------------------------------------------------------------------
# COCO captions and the conditioning / scored caption


COCO_CAPTIONS = ["a cat on a sofa", "a sleeping cat", "grey cat resting", "a cat on a couch", "a lazy cat"]


@pytest.fixture()
def coco(tmp_path) -> pathlib.Path:
    """train2017/ with three images and annotations/captions_train2017.json: 5, 1 and 0 captions."""
    names = {9: "000000000009.jpg", 25: "000000000025.jpg", 30: "000000000030.jpg"}
    for seed, name in enumerate(names.values()):
        _save(tmp_path / "train2017" / name, 20, 30, seed)
    order = [
        (101, 9, COCO_CAPTIONS[0]),
        (50, 25, " a giraffe  "),
        (7, 9, COCO_CAPTIONS[1]),
        (300, 9, COCO_CAPTIONS[2]),
        (3, 9, COCO_CAPTIONS[3]),
        (400, 9, COCO_CAPTIONS[4]),
    ]
    annotations = {
        "images": [{"id": i, "file_name": n, "height": 20, "width": 30} for i, n in names.items()],
        "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in order],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(annotations))
    (tmp_path / "list.txt").write_text("000000000030.jpg\n000000000009.jpg\n000000000025.jpg\n")
    return tmp_path


def test_read_coco_captions_keeps_all_in_annotation_order(coco):
    table = read_coco_captions(coco / "annotations" / "captions_train2017.json")
    assert table == {"000000000009.jpg": COCO_CAPTIONS, "000000000025.jpg": ["a giraffe"], "000000000030.jpg": []}


def test_coco30k_conditioning_gt_none_file(coco):
    kwargs = dict(
        annotations=coco / "annotations" / "captions_train2017.json",
        image_list=coco / "list.txt",
        preprocess=Preprocess("resize", 8),
        strict=False,
    )
    gt = coco30k_dataset(coco / "train2017", **kwargs)
    assert gt.ids == ["000000000030.jpg", "000000000009.jpg", "000000000025.jpg"]
    item = gt.load(1)
    assert item["captions"] == COCO_CAPTIONS and item["image"].shape == (8, 8, 3)
    assert item["original_size"] == (20, 30)
    assert (item["caption"], item["score_caption"], item["score_caption_is_conditioning"]) == (
        COCO_CAPTIONS[0],
        COCO_CAPTIONS[1],
        False,
    )
    one = gt.load(2)
    assert (one["caption"], one["score_caption"], one["score_caption_is_conditioning"]) == (
        "a giraffe",
        "a giraffe",
        True,
    )
    none = gt.load(0)
    assert (none["captions"], none["caption"], none["score_caption"], none["score_caption_is_conditioning"]) == (
        [],
        "",
        "",
        False,
    )

    unconditioned = coco30k_dataset(coco / "train2017", conditioning="none", **kwargs).load(1)
    assert (unconditioned["caption"], unconditioned["score_caption"]) == ("", COCO_CAPTIONS[0])

    (coco / "blip.tsv").write_text(f"000000000009.jpg\t{COCO_CAPTIONS[0]}\n000000000025.jpg\ta tall animal\n")
    from_file = coco30k_dataset(
        coco / "train2017", conditioning="file", conditioning_captions=coco / "blip.tsv", **kwargs
    )
    item = from_file.load(1)  # the file's caption equals the first ground truth: scored against the second
    assert (item["caption"], item["score_caption"], item["score_caption_is_conditioning"]) == (
        COCO_CAPTIONS[0],
        COCO_CAPTIONS[1],
        False,
    )
    assert from_file.load(2)["caption"] == "a tall animal" and from_file.load(2)["score_caption"] == "a giraffe"
    with pytest.raises(MissingCaptionError, match="000000000030.jpg"):
        from_file.load(0)
    assert json.loads(json.dumps(from_file.describe()))["conditioning_captions"] == str(coco / "blip.tsv")


def test_coco30k_needs_annotations_for_gt_and_a_valid_list(coco):
    with pytest.raises(ValueError, match="annotations"):
        coco30k_dataset(coco / "train2017", image_list=coco / "list.txt", strict=False)
    ds = coco30k_dataset(coco / "train2017", image_list=coco / "list.txt", strict=False, conditioning="none")
    assert ds.load(1)["captions"] == [] and ds.load(1)["score_caption"] == ""
    with pytest.raises(ValueError, match="expected 30000"):
        coco30k_dataset(coco / "train2017", image_list=coco / "list.txt", conditioning="none")
    with pytest.raises(ValueError, match="conditioning_captions"):
        coco30k_dataset(coco / "train2017", image_list=coco / "list.txt", strict=False, conditioning="file")
    missing = coco30k_dataset(
        coco / "train2017", image_list=["000000000009.jpg", "000000000077.jpg"], strict=False, conditioning="none"
    )
    with pytest.raises(MissingImageError, match="000000000077.jpg"):
        missing.load(1)


def test_select_captions_rules():
    assert select_captions(["a", "b", "c"], "gt") == ("a", "b", False)
    assert select_captions(["a"], "gt") == ("a", "a", True)
    assert select_captions(["a", "a"], "gt") == ("a", "a", True)  # same text: the score is optimistic
    assert select_captions([], "gt") == ("", "", False)
    assert select_captions(["a", "b"], "none") == ("", "a", False)
    assert select_captions(["a", "b"], "file", "a") == ("a", "b", False)
    assert select_captions(["a", "b"], "file", "z") == ("z", "a", False)
    assert select_captions(["z"], "file", "z") == ("z", "z", True)
    with pytest.raises(ValueError, match="file"):
        select_captions(["a"], "file")
    with pytest.raises(ValueError, match="conditioning must be one of"):
        select_captions(["a"], "blip")


def test_folder_captions_mapping_json_and_tsv(tmp_path):
    _save(tmp_path / "img" / "x.png")
    _save(tmp_path / "img" / "sub" / "y.png")
    ds = folder_dataset(tmp_path / "img", captions={"sub/y.png": ["one", "two"], "x.png": "solo"})
    assert [ds.load(i)["captions"] for i in range(2)] == [["one", "two"], ["solo"]]
    (tmp_path / "caps.json").write_text(json.dumps({"x.png": "from json"}))
    assert folder_dataset(tmp_path / "img", captions=tmp_path / "caps.json").load(1)["caption"] == "from json"
    (tmp_path / "caps.tsv").write_text("y.png\tby file name\n")
    ds = folder_dataset(tmp_path / "img", captions=tmp_path / "caps.tsv")
    assert ds.load(0)["captions"] == ["by file name"] and ds.describe()["num_captioned"] == 1


# ----------------------------------------------------------------------------------------------
# The MSCOCO-30k list


def test_shared_coco30k_list_is_valid():
    if not os.path.exists(SHARED_COCO30K):
        pytest.skip(f"no shared copy of PerCo's coco_names.txt at {SHARED_COCO30K}")
    names = validate_coco30k_list(read_image_list(SHARED_COCO30K))
    assert len(names) == 30_000 and names[0] == "000000000009.jpg"


def test_validate_coco30k_list_rejects_bad_names_and_repeats():
    good = [f"{i:012d}.jpg" for i in range(5)]
    assert validate_coco30k_list(good, strict=False) == good
    with pytest.raises(ValueError, match="expected 30000"):
        validate_coco30k_list(good)
    with pytest.raises(ValueError, match="COCO-2017 file names.*'9.jpg'"):
        validate_coco30k_list(good + ["9.jpg"], strict=False)
    with pytest.raises(ValueError, match="000000000000.png"):
        validate_coco30k_list(["000000000000.png"], strict=False)
    with pytest.raises(ValueError, match="more than once: 000000000003.jpg"):
        validate_coco30k_list(good + [good[3]], strict=False)


def test_fetch_coco30k_list_uses_the_cache_then_explains_network_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(coco30k, "COCO30K_LIST_URLS", ("http://127.0.0.1:9/x", "http://127.0.0.1:9/y"))
    names = [f"{i:012d}.jpg" for i in range(30_000)]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / datasets.COCO30K_LIST_FILE).write_text("\n".join(names) + "\n")
    assert fetch_coco30k_list(tmp_path / "cache") == names
    with pytest.raises(RuntimeError, match="--config.dataset.image_list") as info:
        fetch_coco30k_list(tmp_path / "empty")
    assert "coco30k_file_names.txt" in str(info.value) and "127.0.0.1:9/x" in str(info.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / datasets.COCO30K_LIST_FILE).write_text("\n".join(names[:10]))
    with pytest.raises(ValueError, match="delete it"):
        fetch_coco30k_list(tmp_path / "bad")


def test_fetch_coco30k_list_downloads_and_caches(tmp_path, monkeypatch):
    names = [f"{i:012d}.jpg" for i in range(30_000)]
    (tmp_path / "coco_names.txt").write_text("\n".join(names) + "\n")
    monkeypatch.setattr(coco30k, "COCO30K_LIST_URLS", ("http://127.0.0.1:9/x", (tmp_path / "coco_names.txt").as_uri()))
    assert fetch_coco30k_list(tmp_path / "cache") == names
    assert (tmp_path / "cache" / datasets.COCO30K_LIST_FILE).read_text().split() == names


# ----------------------------------------------------------------------------------------------
# Kodak, describe()


def test_kodak_default_ids_and_missing_images(tmp_path):
    assert KODAK_IDS[0] == "kodim01.png" and KODAK_IDS[-1] == "kodim24.png" and len(KODAK_IDS) == 24
    for i, name in enumerate(("kodim01.png", "kodim07.png", "kodim24.png")):
        _save(tmp_path / name, 32, 48, i)
    ds = kodak_dataset(tmp_path, preprocess=Preprocess("resize", 16))
    assert ds.ids == list(KODAK_IDS) and len(ds.missing_ids()) == 21
    missing = 0
    for index in range(len(ds)):
        try:
            item = ds.load(index)
        except MissingImageError:
            missing += 1
        else:
            assert item["image"].shape == (16, 16, 3) and item["original_size"] == (32, 48) and item["caption"] == ""
    assert missing == 21


def test_describe_is_json_and_its_digest_follows_the_ids(tmp_path):
    for name in ("a.png", "b.png"):
        _save(tmp_path / name)
    one = folder_dataset(tmp_path, image_list=["a.png", "b.png"], preprocess=Preprocess("resize", 8))
    other = folder_dataset(tmp_path, image_list=["b.png", "a.png"], preprocess=Preprocess("resize", 8))
    described = json.loads(json.dumps(one.describe()))
    assert described["name"] == "folder" and described["num_items"] == 2 and described["root"] == str(tmp_path)
    assert described["preprocess"]["mode"] == "resize" and described["preprocess"]["size"] == 8
    assert described["conditioning"] == "gt" and described["image_list"] == "<list>"
    assert described["ids_sha256"] == folder_dataset(tmp_path, preprocess=Preprocess("resize", 8)).ids_sha256()
    assert described["ids_sha256"] != other.describe()["ids_sha256"]
    json.dumps(kodak_dataset(tmp_path).describe())


def test_eval_dataset_rejects_repeated_ids():
    with pytest.raises(ValueError, match="repeated: a"):
        EvalDataset("x", ["a", "b", "a"], lambda i: (np.zeros((1, 1, 3), np.uint8), []), preprocess=Preprocess())


# ----------------------------------------------------------------------------------------------
# Cloud Storage (the emulator on 127.0.0.1)


def assert_same_items(remote: EvalDataset, local: EvalDataset) -> None:
    """The same ids, images, captions and description (but for where they are) in the same order."""
    assert remote.ids == local.ids and remote.missing_ids() == local.missing_ids()
    for index in range(len(local)):
        try:
            expected = local.load(index)
        except MissingImageError:
            with pytest.raises(MissingImageError, match=local.ids[index]):
                remote.load(index)
            continue
        got = remote.load(index)
        np.testing.assert_array_equal(got.pop("image"), expected.pop("image"))
        assert got == expected
    where = ("root", "image_list", "captions", "conditioning_captions")
    assert {k: v for k, v in remote.describe().items() if k not in where} == {
        k: v for k, v in local.describe().items() if k not in where
    }


def test_kodak_folder_on_cloud_storage(gcs, tmp_path):
    for i, name in enumerate(("kodim01.png", "kodim07.png", "kodim24.png", "extra/kodim30.png")):
        _save(tmp_path / "kodak" / name, 32, 48, i)
    (tmp_path / "list.txt").write_text("kodim24.png\nkodim02.png\nkodim01.png\nextra/kodim30.png\n")
    (tmp_path / "caps.tsv").write_text("kodim01.png\ta red door\nkodim24.png\ta mural\n")
    (tmp_path / "blip.tsv").write_text("".join(f"kodim{i:02d}.png\tcaption {i}\n" for i in (1, 7, 24, 30)))
    bucket = gcs.create_bucket()
    storage.copy_tree(tmp_path, f"{bucket}/data")
    made = {}
    for where in (str(tmp_path), f"{bucket}/data"):
        made[where] = [
            kodak_dataset(
                f"{where}/kodak",
                image_list=f"{where}/list.txt",
                captions=f"{where}/caps.tsv",
                preprocess=Preprocess("resize", 16),
            ),
            kodak_dataset(f"{where}/kodak"),
            folder_dataset(
                f"{where}/kodak",
                captions=f"{where}/caps.tsv",
                conditioning="file",
                conditioning_captions=f"{where}/blip.tsv",
            ),
        ]
    local, remote = made.values()
    assert remote[0].describe()["root"] == f"{bucket}/data/kodak" and local[0].missing_ids() == ["kodim02.png"]
    assert remote[2].ids == ["extra/kodim30.png", "kodim01.png", "kodim07.png", "kodim24.png"]
    for r, l in zip(remote, local):
        assert_same_items(r, l)
    with pytest.raises(FileNotFoundError, match=f"Kodak folder {bucket}/absent does not exist"):
        kodak_dataset(f"{bucket}/absent")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/data/absent.txt does not exist"):
        folder_dataset(f"{bucket}/data/kodak", image_list=f"{bucket}/data/absent.txt")


def test_coco_on_cloud_storage(gcs, coco):
    bucket = gcs.create_bucket()
    storage.copy_tree(coco, f"{bucket}/coco")
    annotations = "annotations/captions_train2017.json"
    kwargs = dict(preprocess=Preprocess("resize", 8), strict=False)
    remote = coco30k_dataset(
        f"{bucket}/coco/train2017",
        annotations=f"{bucket}/coco/{annotations}",
        image_list=f"{bucket}/coco/list.txt",
        **kwargs,
    )
    local = coco30k_dataset(coco / "train2017", annotations=coco / annotations, image_list=coco / "list.txt", **kwargs)
    assert remote.load(1)["captions"] == COCO_CAPTIONS
    assert_same_items(remote, local)
    # COCO annotations as the captions of a folder dataset.
    assert_same_items(
        folder_dataset(f"{bucket}/coco/train2017", captions=f"{bucket}/coco/{annotations}"),
        folder_dataset(coco / "train2017", captions=coco / annotations),
    )
    with pytest.raises(FileNotFoundError, match=f"{bucket}/coco/absent.json does not exist"):
        coco30k_dataset(
            f"{bucket}/coco/train2017",
            annotations=f"{bucket}/coco/absent.json",
            image_list=["000000000009.jpg"],
            **kwargs,
        )


# ----------------------------------------------------------------------------------------------
# TFDS and built-in photographs


def _prepare_tool():
    spec = importlib.util.spec_from_file_location("prepare_dataset", ROOT / "tools" / "prepare_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tfds_dataset_ids_captions_and_image_list(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from percov2_jax.data.sources import ImageFolderSource

    for i, name in enumerate(("p.png", "q.png", "r.png")):
        _save(tmp_path / "img" / name, 10, 14, i)
    (tmp_path / "caps.tsv").write_text("p.png\ta red square\nr.png\ta blue circle\n")
    path = _prepare_tool().prepare(
        {"test": ImageFolderSource(tmp_path / "img", tmp_path / "caps.tsv")}, tmp_path / "tfds", name="tiny_eval"
    )
    ds = tfds_dataset(path, "test", preprocess=Preprocess("resize", 8))
    assert ds.ids == ["p.png", "q.png", "r.png"]
    item = ds.load(0)
    assert item["captions"] == ["a red square"] and item["image"].shape == (8, 8, 3)
    assert item["original_size"] == (10, 14)
    assert ds.load(1)["captions"] == [] and ds.describe()["split"] == "test"
    listed = tfds_dataset(path, "test", image_list=["r.png", "nope.png", "p.png"], conditioning="none")
    assert listed.ids == ["r.png", "nope.png", "p.png"] and listed.missing_ids() == ["nope.png"]
    assert listed.load(0)["score_caption"] == "a blue circle" and listed.load(0)["caption"] == ""
    np.testing.assert_array_equal(listed.load(2)["image"], _pixels(10, 14, 0))
    with pytest.raises(MissingImageError, match="nope.png"):
        listed.load(1)


def test_builtin_dataset():
    try:
        ds = builtin_dataset(Preprocess("resize", 32))
    except RuntimeError as e:
        pytest.skip(str(e))
    item = ds.load(0)
    assert item["id"] == ds.ids[0] and "/" in item["id"] and item["image"].shape == (32, 32, 3)
    assert len(item["captions"]) == 1 and item["score_caption"] == item["caption"] == item["captions"][0]
