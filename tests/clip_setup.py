"""A tiny random transformers ``CLIPModel`` folder and a byte-level CLIP tokenizer folder, for the
CLIP-score parity tests and the evaluation tests (no CLIP weights can be downloaded)."""

from __future__ import annotations

import json
import pathlib


def _bytes_to_unicode() -> list[str]:
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = [], 0
    for b in range(256):
        out.append(chr(b) if b in keep else chr(256 + extra))
        extra += b not in keep
    return out


def tokenizer_folder(folder: pathlib.Path):
    """Byte-level CLIP BPE with no merges (256 chars, 256 end-of-word chars, BOS 512, EOS 513), saved."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(folder)
    return tok


def tiny_clip(root: pathlib.Path, seed: int = 92) -> dict:
    """``root/model`` (a random CLIPModel with distinct projection sizes) and ``root/tokenizer``."""
    from torch_reference import randomize_
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=24,
            projection_dim=7,
            bos_token_id=512,
            eos_token_id=2,
            pad_token_id=513,
            hidden_act="quick_gelu",
        ),
        vision_config=dict(
            hidden_size=40,
            intermediate_size=52,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
            projection_dim=9,
            hidden_act="quick_gelu",
        ),
        projection_dim=16,
    )  # the sub-configs' projection_dim differ: CLIPModel uses the top-level one
    model = randomize_(CLIPModel(config), seed=seed)
    model.save_pretrained(root / "model")
    tokenizer = tokenizer_folder(root / "tokenizer")
    return dict(model=model, folder=root / "model", tokenizer_folder=root / "tokenizer", tokenizer=tokenizer)
