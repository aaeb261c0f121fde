"""Caption coders (round trips, the papers' zlib, damaged data, rate on the held-out captions),
the length policy, caption files and the BLIP-2 captioner's loading."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import zlib

import pytest

from percov2_jax.captions import (
    CODERS,
    CaptionDecodeError,
    CaptionFile,
    CaptionFileError,
    CaptionPolicy,
    CaptionTooLongError,
    FixedCaption,
    fit,
    get_coder,
    image_key,
    load_captions,
    ngram,
)
from percov2_jax.captions.range_coder import RangeDecodeError, RangeDecoder, RangeEncoder

TRAIN = fit.read_caption_lines(fit.TRAIN_CAPTIONS_PATH)
EVAL = fit.read_caption_lines(fit.EVAL_CAPTIONS_PATH)

EDGE_CASES = [
    "",
    " ",
    "a",
    "a man riding a bike down a street next to a tall building",
    "A Man, riding a BIKE (2024)!",
    "café – 東京 🚀",
    "  leading and trailing  ",
    "double  space\ttab\nnewline\r\nwindows line\x00nul",
    "\n\n\n",
    "a " * 400,
    "a river runs through a rocky forest with mountains in the background " * 30,
    "".join(chr(c) for c in range(0x20, 0x2000)),
    "🚀" * 300,
]


def random_text(rng: random.Random) -> str:
    """Random code points (no surrogates), often mixed with spaces and caption words."""
    pieces = []
    for _ in range(rng.randrange(0, 25)):
        kind = rng.random()
        if kind < 0.3:
            pieces.append(rng.choice(["a", "dog", "the", "zzyzx", "", " ", "\n"]))
        elif kind < 0.6:
            pieces.append(chr(rng.randrange(0x20, 0x7F)))
        else:
            cp = rng.randrange(0, 0x110000 - 0x800)
            pieces.append(chr(cp + 0x800 if cp >= 0xD800 else cp))
    return rng.choice(["", " "]).join(pieces)


RANDOM_TEXTS = [random_text(random.Random(seed)) for seed in range(300)]


# coders ----------------------------------------------------------------------------------


def test_zlib_is_the_papers_coder_and_word_ngram_the_default():
    from percov2_jax.captions import DEFAULT_CODER, PAPER_CODER
    from percov2_jax.cli import build_parser

    assert get_coder().name == DEFAULT_CODER == "word-ngram-v1" and PAPER_CODER == "zlib"
    compress = build_parser().parse_args(["compress", "x.png", "-o", "x.pcv2", "--checkpoint", "run"])
    assert compress.caption_coder == DEFAULT_CODER
    for text in EDGE_CASES + EVAL[:20]:
        assert get_coder("zlib").encode(text) == zlib.compress(text.encode("utf-8"), 9)


def test_registry():
    assert set(CODERS) >= {"zlib", "deflate-dict-v1", "word-ngram-v1", "word-ngram-v1+crc8"}
    for name in CODERS:
        assert get_coder(name).name == name
    with pytest.raises(KeyError, match="unknown caption coder 'lzma'.*zlib"):
        get_coder("lzma")


@pytest.mark.parametrize("name", CODERS)
def test_round_trips(name):
    coder = get_coder(name)
    for text in EDGE_CASES + EVAL + RANDOM_TEXTS:
        data = coder.encode(text)
        assert isinstance(data, bytes)
        assert coder.decode(data) == text, repr(text[:60])


@pytest.mark.parametrize("name", CODERS)
def test_rejects_non_text(name):
    with pytest.raises(ValueError, match="surrogate"):
        get_coder(name).encode("lone \ud800 surrogate")
    with pytest.raises(TypeError):
        get_coder(name).encode(b"bytes")


def test_word_ngram_is_at_most_one_byte_longer_than_utf8():
    coder = get_coder("word-ngram-v1")
    for text in EDGE_CASES + RANDOM_TEXTS:
        assert len(coder.encode(text)) <= len(text.encode("utf-8")) + 1
    assert coder.encode("") == b""  # END is the first symbol of the first table


def test_better_coders_beat_zlib_on_the_held_out_captions():
    assert not set(TRAIN) & set(EVAL)
    assert len(TRAIN) >= 400 and len(EVAL) >= 150
    total = {name: sum(len(get_coder(name).encode(c)) for c in EVAL) for name in CODERS}
    assert total["word-ngram-v1"] < total["deflate-dict-v1"] < total["zlib"]
    assert total["word-ngram-v1"] * 5 < total["zlib"]
    # The v1 formats are defined by this package alone (zlib's output depends on the library):
    # these counts change only if the format does.
    assert total["word-ngram-v1"] == 1114
    assert total["word-ngram-v1+crc8"] == 1114 + len(EVAL)


def test_word_ngram_format_is_stable():
    coder = get_coder("word-ngram-v1")
    assert coder.encode("a man riding a horse on a dirt road near a barn").hex() == GOLDEN_HORSE
    assert coder.encode("café – 東京 🚀").hex() == GOLDEN_UNICODE


GOLDEN_HORSE = "877462e2af4976"
GOLDEN_UNICODE = "ff636166c3a920e2809320e69db1e4baac20f09f9a80"  # raw mode: 0xFF + UTF-8


def test_stored_tables_are_fitted_on_the_training_captions_only():
    for path, data in fit.build_assets(TRAIN).items():
        assert path.read_bytes() == data, f"{path} is stale: run python -m percov2_jax.captions.fit"


# damaged data ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zlib", "deflate-dict-v1"])
def test_deflate_coders_reject_truncation_and_padding(name):
    coder = get_coder(name)
    for text in EVAL[:40] + EDGE_CASES[:6]:
        data = coder.encode(text)
        for cut in range(len(data)):
            with pytest.raises(CaptionDecodeError, match=name):
                coder.decode(data[:cut])
        with pytest.raises(CaptionDecodeError, match="trailing"):
            coder.decode(data + b"\x00")


def test_zlib_checksum_catches_a_changed_caption():
    data = bytearray(get_coder("zlib").encode("a dog on a couch"))
    data[-1] ^= 0x01
    with pytest.raises(CaptionDecodeError, match="corrupt"):
        get_coder("zlib").decode(bytes(data))


@pytest.mark.parametrize("name", CODERS)
def test_garbage_raises_only_caption_decode_error(name):
    """Random bytes: a CaptionDecodeError (a ValueError), or — for word-ngram — a text whose
    encoding is exactly those bytes (every byte string the encoder can write is valid)."""
    assert issubclass(CaptionDecodeError, ValueError)
    coder, rng = get_coder(name), random.Random(1)
    for _ in range(300):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 30)))
        try:
            text = coder.decode(data)
        except CaptionDecodeError:
            continue
        assert name.startswith("word-ngram") and coder.encode(text) == data


def test_word_ngram_accepts_exactly_its_own_outputs():
    """decode(data) returns a text only if encode(text) == data; damage is caught only when the
    damaged bytes are not themselves an encoding (a near-optimal code has little redundancy)."""
    coder = get_coder("word-ngram-v1")
    for text in EVAL[:50] + EDGE_CASES[:6]:
        data = coder.encode(text)
        if not data.startswith(b"\xff"):  # modelled: zero padding leaves the value, not the length
            for zeros in (b"\x00", b"\x00\x00"):
                with pytest.raises(CaptionDecodeError, match="word-ngram-v1: corrupt, truncated or padded"):
                    coder.decode(data + zeros)
        damaged = [data[:cut] for cut in range(len(data))] + [data + b"\xff", data + b"\x00"]
        damaged += [bytes([data[0] ^ 0x10]) + data[1:]] if data else []
        for bad in damaged:
            try:
                assert coder.encode(coder.decode(bad)) == bad
            except CaptionDecodeError:
                pass


def test_crc8_catches_truncation():
    coder = get_coder("word-ngram-v1+crc8")
    missed = total = 0
    for text in EVAL:
        data = coder.encode(text)
        for cut in range(len(data)):
            total += 1
            try:
                missed += coder.decode(data[:cut]) != text
            except CaptionDecodeError:
                pass
    assert missed <= total // 100


def test_range_coder_round_trip_and_termination():
    rng = random.Random(2)
    for _ in range(200):
        tables = []
        for _ in range(rng.randrange(1, 40)):
            freqs = [rng.randrange(1, 1000) for _ in range(rng.randrange(1, 20))]
            tables.append([0, *[sum(freqs[: i + 1]) for i in range(len(freqs))]])
        symbols = [rng.randrange(len(t) - 1) for t in tables]
        enc = RangeEncoder()
        info = math.log2(10)
        for t, s in zip(tables, symbols):
            enc.encode(t, s)
            info += math.log2(t[-1] / (t[s + 1] - t[s]))
        enc.encode_uniform(7, 10)
        data = enc.finish()
        dec = RangeDecoder(data)
        assert [dec.decode(t) for t in tables] == symbols
        assert dec.decode_uniform(10) == 7
        assert len(data) <= math.ceil(info / 8) + 1  # the shortest point: within a byte of optimal
    with pytest.raises(RangeDecodeError, match="information"):
        dec = RangeDecoder(b"")
        while True:
            dec.decode([0, 1, 2])  # no end symbol: must stop after SLACK_BITS


def test_ngram_tables_are_valid_distributions():
    words, chars = ngram.load_models(fit.NGRAM_MODEL_PATH)
    for model, history in [
        (words, [ngram.WORD_START] * 2),
        (words, ["a", "man"]),
        (words, [ngram.WORD_UNKNOWN]),
        (chars, [ngram.CHAR_START] * 2),
        (chars, ["q", "x"]),
    ]:
        cum = model.table(history)
        assert len(cum) == len(model.symbols) + 1 and cum[0] == 0 and cum[-1] <= ngram.QUANTIZED_TOTAL
        assert all(b > a for a, b in zip(cum, cum[1:]))  # every symbol has frequency >= 1


# policy ----------------------------------------------------------------------------------


def test_policy_counts_whitespace_words():
    policy = CaptionPolicy(max_tokens=3)
    assert policy.count(" a\tb\n c  ") == 3
    assert policy.apply(" a\tb\n c  ") == " a\tb\n c  "  # within the cap: unchanged
    with pytest.raises(CaptionTooLongError, match="4 tokens, more than the cap of 3"):
        policy.apply("one two three four")
    assert issubclass(CaptionTooLongError, ValueError)


def test_policy_truncation_keeps_a_prefix_ending_at_a_word():
    policy = CaptionPolicy(max_tokens=3, on_overflow="truncate")
    assert policy.apply("  one  two\tthree \n four five") == "  one  two\tthree"
    assert policy.apply("one two three four") == "one two three"
    default = CaptionPolicy(on_overflow="truncate")
    words = [f"w{i}" for i in range(40)]
    assert default.apply(" ".join(words)) == " ".join(words[:32])
    assert CaptionPolicy(max_tokens=None).apply(" ".join(words * 10)) == " ".join(words * 10)


def test_policy_with_a_custom_count():
    chars = CaptionPolicy(max_tokens=7, on_overflow="truncate", count_tokens=len)
    assert chars.apply("ab cd ef gh") == "ab cd"  # the longest word prefix of <= 7 characters
    assert chars.apply("abcdefghij") == ""
    with pytest.raises(CaptionTooLongError, match="10 tokens"):
        CaptionPolicy(max_tokens=7, count_tokens=len).apply("abcdefghij")


@pytest.mark.parametrize(
    "kwargs", [{"max_tokens": 0}, {"max_tokens": 2.5}, {"max_tokens": True}, {"on_overflow": "drop"}]
)
def test_policy_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        CaptionPolicy(**kwargs)


# caption files ---------------------------------------------------------------------------


def test_tsv_captions(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(
        "kodak/kodim01.png\ta red door \n\nkodim02.png\tleft\ttab kept\nkodim01.png\ta red door\n", encoding="utf-8"
    )
    assert load_captions(path) == {"kodim01.png": "a red door", "kodim02.png": "left\ttab kept"}
    source = CaptionFile(path)
    assert source.caption_for("/data/kodim01.png") == "a red door"
    assert source.caption_for("kodim02.jpg") == "left\ttab kept"  # unique stem
    with pytest.raises(KeyError, match=r"kodim03.png.*captions.txt"):
        source.caption_for("kodim03.png")


def test_jsonl_captions(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text(
        '{"image": "a/x.png", "caption": "café"}\n{"image": "y.png", "caption": "", "score": 1}\n', encoding="utf-8"
    )
    assert load_captions(path) == {"x.png": "café", "y.png": ""}


def test_coco_captions_take_the_smallest_annotation_id(tmp_path):
    coco = {
        "images": [
            {"id": 7, "file_name": "000007.jpg"},
            {"id": 9, "file_name": "000009.jpg"},
            {"id": 3, "file_name": "000003.jpg"},
        ],
        "annotations": [
            {"id": 50, "image_id": 7, "caption": "A dog.\n"},
            {"id": 12, "image_id": 7, "caption": "A brown dog on grass."},
            {"id": 30, "image_id": 9, "caption": "A cat."},
        ],
    }
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(coco), encoding="utf-8")
    assert load_captions(path) == {"000007.jpg": "A brown dog on grass.", "000009.jpg": "A cat."}
    with pytest.raises(KeyError, match="000003.jpg"):
        CaptionFile(path).caption_for("000003.jpg")  # an image without annotations
    coco["annotations"].append({"id": 1, "image_id": 4, "caption": "?"})
    path.write_text(json.dumps(coco), encoding="utf-8")
    with pytest.raises(CaptionFileError, match="unknown image_id 4"):
        load_captions(path)


def test_coco_captions_all_per_image_in_file_order(tmp_path):
    from percov2_jax.captions.sources import coco_captions, read_coco_captions

    coco = {
        "images": [{"id": 7, "file_name": "train/000007.jpg"}, {"id": 3, "file_name": "000003.jpg"}],
        "annotations": [
            {"id": 50, "image_id": 7, "caption": " A dog.\n"},
            {"id": 12, "image_id": 7, "caption": "A brown dog on grass."},
        ],
    }
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps(coco), encoding="utf-8")
    assert read_coco_captions(path) == {"000007.jpg": ["A dog.", "A brown dog on grass."], "000003.jpg": []}
    assert load_captions(path) == {"000007.jpg": "A brown dog on grass."}  # the smallest annotation id
    twice = {**coco, "images": coco["images"] + [{"id": 8, "file_name": "000007.jpg"}]}
    with pytest.raises(CaptionFileError, match="'000007.jpg' is listed under several image ids"):
        coco_captions(twice, "twice.json")
    bad = {**coco, "annotations": coco["annotations"] + [{"id": 1, "image_id": 3, "caption": 5}]}
    with pytest.raises(CaptionFileError, match=r"bad.json: annotations\[2\]: caption is not a string"):
        coco_captions(bad, "bad.json")


@pytest.mark.parametrize(
    "content, match",
    [
        ("x.png a dog\n", "line 1: expected 'name<TAB>caption'"),
        ("x.png\ta dog\ny.png\tok\nx.png\ta cat\n", "'x.png' has two different captions: line 1: 'a dog' and line 3"),
        ("\tno name\n", "non-empty"),
        ('{"image": "x.png", "caption": "a"}\n{"image": "y.png"\n', "line 2: not JSON"),
        ('{"image": "x.png", "text": "a"}\n', "line 1: expected an object with 'image' and 'caption'"),
        ('{"image": "x.png", "caption": 3}\n', "caption must be a string"),
        (
            '{"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 1}]}',
            "not a COCO captions file.*KeyError: 'id'",
        ),
        (
            '{"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 1, "file_name": "y.jpg"}], "annotations": []}',
            "image id 1 listed twice",
        ),
    ],
)
def test_caption_file_errors(tmp_path, content, match):
    path = tmp_path / "captions.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CaptionFileError, match=match):
        load_captions(path)


def test_ambiguous_stem_and_fixed_caption(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("x.png\tone\nx.jpg\ttwo\n", encoding="utf-8")
    with pytest.raises(KeyError, match="ambiguous"):
        CaptionFile(path).caption_for("x.webp")
    assert FixedCaption("a dog").caption_for("anything.png") == "a dog"
    assert image_key("a\\b/c.d.png") == "c.d.png"


# captioner -------------------------------------------------------------------------------


@pytest.mark.slow
def test_package_imports_without_torch():
    code = "import sys, percov2_jax.captions, percov2_jax.captions.captioner; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_captioner_needs_a_local_folder(tmp_path):
    from percov2_jax.captions.captioner import Blip2Captioner

    with pytest.raises(FileNotFoundError, match="does not exist.*never downloads"):
        Blip2Captioner(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="Salesforce/blip2-opt-2.7b.*does not exist"):
        Blip2Captioner("Salesforce/blip2-opt-2.7b")  # a hub name is not a folder: no download
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Blip2Captioner(tmp_path)


def save_tiny_blip2(folder) -> None:
    """A random 1-layer BLIP-2 (OPT) whose language model always says "cat", with its processor."""
    import torch
    from tiny_captioners import tiny_blip2

    words = ["<pad>", "<unk>", "</s>", "<s>", "a", "cat", "dog"]
    model, processor = tiny_blip2(words)
    decoder = model.language_model.model.decoder
    with torch.no_grad():  # constant hidden state e; the (tied) output rows are 0 except "cat" = e
        e = torch.linspace(0.5, 1.5, 32)
        decoder.final_layer_norm.weight.zero_()
        decoder.final_layer_norm.bias.copy_(e)
        decoder.embed_tokens.weight.zero_()
        decoder.embed_tokens.weight[words.index("cat")] = e
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def test_blip2_captioner_with_a_tiny_local_model(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image

    from percov2_jax.captions.captioner import Blip2Captioner

    save_tiny_blip2(tmp_path)
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    assert Blip2Captioner(tmp_path, max_new_tokens=3).caption(image) == "cat cat cat"
    assert Blip2Captioner(tmp_path).caption_for(tmp_path / "photo.png") == " ".join(["cat"] * 32)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="does not load as a BLIP-2"):
        Blip2Captioner(tmp_path)
