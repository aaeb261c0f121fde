"""The CLIP vision tower, its converter and the CLIP score against transformers (torch, CPU).

References: tiny random ``CLIPVisionModelWithProjection`` (quick_gelu as OpenAI's, gelu as
OpenCLIP exports) and ``CLIPModel``; ``CLIPImageProcessorPil`` on real photos (skimage).
Tolerances: float32 max |ours - ref| <= 1e-5 * max |ref| on ``image_embeds``,
``last_hidden_state`` and every hidden state; scores within 1e-3 absolute (scores are x100);
``preprocess`` equals the processor exactly; ``preprocess_jax`` within ``JAX_PREPROCESS_TOL``.
"""

from __future__ import annotations

import json

import clip_setup
import jax
import numpy as np
import pytest
import torch
from torch_reference import max_rel_error, randomize_
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from percov2_jax.convert import ConversionError
from percov2_jax.convert.clip_vision_weights import load_clip_model, load_clip_scorer, load_clip_vision
from percov2_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from percov2_jax.metrics import clip_score as cs

pytestmark = pytest.mark.parity  # against PyTorch reference models

F32_TOL = 1e-5
JAX_PREPROCESS_TOL = 0.1  # max, normalised units (1/255 is ~0.015; measured 0.071 astronaut, 0.015 chelsea)
JAX_PREPROCESS_MEAN_TOL = 0.01  # mean |diff| (measured 0.0037, 0.0044)
VISION_CONFIGS = {
    "quick_gelu": dict(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=30,
        patch_size=6,
        hidden_act="quick_gelu",
    ),
    "gelu": dict(
        hidden_size=40,
        intermediate_size=52,
        projection_dim=16,
        num_hidden_layers=2,
        num_attention_heads=5,
        image_size=28,
        patch_size=7,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    ),
}


def _photos():
    from skimage import data

    return [data.astronaut(), data.chelsea()]  # 512x512 and 300x451


