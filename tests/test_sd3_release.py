"""The tiny SD3 releases of ``tests/sd3_release.py`` are real releases, and the converter reads them.

Reference: diffusers' own loaders. ``StableDiffusion3Pipeline.from_pretrained`` loads each
variant's folder and generates; diffusers' single-file loader reads ``make_single_file``'s file
back to the folder's exact weights. Then ``percov2_jax.pretrained.convert`` converts both the
folder and the single file; the two checkpoints' params are equal bit for bit (float16 values
upcast to float32 exactly), for every component.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from sd3_release import RELEASE_NAMES, make_release, make_single_file, read_component, single_file_overrides

from percov2_jax import pretrained

pytestmark = pytest.mark.parity  # against PyTorch reference models (diffusers, transformers)

PROMPT = "a photo of a red fox sitting in the snow"
T5_LENGTH = 32  # tokens of T5 context in the pipeline run (the release's default is 256)
COMPONENTS = ["clip_g", "clip_l", "t5", "transformer", "vae"]


@pytest.fixture(scope="module", params=list(RELEASE_NAMES))
def release(request, tmp_path_factory):
    """One built release per variant (module-scoped: each variant is built once)."""
    return request.param, make_release(tmp_path_factory.mktemp(request.param), request.param, seed=7)


@pytest.fixture(scope="module")
def folder_checkpoint(release, tmp_path_factory):
    """``pretrained.convert`` of the release folder: (summary, checkpoint path)."""
    variant, folder = release
    ckpt = tmp_path_factory.mktemp(f"{variant}_ckpt") / "ckpt"
    return pretrained.convert(str(folder), str(ckpt), progress=False), ckpt


def test_layout_and_float16(release):
    variant, folder = release
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    shards = sorted((folder / "text_encoder_3").glob("model-*-of-*.safetensors"))
    weight_map = json.loads((folder / "text_encoder_3" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(shards) >= 2 and sorted(set(weight_map.values())) == [s.name for s in shards]
    for sub in ("tokenizer", "tokenizer_2"):
        assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (folder / sub).iterdir()}
    assert (folder / "tokenizer_3" / "tokenizer.json").is_file()
    dtypes = {}
    for path in folder.glob("*/*.safetensors"):
        with safe_open(path, "np") as f:
            dtypes |= {f"{path.parent.name}/{k}": f.get_slice(k).get_dtype() for k in f.keys()}
    assert {p.split("/")[0] for p in dtypes} == {
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    }
    assert set(dtypes.values()) == {"F16"}, {k: v for k, v in dtypes.items() if v != "F16"}
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 1.5305, 0.0609)
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    assert transformer["qk_norm"] == (None if variant == "sd3_medium" else "rms_norm")
    assert bool(transformer["dual_attention_layers"]) == (variant == "sd35_medium")


def test_diffusers_generates_from_the_folder(release):
    from diffusers import StableDiffusion3Pipeline
    from transformers import AutoTokenizer

    _, folder = release
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    # Every word of the prompt is one T5 piece: the tokenizer covers caption words, no <unk>.
    t5 = AutoTokenizer.from_pretrained(folder / "tokenizer_3", local_files_only=True)
    assert len(t5.tokenize(PROMPT)) == len(PROMPT.split()) and t5.unk_token_id not in t5(PROMPT)["input_ids"]
    image = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=T5_LENGTH,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0


def test_diffusers_reads_the_single_file(release, tmp_path):
    """diffusers' single-file loader (its own original -> diffusers renames, CLIP-L's identity
    projection) gives back the folder's weights exactly: the file is in the original layout."""
    from diffusers import StableDiffusion3Pipeline

    _, folder = release
    single = make_single_file(folder, tmp_path / "sd3_incl_clips_t5xxlfp16.safetensors")
    with safe_open(single, "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    pipe = StableDiffusion3Pipeline.from_single_file(
        str(single), config=str(folder), torch_dtype=torch.float16, local_files_only=True
    )
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        want, got = read_component(folder / sub), getattr(pipe, sub).state_dict()
        assert set(want) <= set(got), sorted(set(want) - set(got))
        for k in want:
            np.testing.assert_array_equal(got[k].numpy(), want[k], err_msg=f"{sub}: {k}")


def test_converts_from_the_folder(release, folder_checkpoint):
    _, folder = release
    summary, ckpt = folder_checkpoint
    assert sorted(summary) == COMPONENTS
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    for field in ("num_layers", "qk_norm", "dual_attention_layers", "joint_attention_dim", "pooled_projection_dim"):
        assert summary["transformer"]["config"][field] == transformer[field], field
    assert sorted(p.name for p in (ckpt / "tokenizers").iterdir()) == ["clip_g", "clip_l", "t5"]


# One variant (the one with the most renames: qk-norm and dual attention): each costs ~12 s of
# conversion and checkpoint loading on 2 cores; all three pass.
@pytest.mark.parametrize("release", ["sd35_medium"], indirect=True)
def test_folder_and_single_file_convert_to_the_same_params(release, folder_checkpoint, tmp_path):
    variant, folder = release
    single = make_single_file(folder, tmp_path / "sd3_single.safetensors")
    pretrained.convert(
        str(single), str(tmp_path / "from_file"), config_overrides=single_file_overrides(variant), progress=False
    )
    from_folder, from_file = pretrained.load(folder_checkpoint[1]), pretrained.load(tmp_path / "from_file")
    assert sorted(from_folder) == sorted(from_file) == COMPONENTS
    for name in COMPONENTS:
        (module, params), (file_module, file_params) = from_folder[name], from_file[name]
        assert module.config == file_module.config, name
        assert jax.tree.structure(params) == jax.tree.structure(file_params), name
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, file_params)
