"""The stage-1 input pipeline: sources (built-in photos, image folders, TFDS array_record), the
dataset tool, and grain batching (determinism, checkpointed state, the per-process split)."""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from percov2_jax import storage
from percov2_jax.data import builtin
from percov2_jax.data.builtin import BuiltinPhotos
from percov2_jax.data.pipeline import (
    make_eval_iterator,
    make_train_iterator,
    resize_and_crop,
)
from percov2_jax.data.sources import ImageDecodeError, ImageFolderSource, TfdsSource, read_image

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 64


def _load_tool():
    spec = importlib.util.spec_from_file_location("prepare_dataset", ROOT / "tools" / "prepare_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth colour gradient plus noise, so that crops and flips differ."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin((x + y) / 7)], axis=-1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """10 small RGB images of assorted sizes (two smaller than the 64-pixel crop), PNG and JPEG,
    in two levels of directories, plus a JSON caption file keyed by relative path."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    sizes = [(80, 96), (64, 64), (72, 100), (48, 40), (96, 72), (70, 90), (64, 120), (100, 80), (30, 50), (88, 88)]
    captions = {}
    for i, (h, w) in enumerate(sizes):
        rel = f"{'sub/' if i % 3 == 0 else ''}img{i:02d}.{'jpg' if i % 4 == 1 else 'png'}"
        (root / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(_photo(rng, h, w)).save(root / rel, quality=95)
        captions[rel] = f"picture number {i}"
    (root.parent / f"{root.name}_captions.json").write_text(json.dumps(captions))
    return root


@pytest.fixture(scope="module")
def source(folder) -> ImageFolderSource:
    return ImageFolderSource(folder, folder.parent / f"{folder.name}_captions.json", require_captions=True)


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# Built-in photos


def test_builtin_photos_are_real_captioned_photos():
    photos = BuiltinPhotos()
    assert len(photos) >= 5, photos
    assert len(set(photos.ids)) == len(photos)
    for i, entry in enumerate(photos.entries):
        record = photos[i]
        assert record["image"].dtype == np.uint8 and record["image"].shape == (*entry["size"], 3), entry["id"]
        assert record["caption"].strip() and record["id"] == entry["id"]
        assert (np.ptp(record["image"], axis=-1) > 2).mean() > 0.5, f"{entry['id']} is not a colour photo"
    with_gray = BuiltinPhotos(include_grayscale=True)
    assert len(with_gray) > len(photos)
    gray = [i for i, e in enumerate(with_gray.entries) if not e["color"]]
    image = with_gray[gray[0]]["image"]
    assert (image[..., 0] == image[..., 2]).all()


def test_builtin_catalogue_is_consistent():
    entries = builtin.catalogue()
    assert len({e["id"] for e in entries}) == len(entries)
    for e in entries:
        assert e["package"] in builtin.PACKAGES and e["caption"].strip() and len(e["size"]) == 2


def test_builtin_photos_without_packages_names_them(monkeypatch):
    monkeypatch.setattr(builtin, "_package_dir", lambda package: None)
    with pytest.raises(RuntimeError, match="scikit-image.*scikit-learn.*matplotlib"):
        BuiltinPhotos()


# ----------------------------------------------------------------------------------------------
# Image folders


def test_image_folder_converts_modes_to_rgb(tmp_path):
    gray = np.arange(48 * 40, dtype=np.uint8).reshape(48, 40)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:4, ..., 3] = 0  # fully transparent: white
    rgba[4:6, ..., 3] = 128  # half transparent red over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    palette.save(tmp_path / "palette_transparent.png", transparency=1)
    deep = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257
    deep[0, 0], deep[0, 1] = 65535, 128  # 128 / 257 rounds to 0
    Image.fromarray(deep).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(gray, "L").convert("1").save(tmp_path / "bilevel.bmp")
    Image.fromarray(_photo(np.random.default_rng(1), 20, 24)).save(tmp_path / "photo.webp", lossless=True)
    (tmp_path / ".hidden.png").write_bytes(b"not read")
    (tmp_path / "notes.txt").write_text("not an image")

    src = ImageFolderSource(tmp_path)
    assert src.ids == sorted(
        [
            "gray.png",
            "alpha.png",
            "palette.png",
            "palette_transparent.png",
            "sixteen.png",
            "cmyk.jpg",
            "bilevel.bmp",
            "photo.webp",
        ]
    )
    records = {src[i]["id"]: src[i] for i in range(len(src))}
    for record in records.values():
        assert record["image"].dtype == np.uint8 and record["image"].ndim == 3 and record["image"].shape[-1] == 3
        assert record["caption"] == ""
    np.testing.assert_array_equal(records["gray.png"]["image"], np.repeat(gray[..., None], 3, -1))
    alpha = records["alpha.png"]["image"]
    assert (alpha[:4] == 255).all() and (alpha[6:] == [200, 0, 0]).all()
    np.testing.assert_array_equal(alpha[4, 0], [227, 127, 127])  # round((200*128 + 255*127) / 255)
    np.testing.assert_array_equal(records["palette.png"]["image"][0, 0], [255, 0, 0])
    np.testing.assert_array_equal(records["palette_transparent.png"]["image"][0, 1], [255, 255, 255])
    np.testing.assert_array_equal(records["palette_transparent.png"]["image"][1, 0], [0, 0, 255])
    expected = np.round(deep.astype(np.float64) / 257).astype(np.uint8)
    np.testing.assert_array_equal(records["sixteen.png"]["image"][..., 1], expected)
    assert records["sixteen.png"]["image"][0, 0, 0] == 255 and records["sixteen.png"]["image"][0, 1, 0] == 0
    assert np.abs(records["cmyk.jpg"]["image"].astype(int) - [255, 0, 0]).max() < 8
    assert set(np.unique(records["bilevel.bmp"]["image"])) <= {0, 255}


def test_exif_orientation_is_applied(tmp_path):
    pixels = _photo(np.random.default_rng(2), 10, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    image = ImageFolderSource(tmp_path)[0]["image"]
    np.testing.assert_array_equal(image, np.rot90(pixels, k=-1))


def test_image_folder_finds_tiff_files(tmp_path):
    pixels = _photo(np.random.default_rng(5), 12, 20)
    Image.fromarray(pixels).save(tmp_path / "scan.tif")
    Image.fromarray(pixels[::-1]).save(tmp_path / "scan2.TIFF")
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageFolderSource(tmp_path)
    assert src.ids == ["scan.tif", "scan2.TIFF"]
    np.testing.assert_array_equal(src[0]["image"], pixels)
    np.testing.assert_array_equal(src[1]["image"], pixels[::-1])


def test_corrupt_images_are_named(tmp_path):
    Image.fromarray(_photo(np.random.default_rng(3), 16, 16)).save(tmp_path / "good.png")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    buffer = io.BytesIO()
    Image.fromarray(_photo(np.random.default_rng(4), 64, 64)).save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:400])
    src = ImageFolderSource(tmp_path)
    assert src[src.ids.index("good.png")]["image"].shape == (16, 16, 3)
    for name in ("garbage.jpg", "truncated.png"):
        with pytest.raises(ImageDecodeError, match=name):
            src[src.ids.index(name)]
    with pytest.raises(ImageDecodeError, match=r"2 of 3 images(.|\n)*garbage.jpg(.|\n)*truncated.png"):
        src.verify()
    assert ImageFolderSource(tmp_path, extensions=[".png"]).ids == ["good.png", "truncated.png"]
    with pytest.raises(ImageDecodeError, match="<bytes>"):
        read_image(b"\x89PNG nonsense")


def test_caption_files(folder, source, tmp_path):
    assert len(source) == 10 and source.ids[0] == "img01.jpg" and source.ids[-1] == "sub/img09.jpg"
    assert source[source.ids.index("sub/img03.png")]["caption"] == "picture number 3"
    # TSV and JSONL are keyed by file name; unknown names are ignored, missing images get "".
    (tmp_path / "c.tsv").write_text("img03.png\ta grey cat\nimg01.jpg\t a dog \nnot_here.png\tx\n")
    tsv = ImageFolderSource(folder, tmp_path / "c.tsv")
    assert tsv.captions[tsv.ids.index("sub/img03.png")] == "a grey cat"
    assert tsv.captions[tsv.ids.index("img01.jpg")] == "a dog"
    assert tsv.captions[tsv.ids.index("img02.png")] == ""
    with pytest.raises(ValueError, match=r"8 of 10 images .*img02.png"):
        ImageFolderSource(folder, tmp_path / "c.tsv", require_captions=True)
    (tmp_path / "c.jsonl").write_text('{"image": "img02.png", "caption": "a tree"}\n')
    jsonl = ImageFolderSource(folder, tmp_path / "c.jsonl")
    assert jsonl.captions[jsonl.ids.index("img02.png")] == "a tree"
    # A mapping (or a .json file) is keyed by relative path.
    mapped = ImageFolderSource(folder, {"sub/img00.png": "zero", "img00.png": "wrong dir"})
    assert mapped.captions[mapped.ids.index("sub/img00.png")] == "zero"
    with pytest.raises(ValueError, match="require_captions"):
        ImageFolderSource(folder, require_captions=True)
    # Captions keyed by file name are ambiguous when two directories hold the same name.
    twin = tmp_path / "twin"
    for d in ("a", "b"):
        (twin / d).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(twin / d / "x.png")
    (tmp_path / "twin.tsv").write_text("x.png\tsomething\n")
    with pytest.raises(ValueError, match=r"x.png \(a/x.png, b/x.png\)"):
        ImageFolderSource(twin, tmp_path / "twin.tsv")
    assert ImageFolderSource(twin, {"b/x.png": "second"}).captions == ["", "second"]


# ----------------------------------------------------------------------------------------------
# TFDS array_record


@pytest.fixture(scope="module")
def tfds_dir(folder, source, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tfds")
    path = _load_tool().prepare(
        {"train": source, "validation": ImageFolderSource(folder / "sub")}, out, name="tiny_folder"
    )
    return pathlib.Path(path)


def test_prepare_dataset_round_trip(folder, source, tfds_dir):
    assert tfds_dir.name == "1.0.0" and tfds_dir.parent.name == "tiny_folder"
    train = TfdsSource(tfds_dir.parent, "train")
    assert len(train) == len(source)
    for i in range(len(source)):
        expected, got = source[i], train[i]
        assert got["id"] == expected["id"] and got["caption"] == expected["caption"]
        if expected["id"].endswith(".png"):
            np.testing.assert_array_equal(got["image"], expected["image"])  # lossless
        else:  # the JPEG bytes are stored as they are: the same decoder gives the same pixels
            np.testing.assert_array_equal(got["image"], read_image(folder / expected["id"]))
    by_name = TfdsSource("tiny_folder", "validation", data_dir=tfds_dir.parent.parent)
    assert [by_name[i]["id"] for i in range(len(by_name))] == ["img00.png", "img03.png", "img06.png", "img09.jpg"]
    assert by_name[0]["caption"] == ""
    sliced = TfdsSource(tfds_dir, "train[:3]", caption_key="id", id_key="caption")
    assert len(sliced) == 3 and sliced[0]["caption"] == source.ids[0] and sliced[0]["id"] == source.captions[0]
    with pytest.raises(KeyError, match="no caption feature 'text'"):
        TfdsSource(tfds_dir, "train", caption_key="text")


def test_tfds_source_rejects_tfrecord(tfds_dir, tmp_path):
    copy = tmp_path / "tiny_folder" / "1.0.0"
    shutil.copytree(tfds_dir, copy)
    info = json.loads((copy / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (copy / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="stored as 'tfrecord'.*array_record"):
        TfdsSource(copy, "train")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        TfdsSource("mnist", "train", data_dir=tmp_path / "empty")


@pytest.mark.slow
def test_prepare_dataset_command_line(folder, tmp_path):
    (tmp_path / "captions.tsv").write_text(
        "".join(f"img{i:02d}.{'jpg' if i % 4 == 1 else 'png'}\tcaption {i}\n" for i in range(10))
    )
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "prepare_dataset.py"),
            f"--split_dir=train={folder / 'sub'}",
            f"--captions={tmp_path / 'captions.tsv'}",
            "--require_captions",
            f"--output_dir={tmp_path}",
            "--name=cli_folder",
            "--keep_jpeg=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train: 4 images" in result.stdout
    src = TfdsSource(tmp_path / "cli_folder", "train")
    assert [src[i]["caption"] for i in range(len(src))] == [f"caption {i}" for i in (0, 3, 6, 9)]


# ----------------------------------------------------------------------------------------------
# Cloud Storage (the emulator on 127.0.0.1)


def assert_records_equal(a, b) -> None:
    """Two sources give the same records, in the same order."""
    assert len(a) == len(b)
    assert_batches_equal([a[i] for i in range(len(a))], [b[i] for i in range(len(b))])


def test_image_folder_on_cloud_storage(gcs, folder, source):
    bucket = gcs.create_bucket()
    storage.copy_tree(folder, f"{bucket}/images")
    storage.write_bytes(f"{bucket}/images/.cache/hidden.png", (folder / "img01.jpg").read_bytes())
    storage.write_bytes(f"{bucket}/images/.hidden.png", (folder / "img01.jpg").read_bytes())
    storage.write_bytes(f"{bucket}/captions.json", (folder.parent / f"{folder.name}_captions.json").read_bytes())
    remote = ImageFolderSource(f"{bucket}/images", f"{bucket}/captions.json", require_captions=True)
    assert remote.ids == source.ids and remote.captions == source.captions
    assert_records_equal(remote, source)
    assert remote.paths[0] == f"{bucket}/images/img01.jpg" and remote.verify() == len(source)
    # Caption files keyed by file name (load_captions formats) too; their errors name the URL.
    storage.write_text(f"{bucket}/c.tsv", "img03.png\ta grey cat\n")
    tsv = ImageFolderSource(f"{bucket}/images", f"{bucket}/c.tsv")
    assert tsv.captions == ImageFolderSource(folder, {"sub/img03.png": "a grey cat"}).captions
    storage.write_text(f"{bucket}/bad.tsv", "img03.png without a tab\n")
    with pytest.raises(ValueError, match=f"{bucket}/bad.tsv: line 1"):
        ImageFolderSource(f"{bucket}/images", f"{bucket}/bad.tsv")


def test_missing_cloud_storage_paths_are_named(gcs, folder):
    bucket = gcs.create_bucket()
    storage.copy_tree(folder / "sub", f"{bucket}/images")
    with pytest.raises(FileNotFoundError, match=f"image folder {bucket}/absent does not exist"):
        ImageFolderSource(f"{bucket}/absent")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/absent.tsv does not exist"):
        ImageFolderSource(f"{bucket}/images", f"{bucket}/absent.tsv")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/images/absent.png does not exist"):
        read_image(f"{bucket}/images/absent.png")
    with pytest.raises(FileNotFoundError, match=f"TFDS dataset directory {bucket}/tfds does not exist"):
        TfdsSource(f"{bucket}/tfds", "train")


def test_tfds_source_on_cloud_storage(gcs, tfds_dir):
    bucket = gcs.create_bucket()
    storage.copy_tree(tfds_dir.parent.parent, f"{bucket}/tfds")
    local = TfdsSource(tfds_dir.parent, "train")
    assert_records_equal(TfdsSource(f"{bucket}/tfds/tiny_folder", "train"), local)
    assert_records_equal(TfdsSource(f"{bucket}/tfds/tiny_folder/1.0.0", "train[:3]"), TfdsSource(tfds_dir, "train[:3]"))
    by_name = TfdsSource("tiny_folder", "validation", data_dir=f"{bucket}/tfds")
    assert_records_equal(by_name, TfdsSource(tfds_dir, "validation"))
    assert_records_equal(TfdsSource(f"{bucket}/tfds", "validation"), by_name)  # a data_dir holding one dataset


@pytest.mark.slow
def test_prepare_dataset_command_line_to_cloud_storage(gcs, folder):
    """The tool reads the images and captions from a bucket, prepares locally, uploads."""
    bucket = gcs.create_bucket()
    storage.copy_tree(folder / "sub", f"{bucket}/images")
    storage.write_text(f"{bucket}/captions.tsv", "".join(f"img{i:02d}.png\tcaption {i}\n" for i in (0, 3, 6)))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "prepare_dataset.py"),
            f"--image_dir={bucket}/images",
            f"--captions={bucket}/captions.tsv",
            f"--output_dir={bucket}/tfds",
            "--name=cloud_folder",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"uploading {bucket}/tfds/cloud_folder/1.0.0/dataset_info.json" in result.stdout
    remote = TfdsSource(f"{bucket}/tfds/cloud_folder", "train")
    assert_records_equal(
        remote, ImageFolderSource(folder / "sub", {f"img{i:02d}.png": f"caption {i}" for i in (0, 3, 6)})
    )
    with pytest.raises(FileExistsError, match=f"{bucket}/tfds/cloud_folder/1.0.0 already holds"):
        _load_tool().prepare({"train": ImageFolderSource(folder / "sub")}, f"{bucket}/tfds", name="cloud_folder")


# ----------------------------------------------------------------------------------------------
# Pipeline


def test_train_batches_shapes_and_determinism(source):
    kwargs = dict(global_batch_size=4, image_size=SIZE, process_index=0, process_count=1)
    first = take(make_train_iterator(source, seed=7, **kwargs), 4)
    batch = first[0]
    assert set(batch) == {"image", "caption", "id"}
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (4, SIZE, SIZE, 3)
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["caption"].shape == (4,) and batch["caption"].dtype.kind == "U"
    assert all(c == f"picture number {int(i[-6:-4])}" for c, i in zip(batch["caption"], batch["id"]))
    # 16 rows = one epoch of 10 then 6 of the next: every example once in the first 10 rows.
    ids = np.concatenate([b["id"] for b in first])
    assert sorted(ids[:10]) == sorted(source.ids)
    assert_batches_equal(first, take(make_train_iterator(source, seed=7, **kwargs), 4))
    other = take(make_train_iterator(source, seed=8, **kwargs), 4)
    assert any(not np.array_equal(a["id"], b["id"]) for a, b in zip(first, other))
    # Same order without shuffling, but crops and flips still follow the seed.
    plain = [make_train_iterator(source, seed=s, shuffle=False, **kwargs) for s in (1, 2)]
    a, b = next(plain[0]), next(plain[1])
    assert list(a["id"]) == source.ids[:4] == list(b["id"])
    assert not np.array_equal(a["image"], b["image"])


def test_without_augmentation_batches_are_centre_crops(source):
    it = make_train_iterator(
        source,
        global_batch_size=5,
        image_size=(64, 128),
        seed=0,
        process_index=0,
        process_count=1,
        shuffle=False,
        random_crop=False,
        random_flip=False,
        num_epochs=1,
    )
    batches = list(it)
    assert len(batches) == it.num_batches == 2 and it.step == 2
    for k, batch in enumerate(batches):
        for j in range(5):
            record = source[5 * k + j]
            expected = resize_and_crop(record["image"], (64, 128)).astype(np.float32) / 127.5 - 1
            np.testing.assert_array_equal(batch["image"][j], expected)
    small = source[source.ids.index("sub/img03.png")]["image"]  # 48 x 40: upscaled to cover 64 x 128
    assert small.shape == (48, 40, 3) and resize_and_crop(small, (64, 128)).shape == (64, 128, 3)


def test_resize_is_antialiased():
    stripes = np.zeros((256, 256, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: point sampling would give all black or all white
    out = resize_and_crop(stripes, (64, 64))
    assert np.abs(out[:, 1:-1].astype(int) - 128).max() <= 2  # Pillow renormalises the filter at the edges


def test_checkpoint_state_restores_the_stream(source):
    kwargs = dict(global_batch_size=4, image_size=SIZE, seed=3, process_index=0, process_count=1)
    it = make_train_iterator(source, **kwargs)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 2)
    fresh = make_train_iterator(source, **kwargs)
    fresh.set_state(state)
    assert fresh.step == 3
    assert_batches_equal(take(fresh, 2), expected)
    with pytest.raises(ValueError, match="global_batch_size saved 4, now 8"):
        make_train_iterator(source, **{**kwargs, "global_batch_size": 8}).set_state(state)


@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 4), (4, 2)])
def test_state_resumes_on_another_process_count(source, saved_on, resumed_on):
    """The state is global: saved by any process of a P-process job, it continues the same
    global batches on P' processes (each process still gets its rows)."""
    kwargs = dict(global_batch_size=8, image_size=SIZE, seed=7)
    single = take(make_train_iterator(source, process_index=0, process_count=1, **kwargs), 5)
    saving = [make_train_iterator(source, process_index=p, process_count=saved_on, **kwargs) for p in range(saved_on)]
    for it in saving:
        take(it, 3)
    states = [json.loads(json.dumps(it.get_state())) for it in saving]
    assert all(state == states[0] for state in states)
    resumed = []
    for p in range(resumed_on):
        it = make_train_iterator(source, process_index=p, process_count=resumed_on, **kwargs)
        it.set_state(states[-1])
        resumed.append(take(it, 2))
        it.close()
    for k in range(2):
        joined = {key: np.concatenate([part[k][key] for part in resumed]) for key in single[3 + k]}
        assert_batches_equal([joined], [single[3 + k]])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_the_global_batch(source, process_count):
    kwargs = dict(global_batch_size=8, image_size=SIZE, seed=11)
    steps = 4  # 32 rows over 10 examples: crosses three epoch boundaries
    single = take(make_train_iterator(source, process_index=0, process_count=1, **kwargs), steps)
    shards = [
        take(make_train_iterator(source, process_index=p, process_count=process_count, **kwargs), steps)
        for p in range(process_count)
    ]
    for k in range(steps):
        assert shards[0][k]["image"].shape[0] == 8 // process_count
        joined = {key: np.concatenate([shard[k][key] for shard in shards]) for key in single[k]}
        assert_batches_equal([joined], [single[k]])