@pytest.fixture(scope="module", params=list(VISION_CONFIGS))
def vision_case(request, tmp_path_factory):
    model = randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIGS[request.param])), seed=91)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    c = VISION_CONFIGS[request.param]
    return dict(
        model=model, folder=folder, size=c["image_size"], positions=(c["image_size"] // c["patch_size"]) ** 2 + 1
    )


def test_vision_parity_float32(vision_case):
    s = vision_case["size"]
    pixels = np.random.RandomState(0).randn(3, s, s, 3).astype(np.float32)
    module, params = load_clip_vision(vision_case["folder"])
    ours = jax.jit(module.apply)({"params": params}, pixels)
    with torch.no_grad():
        ref = vision_case["model"](torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    assert max_rel_error(ours.image_embeds, ref.image_embeds.numpy()) <= F32_TOL
    assert max_rel_error(ours.last_hidden_state, ref.last_hidden_state.numpy()) <= F32_TOL
    assert len(ours.hidden_states) == len(ref.hidden_states)
    for o, r in zip(ours.hidden_states, ref.hidden_states):
        assert max_rel_error(o, r.numpy()) <= F32_TOL


def test_wrong_image_size_is_loud(vision_case):
    module, params = load_clip_vision(vision_case["folder"])
    with pytest.raises(ValueError, match="NHWC"):
        module.apply({"params": params}, np.zeros((1, 3, vision_case["size"], vision_case["size"]), np.float32))


# ---------------------------------------------------------------- converter ------------------


def _copy_folder(src, dst, state):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    write_safetensors(dst / "model.safetensors", state)
    return dst


def test_converter_errors_are_loud(vision_case, tmp_path):
    src = vision_case["folder"]
    state = dict(SafetensorsFile(src / "model.safetensors").items())
    n = vision_case["positions"]
    good = dict(state, **{"vision_model.embeddings.position_ids": np.arange(n, dtype=np.int64)[None]})
    load_clip_vision(_copy_folder(src, tmp_path / "ok", good))  # an arange position_ids buffer is accepted
    bad_ids = dict(good, **{"vision_model.embeddings.position_ids": np.arange(n, dtype=np.int64)[None, ::-1].copy()})
    with pytest.raises(ConversionError, match="position_ids is not arange"):
        load_clip_vision(_copy_folder(src, tmp_path / "ids", bad_ids))
    broken = dict(state)
    del broken["vision_model.post_layernorm.bias"]
    broken["vision_model.encoder.layers.0.mlp.fc3.weight"] = np.zeros((4, 4), np.float32)
    broken["vision_model.embeddings.class_embedding"] = np.zeros((7,), np.float32)
    broken["logit_scale"] = np.zeros((), np.float32)  # a CLIPModel key in a vision-only checkpoint
    with pytest.raises(ConversionError) as info:
        load_clip_vision(_copy_folder(src, tmp_path / "broken", broken))
    msg = str(info.value)
    for expected in (
        "vision_model.encoder.layers.0.mlp.fc3.weight",
        "vision_model/post_layernorm/bias",
        "vision_model.embeddings.class_embedding: checkpoint shape [7]",
        "logit_scale",
    ):
        assert expected in msg, expected
    write_safetensors(tmp_path / "lone.safetensors", state)
    with pytest.raises(ConversionError, match="needs config="):
        load_clip_vision(tmp_path / "lone.safetensors")
    _, from_file = load_clip_vision(tmp_path / "lone.safetensors", config=json.loads((src / "config.json").read_text()))
    _, from_folder = load_clip_vision(src)
    jax.tree.map(np.testing.assert_array_equal, from_file, from_folder)


# ---------------------------------------------------------------- CLIPModel + score ----------


@pytest.fixture(scope="module")
def clip_case(tmp_path_factory):
    return clip_setup.tiny_clip(tmp_path_factory.mktemp("clip_model"))


CAPTIONS = ["a woman in a space suit", "a cat", "a very long caption " + "with many words " * 10]


def test_clip_score_matches_transformers_clipmodel(clip_case):
    from transformers import CLIPImageProcessorPil

    images = _photos() + [_photos()[1][::-1]]
    scorer = load_clip_scorer(clip_case["folder"], clip_case["tokenizer_folder"])
    ours = np.asarray(scorer(images, CAPTIONS))
    # torchmetrics' recipe: processor, untruncated tokens cut to max_position_embeddings, CLIPModel.
    processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    text = clip_case["tokenizer"](CAPTIONS, padding=True, return_tensors="pt")
    ids, mask = text["input_ids"][:, :24], text["attention_mask"][:, :24]
    with torch.no_grad():
        out = clip_case["model"](input_ids=ids, attention_mask=mask, pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()  # both already unit-normalised
    ref = 100 * np.maximum(cos, 0)
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    np.testing.assert_allclose(
        np.asarray(cs.torchmetrics_clip_score(scorer.image_embeds(images), scorer.text_embeds(CAPTIONS))),
        max(100 * cos.mean(), 0),
        atol=1e-3,
    )
    # The projected embeddings themselves (not only their cosines).
    with torch.no_grad():
        ref_img = clip_case["model"].get_image_features(pixels).pooler_output.numpy()
        ref_txt = clip_case["model"].get_text_features(ids, mask).pooler_output.numpy()
    assert max_rel_error(scorer.image_embeds(images), ref_img) <= F32_TOL
    assert max_rel_error(scorer.text_embeds(CAPTIONS), ref_txt) <= F32_TOL


def test_clip_model_vision_only_and_text_side_loud(clip_case, tmp_path):
    """A CLIPModel folder also loads as the vision tower alone; a vision-only folder is not a CLIPModel."""
    module, params = load_clip_vision(clip_case["folder"])
    assert module.config.projection_dim == 16 and params["visual_projection"]["kernel"].shape == (40, 16)
    vision_only = tmp_path / "vision_only"
    vision_only.mkdir()
    cfg = json.loads((clip_case["folder"] / "config.json").read_text())
    cfg["architectures"] = ["CLIPVisionModelWithProjection"]
    (vision_only / "config.json").write_text(json.dumps(cfg))
    state = dict(SafetensorsFile(clip_case["folder"] / "model.safetensors").items())
    write_safetensors(vision_only / "model.safetensors", state)
    with pytest.raises(ConversionError, match="text_model.embeddings.token_embedding.weight"):
        load_clip_vision(vision_only)
    with pytest.raises(ConversionError, match="expected CLIPModel"):
        load_clip_model(vision_only)


def test_clip_score_definition():
    img = np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]], np.float32)
    txt = np.array([[2.0, 0.0], [-1.0, 0.0], [4.0, 3.0]], np.float32)
    np.testing.assert_allclose(np.asarray(cs.clip_score(img, txt)), [100.0, 0.0, 96.0], rtol=1e-6)
    np.testing.assert_allclose(float(cs.torchmetrics_clip_score(img, txt)), (100 - 100 + 96) / 3, rtol=1e-6)


# ---------------------------------------------------------------- preprocessing --------------


def test_preprocess_equals_clip_image_processor_on_photos():
    from transformers import CLIPImageProcessorPil

    photos = _photos()
    ref = CLIPImageProcessorPil()(images=photos, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = cs.preprocess(photos, 224)
    assert ours.shape == ref.shape == (2, 224, 224, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)
    # The in-graph approximation, per photo (they differ in size).
    errs = [np.abs(np.asarray(cs.preprocess_jax(p[None] / 255.0, 224))[0] - r) for p, r in zip(photos, ref)]
    assert max(e.max() for e in errs) <= JAX_PREPROCESS_TOL
    assert max(e.mean() for e in errs) <= JAX_PREPROCESS_MEAN_TOL
