"""Name tables for the text encoders: transformers names -> Flax rules, and the prefixes under
which SD3 single files bundle them.

transformers stores CLIP's ``position_ids`` buffer in older checkpoints and T5's token table
twice (``shared`` and the tied ``encoder.embed_tokens``); ``tidy_sources`` resolves both
explicitly (verified, never dropped unchecked).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from percov2_jax.convert.core import ConversionError, Rule, SourceTensor

CLIP_RULES = (
    Rule(r"text_model\.embeddings\.(?:token|position)_embedding\.weight", "embedding", "identity"),
    Rule(r".*(?:layer_norm1|layer_norm2|final_layer_norm)\.weight", "scale", "identity"),
    Rule(r".*\.weight", "kernel", "linear"),
    Rule(r".*\.bias", "bias", "identity"),
)

T5_RULES = (
    Rule(r"shared\.weight", "embedding", "identity"),
    Rule(r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "embedding", "identity"),
    Rule(r".*(?:layer_norm|final_layer_norm)\.weight", "scale", "identity"),
    Rule(
        r"encoder\.block\.\d+\.layer\.\d\.(?:SelfAttention\.[qkvo]|DenseReluDense\.(?:wi|wi_0|wi_1|wo))\.weight",
        "kernel",
        "linear",
    ),
)

# Single-file SD3 checkpoints: prefix -> (component, transformers prefix inside it).
SINGLE_FILE_PREFIXES = {
    "text_encoders.clip_l.transformer.": "clip_l",
    "text_encoders.clip_g.transformer.": "clip_g",
    "text_encoders.t5xxl.transformer.": "t5",
}


def _checked_equal(primary: SourceTensor, alias: SourceTensor) -> SourceTensor:
    def load():
        a, b = primary.load(), alias.load()
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ConversionError(f"{primary.key} and {alias.key} should be tied (identical) but differ")
        return a

    return SourceTensor(primary.key, primary.shape, load)


def tidy_sources(class_name: str, sources: Iterable[SourceTensor]) -> list[SourceTensor]:
    """Resolve the two known non-parameter / duplicate keys; everything else passes to ``plan``.

    - CLIP ``text_model.embeddings.position_ids``: must be ``arange`` (checked now), then dropped.
    - T5 ``encoder.embed_tokens.weight``: the tied copy of ``shared.weight``; used as ``shared``
      when alone, checked equal to it when both are present.
    """
    by_key = {s.key: s for s in sources}
    if class_name == "CLIPTextModelWithProjection" and "text_model.embeddings.position_ids" in by_key:
        ids = by_key.pop("text_model.embeddings.position_ids").load()
        if not np.array_equal(np.asarray(ids).reshape(-1), np.arange(np.asarray(ids).size)):
            raise ConversionError(
                "text_model.embeddings.position_ids is not arange(n): custom positions are not supported"
            )
    if class_name == "T5EncoderModel" and "encoder.embed_tokens.weight" in by_key:
        alias = by_key.pop("encoder.embed_tokens.weight")
        shared = by_key.get("shared.weight")
        by_key["shared.weight"] = (
            SourceTensor("shared.weight", alias.shape, alias.load) if shared is None else _checked_equal(shared, alias)
        )
    return list(by_key.values())


def _require(shapes, keys, what: str) -> None:
    absent = [k for k in keys if k not in shapes]
    if absent:
        raise ConversionError(f"{what} in the single file lacks {absent}")


def _layer_count(shapes, pattern: str) -> int:
    import re

    idx = [int(m.group(1)) for k in shapes if (m := re.match(pattern, k))]
    if not idx:
        raise ConversionError(f"no keys match {pattern!r}")
    return max(idx) + 1


def infer_clip_config(shapes: dict[str, tuple[int, ...]], component: str, overrides=None) -> dict:
    """CLIPTextConfig fields from an SD3 single file's ``clip_l`` / ``clip_g`` keys.

    Read off the weights: vocabulary, widths, depth, positions, projection size. Not stored,
    set to the SD3 release's values unless overridden: heads = hidden / 64, ``hidden_act``
    (``quick_gelu`` for CLIP-L, ``gelu`` for bigG), ``eos_token_id`` 2 (legacy argmax pooling,
    as the SD3 text-encoder configs), ``layer_norm_eps`` 1e-5.
    """
    _require(
        shapes,
        [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight",
        ],
        component,
    )
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    proj = shapes.get("text_projection.weight", (hidden, hidden))[0]
    config = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        projection_dim=proj,
        intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_layer_count(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=hidden // 64,
        max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0],
        hidden_act="quick_gelu" if component == "clip_l" else "gelu",
        layer_norm_eps=1e-5,
        eos_token_id=2,
    )
    config.update(overrides or {})
    return {"_class_name": "CLIPTextModelWithProjection", **config}


def infer_t5_config(shapes: dict[str, tuple[int, ...]], overrides=None) -> dict:
    """T5EncoderConfig fields from an SD3 single file's ``t5xxl`` keys; ``relative_attention_max_distance``
    (128) and ``layer_norm_epsilon`` (1e-6) are not stored in the weights."""
    embed_key = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
    _require(
        shapes,
        [
            embed_key,
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.0.layer.0.SelfAttention.q.weight",
        ],
        "t5",
    )
    vocab, d_model = shapes[embed_key]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    config = dict(
        vocab_size=vocab,
        d_model=d_model,
        num_heads=heads,
        d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=ff,
        num_layers=_layer_count(shapes, r"encoder\.block\.(\d+)\."),
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    config.update(overrides or {})
    return {"_class_name": "T5EncoderModel", **config}


def single_file_sources(component: str, shapes: dict[str, tuple[int, ...]], load) -> list[SourceTensor]:
    """Sources of a text encoder inside an SD3 single file (names are already transformers').

    SD3 single files store CLIP-L without ``text_projection``; as diffusers does, it is then the
    identity (CLIP-L's projection keeps the 768-d pooled output).
    """
    sources = [SourceTensor(k, shape, lambda k=k: load(k)) for k, shape in shapes.items()]
    if component == "clip_l" and "text_projection.weight" not in shapes:
        hidden = shapes["text_model.embeddings.token_embedding.weight"][1]
        sources.append(
            SourceTensor("text_projection.weight", (hidden, hidden), lambda: np.eye(hidden, dtype=np.float32))
        )
    class_name = "T5EncoderModel" if component == "t5" else "CLIPTextModelWithProjection"
    return tidy_sources(class_name, sources)
