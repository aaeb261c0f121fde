"""The codec end to end with a (briefly) trained stage-1 model and stage-2 prior: compress ->
.pcv2 -> decompress through the Python API and the ``percov2`` command. Uniform token coding is
exactly h*w*log2(V) bits; prior coding round-trips every schedule exactly and costs the
prior's code length; hybrid streams keep the transmitted tokens verbatim."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration  # trains models or runs whole jobs


@pytest.fixture(scope="module")
def workdir(stage1_workdir):
    return stage1_workdir


@pytest.fixture(scope="module")
def codec(workdir):
    from percov2_jax.codec.api import Codec

    return Codec.from_workdir(str(workdir), sample_steps=2, prior=False)


@pytest.fixture(scope="module")
def prior_codec(workdir, prior_workdir):
    from percov2_jax.codec.api import Codec

    return Codec.from_workdir(str(workdir), sample_steps=2)  # finds WORKDIR/prior


@pytest.fixture(scope="module")
def photo():
    from percov2_jax.data.builtin import BuiltinPhotos

    return BuiltinPhotos()[2]["image"][:128, :192]  # 8 x 12 tokens at the test rate


def test_round_trip_any_size_and_mode(codec):
    from percov2_jax.codec import bitstream
    from percov2_jax.data.builtin import BuiltinPhotos

    photo = BuiltinPhotos()[1]["image"][:100, :130]  # not multiples of 64: padded to 128 x 192
    rgba = Image.fromarray(photo).convert("RGBA")
    data = codec.compress(rgba, "a cat")
    budget = bitstream.bit_budget(data)
    rows, cols = 128 // 16, 192 // 16  # test config: extreme rate, 16 px per token
    assert budget["tokens_bits"] == rows * cols * 8  # uniform: exactly log2(256) bits per token
    stream = bitstream.unpack(data)
    assert stream.header.token_grid == (rows, cols) and stream.caption() == "a cat"
    # The receiver decodes exactly the encoder's indices.
    from percov2_jax.entropy import coder

    indices, size, policy = codec.tokens(rgba)
    assert size == (100, 130) and policy == "pad"
    np.testing.assert_array_equal(coder.decode_uniform(stream.token_bytes, rows * cols, 256), indices.reshape(-1))
    out = codec.decompress(data)
    assert out.shape == (100, 130, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, codec.decompress(data))  # deterministic for the same seed
    gray = codec.compress(Image.fromarray(photo).convert("L"), "")
    assert bitstream.unpack(gray).header.width == 130


def test_foreign_or_damaged_streams_fail_loudly(codec):
    from percov2_jax.codec import bitstream

    data = codec.compress(np.zeros((64, 64, 3), np.uint8), "black")
    other = bitstream.pack(
        bitstream.CompressedImage(
            bitstream.StreamHeader(
                model_id=(codec.model_id + 1) % 2**24,
                height=64,
                width=64,
                rate=codec.config.rate,
                entropy_mode="uniform",
            ),
            b"",
            bitstream.unpack(data).token_bytes,
        )
    )
    with pytest.raises(bitstream.BitstreamError, match="model"):
        codec.decompress(other)
    with pytest.raises(bitstream.BitstreamError):
        codec.decompress(data[:-3])


def test_command_line(workdir, tmp_path):
    from percov2_jax import cli

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((64, 128, 3), 90, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((70, 64, 3), 200, np.uint8)).save(folder / "b.jpg")
    assert (
        cli.main(
            ["compress", str(folder), "-o", str(tmp_path / "z"), "--checkpoint", str(workdir), "--caption", "grey"]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["a.pcv2", "b.pcv2", "captions.tsv"]
    assert cli.main(["info", str(tmp_path / "z" / "a.pcv2")]) == 0
    assert (
        cli.main(
            [
                "decompress",
                str(tmp_path / "z"),
                "-o",
                str(tmp_path / "out"),
                "--checkpoint",
                str(workdir),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "out" / "b.png").size == (64, 70)
    (tmp_path / "bad.pcv2").write_bytes(b"\x00garbage")
    assert cli.main(["info", str(tmp_path / "bad.pcv2")]) == 2


def test_command_line_relative_checkpoint_and_captions_file(workdir, tmp_path, monkeypatch):
    """A relative --checkpoint works (orbax wants absolute paths); a --captions file that does not
    caption an image stops with the image's name instead of sending an empty caption."""
    from percov2_jax import cli
    from percov2_jax.codec import bitstream

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((64, 64, 3), 20, np.uint8)).save(folder / "b.png")
    (tmp_path / "captions.tsv").write_text("a.jpg\ta grey square\n")  # stem fallback: serves a.png
    monkeypatch.chdir(os.path.dirname(workdir))
    relative = os.path.basename(workdir)
    assert (
        cli.main(
            [
                "compress",
                str(folder / "a.png"),
                "-o",
                str(tmp_path / "a.pcv2"),
                "--checkpoint",
                relative,
                "--captions",
                str(tmp_path / "captions.tsv"),
            ]
        )
        == 0
    )
    assert bitstream.unpack((tmp_path / "a.pcv2").read_bytes()).caption() == "a grey square"
    with pytest.raises(SystemExit, match="b.png"):
        cli.main(
            [
                "compress",
                str(folder),
                "-o",
                str(tmp_path / "z"),
                "--checkpoint",
                relative,
                "--captions",
                str(tmp_path / "captions.tsv"),
            ]
        )


