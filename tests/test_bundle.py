"""The inference bundle (`percov2_jax.codec.bundle`, ``percov2 export``) and the compilation cache
of the codec commands (`percov2_jax.compilation_cache`). Reference: the stage-1 run (and its
prior) the bundle is exported from, through ``Codec.from_workdir``; tolerance: none (the same
stream bytes, the same decoded pixels, the same model ids)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration  # exports and loads trained models


@pytest.fixture(scope="module")
def bundle(stage1_workdir, prior_workdir, tmp_path_factory):
    from percov2_jax.codec import bundle as bundle_lib

    out = tmp_path_factory.mktemp("bundle") / "demo"
    bundle_lib.export(stage1_workdir, out)
    return str(out)


@pytest.fixture(scope="module")
def run_codec(stage1_workdir, prior_workdir):
    from percov2_jax.codec.api import Codec

    return Codec.from_workdir(stage1_workdir, sample_steps=2)


@pytest.fixture(scope="module")
def bundle_codec(bundle):
    from percov2_jax.codec.api import Codec

    return Codec.from_workdir(bundle, sample_steps=2)


@pytest.fixture(scope="module")
def photo():
    from percov2_jax.data.builtin import BuiltinPhotos

    return BuiltinPhotos()[2]["image"][:100, :130]  # padded to 128 x 192: 8 x 12 tokens


def test_bundle_holds_what_the_codec_needs_and_nothing_else(bundle, stage1_workdir):
    from percov2_jax.runs import checkpointing
    from percov2_jax.runs.layout import RunDir

    assert sorted(os.listdir(bundle)) == ["bundle.json", "latent_codec.npz", "prior.npz", "stage1.npz"]
    with open(os.path.join(bundle, "bundle.json")) as f:
        manifest = json.load(f)
    with np.load(os.path.join(bundle, "stage1.npz")) as stored:
        assert {name.split("/")[0] for name in stored.files} == {"params", "vq_stats"}  # no optimizer state
    run = RunDir(stage1_workdir)
    step = checkpointing.latest_step(run)
    saved = checkpointing.state_metadata(run, step)
    assert manifest["source"]["step"] == step
    assert manifest["source"]["weights"] == ("ema_params" if saved.get("ema_params") is not None else "params")
    assert manifest["config"] == checkpointing.read_json(run, checkpointing.CONFIG, step)
    assert manifest["source"]["prior_meta"]["stage1_model_id"] == manifest["model_id"]


@pytest.mark.parametrize(
    "coding", [{}, {"entropy_mode": "uniform"}, {"entropy_mode": "prior"}, {"hybrid_groups": 3, "temperature": 0.3}]
)
def test_bundle_codes_exactly_like_its_run(run_codec, bundle_codec, photo, coding):
    assert bundle_codec.model_id == run_codec.model_id
    assert bundle_codec.prior_model_id == run_codec.prior_model_id is not None
    data = run_codec.compress(photo, "a mug of coffee", **coding)
    assert bundle_codec.compress(photo, "a mug of coffee", **coding) == data
    np.testing.assert_array_equal(bundle_codec.decompress(data), run_codec.decompress(data))


def test_command_line_export_and_compilation_cache(stage1_workdir, prior_workdir, run_codec, photo, tmp_path):
    """``percov2 export`` then compress / decompress with ``--checkpoint BUNDLE``: the run's bytes
    and pixels, with executables stored and then read back from the cache (and none kept with
    ``--no-compilation-cache``)."""
    from percov2_jax import cli
    from percov2_jax.codec import networks

    out = tmp_path / "bundle"
    assert cli.main(["export", stage1_workdir, str(out)]) == 0
    with pytest.raises(SystemExit, match="already holds a bundle"):
        cli.main(["export", stage1_workdir, str(out)])
    Image.fromarray(photo).save(tmp_path / "a.png")
    cache = tmp_path / "cache"
    compress = ["compress", str(tmp_path / "a.png"), "--checkpoint", str(out), "--caption", "a mug of coffee"]
    decompress = ["decompress", str(tmp_path / "a.pcv2"), "--checkpoint", str(out), "--steps", "2"]
    reference = run_codec.compress(photo, "a mug of coffee")
    for attempt in range(2):
        if attempt:  # the second time the programs come from the files, not from this process's memory
            networks.encode_tokens._loaded.clear()
            networks.decode_tokens._loaded.clear()
        assert cli.main([*compress, "-o", str(tmp_path / "a.pcv2"), "--compilation-cache", str(cache)]) == 0
        assert (tmp_path / "a.pcv2").read_bytes() == reference
        assert cli.main([*decompress, "-o", str(tmp_path / "d.png"), "--compilation-cache", str(cache)]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d.png")), run_codec.decompress(reference))
        stored = sorted(p.name.split("-")[0] for p in (cache / "percov2_executables").iterdir())
        assert {"encode_tokens", "decode_tokens", "probabilities"} <= set(stored)
    off = ["--compilation-cache", str(tmp_path / "off"), "--no-compilation-cache"]
    assert cli.main([*compress, "-o", str(tmp_path / "b.pcv2"), *off]) == 0
    assert (tmp_path / "b.pcv2").read_bytes() == reference and not (tmp_path / "off").exists()


def test_bad_bundles_fail_with_one_clear_error(bundle, tmp_path, capsys):
    from percov2_jax import cli
    from percov2_jax.codec.api import Codec
    from percov2_jax.codec.bundle import BundleError

    def damaged(name, change):
        folder = tmp_path / name
        shutil.copytree(bundle, folder)
        change(folder)
        return str(folder)

    def edit_manifest(edit):
        def change(folder):
            manifest = json.loads((folder / "bundle.json").read_text())
            edit(manifest)
            (folder / "bundle.json").write_text(json.dumps(manifest))

        return change

    def truncate(folder):
        data = (folder / "stage1.npz").read_bytes()
        (folder / "stage1.npz").write_bytes(data[: len(data) // 2])

    cases = {
        "partial": (lambda f: (f / "bundle.json").unlink(), "incomplete codec bundle"),
        "missing": (lambda f: (f / "prior.npz").unlink(), "prior.npz is missing"),
        "truncated": (truncate, "damaged"),
        "model id": (edit_manifest(lambda m: m.update(model_id=m["model_id"] ^ 1)), "model id"),
        "shape": (
            edit_manifest(lambda m: m["arrays"]["latent_codec"]["mean"].update(shape=[1])),
            "has shape",
        ),
        "version": (edit_manifest(lambda m: m.update(version=99)), "version 99"),
        "not json": (lambda f: (f / "bundle.json").write_text("{"), "not valid JSON"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(BundleError, match=message):
            Codec.from_workdir(damaged(name, change))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    args = ["compress", str(tmp_path / "a.png"), "-o", str(tmp_path / "a.pcv2"), "--checkpoint"]
    assert cli.main([*args, str(tmp_path / "partial")]) == 2
    assert "incomplete codec bundle" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one step"):
        Codec.from_workdir(bundle, step=1)


def test_bundle_on_cloud_storage(gcs, stage1_workdir, prior_workdir, run_codec, photo):
    from percov2_jax.codec import bundle as bundle_lib
    from percov2_jax.codec.api import Codec

    url = gcs.create_bucket() + "/bundle"
    bundle_lib.export(stage1_workdir, url)
    assert bundle_lib.is_bundle(url)
    codec = Codec.from_workdir(url, sample_steps=2)
    assert codec.prior_model_id == run_codec.prior_model_id
    assert codec.compress(photo, "a mug") == run_codec.compress(photo, "a mug")


def test_arrays_numpy_cannot_name_round_trip(tmp_path):
    """bfloat16 (a converted SD3 checkpoint's dtype) is stored as uint16 and read back as bfloat16."""
    import io

    import jax.numpy as jnp

    from percov2_jax.codec import bundle as bundle_lib

    arrays = {"w": np.arange(6, dtype=jnp.bfloat16).reshape(2, 3), "b": np.ones(3, np.float32)}
    buffer = io.BytesIO()
    np.savez(buffer, **{k: bundle_lib._storable(a) for k, a in arrays.items()})
    (tmp_path / "latent_codec.npz").write_bytes(buffer.getvalue())
    listed = {k: {"shape": list(a.shape), "dtype": a.dtype.name} for k, a in arrays.items()}
    read = bundle_lib._read_part(tmp_path, "latent_codec", {"arrays": {"latent_codec": listed}})
    for k, a in arrays.items():
        assert read[k].dtype == a.dtype
        np.testing.assert_array_equal(read[k], a)


def test_compilation_cache_settings(monkeypatch, tmp_path):
    import jax

    from percov2_jax import compilation_cache as cc

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(cc.ENV, raising=False)
    assert cc.default_dir() == str(tmp_path / "xdg" / "percov2_jax" / "jax_cache")
    assert cc.resolve(str(tmp_path / "d")) == str(tmp_path / "d")
    assert cc.resolve(str(tmp_path / "d"), enabled=False) is None
    # The test session configured JAX's cache (rule 4): left as it is.
    assert jax.config.jax_compilation_cache_dir and cc.resolve() == ""
    monkeypatch.setenv(cc.ENV, "off")
    assert cc.resolve() is None and cc.resolve(str(tmp_path / "d")) == str(tmp_path / "d")
    monkeypatch.setenv(cc.ENV, str(tmp_path / "e"))
    assert cc.resolve() == str(tmp_path / "e")
    before = jax.config.jax_compilation_cache_dir
    with cc.configured() as directory:
        assert directory == jax.config.jax_compilation_cache_dir == str(tmp_path / "e")
        assert cc._store == str(tmp_path / "e" / cc.EXECUTABLES)
    assert jax.config.jax_compilation_cache_dir == before and cc._store is None
