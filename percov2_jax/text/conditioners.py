"""Caption conditioning for training: captions -> (encoder_hidden_states, pooled_projections).

Three kinds, chosen by ``config.text.kind``:
- ``sd3``: the frozen SD3 text encoders (CLIP-L, CLIP-G, T5-XXL) from a converted checkpoint,
  via ``prompt_encoder.PromptEncoder`` (equal to diffusers' ``encode_prompt``).
- ``precomputed``: embeddings written by ``tools/precompute_text.py``, looked up by example id.
- ``hashed``: a parameter-free bag-of-words stand-in for the tiny config (no text-encoder weights
  can be downloaded): each word maps to a fixed pseudo-random vector seeded by its CRC32. It
  carries which words a caption has, nothing more; it is not a language model.

Dropped captions use ``null_embeddings()``: the embedding of the empty prompt (SD3's choice for
CFG; the learned alternative lives in the model, ``PerCoV2Config.learned_null_text``).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np


class HashedTextEncoder:
    """Captions -> ``([B, length, features], [B, pooled_features])`` float32 numpy arrays.

    Token ``i`` of a caption is the unit-variance vector of its ``i``-th word (lower-cased,
    ``[a-z0-9']+``); the pooled vector is the mean of the words' pooled vectors. The empty
    caption gives zeros.
    """

    def __init__(self, length: int, features: int, pooled_features: int, seed: int = 0):
        self.length, self.features, self.pooled_features, self.seed = length, features, pooled_features, seed
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _word(self, word: str) -> tuple[np.ndarray, np.ndarray]:
        if word not in self._cache:
            rng = np.random.default_rng([self.seed, zlib.crc32(word.encode("utf-8"))])
            self._cache[word] = (
                rng.standard_normal(self.features).astype(np.float32),
                rng.standard_normal(self.pooled_features).astype(np.float32),
            )
        return self._cache[word]

    def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(captions, str):
            raise TypeError("pass a sequence of captions, not one string")
        seq = np.zeros((len(captions), self.length, self.features), np.float32)
        pooled = np.zeros((len(captions), self.pooled_features), np.float32)
        for i, caption in enumerate(captions):
            words = re.findall(r"[a-z0-9']+", str(caption).lower())[: self.length]
            for j, word in enumerate(words):
                seq[i, j], p = self._word(word)
                pooled[i] += p
            if words:
                pooled[i] /= np.sqrt(len(words))
        return seq, pooled

    def null_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return self([""])


class SD3TextEncoder:
    """The SD3 text encoders from a checkpoint made by ``percov2 convert`` (``sd3`` kind)."""

    def __init__(
        self, checkpoint: str, max_sequence_length: int = 256, use_t5: bool = True, joint_attention_dim: int = 4096
    ):
        from percov2_jax.text.prompt_encoder import PromptEncoder

        self.encoder = PromptEncoder.from_checkpoint(
            checkpoint, use_t5=use_t5, max_sequence_length=max_sequence_length, joint_attention_dim=joint_attention_dim
        )

    def __call__(self, captions: Sequence[str]):
        seq, pooled = self.encoder(list(captions))
        return np.asarray(seq, np.float32), np.asarray(pooled, np.float32)

    def null_embeddings(self):
        return self([""])


class PrecomputedText:
    """Embeddings from a ``TextEmbeddingStore``, looked up by example id (``precomputed`` kind)."""

    def __init__(self, directory: str):
        from percov2_jax.text.store import EMPTY_PROMPT_ID, TextEmbeddingStore

        empty_prompt_id = EMPTY_PROMPT_ID
        self.directory = directory
        self.store = TextEmbeddingStore(directory)
        if empty_prompt_id not in self.store:
            raise ValueError(
                f"text store {directory} has no entry {empty_prompt_id!r} for the empty prompt; "
                "rebuild it with tools/precompute_text.py, which adds it"
            )
        self.empty_prompt_id = empty_prompt_id

    def lookup(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        missing = [i for i in ids if i not in self.store]
        if missing:
            raise KeyError(f"text store has no embeddings for ids {missing[:5]} ({len(missing)} missing)")
        rows = [self.store[i] for i in ids]
        return (
            np.stack([r["prompt_embeds"] for r in rows]).astype(np.float32),
            np.stack([r["pooled"] for r in rows]).astype(np.float32),
        )

    def null_embeddings(self):
        return self.lookup([self.empty_prompt_id])

    def require(self, ids: Sequence[str], what: str) -> None:
        """ValueError naming the ids of ``what`` (a data source) that the store lacks: raised
        before training starts rather than at the batch that needs them."""
        missing = [i for i in ids if i not in self.store]
        if missing:
            shown = ", ".join(repr(i) for i in missing[:5])
            raise ValueError(
                f"text store {self.directory} has no embeddings for {len(missing)} of {len(ids)} ids of {what} "
                f"({shown}{', ...' if len(missing) > 5 else ''}); make it for this data with "
                "tools/precompute_text.py --config (the run's config), which keys it by the source's ids"
            )


class MissingTextEncoder:
    """Stands in for the text encoders of a run trained on precomputed embeddings when none were
    given: any caption to encode raises a ValueError saying what to pass."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, captions: Sequence[str]):
        raise ValueError(
            f"{self.what} was trained on precomputed caption embeddings (text.kind='precomputed'); coding "
            "captions needs its SD3 text encoders: pass a checkpoint from percov2 convert holding them "
            "(percov2 compress/decompress --text-checkpoint DIR, Codec.from_workdir(..., text_checkpoint=DIR), "
            "evaluation config.text_checkpoint)"
        )

    def null_embeddings(self):
        return self([""])


def _sd3_encoder(cfg, checkpoint: str, width: int) -> SD3TextEncoder:
    return SD3TextEncoder(checkpoint, int(cfg.max_sequence_length), bool(cfg.use_t5), joint_attention_dim=width)


def caption_encoder(
    cfg, length: int, width: int, pooled_width: int, default_checkpoint: str = "", text_checkpoint: str = "", what=""
):
    """What encodes captions at inference for a run whose ``config.text`` is ``cfg``: the run's
    own conditioner for ``hashed`` and ``sd3`` (``text_checkpoint`` replaces the encoders'
    checkpoint if given); for ``precomputed`` the SD3 encoders of ``text_checkpoint``, else of
    ``cfg.checkpoint`` or ``default_checkpoint``, with the store's settings, else a
    `MissingTextEncoder` naming ``what`` (the run)."""
    if cfg.kind == "precomputed":
        checkpoint = text_checkpoint or cfg.checkpoint or default_checkpoint
        return _sd3_encoder(cfg, checkpoint, width) if checkpoint else MissingTextEncoder(what or "this run")
    if cfg.kind == "sd3" and text_checkpoint:
        return _sd3_encoder(cfg, text_checkpoint, width)
    return text_conditioner(cfg, length, width, pooled_width, default_checkpoint)


def text_conditioner(cfg, length: int, width: int, pooled_width: int, default_checkpoint: str = "", mesh=None):
    """The conditioner for ``cfg`` (a run's ``config.text``) giving ``[B, length, width]`` and
    ``[B, pooled_width]``; ``sd3`` falls back to ``default_checkpoint`` (the run's
    ``pretrained.checkpoint``) when ``cfg.checkpoint`` is empty, and with a training ``mesh`` is a
    `percov2_jax.text.on_mesh.MeshTextEncoder` (sharded, in ``cfg.dtype``, outputs left on the
    devices). A precomputed store written with other settings is refused."""
    if cfg.kind == "hashed":
        return HashedTextEncoder(length, width, pooled_width, int(cfg.get("seed", 0)))
    if cfg.kind == "sd3":
        checkpoint = cfg.checkpoint or default_checkpoint
        if not checkpoint:
            raise ValueError("text.kind='sd3' needs text.checkpoint or pretrained.checkpoint (made by percov2 convert)")
        if mesh is not None:
            from percov2_jax.text.on_mesh import MeshTextEncoder

            return MeshTextEncoder.from_checkpoint(
                checkpoint,
                mesh,
                dtype=str(cfg.get("dtype", "auto")),
                use_t5=bool(cfg.use_t5),
                max_sequence_length=int(cfg.max_sequence_length),
                joint_attention_dim=width,
            )
        return _sd3_encoder(cfg, checkpoint, width)
    if cfg.kind == "precomputed":
        if not cfg.store:
            raise ValueError("text.kind='precomputed' needs text.store (a directory from tools/precompute_text.py)")
        text = PrecomputedText(cfg.store)
        stored = text.store.settings or {}
        want = {"max_sequence_length": int(cfg.max_sequence_length), "use_t5": bool(cfg.use_t5)}
        differ = {k: (stored.get(k), v) for k, v in want.items() if stored.get(k) != v}
        if differ:
            raise ValueError(
                f"text store {cfg.store} was written with other settings than config.text: {differ} (store, config)"
            )
        return text
    raise ValueError(f"unknown text.kind {cfg.kind!r}; choose hashed, sd3 or precomputed")