def test_command_line_prior_and_hybrid(workdir, prior_workdir, tmp_path, capsys):
    from percov2_jax import cli
    from percov2_jax.codec import bitstream

    image = tmp_path / "a.png"
    Image.fromarray(np.tile(np.arange(128, dtype=np.uint8)[:, None, None], (1, 128, 3))).save(image)
    assert (
        cli.main(
            [
                "compress",
                str(image),
                "-o",
                str(tmp_path / "a.pcv2"),
                "--checkpoint",
                workdir,
                "--schedule",
                "qlds",
                "--steps",
                "5",
                "--hybrid-groups",
                "2",
                "--temperature",
                "0.5",
                "--hybrid-seed",
                "9",
                "--caption",
                "a ramp",
                "--entropy-mode",
                "prior",
            ]
        )
        == 0
    )
    header = bitstream.unpack((tmp_path / "a.pcv2").read_bytes()).header
    assert (header.entropy_mode, header.steps, header.hybrid_groups, header.temperature, header.seed) == (
        "prior",
        5,
        2,
        0.5,
        9,
    )
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "a.pcv2")]) == 0
    assert "schedule qlds, 5 groups; hybrid: first 2 groups sent" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "decompress",
                str(tmp_path / "a.pcv2"),
                "-o",
                str(tmp_path / "a_out.png"),
                "--checkpoint",
                workdir,
                "--steps",
                "2",
            ]
        )
        == 0
    )
    # Without the prior the stream cannot be decoded: exit 2 with the reason.
    assert (
        cli.main(
            [
                "decompress",
                str(tmp_path / "a.pcv2"),
                "-o",
                str(tmp_path / "b.png"),
                "--checkpoint",
                workdir,
                "--prior",
                "none",
            ]
        )
        == 2
    )
    assert "needs a stage-2 prior" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="hybrid_groups=2 must be below"):
        cli.main(
            [
                "compress",
                str(image),
                "-o",
                str(tmp_path / "c.pcv2"),
                "--checkpoint",
                workdir,
                "--schedule",
                "checkerboard",
                "--hybrid-groups",
                "2",
            ]
        )


def test_prior_codes_every_schedule_exactly(prior_codec, photo):
    from percov2_jax.codec import bitstream
    from percov2_jax.entropy import mim, schedules

    assert prior_codec.coding.entropy_mode == "auto" and prior_codec.prior_model_id != prior_codec.model_id
    indices, _, _ = prior_codec.tokens(photo)
    caption = "a photograph"
    embedding = prior_codec.caption_embedding(caption)
    assert embedding is not None and embedding.shape == (prior_codec.prior.model.config.caption_dim,)
    for name in ("qlds", "checkerboard", "quincunx", "implicit_var", "raster", "random"):
        data = prior_codec.compress(photo, caption, schedule=name, entropy_mode="prior")
        header = bitstream.unpack(data).header
        schedule = schedules.make_schedule(name, *indices.shape)
        assert (header.entropy_mode, header.schedule_id, header.steps) == (
            "prior",
            schedules.schedule_id(name),
            schedule.num_steps,
        )
        assert header.model_id == prior_codec.prior_model_id
        decoded, _ = prior_codec.decode_tokens(data)
        np.testing.assert_array_equal(decoded, indices, err_msg=name)
        # The payload costs the prior's code length (quantised tables; a few bits of termination).
        _, bits = mim.schedule_log2_probs(
            prior_codec.prior.model.apply, prior_codec.prior.params, indices, schedule, embedding
        )
        token_bits = bitstream.bit_budget(data)["tokens_bits"]
        assert abs(token_bits - bits.sum()) <= 0.005 * bits.sum() + 16, (name, token_bits, bits.sum())