def test_eval_iterator_pads_the_last_batch(source):
    shards = [
        list(make_eval_iterator(source, global_batch_size=4, image_size=SIZE, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert [len(s) for s in shards] == [3, 3]
    ids = np.concatenate([np.concatenate([shards[0][k]["id"], shards[1][k]["id"]]) for k in range(3)])
    mask = np.concatenate([np.concatenate([shards[0][k]["mask"], shards[1][k]["mask"]]) for k in range(3)])
    assert list(ids[mask]) == source.ids and list(ids[~mask]) == ["", ""]
    assert (shards[1][2]["image"] == -1.0).all() and not shards[1][2]["mask"].any()


def test_finite_epochs_stop(source):
    it = make_train_iterator(
        source, global_batch_size=4, image_size=SIZE, seed=0, process_index=0, process_count=1, num_epochs=2
    )
    batches = list(it)
    assert len(batches) == it.num_batches == 5  # 20 rows
    ids = np.concatenate([b["id"] for b in batches])
    assert sorted(ids[:10]) == sorted(ids[10:]) == sorted(source.ids) and list(ids[:10]) != list(ids[10:])


def test_invalid_arguments(source):
    kwargs = dict(global_batch_size=4, image_size=SIZE, seed=0, process_index=0, process_count=1)
    for size in (100, 0, -64, (64, 96), 64.0, True):
        with pytest.raises(ValueError, match="image_size") as info:
            make_train_iterator(source, **{**kwargs, "image_size": size})
        assert repr(size) in str(info.value)
    with pytest.raises(ValueError, match="global_batch_size 6 is not divisible by process_count 4"):
        make_train_iterator(source, **{**kwargs, "global_batch_size": 6, "process_count": 4})
    with pytest.raises(ValueError, match="process_index 2"):
        make_eval_iterator(source, global_batch_size=4, image_size=SIZE, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed"):
        make_train_iterator(source, **{**kwargs, "seed": -1})
    with pytest.raises(ValueError, match="do not fill one global batch"):
        make_train_iterator(source, **{**kwargs, "global_batch_size": 32, "num_epochs": 1})


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(source):
    kwargs = dict(global_batch_size=4, image_size=SIZE, seed=2, process_index=0, process_count=1)
    in_process = make_train_iterator(source, **kwargs)
    expected = take(in_process, 3)
    it = make_train_iterator(source, worker_count=2, **kwargs)
    try:
        assert_batches_equal(take(it, 3), expected)
        # A position saved without workers continues with them.
        it.set_state(in_process.get_state())
        assert_batches_equal(take(it, 2), take(in_process, 2))
    finally:
        it.close()
