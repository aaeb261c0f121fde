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
