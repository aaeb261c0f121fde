"""Tiny stage-1 config: trains on 2 CPU cores in minutes on the builtin photographs.

  python -m percov2_jax.train --config configs/tiny.py --workdir /tmp/percov2_tiny
  python -m percov2_jax.train --config configs/tiny.py --workdir /tmp/t --config.train.num_steps=50

Nothing here is a paper value: every size is shrunk so a CPU can run it. The SD3 VAE is
replaced by a PCA patch autoencoder fitted on the training photos (8x downsampling, 16
channels, like SD3's) and the text encoders by a hashed bag-of-words encoder, because no
pretrained weights can be downloaded. Expect blurred, roughly right colours and layout, not
SD3 quality.
"""

from percov2_jax.train.defaults import base_config


def get_config():
    c = base_config()
    c.rate = "extreme"  # 32x32 tokens at 512^2 -> 8x8 tokens at 128^2 (V=256)
    c.image_size = 128
    c.model.transformer.update(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=64,
        dual_attention_layers=(),
        qk_norm="none",
    )  # 64 patches: images up to 1024 px
    c.model.hyper_channels = 32  # PerCo: 192
    c.model.hyper_out_channels = 32  # PerCo: 320
    c.model.codebook_dim = 8  # PerCo: 32
    c.model.dtype = "float32"
    c.model.scan_layers = False
    c.model.remat_policy = "none"
    c.vae.kind = "patch_pca"
    c.vae.fit_images = 64
    c.text.kind = "hashed"
    c.text.max_sequence_length = 16  # hashed words per caption
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.optim.schedule = "cosine"
    c.optim.end_learning_rate_factor = 0.1
    c.optim.decay_steps = 300
    c.data.source = "builtin"
    c.train.global_batch_size = 8
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.image_every = 100
    c.train.async_checkpointing = True
    c.sample.num_steps = 10
    c.sample.guidance_scale = 3.0
    c.sample.num_images = 4
    return c
