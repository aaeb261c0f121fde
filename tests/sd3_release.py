"""A tiny random SD3 release, built offline, in the exact layouts Stability publishes.

``make_release`` writes a diffusers pipeline folder laid out like
``stabilityai/stable-diffusion-3-medium-diffusers`` (or ``-3.5-medium`` / ``-3.5-large``):
``model_index.json``, ``scheduler/``, ``transformer/``, ``vae/``, ``text_encoder{,_2,_3}/``,
``tokenizer{,_2,_3}/``, every weight in float16, the T5 encoder in two shards with
``model.safetensors.index.json`` (and the SD3.5-large transformer sharded as well).
``make_single_file`` writes the same weights as Stability's original single file
(``sd3_medium_incl_clips_t5xxlfp16.safetensors``): ``model.diffusion_model.*``,
``first_stage_model.*`` and ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``.

Sizes (real release in brackets):
  CLIP-L  width 32 [768], 2 layers, 4 heads of 8, quick_gelu, projection the identity 32x32 [768]
  CLIP-G  width 48 [1280], 3 layers, 6 heads of 8, gelu, projection 48 -> 40 [1280 -> 1280]
  T5      width 96 [4096], 2 layers, 4 heads of 16, d_ff 128, gated-gelu, 32 relative buckets
  MM-DiT  2 layers (3 for SD3.5-medium), 2 heads of 8, sample_size 8 latents, patch 2,
          pos_embed_max_size 8, joint_attention_dim 96 (= T5 width), pooled 72 (= 32 + 40)
  VAE     4 levels (8, 8, 16, 16) [128 ... 512], 16 latent channels, factor 8 (64x64 -> 8x8)
Vocabularies: CLIP 514 (256 bytes, 256 end-of-word bytes, BOS 512, EOS 513); T5 tokenizer
``T5_VOCAB`` (150) ids, of which the common caption words in ``CAPTION_WORDS`` are single pieces.

Values: ``torch_reference.randomize_`` (variance-preserving): weights and activations stay O(1),
far inside float16's range (the pipeline also runs finite in float16).
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np
import torch
from torch_reference import randomize_, sd3_to_original, tiny_vae, vae_to_original

# The folder names Stability's repositories have on the Hub.
RELEASE_NAMES = {
    "sd3_medium": "stable-diffusion-3-medium-diffusers",
    "sd35_medium": "stable-diffusion-3.5-medium",
    "sd35_large": "stable-diffusion-3.5-large",
}
TRANSFORMER_BASE = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=96,
    caption_projection_dim=16,
    pooled_projection_dim=72,
    out_channels=16,
    pos_embed_max_size=8,
)
TRANSFORMER_VARIANTS = {
    "sd3_medium": {},
    # Like SD3.5-medium's first 13 of 24 blocks: dual attention in the early blocks, not the last.
    "sd35_medium": dict(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd35_large": dict(qk_norm="rms_norm"),
}
# Released as sharded diffusers folders (the T5 encoder is sharded in every release).
SHARDED_TRANSFORMER = {"sd35_large"}
VAE_OVERRIDES = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    sample_size=64,
)
CLIP_COMMON = dict(
    vocab_size=514,
    max_position_embeddings=77,
    # The SD3 text-encoder configs carry CLIP's legacy ids (pooling by argmax of the token ids,
    # which finds EOS = the largest id).
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    layer_norm_eps=1e-5,
)
CLIP_L = dict(
    hidden_size=32,
    projection_dim=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act="quick_gelu",
)
CLIP_G = dict(
    hidden_size=48,
    projection_dim=40,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    hidden_act="gelu",
)
T5 = dict(
    d_model=96,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
)
T5_VOCAB = 150  # ids of the T5 tokenizer and rows of the encoder's table (tests/test_conditioning.py)

# Whole-word pieces of the T5 tokenizer: the words of short photo captions (BLIP-2 style, as in
# percov2_jax/data/builtin_photos.json) and of the test captions.
CAPTION_WORDS = """
a an the of in on with and at to near next front through by is
photo picture image close up view black white
man woman people person child boy girl
dog cat bird horse fox cow
car bus train boat boats bike bikes motorcycle
street road city building house room table kitchen window
plate pizza food cup glass water
beach lake river sea mountain sky snow grass field park tree trees flower leaves
red blue green yellow orange brown small large tall old wet sunny
two three many very long caption words
sitting standing running walking riding holding parked looking flying playing mat
""".split()
_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table (256 entries)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_tokenizer(folder: pathlib.Path, pad_token: str):
    """A byte-level CLIP BPE tokenizer with no merges: 256 characters, 256 end-of-word variants,
    BOS 512, EOS 513 (514 ids); ``vocab.json`` and ``merges.txt`` are written to ``folder``."""
    from transformers import CLIPTokenizer

    chars = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )
    return tok


def t5_tokenizer():
    """A SentencePiece-style Unigram T5 tokenizer (``T5TokenizerFast``) of ``T5_VOCAB`` ids.

    ids 0-2 are ``<pad>``, ``</s>``, ``<unk>`` as in T5; then ``▁``, the characters of
    ``_CHARACTERS`` and ``▁word`` for every word of ``CAPTION_WORDS``. The unigram scores are the
    words' log frequencies in that list (all equal) and a lower score per single character, so a
    caption word is one piece and any other lower-case word is spelled out; other characters are
    ``<unk>``. Built from the fixed lists, not by a (multi-threaded) trainer: byte-for-byte the
    same every time.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = list(dict.fromkeys(CAPTION_WORDS))
    word_score = math.log(1.0 / len(words))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", word_score - 2.0)]
    vocab += [(c, word_score - 4.0) for c in _CHARACTERS]
    vocab += [("▁" + w, word_score) for w in words]
    assert len(vocab) <= T5_VOCAB, len(vocab)
    vocab += [(f"<unused_{i}>", -100.0) for i in range(T5_VOCAB - len(vocab))]  # never chosen: padding ids
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0, model_max_length=512
    )


