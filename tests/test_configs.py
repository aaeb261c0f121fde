"""The shipped stage-1 configs: the SD3-medium ones build abstractly (jax.eval_shape, no
memory) with the documented sharding, and the tiny one is what the demo trains."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P


def _spec(name):
    import importlib

    from percov2_jax import build
    from percov2_jax import sharding as sharding_lib
    from percov2_jax.models.percov2 import count_params
    from percov2_jax.train.state import build_state_spec

    config = importlib.import_module(f"configs.{name}").get_config()
    mesh = sharding_lib.make_mesh()
    rate = build.validate_config(config, mesh=mesh)
    model = build.build_model(config, rate)
    inputs = build.init_inputs(model, rate)
    spec = build_state_spec(model, inputs, config.optim, mesh, ema=False)
    return config, model, spec, count_params(spec.abstract.params)


@pytest.mark.parametrize("name,hyper_side", [("sd3_medium_ultralow", 8), ("sd3_medium_extreme", 32)])
def test_sd3_medium_configs_build_abstractly(name, hyper_side):
    config, model, spec, n = _spec(name)
    cfg = model.config
    assert cfg.hyper_encoder.hyper_side == hyper_side and cfg.quantizer.codebook_size == 256
    assert cfg.conditioned_transformer.in_channels == 16 + 320
    # SD3-medium MM-DiT: 2.03B weights (+ 320 x 1536 x 4 for the widened patch embedding), the
    # 192 x 192 x 1536 position table (a buffer in diffusers, a frozen parameter here), and the
    # ELIC hyper-encoder (~4-6M) with the VQ projections.
    table = 192 * 192 * 1536
    assert 2.02e9 < n - table < 2.05e9, n - table
    params, shardings = spec.abstract.params, spec.shardings.params
    blocks = next(k for k in params["transformer"] if k.startswith("transformer_blocks_0_to"))
    q = shardings["transformer"][blocks]["attn"]["to_q"]["kernel"].spec
    assert params["transformer"][blocks]["attn"]["to_q"]["kernel"].shape == (23, 1536, 1536)
    assert q == P(None, "fsdp", "tensor")  # scanned layers, embed -> fsdp, heads -> tensor
    assert shardings["transformer"][blocks]["ff"]["net_2"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert shardings["transformer"]["pos_embed"]["proj"]["kernel"].spec == P(None, None, None, "fsdp")
    # Adam moments follow their parameters; the frozen position table has no optimizer state.
    mu = jax.tree_util.tree_leaves(spec.shardings.opt_state)
    assert any(getattr(s, "spec", None) == P(None, "fsdp", "tensor") for s in mu)
    assert not spec.mask["transformer"]["pos_embed"]["pos_embed"]
    assert config.train.global_batch_size == 160 and config.optim.learning_rate == 1e-5


def test_tiny_config_is_small():
    _, _, _, n = _spec("tiny")
    assert n < 2e6, n


@pytest.mark.parametrize("name", ["prior_base", "prior_tiny", "prior_demo"])
def test_prior_configs_build_abstractly(name):
    """Every shipped stage-2 config builds its prior and optimizer from the schema's own fields."""
    import importlib

    import jax.numpy as jnp

    from percov2_jax import sharding as sharding_lib
    from percov2_jax.entropy import mim
    from percov2_jax.train.prior import prior_model_config
    from percov2_jax.train.state import build_state_spec

    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.optim.decay_steps == config.train.num_steps  # the schedule ends with the run
    model = mim.MaskedTokenPrior(prior_model_config(config, 256, 2048))
    inputs = (jnp.zeros((1, 8, 8), jnp.int32), jnp.zeros((1, 8, 8), bool), None)
    spec = build_state_spec(model, inputs, config.optim, sharding_lib.make_mesh(), ema=False)
    n = sum(x.size for x in jax.tree_util.tree_leaves(spec.abstract.params))
    assert (n > 80e6) if name == "prior_base" else (n < 1e6), n


