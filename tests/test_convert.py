"""The converter: both front-ends agree, strictness (every bad key is named), sharded folders,
half-precision upcasts, the ``percov2 convert`` command and ``percov2_jax.pretrained``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from torch_reference import SD3_VARIANTS, max_rel_error, nhwc, sd3_to_original, tiny_sd3, tiny_vae, vae_to_original

from percov2_jax import pretrained
from percov2_jax.convert import CheckpointFormatError, ConversionError, load_diffusers_component, load_single_file
from percov2_jax.convert.safetensors_io import SafetensorsFile, write_safetensors

pytestmark = pytest.mark.parity  # against PyTorch reference models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A diffusers-format SD3 pipeline folder with tiny random transformer and VAE."""
    root = tmp_path_factory.mktemp("pipeline")
    transformer, vae = tiny_sd3("sd3_medium", seed=31), tiny_vae(seed=32)
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return dict(root=root, transformer=transformer, vae=vae)


# ------------------------------------------------------------------ front-ends agree ---------


@pytest.mark.parametrize("variant", list(SD3_VARIANTS))
def test_single_file_and_diffusers_folder_agree(variant, tmp_path):
    transformer, vae = tiny_sd3(variant, seed=41), tiny_vae(seed=42)
    transformer.save_pretrained(tmp_path / "transformer")
    vae.save_pretrained(tmp_path / "vae")
    original = {
        **sd3_to_original(_numpy_state(transformer), transformer.config.num_layers),
        **vae_to_original(_numpy_state(vae), len(vae.config.block_out_channels)),
    }
    write_safetensors(tmp_path / "sd3_single.safetensors", original)

    # Weights do not reveal head_dim without qk-norm, nor the VAE's group count or tiling size: give them.
    overrides = {"vae": {"norm_num_groups": 4, "sample_size": 32}}
    if transformer.config.qk_norm is None:
        overrides["transformer"] = {"attention_head_dim": 8}
    single = load_single_file(tmp_path / "sd3_single.safetensors", config_overrides=overrides)
    assert sorted(single) == ["transformer", "vae"]
    for name in ("transformer", "vae"):
        module, params = load_diffusers_component(tmp_path / name)
        s_module, s_params = single[name]
        # Config inferred from the keys (depth, dual layers, qk-norm, sample_size ...) is diffusers' config.
        assert s_module.config == module.config, name
        _assert_same_tree(s_params, params)


