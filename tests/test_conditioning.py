"""SD3 prompt embeddings equal diffusers' ``StableDiffusion3Pipeline.encode_prompt``.

Reference: a diffusers SD3 pipeline of tiny random text encoders (CLIP-L-like, bigG-like, T5
v1.1-like) with offline tokenizers (a byte-level CLIP BPE vocabulary and a Unigram T5 model
trained here), saved to disk, converted with the tool, and loaded with
``PromptEncoder.from_checkpoint``. Tolerance: max |ours - ref| <= 1e-5 * max |ref| (embeddings
and pooled), with and without T5, for captions including the empty, non-ASCII and over-long ones.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from sd3_release import clip_tokenizer as _clip_tokenizer
from sd3_release import t5_tokenizer as _t5_tokenizer
from torch_reference import max_rel_error, randomize_, tiny_vae

from percov2_jax import pretrained
from percov2_jax.text.prompt_encoder import PromptEncoder, load_tokenizers

pytestmark = pytest.mark.parity  # against PyTorch reference models

TOL = 1e-5
BF16_TOL = 5e-2  # bfloat16 encoders: 8 mantissa bits through 2-3 layers
T5_LENGTH = 24
CAPTIONS = [
    "a photo of a cat sitting on a mat",
    "",
    "café au lait – 東京 🚀",
    "a very long caption " + "with many many words " * 20,
]


@pytest.fixture(scope="module")
def sd3_text(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("sd3_text")
    clip = dict(vocab_size=514, intermediate_size=37, num_hidden_layers=3, max_position_embeddings=77, bos_token_id=512)
    text_encoder = randomize_(
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=32,
                projection_dim=32,
                num_attention_heads=4,
                hidden_act="quick_gelu",
                eos_token_id=2,
                **clip,
            )
        ),
        81,
    )
    text_encoder_2 = randomize_(
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=40, projection_dim=24, num_attention_heads=5, hidden_act="gelu", eos_token_id=513, **clip
            )
        ),
        82,
    )
    text_encoder_3 = randomize_(
        T5EncoderModel(
            T5Config(
                vocab_size=150,
                d_model=80,
                d_kv=8,
                d_ff=50,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8,
            )
        ),
        83,
    )
    transformer = randomize_(
        SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=80,
            caption_projection_dim=16,
            pooled_projection_dim=56,
            out_channels=16,
            pos_embed_max_size=8,
        ),
        84,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed=85),
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(root / "vocab_l", "<|endoftext|>"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(root / "vocab_g", "!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=_t5_tokenizer(),
    )
    pipe.save_pretrained(root / "pipeline")
    pretrained.convert(str(root / "pipeline"), str(root / "ckpt"), progress=False)
    return dict(pipe=pipe, root=root)


def _reference(pipe, captions, use_t5=True):
    saved = pipe.text_encoder_3
    if not use_t5:
        pipe.text_encoder_3 = None
    try:
        with torch.no_grad():
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                captions, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=T5_LENGTH
            )
    finally:
        pipe.text_encoder_3 = saved
    return embeds.numpy(), pooled.numpy(), neg.numpy(), neg_pooled.numpy()


@pytest.mark.parametrize("use_t5", [True, False])
def test_prompt_embeddings_match_diffusers(sd3_text, use_t5):
    encoder = PromptEncoder.from_checkpoint(
        sd3_text["root"] / "ckpt", use_t5=use_t5, max_sequence_length=T5_LENGTH, joint_attention_dim=80
    )
    ref_embeds, ref_pooled, ref_neg, ref_neg_pooled = _reference(sd3_text["pipe"], CAPTIONS, use_t5)
    embeds, pooled = encoder(CAPTIONS)
    assert embeds.shape == ref_embeds.shape == (4, 77 + T5_LENGTH, 80)
    assert pooled.shape == ref_pooled.shape == (4, 56)
    assert max_rel_error(embeds, ref_embeds) <= TOL
    assert max_rel_error(pooled, ref_pooled) <= TOL
    if not use_t5:
        assert not np.asarray(embeds)[:, 77:].any()
    neg, neg_pooled = encoder.unconditional(batch_size=4)
    assert max_rel_error(neg, ref_neg) <= TOL
    assert max_rel_error(neg_pooled, ref_neg_pooled) <= TOL


def test_tokenizers_travel_with_the_checkpoint(sd3_text):
    tokenizers = load_tokenizers(sd3_text["root"] / "ckpt")
    assert sorted(tokenizers) == ["clip_g", "clip_l", "t5"]
    assert tokenizers["clip_g"].pad_token == "!"
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer folders"):
        load_tokenizers(sd3_text["root"] / "vocab_l")


@pytest.mark.slow
def test_precomputed_text_store(sd3_text, tmp_path):
    import os
    import subprocess
    import sys

    import ml_dtypes

    from percov2_jax.text.store import EMPTY_PROMPT_ID, TextEmbeddingStore, precompute_text_embeddings

    encoder = PromptEncoder.from_checkpoint(
        sd3_text["root"] / "ckpt", max_sequence_length=T5_LENGTH, joint_attention_dim=80
    )
    captions = {f"img{i:03d}.jpg": c for i, c in enumerate(CAPTIONS + ["a red bus on a wet street"])}
    for shard in range(2):  # two hosts, each its round-robin share
        precompute_text_embeddings(
            encoder, captions, str(tmp_path / "store"), batch_size=2, shard_index=shard, shard_count=2, progress=False
        )
    store = TextEmbeddingStore(str(tmp_path / "store"))
    # Every store also carries the empty prompt (dropped captions, CFG).
    assert len(store) == 6 and sorted(store.ids()) == sorted([*captions, EMPTY_PROMPT_ID])
    assert store[EMPTY_PROMPT_ID]["caption"] == ""
    # Recomputed at another batch size (another compiled kernel): equal to float32 rounding.
    embeds, pooled = encoder(list(captions.values()))
    for i, name in enumerate(captions):
        record = store[name]
        assert record["caption"] == captions[name] and record["prompt_embeds"].dtype == np.float32
        assert max_rel_error(record["prompt_embeds"], embeds[i]) <= TOL
        assert max_rel_error(record["pooled"], pooled[i]) <= TOL
    assert len(store.as_grain_source()) == 6 and store.as_grain_source()[0]["id"] == store.ids()[0]
    with pytest.raises(KeyError, match="img999"):
        store["img999"]
    os.remove(tmp_path / "store" / "text_embeddings-00001-of-00002.array_record")
    with pytest.raises(ValueError, match="incomplete"):
        TextEmbeddingStore(str(tmp_path / "store"))

    # The command-line tool, bfloat16 storage, from a JSONL captions file.
    (tmp_path / "captions.jsonl").write_text(
        "\n".join(json.dumps({"image": k, "caption": v}) for k, v in captions.items())
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "tools", "precompute_text.py"),
            "--checkpoint",
            str(sd3_text["root"] / "ckpt"),
            "--captions",
            str(tmp_path / "captions.jsonl"),
            "--output",
            str(tmp_path / "tool_store"),
            "--max_sequence_length",
            str(T5_LENGTH),
            "--dtype",
            "bfloat16",
            "--batch_size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = TextEmbeddingStore(str(tmp_path / "tool_store"))["img001.jpg"]
    assert record["prompt_embeds"].dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(record["prompt_embeds"].astype(np.float32), np.asarray(embeds[1]), rtol=1e-2, atol=1e-2)


class _CodeEncoder:
    """A stand-in `PromptEncoder` for the store's plumbing: each caption -> a few numbers of it."""

    max_sequence_length, use_t5 = 8, False

    def __call__(self, texts):
        codes = np.array([[len(t), sum(map(ord, t)) % 997] for t in texts], np.float32)
        return np.repeat(codes[:, None, :], 3, axis=1), codes  # prompt_embeds [B, 3, 2], pooled [B, 2]


