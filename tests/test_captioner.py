"""Automatic captions: `captions.captioner.Captioner` on tiny random transformers models built
offline (BLIP-2 with an OPT decoder, and ViT-GPT2 as a `VisionEncoderDecoderModel`), and
``percov2 compress --captioner``: batched captions equal one-by-one captions and a direct
``generate`` call exactly (greedy decoding, same weights); the command writes OUT/captions.tsv
and sends those captions in the streams; an image without any caption source gets the empty
caption, said once; bad folders and flag combinations stop with one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_captioners import tiny_blip2, word_tokenizer

pytest.importorskip("torch")
pytest.importorskip("transformers")

WORDS = ["<pad>", "<unk>", "</s>", "<s>", *"a cat dog on sofa red blue tree house man sky road with".split()]
PAD, UNK, EOS, BOS = range(4)
SIZE = 32  # the models' input side, pixels


def scramble(model, skip: tuple[str, ...] = ()) -> None:
    """Redraws the weights large (normal, std 1 for matrices, 0.2 for vectors; layer norms kept),
    so greedy captions depend on the image instead of repeating one token."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "layer_norm" not in name and "layernorm" not in name and not name.endswith(skip):
                weight.normal_(0, 1.0 if weight.ndim >= 2 else 0.2)


def save_tiny_blip2(folder) -> None:
    """A random 1-layer BLIP-2 (OPT decoder) with its Blip2Processor, saved to ``folder``."""
    model, processor = tiny_blip2(WORDS, SIZE)
    scramble(model)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def save_tiny_vit_gpt2(folder) -> None:
    """A random ViT encoder + GPT-2 decoder (`VisionEncoderDecoderModel`), its ViT image processor
    and tokenizer, but no processor class: the layout of e.g. vit-gpt2 image-captioning models."""
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tokenizer = word_tokenizer(WORDS)
    encoder = ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE, patch_size=16
    )
    decoder = GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer), n_positions=64, bos_token_id=BOS, eos_token_id=EOS
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = BOS, PAD, EOS
    model = VisionEncoderDecoderModel(config=config).eval()
    scramble(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip2")
    save_tiny_blip2(folder)
    return folder


@pytest.fixture(scope="module")
def photos():
    """Three built-in photographs, 64 x 64 (one token grid size: one compile)."""
    from percov2_jax.data.builtin import BuiltinPhotos

    source = BuiltinPhotos()
    return [np.asarray(Image.fromarray(source[i]["image"]).resize((64, 64), Image.BICUBIC)) for i in range(3)]


def generate_directly(folder, images, max_new_tokens: int) -> list[str]:
    """Captions from the transformers auto classes' own processor and ``generate`` (the reference)."""
    import torch
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    if not isinstance(processor, transformers.ProcessorMixin):
        image_processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        inputs = image_processor(images=[Image.fromarray(x) for x in images], return_tensors="pt")
        processor = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        inputs = processor(images=[Image.fromarray(x) for x in images], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


def test_blip2_batched_captions_equal_one_by_one_and_generate(blip2_folder, photos, tmp_path):
    from percov2_jax.captions.captioner import Blip2Captioner, Captioner

    captioner = Captioner(blip2_folder, max_new_tokens=12)
    assert type(captioner.model).__name__ == "Blip2ForConditionalGeneration"
    batched = captioner.captions(photos)
    assert len(set(batched)) == 3 and all(batched)  # the check has teeth: captions differ per image
    assert batched == [captioner.caption(x) for x in photos]
    assert batched == generate_directly(blip2_folder, photos, 12)
    assert Blip2Captioner(blip2_folder, max_new_tokens=12).captions(photos) == batched
    paths = []
    for i, x in enumerate(photos):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(x).save(paths[-1])
    assert captioner.captions_for(paths, batch_size=2) == batched  # batches of 2 and 1
    assert captioner.caption_for(paths[1]) == batched[1]
    assert captioner.captions([]) == []


def test_any_image_to_text_model(tmp_path, photos):
    """A folder without a processor class (image processor + tokenizer) loads too."""
    from percov2_jax.captions.captioner import Blip2Captioner, Captioner

    save_tiny_vit_gpt2(tmp_path)
    captioner = Captioner(tmp_path, max_new_tokens=6)
    assert type(captioner.model).__name__ == "VisionEncoderDecoderModel"
    batched = captioner.captions(photos)
    assert batched == [captioner.caption(x) for x in photos] == generate_directly(tmp_path, photos, 6)
    assert len(set(batched)) > 1
    with pytest.raises(ValueError, match="does not load as a BLIP-2 model"):
        Blip2Captioner(tmp_path)


def test_captioner_errors(tmp_path, monkeypatch):
    from percov2_jax.captions.captioner import Captioner

    with pytest.raises(FileNotFoundError, match="does not exist.*never downloads"):
        Captioner(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Captioner(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # not an image-to-text model
    with pytest.raises(ValueError, match="does not load as an image-to-text model and processor"):
        Captioner(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(ImportError, match="needs torch and transformers"):
        Captioner(tmp_path)


# percov2 compress ---------------------------------------------------------------------------


def compress_args(input_path, output, *extra, checkpoint="/nonexistent/run"):
    return ["compress", str(input_path), "-o", str(output), "--checkpoint", str(checkpoint), *extra]


def test_command_line_caption_flag_errors(blip2_folder, tmp_path):
    """Checked before any model loads (the checkpoint here does not exist)."""
    from percov2_jax import cli

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "captions.tsv").write_text("a.png\ta cat\n")
    image, out = tmp_path / "a.png", tmp_path / "a.pcv2"
    cases = [
        (["--captioner", str(blip2_folder), "--caption", "x"], "--captioner cannot be combined"),
        (["--captioner", str(blip2_folder), "--captions", str(tmp_path / "captions.tsv")], "cannot be combined"),
        (["--captioner", str(tmp_path / "missing")], "--captioner: .*missing.* does not exist.*never downloads"),
        (["--captioner", str(tmp_path)], "--captioner: .*has no config.json"),
        (["--captioner", str(blip2_folder), "--captioner-batch", "0"], "--captioner-batch must be at least 1"),
    ]
    for extra, match in cases:
        with pytest.raises(SystemExit, match=match):
            cli.main(compress_args(image, out, *extra))
    assert not out.exists()
    # The streams' folder must not overwrite the --captions file with its record.
    with pytest.raises(SystemExit, match="is the --captions file"):
        cli.main(compress_args(tmp_path, tmp_path, "--captions", str(tmp_path / "captions.tsv")))
    assert (tmp_path / "captions.tsv").read_text() == "a.png\ta cat\n"


@pytest.mark.integration
def test_command_line_captioner(stage1_workdir, blip2_folder, photos, tmp_path, capsys):
    """A folder of 3 photos (one in a subfolder), captioned in batches of 2: OUT/captions.tsv
    holds the captions the streams carry, and reads back as a --captions file."""
    from percov2_jax import cli
    from percov2_jax.captions import load_captions
    from percov2_jax.captions.captioner import Captioner
    from percov2_jax.codec import bitstream

    names = ["a.png", "b.jpg", "sub/c.png"]
    for name, x in zip(names, photos):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(tmp_path / "in" / name, quality=95)
    from percov2_jax.data.sources import read_image

    expected = Captioner(blip2_folder).captions([read_image(tmp_path / "in" / n) for n in names])  # one batch
    assert len(set(expected)) == 3
    out = tmp_path / "out"
    flags = ["--captioner", str(blip2_folder), "--captioner-batch", "2"]
    assert cli.main(compress_args(tmp_path / "in", out, *flags, checkpoint=stage1_workdir)) == 0
    lines = (out / "captions.tsv").read_text(encoding="utf-8").splitlines()
    assert lines == [f"{n}\t{c}" for n, c in zip(names, expected)]
    assert load_captions(out / "captions.tsv") == {n.split("/")[-1]: c for n, c in zip(names, expected)}
    for name, caption in zip(names, expected):
        stream = (out / name).with_suffix(".pcv2").read_bytes()
        assert bitstream.unpack(stream).caption() == caption
    assert "no caption given" not in capsys.readouterr().err
    # One file: the summary line names the caption sent.
    single = compress_args(tmp_path / "in" / "a.png", tmp_path / "a.pcv2", *flags[:2], checkpoint=stage1_workdir)
    assert cli.main(single) == 0
    assert capsys.readouterr().out.strip().endswith(f"caption {expected[0]!r}")


@pytest.mark.integration
def test_command_line_without_captions_says_so_once(stage1_workdir, photos, tmp_path, capsys):
    from percov2_jax import cli
    from percov2_jax.codec import bitstream

    (tmp_path / "in").mkdir()
    for i, x in enumerate(photos):
        Image.fromarray(x).save(tmp_path / "in" / f"{i}.png")
    assert cli.main(compress_args(tmp_path / "in", tmp_path / "out", checkpoint=stage1_workdir)) == 0
    err = capsys.readouterr().err
    message = "percov2 compress: no caption given (--caption, --captions or --captioner): coding the empty caption"
    assert err.count(message) == 1, err
    assert (tmp_path / "out" / "captions.tsv").read_text() == "0.png\t\n1.png\t\n2.png\t\n"
    for i in range(3):
        assert bitstream.unpack((tmp_path / "out" / f"{i}.pcv2").read_bytes()).caption() == ""


@pytest.mark.slow
def test_command_line_imports_no_torch():
    code = (
        "import sys; from percov2_jax import cli; cli.build_parser().parse_args(['compress', 'x', '-o', 'y', "
        "'--checkpoint', 'z', '--captioner', 'm']); assert not {'torch', 'transformers'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
