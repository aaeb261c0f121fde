"""The codec end to end with a (briefly) trained stage-1 model: compress -> .pcv2 -> decompress
through the Python API and the ``percov2`` command; uniform token coding is exactly
h*w*log2(V) bits and the decoder sees exactly the encoder's tokens."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import train_setup


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return train_setup.trained_stage1(tmp_path_factory.mktemp("stage1"))


@pytest.fixture(scope="module")
def codec(workdir):
    from percov2_jax.codec.api import Codec

    return Codec.from_workdir(str(workdir), sample_steps=2)


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
    other = bitstream.pack(bitstream.CompressedImage(
        bitstream.StreamHeader(model_id=(codec.model_id + 1) % 2**24, height=64, width=64, rate=codec.config.rate,
                               entropy_mode="uniform"), b"", bitstream.unpack(data).token_bytes))
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
    assert cli.main(["compress", str(folder), "-o", str(tmp_path / "z"), "--checkpoint", str(workdir),
                     "--caption", "grey"]) == 0
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["a.pcv2", "b.pcv2"]
    assert cli.main(["info", str(tmp_path / "z" / "a.pcv2")]) == 0
    assert cli.main(["decompress", str(tmp_path / "z"), "-o", str(tmp_path / "out"), "--checkpoint", str(workdir),
                     "--steps", "2"]) == 0
    assert Image.open(tmp_path / "out" / "b.png").size == (64, 70)
    (tmp_path / "bad.pcv2").write_bytes(b"\x00garbage")
    assert cli.main(["info", str(tmp_path / "bad.pcv2")]) == 2