def test_hybrid_streams_keep_sent_tokens_and_generate_the_rest(prior_codec, photo):
    from percov2_jax.codec import bitstream
    from percov2_jax.entropy import mim, schedules

    indices, _, _ = prior_codec.tokens(photo)
    schedule = schedules.make_schedule("qlds", *indices.shape)
    sent = np.concatenate(schedule.groups[:3])
    full_bits = bitstream.bit_budget(prior_codec.compress(photo, "x", entropy_mode="prior"))["tokens_bits"]
    prior = prior_codec.prior
    for mode, temperature, seed in (("prior", 0.0, 0), ("prior", 0.7, 5), ("uniform", 0.0, 0)):
        data = prior_codec.compress(photo, "x", entropy_mode=mode, hybrid_groups=3, temperature=temperature, seed=seed)
        header = bitstream.unpack(data).header
        assert (header.hybrid_groups, header.temperature) == (3, temperature)
        decoded, _ = prior_codec.decode_tokens(data)
        np.testing.assert_array_equal(decoded.reshape(-1)[sent], indices.reshape(-1)[sent])  # verbatim
        expected = mim.hybrid_complete(
            prior.apply,
            prior.params,
            indices,
            schedule,
            3,
            temperature=temperature,
            seed=seed,
            caption=prior_codec.caption_embedding("x"),
        )
        np.testing.assert_array_equal(decoded, expected)
        bits = bitstream.bit_budget(data)["tokens_bits"]
        if mode == "uniform":
            assert bits == 8 * len(sent)
        else:
            assert bits < full_bits
    out = prior_codec.decompress(prior_codec.compress(photo, "x", hybrid_groups=2))
    assert out.shape == photo.shape


def test_prior_streams_need_the_prior(codec, prior_codec, photo, workdir, prior_workdir):
    from percov2_jax.codec import bitstream
    from percov2_jax.codec.api import load_token_prior

    data = prior_codec.compress(photo, "x", entropy_mode="prior")
    with pytest.raises(bitstream.BitstreamError, match="needs a stage-2 prior") as e:
        codec.decode_tokens(data)
    assert e.value.kind == "model"
    # Uniform streams carry the stage-1 id: a codec without the prior reads them.
    uniform = prior_codec.compress(photo, "x", entropy_mode="uniform")
    np.testing.assert_array_equal(codec.decode_tokens(uniform)[0], prior_codec.tokens(photo)[0])
    with pytest.raises(ValueError, match="needs a stage-2 prior"):
        codec.compress(photo, "x", entropy_mode="prior")
    with pytest.raises(ValueError, match="trained on the tokens of stage-1 model"):
        load_token_prior(prior_workdir, expected_stage1_id=(codec.model_id + 1) % 2**24)
    with pytest.raises(ValueError, match="hybrid_groups=2 must be below"):
        prior_codec.compress(photo, "x", schedule="checkerboard", hybrid_groups=2)  # 8x12: 2 groups
    # A prior stream whose model id is changed is refused by model, not decoded into garbage.
    stream = bitstream.unpack(data)
    forged = bitstream.pack(
        bitstream.CompressedImage(
            bitstream.StreamHeader(**{**stream.header.__dict__, "model_id": codec.model_id}),
            stream.caption_bytes,
            stream.token_bytes,
        )
    )
    with pytest.raises(bitstream.BitstreamError, match="model"):
        prior_codec.decode_tokens(forged)


def test_auto_mode_sends_the_shorter_coding(prior_codec, photo):
    """The default ``auto`` mode is never longer than uniform coding, whatever the prior: a prior
    made confidently wrong (its output bias pinned to token 0) loses to uniform coding on a photo
    and wins on a map of zeros; hybrid streams choose the cheaper coding of the sent groups."""
    import dataclasses

    import jax

    from percov2_jax.codec import bitstream
    from percov2_jax.codec.token_payload import TokenCoding, TokenPrior

    def pin_bias(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim == 1 and leaf.shape[0] == 256 and "bias" in name:
            return leaf.at[:].set(-30.0).at[0].set(30.0)
        return leaf

    pinned = jax.tree_util.tree_map_with_path(pin_bias, prior_codec.prior.params)
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pinned), jax.tree.leaves(prior_codec.prior.params))
    )
    wrong = dataclasses.replace(prior_codec, prior=TokenPrior.from_params(prior_codec.prior.model, pinned))
    indices, size, _ = wrong.tokens(photo)
    assert (indices != 0).mean() > 0.5
    lengths = {}
    for mode in ("auto", "prior", "uniform"):
        data = wrong.pack(indices, size, None, "x", "zlib", TokenCoding(mode))
        lengths[mode] = len(data)
        np.testing.assert_array_equal(wrong.decode_tokens(data)[0], indices)
        if mode == "auto":
            assert bitstream.unpack(data).header.entropy_mode == "uniform"
    assert lengths["prior"] > 2 * lengths["uniform"] and lengths["auto"] == lengths["uniform"]
    zeros = np.zeros_like(indices)
    auto = wrong.pack(zeros, size, None, "x", "zlib", TokenCoding("auto"))
    assert bitstream.unpack(auto).header.entropy_mode == "prior"
    assert len(auto) == len(wrong.pack(zeros, size, None, "x", "zlib", TokenCoding("prior"))) < lengths["uniform"]
    np.testing.assert_array_equal(wrong.decode_tokens(auto)[0], zeros)
    hybrid = TokenCoding("auto", hybrid_groups=3)
    data = wrong.pack(indices, size, None, "x", "zlib", hybrid)
    header = bitstream.unpack(data).header
    assert (header.entropy_mode, header.hybrid_groups) == ("uniform", 3)
    assert len(data) <= len(
        wrong.pack(indices, size, None, "x", "zlib", dataclasses.replace(hybrid, entropy_mode="prior"))
    )
    with pytest.raises(ValueError, match="entropy_mode must be one of"):
        TokenCoding("best")