def test_text_store_on_cloud_storage(gcs, tmp_path):
    """A store written into a bucket (each shard written locally, then uploaded) reads back as
    the same store written locally; a missing store names its URL."""
    from percov2_jax.text.store import EMPTY_PROMPT_ID, TextEmbeddingStore, precompute_text_embeddings

    captions = {f"img{i:03d}.jpg": c for i, c in enumerate(CAPTIONS)}
    url = gcs.create_bucket() + "/text"
    for where in (url, str(tmp_path)):
        for shard in range(2):
            path = precompute_text_embeddings(
                _CodeEncoder(), captions, where, batch_size=2, shard_index=shard, shard_count=2, progress=False
            )
            assert path == f"{where}/text_embeddings-0000{shard}-of-00002.array_record"
    remote, local = TextEmbeddingStore(url), TextEmbeddingStore(str(tmp_path))
    assert remote.ids() == local.ids() and remote.settings == local.settings and EMPTY_PROMPT_ID in remote
    for a, b in zip(remote.records(), local.records()):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert remote["img002.jpg"]["pooled"][0] == len(CAPTIONS[2])
    with pytest.raises(FileNotFoundError, match=f"{url}-absent: no text_embeddings"):
        TextEmbeddingStore(url + "-absent")


@pytest.mark.integration  # talks to the Cloud Storage emulator, a server process
def test_checkpoint_on_cloud_storage(sd3_text, gcs):
    """``percov2 convert --output gs://...`` writes the checkpoint and its tokenizers to a bucket;
    loading it from there gives the local conversion's params, and a prompt encoder built from
    the URL encodes captions as one built from the local copy."""
    from percov2_jax import cli

    url = gcs.create_bucket() + "/sd3"
    assert cli.main(["convert", "--input", str(sd3_text["root"] / "pipeline"), "--output", url]) == 0
    with pytest.raises(SystemExit, match="exists"):
        cli.main(["convert", "--input", str(sd3_text["root"] / "pipeline"), "--output", url])
    local, remote = pretrained.load(sd3_text["root"] / "ckpt"), pretrained.load(url)
    assert sorted(remote) == sorted(local) == ["clip_g", "clip_l", "t5", "transformer", "vae"]
    for name in local:
        jax.tree.map(np.testing.assert_array_equal, remote[name][1], local[name][1])
    assert sorted(load_tokenizers(url)) == ["clip_g", "clip_l", "t5"]
    captions = ["a red fox", "two boats on a lake"]
    want = PromptEncoder.from_checkpoint(sd3_text["root"] / "ckpt", max_sequence_length=T5_LENGTH)(captions)
    got = PromptEncoder.from_checkpoint(url, max_sequence_length=T5_LENGTH)(captions)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(pretrained.CheckpointError, match="no such checkpoint"):
        pretrained.load(url + "-absent")