def test_single_file_component_selection_and_unknown_prefixes(pipeline, tmp_path):
    original = sd3_to_original(_numpy_state(pipeline["transformer"]), 3)
    # A bundled text encoder that is incomplete is converted (by default) and named in the error.
    original["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = np.ones(4, np.float32)
    write_safetensors(tmp_path / "bundle.safetensors", original)
    with pytest.raises(ConversionError, match="cannot infer the head count"):
        load_single_file(tmp_path / "bundle.safetensors")
    with pytest.raises(ConversionError, match="text_model.embeddings.token_embedding.weight"):
        load_single_file(tmp_path / "bundle.safetensors", config_overrides={"transformer": {"attention_head_dim": 8}})
    out = load_single_file(
        tmp_path / "bundle.safetensors",
        components=("transformer",),
        config_overrides={"transformer": {"attention_head_dim": 8}},
    )
    assert list(out) == ["transformer"]
    with pytest.raises(ConversionError, match=r"components \['vae'\] not in the file"):
        load_single_file(tmp_path / "bundle.safetensors", components=("vae",))
    original["cond_stage_model.foo"] = np.ones(2, np.float32)
    write_safetensors(tmp_path / "unknown.safetensors", original)
    with pytest.raises(ConversionError, match="cond_stage_model.foo"):
        load_single_file(tmp_path / "unknown.safetensors")


# ------------------------------------------------------------------ strictness ---------------


def _folder_with(tmp_path, pipeline, edit):
    folder = tmp_path / "transformer"
    shutil.copytree(pipeline["root"] / "transformer", folder)
    state = dict(SafetensorsFile(folder / WEIGHTS).items())
    edit(state)
    write_safetensors(folder / WEIGHTS, state)
    return folder


def test_missing_extra_and_misshaped_keys_are_all_named(pipeline, tmp_path):
    def edit(state):
        del state["transformer_blocks.1.attn.to_k.weight"]
        state["transformer_blocks.0.attn.to_z.weight"] = np.zeros((16, 16), np.float32)
        state["context_embedder.weight"] = np.zeros((16, 11), np.float32)

    folder = _folder_with(tmp_path, pipeline, edit)
    with pytest.raises(ConversionError) as info:
        load_diffusers_component(folder)
    msg = str(info.value)
    assert "1 unknown checkpoint keys" in msg and "transformer_blocks.0.attn.to_z.weight" in msg
    assert "1 missing parameters" in msg and "transformer_blocks_1/attn/to_k/kernel" in msg
    assert "1 shape mismatches" in msg and "context_embedder.weight: checkpoint shape [16, 11]" in msg


def test_missing_stacked_layer_is_named(pipeline, tmp_path):
    folder = _folder_with(tmp_path, pipeline, lambda s: s.pop("transformer_blocks.0.ff.net.2.bias"))
    with pytest.raises(ConversionError, match=r"transformer_blocks_0_to_1/ff/net_2/bias layers \[0\] of 2"):
        load_diffusers_component(folder, scan_layers=True)


def test_truncated_and_corrupt_files(pipeline, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(pipeline["root"] / "transformer", folder)
    path = folder / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointFormatError, match="file is truncated"):
        load_diffusers_component(folder)
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointFormatError, match="corrupt safetensors header"):
        load_diffusers_component(folder)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_diffusers_component(folder)


def test_folder_errors(tmp_path, pipeline):
    with pytest.raises(ConversionError, match="no config.json"):
        load_diffusers_component(tmp_path)
    folder = tmp_path / "t"
    shutil.copytree(pipeline["root"] / "transformer", folder)
    os.remove(folder / WEIGHTS)
    with pytest.raises(ConversionError, match="no diffusion_pytorch_model.safetensors"):
        load_diffusers_component(folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ConversionError, match="unsupported component class 'UNet2DConditionModel'"):
        load_diffusers_component(folder)


# ------------------------------------------------------------------ formats ------------------


