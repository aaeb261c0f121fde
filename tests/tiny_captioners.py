"""Tiny random image-to-text models for the caption tests, built offline: a word-level tokenizer
and a 1-layer BLIP-2 (OPT decoder) with its processor. Token ids follow the order of ``words``,
whose first four must be ``<pad>``, ``<unk>``, ``</s>``, ``<s>``."""

from __future__ import annotations

SPECIAL = ["<pad>", "<unk>", "</s>", "<s>"]


def word_tokenizer(words: list[str]):
    """A `PreTrainedTokenizerFast` over ``words`` split on whitespace (no files needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert words[:4] == SPECIAL, words[:4]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_blip2(words: list[str], side: int = 32):
    """``(model, processor)``: a random 1-layer BLIP-2 (widths 32, 4 query tokens, OPT decoder) in
    eval mode, drawn after ``torch.manual_seed(0)``, for ``side`` x ``side`` images."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tokenizer = word_tokenizer(words)
    # Blip2Processor adds the "<image>" token the model's query outputs replace (transformers 5).
    processor = Blip2Processor(BlipImageProcessor(size={"height": side, "width": side}), tokenizer, num_query_tokens=4)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = Blip2Config(
        vision_config=dict(small, image_size=side, patch_size=16),
        qformer_config=dict(small, encoder_hidden_size=32, vocab_size=16),
        text_config=dict(
            model_type="opt",
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=len(tokenizer),
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            bos_token_id=SPECIAL.index("<s>"),
            eos_token_id=SPECIAL.index("</s>"),
            pad_token_id=SPECIAL.index("<pad>"),
        ),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    return Blip2ForConditionalGeneration(config).eval(), processor