@pytest.mark.integration  # a training run, the tool in a subprocess and the codec
def test_run_on_precomputed_text_codes_new_captions(sd3_text, tmp_path):
    """Precomputed text through a whole run, on the builtin photographs (ids like
    ``skimage/astronaut``): `tools/precompute_text.py --config` keys the store by the source's
    ids with the run's text settings; a store lacking ids stops the trainer before training,
    naming them; the trainer reads its batches' embeddings from the store. The codec of that run
    compresses without text encoders but says what to pass to decode, and with
    ``text_checkpoint`` it decodes; its caption embedding equals the stored one (same encoders)."""
    import os
    import subprocess
    import sys
    import textwrap

    import train_setup

    from percov2_jax.codec.api import Codec
    from percov2_jax.data.builtin import BuiltinPhotos
    from percov2_jax.text.store import TextEmbeddingStore, precompute_text_embeddings
    from percov2_jax.train.loop import Trainer

    config_file = tmp_path / "config.py"
    config_file.write_text(
        textwrap.dedent(
            f"""
            import train_setup

            def get_config():
                c = train_setup.test_config()
                c.model.transformer = dict(c.model.transformer, joint_attention_dim=80, pooled_projection_dim=56)
                c.text.kind, c.text.max_sequence_length = "precomputed", {T5_LENGTH}
                c.text.store = {str(tmp_path / "store")!r}
                return c
            """
        )
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "tests")])}
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "tools", "precompute_text.py"),
            "--config",
            str(config_file),
            "--checkpoint",
            str(sd3_text["root"] / "ckpt"),
            "--output",
            str(tmp_path / "store"),
            "--batch_size",
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    source = BuiltinPhotos()
    store = TextEmbeddingStore(str(tmp_path / "store"))
    assert set(source.ids) <= set(store.ids()) and store.settings["max_sequence_length"] == T5_LENGTH
    assert store[source.ids[0]]["caption"] == source.captions[0]

    config = train_setup.test_config()
    config.model.transformer = dict(config.model.transformer, joint_attention_dim=80, pooled_projection_dim=56)
    config.text.kind, config.text.max_sequence_length = "precomputed", T5_LENGTH

    # A store without two of the photos: refused before any training, naming them.
    encoder = PromptEncoder.from_checkpoint(
        sd3_text["root"] / "ckpt", max_sequence_length=T5_LENGTH, joint_attention_dim=80
    )
    partial = dict(zip(source.ids[2:], source.captions[2:]))
    precompute_text_embeddings(encoder, partial, str(tmp_path / "partial"), batch_size=4, progress=False)
    config.text.store = str(tmp_path / "partial")
    with pytest.raises(ValueError, match=f"no embeddings for 2 of {len(source)} ids.*{source.ids[0]}"):
        Trainer(config, str(tmp_path / "refused"))

    config.text.store = str(tmp_path / "store")
    trainer = Trainer(config, str(tmp_path / "run"))
    try:
        batch, local = trainer.next_batch()
        want = np.stack([store[str(i)]["prompt_embeds"] for i in local["id"]])
        np.testing.assert_array_equal(np.asarray(batch["encoder_hidden_states"]), want)
        trainer.save()
    finally:
        trainer.close()

    photo = source[0]["image"][:64, :64]
    codec = Codec.from_workdir(str(tmp_path / "run"), prior=False, sample_steps=1)
    stream = codec.compress(photo, caption=source.captions[0])
    with pytest.raises(ValueError, match="precomputed caption embeddings.*--text-checkpoint"):
        codec.decompress(stream)
    codec = Codec.from_workdir(
        str(tmp_path / "run"), prior=False, sample_steps=1, text_checkpoint=str(sd3_text["root"] / "ckpt")
    )
    assert codec.decompress(stream).shape == photo.shape
    seq, pooled = codec.text([source.captions[0]])
    assert max_rel_error(seq[0], store[source.ids[0]]["prompt_embeds"]) <= TOL
    assert max_rel_error(pooled[0], store[source.ids[0]]["pooled"]) <= TOL


