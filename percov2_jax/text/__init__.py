"""Captions -> the MM-DiT's text conditioning ``(prompt_embeds [B, L, D], pooled [B, P])``.

Modules: `prompt_encoder` (SD3's CLIP-L + CLIP-G + T5 prompt embeddings, equal to diffusers'
``encode_prompt``), `store` (embeddings precomputed once into ArrayRecord shards) and
`conditioners` (what a run's ``config.text`` selects: the SD3 encoders, a precomputed store, or
the tiny configs' hashed stand-in).
"""
