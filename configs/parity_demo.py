"""The parity demo: a small random diffusers-format SD3 built on disk, converted, and run in Flax
beside diffusers on a real photograph.

  python demos/parity.py --config configs/parity_demo.py --workdir /tmp/percov2_parity_demo
  python demos/parity.py --config configs/parity_demo.py --workdir /tmp/d --config.image=coffee --config.sigma=0.3

Nothing here comes from the PerCoV2 paper: these are demo sizes (the real SD3-medium values
are in the comments).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.image = "astronaut"  # a photograph shipped with scikit-image (astronaut, coffee, chelsea, rocket)
    c.image_size = 128  # pixels per side (PerCoV2 evaluates at 512)
    c.caption = "a woman in an orange space suit standing in front of an american flag"  # sent losslessly
    c.sigma = 0.6  # flow-matching noise level of the one denoising step shown (t = 1000 * sigma)
    c.context_length = 16  # caption tokens (SD3: 77 CLIP + 256 T5)
    c.transformer = ml_collections.ConfigDict(
        dict(
            sample_size=32,  # SD3-medium: 128
            patch_size=2,
            in_channels=16,
            num_layers=4,  # SD3-medium: 24
            attention_head_dim=16,  # SD3-medium: 64
            num_attention_heads=4,  # SD3-medium: 24
            joint_attention_dim=64,  # SD3-medium: 4096
            caption_projection_dim=64,  # = heads * head_dim (SD3-medium: 1536)
            pooled_projection_dim=64,  # SD3-medium: 2048
            out_channels=16,
            pos_embed_max_size=32,  # SD3-medium: 192
        )
    )
    c.vae = ml_collections.ConfigDict(
        dict(
            block_out_channels=(32, 64, 64, 64),  # SD3: (128, 256, 512, 512)
            layers_per_block=1,  # SD3: 2
            norm_num_groups=16,  # SD3: 32
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
        )
    )
    return c