@pytest.mark.parametrize(
    "name,layers,width,billions",
    [("sd35_medium_ultralow", 24, 1536, (2.2, 2.6)), ("sd35_large_extreme", 38, 2432, (8.0, 8.3))],
)
def test_sd35_configs_build_abstractly(name, layers, width, billions):
    """The SD3.5 configs build their release's MM-DiT (dual attention, qk-norm) from
    ``model.variant`` when there is no checkpoint to read it from."""
    config, model, _, n = _spec(name)
    t = model.config.transformer
    assert (t.num_layers, t.inner_dim, t.qk_norm) == (layers, width, "rms_norm")
    assert t.dual_attention_layers == (tuple(range(13)) if "medium" in name else ())
    table = t.pos_embed_max_size**2 * width
    assert billions[0] * 1e9 < n - table < billions[1] * 1e9, n - table


SHIPPED = ["sd3_medium_ultralow", "sd3_medium_extreme", "sd35_medium_ultralow", "sd35_medium_extreme"]
SHIPPED += ["sd35_large_ultralow", "sd35_large_extreme", "tiny", "demo"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_field_overridable_from_the_command_line(name):
    """absl cannot override a field typed NoneType; no shipped stage-1 config has one."""
    import importlib

    from ml_collections import config_dict

    config = importlib.import_module(f"configs.{name}").get_config()
    untyped = []

    def walk(c, prefix):
        for key in c.keys():
            field = c._fields[key]
            if isinstance(field, config_dict.ConfigDict):
                walk(field, f"{prefix}{key}.")
            elif (field.get_type() if isinstance(field, config_dict.FieldReference) else type(field)) is type(None):
                untyped.append(prefix + key)

    walk(config, "")
    assert not untyped, untyped


def _tiny_checkpoint(path, **fields):
    from percov2_jax import pretrained
    from percov2_jax.convert import registry

    config = dict(
        _class_name="SD3Transformer2DModel",
        sample_size=8,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        pos_embed_max_size=8,
        **fields,
    )
    module, kind = registry.build_module(config)
    params = module.init(jax.random.key(0), *kind.example_inputs(module.config))["params"]
    import flax.linen as nn

    pretrained.save(path, {"transformer": (module, nn.meta.unbox(params))})
    return config


def test_architecture_comes_from_the_checkpoint(tmp_path):
    """Unset fields come from the converted checkpoint's config; a field the config sets must
    agree with it, else one error names the field; the run stores the resolved architecture."""
    from percov2_jax import build
    from percov2_jax.train.defaults import release_config

    stored = _tiny_checkpoint(tmp_path / "ckpt", qk_norm="rms_norm", dual_attention_layers=[0])
    config = release_config("sd3-medium", "ultra-low")  # the variant is only the fallback
    config.pretrained.checkpoint = str(tmp_path / "ckpt")
    t = build.transformer_config(config)
    assert (t.num_layers, t.joint_attention_dim, t.qk_norm, t.dual_attention_layers) == (3, 24, "rms_norm", (0,))
    config.model.transformer.pooled_projection_dim = 12  # agrees: fine
    assert build.transformer_config(config) == t
    config.model.transformer.num_layers = 24
    config.model.transformer.qk_norm = "none"
    with pytest.raises(ValueError, match=r"model.transformer.num_layers=24 but the checkpoint has 3") as e:
        build.transformer_config(config)
    assert "model.transformer.qk_norm=None but the checkpoint has 'rms_norm'" in str(e.value)
    config.model.transformer.num_layers = None
    config.model.transformer.qk_norm = None
    build.resolve_architecture(config)
    assert dict(config.model.transformer)["dual_attention_layers"] == (0,)
    assert dict(config.model.transformer)["num_layers"] == stored["num_layers"]
    config.pretrained.checkpoint = str(tmp_path / "elsewhere")  # a stored run needs no checkpoint
    assert build.transformer_config(config) == t


def test_architecture_without_a_checkpoint():
    from percov2_jax import build
    from percov2_jax.train.defaults import base_config

    config = base_config()
    config.model.transformer.num_layers = 2  # a size override on the variant
    assert build.transformer_config(config).num_layers == 2
    assert build.transformer_config(config).pos_embed_max_size == 192
    config.model.variant = "sd4"
    with pytest.raises(ValueError, match="unknown model.variant 'sd4'"):
        build.transformer_config(config)
    config.model.variant = ""
    with pytest.raises(ValueError, match=r"leaves \['attention_head_dim'"):
        build.transformer_config(config)