def test_resize_policy_and_size_limits(codec, photo):
    from percov2_jax.codec import bitstream

    crop = photo[:100, :130]
    data = codec.compress(crop, "", resize_policy="resize")
    header = bitstream.unpack(data).header
    assert header.resize_policy == "resize" and header.coded_size == (128, 128)
    assert codec.decompress(data).shape == (100, 130, 3)
    tiny = codec.compress(np.full((1, 1, 3), 7, np.uint8), "")
    assert bitstream.unpack(tiny).header.coded_size == (64, 64) and codec.decompress(tiny).shape == (1, 1, 3)
    with pytest.raises(ValueError, match="beyond this model's"):
        codec.tokens(np.zeros((64, codec.max_side + 1, 3), np.uint8))
    with pytest.raises(ValueError, match="resize_policy"):
        codec.compress(crop, "", resize_policy="stretch")


def test_forged_prior_payloads_fail_cleanly(prior_codec, photo):
    """Streams with a valid checksum but random token bytes (what a CRC cannot catch): the
    decoder returns some in-range token map or raises BitstreamError; nothing else, no hang."""
    from percov2_jax.codec import bitstream

    stream = bitstream.unpack(prior_codec.compress(photo[:64, :64], "x", entropy_mode="prior"))  # 4x4, qlds
    rng = np.random.default_rng(0)
    outcomes = {"tokens": 0, "error": 0}
    for _ in range(40):
        payload = rng.bytes(int(rng.integers(0, 12)))
        forged = bitstream.pack(bitstream.CompressedImage(stream.header, stream.caption_bytes, payload))
        try:
            tokens, _ = prior_codec.decode_tokens(forged)
        except bitstream.BitstreamError:
            outcomes["error"] += 1
        else:
            assert tokens.shape == (4, 4) and tokens.min() >= 0 and tokens.max() < 256
            outcomes["tokens"] += 1
    assert outcomes["error"] > 30, outcomes  # the range decoder's own checks catch most of them


def test_runs_on_cloud_storage(gcs, workdir, prior_workdir, codec, tmp_path):
    """A stage-1 run in a bucket: a prior trains into ``gs://.../prior`` from the bucket's run, and
    ``percov2 compress/decompress --checkpoint gs://...`` gives the bytes and pixels of the same
    run read from local disk (uniform coding: the local codec; prior coding: the local prior,
    trained by the same steps)."""
    import shutil

    import train_setup

    from percov2_jax import cli, storage
    from percov2_jax.codec.api import Codec

    local_stage1 = tmp_path / "stage1"
    shutil.copytree(workdir, local_stage1, ignore=shutil.ignore_patterns("prior"))
    bucket = gcs.create_bucket() + "/run"
    storage.copy_tree(local_stage1, bucket)
    train_setup.trained_prior(bucket, bucket + "/prior")

    image = np.tile(np.arange(128, dtype=np.uint8)[:, None, None], (1, 128, 3))
    Image.fromarray(image).save(tmp_path / "a.png")
    uniform = ["--entropy-mode", "uniform"]
    for name, extra, reference in (
        ("u", uniform, codec),
        ("p", [], Codec.from_workdir(workdir, sample_steps=2)),
    ):
        args = ["compress", str(tmp_path / "a.png"), "-o", str(tmp_path / f"{name}.pcv2"), "--checkpoint", bucket]
        assert cli.main([*args, "--caption", "a ramp", *extra]) == 0
        data = (tmp_path / f"{name}.pcv2").read_bytes()
        assert data == reference.compress(image, "a ramp")
        args = ["decompress", str(tmp_path / f"{name}.pcv2"), "-o", str(tmp_path / f"{name}.png"), "--checkpoint"]
        assert cli.main([*args, bucket, "--steps", "2"]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{name}.png")), reference.decompress(data))
