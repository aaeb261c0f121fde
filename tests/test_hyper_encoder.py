"""Parity of the Flax hyper-encoder with PerCo's ``HyperEncoder.backbone`` (torch, CPU).

Reference: ``TorchHyperBackbone`` below, a transcription of Nikolai10/PerCo ``src/hyper_encoder.py``
(``backbone`` Sequential, PerCo's own ``ResidualBottleneckBlock``) and of CompressAI 1.2.8's
``AttentionBlock`` / ``conv3x3`` / ``models.utils.conv`` (5x5, stride 2, padding 2). CompressAI
itself is not imported: it requires ``numpy<2`` and ``torchvision``, neither of which installs
beside numpy 2 / torch 2.13. The layer choice is written from PerCo's ``cfg_ss`` conditions
(>= 16, >= 32, == 64), independently of ``hyper_encoder.layer_plan``.

Weights are random (variance-preserving, ``torch_reference.randomize_``) and reach Flax through the
converter back-end with two generic rules, so the parameter names are checked too. Non-square
20x12 latents give odd intermediate sizes (10x6 -> 5x3 -> 3x2). Tolerances: float32
max |ours - ref| <= 1e-5 * max |ref|; float64 <= 1e-10.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import meta
from torch_reference import max_rel_error, nchw, nhwc, randomize_

from percov2_jax.convert import core
from percov2_jax.models import hyper_encoder as he

pytestmark = pytest.mark.parity  # against PyTorch reference models

F32_TOL = 1e-5
F64_TOL = 1e-10
HYPER_SIDES = (64, 32, 16, 8)
RULES = (core.Rule(r".*\.weight", "kernel", "conv"), core.Rule(r".*\.bias", "bias", "identity"))
SMALL = dict(in_channels=16, channels=32, out_channels=40, latent_side=64)  # tiny widths, real topology


# ---- PyTorch reference (PerCo + CompressAI definitions) -------------------------------------------


def conv1x1(cin, cout):
    return torch.nn.Conv2d(cin, cout, kernel_size=1)


def conv3x3(cin, cout):
    return torch.nn.Conv2d(cin, cout, kernel_size=3, padding=1)


def conv5x5_down(cin, cout):  # compressai.models.utils.conv
    return torch.nn.Conv2d(cin, cout, kernel_size=5, stride=2, padding=2)


class TorchResidualBottleneckBlock(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = torch.nn.Sequential(
            conv1x1(n, n // 2), torch.nn.ReLU(), conv3x3(n // 2, n // 2), torch.nn.ReLU(), conv1x1(n // 2, n)
        )

    def forward(self, x):
        return x + self.layers(x)


class TorchResidualUnit(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = torch.nn.Sequential(
            conv1x1(n, n // 2), torch.nn.ReLU(), conv3x3(n // 2, n // 2), torch.nn.ReLU(), conv1x1(n // 2, n)
        )

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


class TorchAttentionBlock(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv_a = torch.nn.Sequential(*(TorchResidualUnit(n) for _ in range(3)))
        self.conv_b = torch.nn.Sequential(*(TorchResidualUnit(n) for _ in range(3)), conv1x1(n, n))

    def forward(self, x):
        return self.conv_a(x) * torch.sigmoid(self.conv_b(x)) + x


class TorchHyperBackbone(torch.nn.Module):
    def __init__(self, in_channels=4, N=192, M=320, cfg_ss=64):
        super().__init__()
        rbb = TorchResidualBottleneckBlock
        self.backbone = torch.nn.Sequential(
            conv1x1(in_channels, N) if cfg_ss >= 16 else conv5x5_down(in_channels, N),
            rbb(N),
            rbb(N),
            rbb(N),
            conv1x1(N, N) if cfg_ss >= 32 else conv5x5_down(N, N),
            rbb(N),
            rbb(N),
            rbb(N),
            TorchAttentionBlock(N),
            conv1x1(N, N) if cfg_ss == 64 else conv5x5_down(N, N),
            rbb(N),
            rbb(N),
            rbb(N),
            conv1x1(N, M),
            TorchAttentionBlock(M),
        )

    def forward(self, x):
        return self.backbone(x)


# ---- helpers ----------------------------------------------------------------------------------------


def flax_shapes(config, dtype=jnp.float32):
    module = he.HyperEncoder(config, dtype=dtype, param_dtype=dtype)
    x = jax.ShapeDtypeStruct((1, config.latent_side, config.latent_side, config.in_channels), dtype)
    abstract = jax.eval_shape(module.init, jax.random.key(0), x)
    return module, core.flatten_shapes(meta.unbox(abstract)["params"])


def convert(model: torch.nn.Module, target_shapes, dtype=np.float32):
    sources = [
        core.SourceTensor(k, tuple(v.shape), (lambda v=v: v.detach().numpy())) for k, v in model.state_dict().items()
    ]
    return core.assemble(core.plan(sources, RULES, target_shapes, what="HyperEncoder"), target_shapes, dtype)


@pytest.fixture(scope="module", params=HYPER_SIDES, ids=lambda s: f"hyper{s}")
def case(request):
    side = request.param
    config = he.HyperEncoderConfig(**SMALL, hyper_side=side)
    model = randomize_(
        TorchHyperBackbone(SMALL["in_channels"], SMALL["channels"], SMALL["out_channels"], side), seed=side
    )
    latents = np.random.RandomState(side).randn(2, 20, 12, SMALL["in_channels"]).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(model(nchw(latents)))
    module, shapes = flax_shapes(config)
    return dict(
        config=config,
        model=model,
        latents=latents,
        ref=ref,
        module=module,
        shapes=shapes,
        params=convert(model, shapes),
    )


# ---- tests ------------------------------------------------------------------------------------------


def test_float32_parity(case):
    out = jax.jit(lambda p, x: case["module"].apply({"params": p}, x))(case["params"], case["latents"])
    f = he.downsample_factor(case["config"])
    expected_hw = (-(-20 // f), -(-12 // f))  # ceil, as torch's padded stride-2 convs
    assert out.shape == (2, *expected_hw, SMALL["out_channels"]) == case["ref"].shape
    err = max_rel_error(out, case["ref"])
    print(f"hyper_side={case['config'].hyper_side} float32 max rel error {err:.2e}")
    assert err <= F32_TOL


def test_float64_parity(case):
    model = copy.deepcopy(case["model"]).double()
    latents = case["latents"].astype(np.float64)
    with torch.no_grad():
        ref = nhwc(model(nchw(latents)))
    with jax.enable_x64(True):
        module, shapes = flax_shapes(case["config"], jnp.float64)
        out = module.apply({"params": convert(model, shapes, np.float64)}, latents)
        assert out.dtype == jnp.float64
        err = max_rel_error(out, ref)
    print(f"hyper_side={case['config'].hyper_side} float64 max rel error {err:.2e}")
    assert err <= F64_TOL


# PerCo's comment (in_channels=4): "0.1250 (4,080,128) # 0.0019 (5,868,032)", i.e. hyper_side 64 and 8.
# The two middle values follow from the layer list (one / two 5x5 convs in place of 1x1 convs).
PERCO_COUNTS = {64: 4_080_128, 32: 4_964_864, 16: 5_849_600, 8: 5_868_032}


@pytest.mark.parametrize("side", HYPER_SIDES)
def test_parameter_count_matches_perco(side):
    _, shapes = flax_shapes(he.HyperEncoderConfig(in_channels=4, hyper_side=side))
    ours = sum(int(np.prod(s)) for s in shapes.values())
    torch_count = sum(p.numel() for p in TorchHyperBackbone(4, 192, 320, side).parameters())
    assert ours == torch_count == PERCO_COUNTS[side]


def test_kodak_grid_and_factor():
    config = he.HyperEncoderConfig()  # SD3: 16 channels, 8x8 tokens at 512^2
    assert he.downsample_factor(config) == 8
    module = he.HyperEncoder(config)
    x = jax.ShapeDtypeStruct((1, 96, 64, 16), jnp.float32)  # the latent of a 768x512 Kodak image
    out = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x)[0], x)
    assert out.shape == (1, 12, 8, 320)
    assert [he.downsample_factor(he.HyperEncoderConfig(hyper_side=s)) for s in HYPER_SIDES] == [1, 2, 4, 8]


def test_parameter_names_and_axes():
    _, shapes = flax_shapes(he.HyperEncoderConfig(in_channels=4, hyper_side=8))
    assert shapes[("backbone_0", "kernel")] == (5, 5, 4, 192)
    assert shapes[("backbone_1", "layers_2", "kernel")] == (3, 3, 96, 96)
    assert shapes[("backbone_8", "conv_b_3", "kernel")] == (1, 1, 192, 192)
    assert shapes[("backbone_14", "conv_a_0", "conv_4", "bias")] == (320,)
    module = he.HyperEncoder(he.HyperEncoderConfig(in_channels=4, hyper_side=8))
    boxed = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32))
    assert boxed["params"]["backbone_0"]["kernel"].names == (None, None, "conv_in", "conv_out")


@pytest.mark.parametrize("bad", [dict(hyper_side=48), dict(hyper_side=128), dict(hyper_side=4), dict(channels=0)])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="invalid HyperEncoderConfig"):
        he.HyperEncoderConfig(**bad)


def test_config_roundtrip_and_input_check():
    config = he.HyperEncoderConfig(in_channels=4, hyper_side=32)
    d = config.to_dict()
    assert d["_class_name"] == "HyperEncoder"
    assert he.HyperEncoderConfig.from_dict(d) == config
    with pytest.raises(ValueError, match="unknown HyperEncoder config fields"):
        he.HyperEncoderConfig.from_dict({"N": 192})
    with pytest.raises(ValueError, match=r"NHWC \[B, h, w, 4\]"):
        jax.eval_shape(he.HyperEncoder(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4, 8, 8), jnp.float32))