def test_sharded_folder_equals_single_file(pipeline, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(pipeline["root"] / "transformer" / "config.json", folder)
    state = dict(SafetensorsFile(pipeline["root"] / "transformer" / WEIGHTS).items())
    keys = sorted(state)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, part in shards.items():
        write_safetensors(folder / name, {k: state[k] for k in part})
        weight_map.update({k: name for k in part})
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, sharded = load_diffusers_component(folder)
    _, single = load_diffusers_component(pipeline["root"] / "transformer")
    _assert_same_tree(sharded, single)
    os.remove(folder / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(ConversionError, match="shard files that do not exist"):
        load_diffusers_component(folder)


@pytest.mark.parametrize("torch_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_upcast_exactly(pipeline, tmp_path, torch_dtype):
    import copy

    half = copy.deepcopy(pipeline["transformer"]).to(torch_dtype)
    half.save_pretrained(tmp_path / "half")
    stored = SafetensorsFile(tmp_path / "half" / WEIGHTS)
    assert stored.dtype("proj_out.weight") == (np.float16 if torch_dtype == torch.float16 else ml_dtypes.bfloat16)
    _, params = load_diffusers_component(tmp_path / "half")
    kernel = np.asarray(params["proj_out"]["kernel"])
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, half.proj_out.weight.detach().float().numpy().T)
    _, bf16_params = load_diffusers_component(tmp_path / "half", param_dtype=jnp.bfloat16)
    assert bf16_params["proj_out"]["kernel"].dtype == jnp.bfloat16


# ------------------------------------------------------------------ tool and checkpoints -----


def _sd3_reference(transformer):
    rng = np.random.RandomState(7)
    x = dict(
        latents=rng.randn(1, 8, 12, 16).astype(np.float32),
        context=rng.randn(1, 3, 12).astype(np.float32),
        pooled=rng.randn(1, 10).astype(np.float32),
        timestep=np.array([500.0], np.float32),
    )
    with torch.no_grad():
        ref = transformer(
            torch.from_numpy(x["latents"].transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(x["context"]),
            torch.from_numpy(x["pooled"]),
            torch.from_numpy(x["timestep"]),
        ).sample
    return x, nhwc(ref)


@pytest.mark.slow
def test_convert_tool_end_to_end(pipeline, tmp_path):
    dst = tmp_path / "sd3_flax"
    result = subprocess.run(
        [sys.executable, "-m", "percov2_jax.cli", "convert", "--input", str(pipeline["root"]), "--output", str(dst)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformer:" in result.stdout and "wrote" in result.stdout
    loaded = pretrained.load(dst)
    assert sorted(loaded) == ["transformer", "vae"]
    module, params = loaded["transformer"]
    x, ref = _sd3_reference(pipeline["transformer"])
    out = module.apply({"params": params}, x["latents"], x["context"], x["pooled"], x["timestep"])
    assert max_rel_error(out, ref) <= 1e-5
    vae_module, vae_params = loaded["vae"]
    images = np.random.RandomState(3).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref_mean = pipeline["vae"].encode(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).latent_dist.mean
    mean, _ = vae_module.apply({"params": vae_params}, images, method="encode")
    assert max_rel_error(mean, nhwc(ref_mean)) <= 1e-5


def test_checkpoint_layout_and_dtype_options(pipeline, tmp_path):
    dst = tmp_path / "bf16_scanned"
    summary = pretrained.convert(str(pipeline["root"]), str(dst), dtype="bfloat16", scan_layers=True, progress=False)
    assert (
        summary["transformer"]["params"]
        == sum(p.numel() for p in pipeline["transformer"].parameters())
        + pipeline["transformer"].pos_embed.pos_embed.numel()
    )
    module, params = pretrained.load(dst, components=("transformer",))["transformer"]
    assert module.scan_layers and "transformer_blocks_0_to_1" in params
    assert params["proj_out"]["kernel"].dtype == jnp.bfloat16
    # Asking for the other layout converts it on load.
    loop_module, loop_params = pretrained.load(
        dst, components=("transformer",), options={"transformer": {"scan_layers": False}}
    )["transformer"]
    assert not loop_module.scan_layers and "transformer_blocks_1" in loop_params
    _assert_same_tree(
        loop_params["transformer_blocks_1"], jax.tree.map(lambda a: a[1], params["transformer_blocks_0_to_1"])
    )
    with pytest.raises(FileExistsError):
        pretrained.convert(str(pipeline["root"]), str(dst), progress=False)


def test_checkpoint_load_errors(tmp_path, pipeline):
    with pytest.raises(pretrained.CheckpointError, match="no such checkpoint directory"):
        pretrained.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pretrained.CheckpointError, match="not a percov2-jax checkpoint"):
        pretrained.load(tmp_path / "empty")
    dst = tmp_path / "ok"
    pretrained.convert(str(pipeline["root"] / "vae"), str(dst), progress=False)
    with pytest.raises(pretrained.CheckpointError, match=r"components \['transformer'\] not in the checkpoint"):
        pretrained.load(dst, components=("transformer",))


def test_pipeline_with_a_broken_text_encoder(pipeline, tmp_path):
    root = tmp_path / "pipe"
    shutil.copytree(pipeline["root"], root)
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ConversionError, match=r"architectures \['BertModel'\] include none"):
        pretrained.convert(str(root), str(tmp_path / "out"), progress=False)
    summary = pretrained.convert(str(root), str(tmp_path / "out"), components=("transformer", "vae"), progress=False)
    assert sorted(summary) == ["transformer", "vae"]


def test_overrides_are_refused_for_folders(pipeline, tmp_path):
    """A folder's config.json states every field: an override would be silently ignored, so it is refused."""
    with pytest.raises(ConversionError, match="single .safetensors files only"):
        pretrained.convert(
            str(pipeline["root"]),
            str(tmp_path / "out"),
            progress=False,
            config_overrides={"transformer": {"attention_head_dim": 8}},
        )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ writing one component at a time


def test_components_are_written_one_at_a_time(pipeline, tmp_path, monkeypatch):
    """When the converter reads a component, no array of the one before it is alive: host memory
    holds one component at a time (the peak itself: experiments/convert_memory.py)."""
    import gc
    import weakref

    from percov2_jax.convert import registry

    assemble, alive = registry.PlannedComponent.assemble, []

    def watched(self, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in refs))
        params = assemble(self, **kwargs)
        refs.extend(weakref.ref(x) for x in jax.tree.leaves(params))
        return params

    refs: list = []
    monkeypatch.setattr(registry.PlannedComponent, "assemble", watched)
    pretrained.convert(str(pipeline["root"]), str(tmp_path / "out"), progress=False)
    assert alive == [0, 0]  # before the transformer, before the VAE
    assert sorted(pretrained.load(tmp_path / "out")) == ["transformer", "vae"]


_CRASH_ON_VAE = """
import os, sys
from percov2_jax import pretrained
from percov2_jax.convert import registry
assemble = registry.PlannedComponent.assemble
def crash(self, **kwargs):
    if self.kind.class_name == "AutoencoderKL":
        os._exit(3)  # as a kill: no cleanup, no exception handlers
    return assemble(self, **kwargs)
registry.PlannedComponent.assemble = crash
pretrained.convert(sys.argv[1], sys.argv[2], progress=False)
"""


def test_a_failed_or_cut_conversion_leaves_no_checkpoint(pipeline, tmp_path, monkeypatch):
    from percov2_jax.convert import registry

    assemble = registry.PlannedComponent.assemble

    def fail(self, **kwargs):
        if self.kind.class_name == "AutoencoderKL":
            raise RuntimeError("disk full")
        return assemble(self, **kwargs)

    monkeypatch.setattr(registry.PlannedComponent, "assemble", fail)
    dst = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="disk full"):
        pretrained.convert(str(pipeline["root"]), str(dst), progress=False)
    assert list(tmp_path.iterdir()) == []  # the transformer written before the failure is gone too
    # Killed after the transformer was written: what is left is orbax's temporary folder, not DST.
    result = subprocess.run(
        [sys.executable, "-c", _CRASH_ON_VAE, str(pipeline["root"]), str(tmp_path / "cut")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    (left,) = tmp_path.iterdir()
    assert left.name.startswith("cut.orbax-checkpoint-tmp") and (left / "transformer").is_dir()
    with pytest.raises(pretrained.CheckpointError, match="no such checkpoint directory"):
        pretrained.load(tmp_path / "cut")
    monkeypatch.undo()
    pretrained.convert(str(pipeline["root"] / "vae"), str(tmp_path / "cut"), progress=False)  # a rerun succeeds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut"]


def test_save_writes_what_load_reads(pipeline, tmp_path):
    loaded = pretrained.load(_converted_vae(pipeline, tmp_path))
    pretrained.save(tmp_path / "again", loaded)
    again = pretrained.load(tmp_path / "again")
    _assert_same_tree(again["vae"][1], loaded["vae"][1])
    with pytest.raises(FileExistsError):
        pretrained.save(tmp_path / "again", loaded)
    with pytest.raises(ValueError, match="invalid component name 'tokenizers'"):
        pretrained.save(tmp_path / "bad", {"tokenizers": loaded["vae"]})


def _converted_vae(pipeline, tmp_path):
    pretrained.convert(str(pipeline["root"] / "vae"), str(tmp_path / "vae"), progress=False)
    return tmp_path / "vae"


def test_tensors_are_read_fresh(pipeline):
    """Each read is a new, writable array from the file (no memory map kept by the reader)."""
    reader = SafetensorsFile(pipeline["root"] / "transformer" / WEIGHTS)
    first = reader.get("proj_out.weight")
    first[...] = 0
    again = reader.get("proj_out.weight")
    assert again.any() and not np.shares_memory(first, again)
    assert not any(isinstance(v, np.memmap) for v in vars(reader).values())


# ------------------------------------------------------------------ tokenizers ---------------


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny SD3 release (pipeline folder with tokenizers, float16) and its original single file."""
    import sd3_release

    root = tmp_path_factory.mktemp("release")
    folder = sd3_release.make_release(root / "hub")
    single = sd3_release.make_single_file(folder, root / "files" / "sd3_medium_incl_clips_t5xxlfp16.safetensors")
    overrides = [
        f"{component}.{field}={json.dumps(value)}"
        for component, fields in sd3_release.single_file_overrides("sd3_medium").items()
        for field, value in fields.items()
    ]
    return dict(folder=folder, single=single, overrides=[a for o in overrides for a in ("--override", o)])


def test_single_file_with_tokenizers_encodes_as_the_pipeline_folder(release, tmp_path, capsys):
    from percov2_jax import cli
    from percov2_jax.text.prompt_encoder import PromptEncoder

    single, folder = tmp_path / "from_single", tmp_path / "from_folder"
    args = ["convert", "--input", str(release["single"]), "--output", str(single), *release["overrides"]]
    assert cli.main([*args, "--tokenizers", str(release["folder"])]) == 0
    out = capsys.readouterr().out
    assert f"tokenizers: clip_l, clip_g, t5 copied from {release['folder']}\n" in out and "note:" not in out
    assert cli.main(["convert", "--input", str(release["folder"]), "--output", str(folder)]) == 0
    assert "(the pipeline folder's)" in capsys.readouterr().out
    captions = ["a red fox", "two boats on a lake", ""]
    got = PromptEncoder.from_checkpoint(single, max_sequence_length=16)(captions)
    want = PromptEncoder.from_checkpoint(folder, max_sequence_length=16)(captions)
    for a, b in zip(got, want, strict=True):
        assert np.asarray(a).any()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tokenizers_beside_a_single_file_missing_or_bad(release, tmp_path, capsys, monkeypatch):
    from percov2_jax import cli

    def convert(src, dst, *extra):
        code = cli.main(
            ["convert", "--input", str(src), "--output", str(tmp_path / dst), *release["overrides"], *extra]
        )
        return code, capsys.readouterr().out

    # None found: converted all the same, with a note saying what to do.
    code, out = convert(release["single"], "none")
    assert code == 0 and "note: no tokenizers for clip_l, clip_g, t5: captions cannot be encoded" in out
    assert "--tokenizers DIR" in out and not (tmp_path / "none" / "tokenizers").exists()
    # Found beside the file without the flag (here the CLIP ones only: a note for T5).
    beside = tmp_path / "beside_release"
    beside.mkdir()
    (beside / release["single"].name).symlink_to(release["single"])
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(release["folder"] / sub, beside / sub)
    code, out = convert(beside / release["single"].name, "beside")
    assert code == 0 and f"tokenizers: clip_l, clip_g copied from {beside} (found beside the single file)" in out
    assert "note: no T5 tokenizer" in out
    assert sorted(os.listdir(tmp_path / "beside" / "tokenizers")) == ["clip_g", "clip_l"]
    # A folder without the CLIP tokenizers: one error naming them, before any conversion work.
    monkeypatch.setattr(pretrained, "plan", lambda *a, **k: pytest.fail("planned before checking --tokenizers"))
    with pytest.raises(SystemExit, match=r"tokenizers .*: no tokenizer/ or tokenizer_2/ in it"):
        convert(release["single"], "bad", "--tokenizers", str(release["folder"] / "vae"))
    with pytest.raises(ConversionError, match="no such folder"):
        pretrained.convert(str(release["single"]), str(tmp_path / "bad"), tokenizers=tmp_path / "absent")
    assert not (tmp_path / "bad").exists()