def _clip(config: dict, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_COMMON, **config)), seed)


def _save_sharded(model, folder: pathlib.Path, shards: int = 2) -> None:
    """Re-save ``model`` into ``folder`` in about ``shards`` safetensors shards plus their index."""
    for f in folder.glob("*.safetensors"):
        f.unlink()
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(folder, max_shard_size=math.ceil(nbytes / shards) + 1)


def make_release(root: str | os.PathLike, variant: str = "sd3_medium", seed: int = 0) -> pathlib.Path:
    """Write a tiny random SD3 release of ``variant`` under ``root``; returns its folder
    (``root / RELEASE_NAMES[variant]``).

    ``variant``: ``sd3_medium`` (no qk-norm), ``sd35_medium`` (qk-norm, dual attention in blocks
    0 and 1 of 3), ``sd35_large`` (qk-norm). Every weight is float16; ``text_encoder_3`` (and the
    SD3.5-large ``transformer``) are sharded. CLIP-L's ``text_projection`` is the identity, as in
    Stability's releases (their single files omit it and diffusers fills in ``eye``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    if variant not in RELEASE_NAMES:
        raise ValueError(f"unknown SD3 variant {variant!r}; expected one of {sorted(RELEASE_NAMES)}")
    folder = pathlib.Path(root) / RELEASE_NAMES[variant]
    text_encoder = _clip(CLIP_L, seed + 1)
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(CLIP_L["hidden_size"]))
    transformer = randomize_(SD3Transformer2DModel(**{**TRANSFORMER_BASE, **TRANSFORMER_VARIANTS[variant]}), seed + 4)
    text_encoder_3 = randomize_(T5EncoderModel(T5Config(vocab_size=T5_VOCAB, **T5)), seed + 3)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae(seed=seed + 5, **VAE_OVERRIDES),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(folder / "tokenizer", "<|endoftext|>"),
        text_encoder_2=_clip(CLIP_G, seed + 2),
        tokenizer_2=clip_tokenizer(folder / "tokenizer_2", "!"),  # SD3's CLIP-G pads with "!"
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer(),
    ).to(torch.float16)
    pipe.save_pretrained(folder)
    for sub in ("tokenizer", "tokenizer_2"):
        # Stability's CLIP tokenizer folders hold the slow files only (vocab.json, merges.txt,
        # the two JSON configs); transformers builds the fast tokenizer from them on load.
        (folder / sub / "tokenizer.json").unlink()
        config = json.loads((folder / sub / "tokenizer_config.json").read_text())
        special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        (folder / sub / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    _save_sharded(pipe.text_encoder_3, folder / "text_encoder_3")
    if variant in SHARDED_TRANSFORMER:
        _save_sharded(pipe.transformer, folder / "transformer")
    return folder


# ------------------------------------------------------------------ the single file ----------


def single_file_overrides(variant: str) -> dict[str, dict]:
    """``config_overrides`` for converting ``make_single_file``'s output of ``variant``: the fields
    a single file does not store and in which these tiny models differ from the converter's SD3
    defaults (64-wide heads, 32 norm groups, 1024-pixel VAE tiles)."""
    overrides = {
        "vae": {"norm_num_groups": 4, "sample_size": VAE_OVERRIDES["sample_size"]},
        "clip_l": {"num_attention_heads": CLIP_L["num_attention_heads"]},
        "clip_g": {"num_attention_heads": CLIP_G["num_attention_heads"]},
    }
    if "qk_norm" not in TRANSFORMER_VARIANTS[variant]:  # with qk-norm the head width is in the weights
        overrides["transformer"] = {"attention_head_dim": TRANSFORMER_BASE["attention_head_dim"]}
    return overrides


def read_component(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a diffusers/transformers component folder (all shards), as stored."""
    from safetensors.numpy import load_file

    state = {}
    for path in sorted(pathlib.Path(folder).glob("*.safetensors")):
        state.update(load_file(path))
    return state


