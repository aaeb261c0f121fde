"""Every parameter of every model carries logical axis names that the one rule table maps
onto the (data, fsdp, tensor) mesh."""

from __future__ import annotations

import flax.linen as nn
import jax
import pytest
from flax import traverse_util

from percov2_jax import sharding
from percov2_jax.convert import registry
from percov2_jax.models import AutoencoderKLConfig, SD3TransformerConfig
from percov2_jax.models.clip import CLIPTextConfig
from percov2_jax.models.t5 import T5EncoderConfig

CONFIGS = {
    "sd35_medium_scanned": (
        {
            "_class_name": "SD3Transformer2DModel",
            **SD3TransformerConfig(
                num_layers=5,
                attention_head_dim=8,
                num_attention_heads=2,
                caption_projection_dim=16,
                joint_attention_dim=12,
                pooled_projection_dim=10,
                pos_embed_max_size=12,
                qk_norm="rms_norm",
                dual_attention_layers=(0, 1),
            ).to_dict(),
        },
        {"scan_layers": True},
    ),
    "sd3_loop": (
        {
            "_class_name": "SD3Transformer2DModel",
            **SD3TransformerConfig(
                num_layers=3,
                attention_head_dim=8,
                num_attention_heads=2,
                caption_projection_dim=16,
                joint_attention_dim=12,
                pooled_projection_dim=10,
                pos_embed_max_size=12,
            ).to_dict(),
        },
        {},
    ),
    "vae": (
        AutoencoderKLConfig(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4,
            latent_channels=16,
            use_quant_conv=True,
        ).to_dict(),
        {},
    ),
    "clip_g": (
        CLIPTextConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            projection_dim=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_act="gelu",
        ).to_dict(),
        {},
    ),
    "t5": (
        T5EncoderConfig(
            vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
        ).to_dict(),
        {},
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_parameter_has_logical_axes(name):
    config, options = CONFIGS[name]
    module, kind = registry.build_module(config, **options)
    boxed = registry.abstract_params(module, kind)
    flat = traverse_util.flatten_dict(boxed)  # stops at the (non-dict) boxes
    unnamed = [k for k, v in flat.items() if not isinstance(v, nn.LogicallyPartitioned)]
    assert not unnamed, unnamed
    known = {logical for logical, _ in sharding.LOGICAL_AXIS_RULES}
    for path, box in flat.items():
        assert len(box.names) == len(box.value.shape), path
        assert set(box.names) - {None} <= known, (path, box.names)
    if name == "t5":
        assert flat[("encoder", "block_1", "layer_1", "DenseReluDense", "wi_0", "kernel")].names == ("embed", "mlp")
        assert flat[("shared", "embedding")].names == ("vocab", "embed")
    if options.get("scan_layers"):
        assert flat[("transformer_blocks_0_to_1", "attn", "to_q", "kernel")].names == ("layers", "embed", "heads")
    # The rule table maps every name (no duplicates within a parameter).
    nn.logical_to_mesh(nn.get_partition_spec(boxed), sharding.LOGICAL_AXIS_RULES)


def test_make_mesh_shapes_and_errors():
    mesh = sharding.make_mesh(data=-1)
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == jax.device_count()
    with pytest.raises(ValueError, match="at most one mesh axis"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh(data=jax.device_count() + 1)