def test_encoders_on_the_mesh(sd3_text):
    """`MeshTextEncoder` (training): the encoders restored onto the mesh in the asked dtype, the
    batch's embeddings computed in one jitted call and left on the devices, split like the
    images. float32 equals the host `PromptEncoder` (TOL); bfloat16 parameters and compute stay
    within BF16_TOL of it (relative to the largest value)."""
    from percov2_jax import sharding
    from percov2_jax.text.on_mesh import MeshTextEncoder

    ckpt = sd3_text["root"] / "ckpt"
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    host = PromptEncoder.from_checkpoint(ckpt, max_sequence_length=T5_LENGTH, joint_attention_dim=80)
    want_seq, want_pooled = (np.asarray(x) for x in host(CAPTIONS))
    for dtype, tol in (("float32", TOL), ("bfloat16", BF16_TOL)):
        enc = MeshTextEncoder.from_checkpoint(
            str(ckpt), mesh, dtype=dtype, max_sequence_length=T5_LENGTH, joint_attention_dim=80
        )
        assert {x.dtype for x in jax.tree_util.tree_leaves(enc.params)} == {np.dtype(dtype)}
        seq, pooled = enc.encode(CAPTIONS)
        assert isinstance(seq, jax.Array) and seq.sharding.is_equivalent_to(sharding.batch_sharding(mesh), seq.ndim)
        assert seq.dtype == np.float32 and seq.shape == want_seq.shape
        print(dtype, max_rel_error(np.asarray(seq), want_seq), max_rel_error(np.asarray(pooled), want_pooled))
        assert max_rel_error(np.asarray(seq), want_seq) <= tol
        assert max_rel_error(np.asarray(pooled), want_pooled) <= tol
        null_seq, _ = enc.null_embeddings()
        assert max_rel_error(null_seq[0], want_seq[1]) <= tol  # CAPTIONS[1] is the empty prompt


@pytest.mark.integration  # a training step
def test_training_on_sd3_text_without_t5_at_another_width(sd3_text, tmp_path):
    """``text.kind="sd3"`` with ``use_t5=False`` on a transformer whose text width is not 4096:
    the trainer's encoders (on its mesh) give CLIP plus zeros at the transformer's width, equal
    to diffusers' embeddings without T5, and a step trains on them."""
    import train_setup

    from percov2_jax.train.loop import Trainer

    config = train_setup.test_config()
    config.model.transformer = dict(config.model.transformer, joint_attention_dim=80, pooled_projection_dim=56)
    config.text.kind, config.text.use_t5, config.text.max_sequence_length = "sd3", False, T5_LENGTH
    config.text.checkpoint = str(sd3_text["root"] / "ckpt")
    trainer = Trainer(config, str(tmp_path / "run"))
    try:
        batch, local = trainer.next_batch()
        want, want_pooled, _, _ = _reference(sd3_text["pipe"], [str(c) for c in local["caption"]], use_t5=False)
        assert max_rel_error(np.asarray(batch["encoder_hidden_states"]), want) <= TOL
        assert max_rel_error(np.asarray(batch["pooled_projections"]), want_pooled) <= TOL
        (metrics,) = trainer.train_steps(1)
        assert np.isfinite(metrics["loss"])
    finally:
        trainer.close()