def make_single_file(release: str | os.PathLike, path: str | os.PathLike) -> pathlib.Path:
    """Write ``release``'s weights as one original-format SD3 checkpoint at ``path``; returns ``path``.

    Keys as in ``sd3_medium_incl_clips_t5xxlfp16.safetensors``: ``model.diffusion_model.*``
    (MM-DiT: fused qkv, ``joint_blocks.{i}.{x,context}_block``, (shift, scale) modulations),
    ``first_stage_model.*`` (LDM VAE names, 1x1-conv attention), and the text encoders under
    ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` with transformers names (CLIP-L without
    its identity ``text_projection``). dtypes as stored in the release (float16).
    """
    from safetensors.numpy import save_file

    release, path = pathlib.Path(release), pathlib.Path(path)
    config = lambda sub: json.loads((release / sub / "config.json").read_text())
    out = sd3_to_original(read_component(release / "transformer"), config("transformer")["num_layers"])
    out |= vae_to_original(read_component(release / "vae"), len(config("vae")["block_out_channels"]))
    clip_l = read_component(release / "text_encoder")
    projection = clip_l.pop("text_projection.weight")
    if not np.array_equal(projection, np.eye(len(projection), dtype=projection.dtype)):
        raise ValueError(f"{release}/text_encoder: CLIP-L's text_projection is not the identity")
    t5 = read_component(release / "text_encoder_3")
    # Both names of the tied token table: diffusers' single-file loader detects T5 by
    # ``shared.weight`` and loads ``encoder.embed_tokens.weight`` (strictly).
    t5.setdefault("shared.weight", t5.get("encoder.embed_tokens.weight"))
    t5.setdefault("encoder.embed_tokens.weight", t5["shared.weight"])
    for prefix, state in (
        ("text_encoders.clip_l.transformer.", clip_l),
        ("text_encoders.clip_g.transformer.", read_component(release / "text_encoder_2")),
        ("text_encoders.t5xxl.transformer.", t5),
    ):
        out |= {prefix + k: v for k, v in state.items()}
    not_half = sorted(k for k, v in out.items() if v.dtype != np.float16)
    if not_half:
        raise ValueError(f"{release}: tensors not stored in float16: {not_half[:10]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(path))
    return path
