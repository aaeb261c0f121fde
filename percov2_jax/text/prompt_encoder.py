"""SD3 prompt embeddings: what diffusers' ``StableDiffusion3Pipeline.encode_prompt`` computes.

For a batch of captions:
- CLIP-L and CLIP-G (OpenCLIP bigG) hidden states at ``[-(clip_skip + 2)]`` (the penultimate
  layer by default), tokens padded/truncated to 77, concatenated on channels (768 + 1280);
- zero-padded on channels to the T5 width, then T5-XXL's last hidden state (``max_sequence_length``
  tokens, default 256) appended on the sequence axis: ``prompt_embeds [B, 77 + L, 4096]``;
- without T5, zeros ``[B, L, joint_attention_dim]`` stand in for it, as diffusers does;
- ``pooled [B, 2048]`` = CLIP-L projected pooled ‖ CLIP-G projected pooled.
The empty caption ``""`` gives the classifier-free-guidance (unconditional) embedding.

Tokenizers are transformers tokenizers read from local folders (no downloads).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax import storage

CLIP_MAX_LENGTH = 77  # SD3's CLIP tokenizers' model_max_length


def load_tokenizers(folder: str | os.PathLike) -> dict[str, Any]:
    """Tokenizers from a diffusers pipeline folder (``tokenizer``, ``tokenizer_2``, ``tokenizer_3``) or
    from a percov2-jax checkpoint (``tokenizers/{clip_l,clip_g,t5}``): ``{"clip_l": ..., "clip_g": ..., "t5": ...}``
    (``t5`` absent when the folder has none). Read with ``local_files_only``: never downloads.
    """
    from transformers import AutoTokenizer

    from percov2_jax import pretrained

    root = storage.path(folder)
    base = root if (root / "tokenizer").is_dir() else root / "tokenizers"
    subfolders = {name: sub if base == root else name for sub, name in pretrained.TOKENIZER_FOLDERS.items()}
    missing = [os.fspath(base / subfolders[n]) for n in ("clip_l", "clip_g") if not (base / subfolders[n]).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no CLIP tokenizer folders {missing} (expected a diffusers SD3 pipeline "
            "folder or a percov2-jax checkpoint converted from one)"
        )
    out = {}
    for name, sub in subfolders.items():
        if (base / sub).is_dir():
            # transformers reads local folders only: a gs:// checkpoint's tokenizers are copied first.
            with storage.local_folder(base / sub) as local:
                out[name] = AutoTokenizer.from_pretrained(local, local_files_only=True)
    return out


def sd3_prompt_embeddings(
    clip_l,
    clip_g,
    t5_hidden: jax.Array | None,
    *,
    clip_skip: int | None = None,
    max_sequence_length: int = 256,
    joint_attention_dim: int = 4096,
):
    """Assemble SD3's conditioning from the encoders' outputs (pure; any batch).

    Args:
      clip_l, clip_g: ``CLIPTextOutput`` of the two CLIP encoders on 77-token ids.
      t5_hidden: T5's ``last_hidden_state [B, L, D_t5]``, or None for zeros ``[B, max_sequence_length,
        joint_attention_dim]``.
    Returns ``(prompt_embeds [B, 77 + L, D], pooled [B, P_l + P_g])``.
    """
    index = -2 if clip_skip is None else -(clip_skip + 2)
    clip = jnp.concatenate([clip_l.hidden_states[index], clip_g.hidden_states[index]], axis=-1)
    if t5_hidden is None:
        t5_hidden = jnp.zeros((clip.shape[0], max_sequence_length, joint_attention_dim), clip.dtype)
    width = t5_hidden.shape[-1]
    if clip.shape[-1] > width:
        raise ValueError(f"CLIP width {clip.shape[-1]} exceeds the T5 / joint attention width {width}")
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
    prompt_embeds = jnp.concatenate([clip, t5_hidden.astype(clip.dtype)], axis=1)
    pooled = jnp.concatenate([clip_l.text_embeds, clip_g.text_embeds], axis=-1)
    return prompt_embeds, pooled


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
    """Captions -> SD3 ``(prompt_embeds, pooled)``, the Flax encoders run under one ``jax.jit``.

    ``encoders`` maps ``"clip_l"``, ``"clip_g"`` and optionally ``"t5"`` to ``(module, params)``;
    ``tokenizers`` maps the same names to transformers tokenizers. Without ``"t5"`` in
    ``encoders`` the T5 part is zeros (``joint_attention_dim`` wide).
    """

    encoders: Mapping[str, tuple[Any, Any]]
    tokenizers: Mapping[str, Any]
    max_sequence_length: int = 256
    joint_attention_dim: int = 4096
    clip_skip: int | None = None

    def __post_init__(self):
        missing = [n for n in ("clip_l", "clip_g") if n not in self.encoders or n not in self.tokenizers]
        if "t5" in self.encoders and "t5" not in self.tokenizers:
            missing.append("t5 tokenizer")
        if missing:
            raise ValueError(f"PromptEncoder needs encoders and tokenizers for {missing}")

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        use_t5: bool = True,
        tokenizers_path=None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        **kwargs,
    ) -> PromptEncoder:
        """Text encoders from a percov2-jax checkpoint (tokenizers from it, or ``tokenizers_path``)."""
        from percov2_jax import pretrained  # orbax: imported when encoders are loaded, not for CLIP_MAX_LENGTH

        names = ("clip_l", "clip_g", "t5") if use_t5 else ("clip_l", "clip_g")
        encoders = pretrained.load(path, components=names, options=options)
        return cls(encoders, load_tokenizers(tokenizers_path or path), **kwargs)

    @property
    def use_t5(self) -> bool:
        return "t5" in self.encoders

    def tokenize(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids as the SD3 pipeline makes them: CLIP padded/truncated to 77, T5 to ``max_sequence_length``."""
        if isinstance(captions, str):
            captions = [captions]
        ids = {}
        for name in ("clip_l", "clip_g"):
            ids[name] = np.asarray(
                self.tokenizers[name](
                    list(captions), padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True
                ).input_ids,
                np.int32,
            )
        if self.use_t5:
            ids["t5"] = np.asarray(
                self.tokenizers["t5"](
                    list(captions),
                    padding="max_length",
                    max_length=self.max_sequence_length,
                    truncation=True,
                    add_special_tokens=True,
                ).input_ids,
                np.int32,
            )
        return ids

    def embed_ids(self, ids: Mapping[str, np.ndarray]):
        """``tokenize``'s output -> ``(prompt_embeds, pooled)`` (jitted)."""
        modules = tuple((name, self.encoders[name][0]) for name in sorted(self.encoders))
        params = {name: self.encoders[name][1] for name in self.encoders}
        return _embed(modules, self.clip_skip, self.max_sequence_length, self.joint_attention_dim, params, dict(ids))

    def __call__(self, captions: Sequence[str] | str):
        """Captions -> ``(prompt_embeds [B, 77 + L, D], pooled [B, P])``."""
        return self.embed_ids(self.tokenize(captions))

    def unconditional(self, batch_size: int = 1):
        """The empty-caption embedding used for classifier-free guidance, repeated ``batch_size`` times."""
        embeds, pooled = self([""])
        return jnp.repeat(embeds, batch_size, axis=0), jnp.repeat(pooled, batch_size, axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _embed(modules, clip_skip, max_sequence_length, joint_attention_dim, params, ids):
    return embed_tokens(modules, clip_skip, max_sequence_length, joint_attention_dim, params, ids)


def embed_tokens(modules, clip_skip, max_sequence_length, joint_attention_dim, params, ids):
    """Token ids ``{name: [B, length] int32}`` -> ``(prompt_embeds, pooled)`` through the encoders
    ``modules`` (``((name, module), ...)``) with ``params`` ``{name: params}`` (pure, traceable)."""
    modules = dict(modules)
    clip_l = modules["clip_l"].apply({"params": params["clip_l"]}, ids["clip_l"])
    clip_g = modules["clip_g"].apply({"params": params["clip_g"]}, ids["clip_g"])
    t5_hidden = None
    if "t5" in modules:
        t5_hidden = modules["t5"].apply({"params": params["t5"]}, ids["t5"]).last_hidden_state
    return sd3_prompt_embeddings(
        clip_l,
        clip_g,
        t5_hidden,
        clip_skip=clip_skip,
        max_sequence_length=max_sequence_length,
        joint_attention_dim=joint_attention_dim,
    )
