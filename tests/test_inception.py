"""Parity of the Flax FID InceptionV3 (``percov2_jax.metrics.inception``) with a plain-torch reference.

Reference: ``TorchFIDInception`` below mirrors pytorch-fid 0.3.0's
``InceptionV3(output_blocks=[3], resize_input=False, normalize_input=True)`` built on
``fid_inception_v3()`` (torchvision ``Inception3`` layers with ``FIDInceptionA/C/E_1/E_2``),
read from the pytorch-fid wheel's ``pytorch_fid/inception.py`` and torchvision 0.28's
``models/inception.py``; both import torchvision, which does not import beside torch 2.13 here,
so the layer list is written out. Inputs are in [0, 255] and divided by 255 first, as clean-fid's
``legacy_pytorch`` feature extractor does.

Weights are random (seeded): He-scaled convs, BatchNorm weight/bias/running_mean/running_var
randomised; they go through the production converter from a ``.pth`` in pytorch-fid's key
format (plus the ``fc`` classifier and ``num_batches_tracked`` counters the converter skips).
Images: two 299x299 crops of skimage's astronaut, one with noise. Tolerance: float32,
max |ours - ref| <= 1e-4 * max |ref| on the pool3 features; measured 5.1e-7 (see -s output).
The test sees the FID patches: torchvision's ``count_include_pad=True`` pools in A/C/E_1 give
4.2e-2, an average pool in ``Mixed_7c`` 2.0e-1. Resize: torch's interpolation weights are
reproduced bit for bit; resized values within 3.1e-5 on [0, 255] (float32 summation order).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn
from torch_reference import max_rel_error, nchw

from percov2_jax.convert.core import ConversionError
from percov2_jax.convert.inception_weights import load_fid_inception
from percov2_jax.metrics.inception import bilinear_weights, clean_fid_resize, resize_bilinear, scale_input

pytestmark = pytest.mark.parity  # against PyTorch reference models

F32_TOL = 1e-4


class BasicConv2d(tnn.Module):
    def __init__(self, c_in, c_out, **kw):
        super().__init__()
        self.conv = tnn.Conv2d(c_in, c_out, bias=False, **kw)
        self.bn = tnn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_tf(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tnn.Module):
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(avg_pool_tf(x)),
            ],
            1,
        )


class InceptionB(tnn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class FIDInceptionC(tnn.Module):
    def __init__(self, c_in, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for k in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{k}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionD(tnn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for k in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{k}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(tnn.Module):
    """``FIDInceptionE_1`` (``max_pool=False``) and ``FIDInceptionE_2`` (``max_pool=True``)."""

    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(tnn.Module):
    """pytorch-fid's ``fid_inception_v3()`` modules (same attribute names, so the same state dict)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = tnn.Linear(2048, 1008)  # in the published file; unused for pool3
        maxpool = lambda: tnn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
        self.blocks = [  # pytorch-fid InceptionV3.blocks 0..3 (plain list: not in the state dict)
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, maxpool()],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, maxpool()],
            [
                self.Mixed_5b,
                self.Mixed_5c,
                self.Mixed_5d,
                self.Mixed_6a,
                self.Mixed_6b,
                self.Mixed_6c,
                self.Mixed_6d,
                self.Mixed_6e,
            ],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, tnn.AdaptiveAvgPool2d(output_size=(1, 1))],
        ]

    def forward(self, images_0_255):
        x = 2 * (images_0_255 / 255) - 1  # clean-fid legacy_pytorch: model(x / 255); normalize_input
        for block in self.blocks:
            for layer in block:
                x = layer(x)
        return x.squeeze(-1).squeeze(-1)  # clean-fid: [B, 2048, 1, 1] -> [B, 2048]


def random_reference(seed: int) -> TorchFIDInception:
    g = torch.Generator().manual_seed(seed)
    model = TorchFIDInception().eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("conv.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / np.prod(t.shape[1:])))
            elif name.endswith("bn.weight") or name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("bn.bias") or name.endswith("running_mean"):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            elif name.startswith("fc."):
                t.copy_(0.01 * torch.randn(t.shape, generator=g))
    return model


def photos() -> np.ndarray:
    """``[2, 299, 299, 3]`` float32 in [0, 255]: an astronaut crop and a noisy crop."""
    from skimage import data

    photo = data.astronaut().astype(np.float32)
    a = photo[0:299, 100:399]
    b = np.clip(photo[200:499, 180:479] + np.random.RandomState(0).normal(0, 20, a.shape), 0, 255)
    return np.stack([a, b]).astype(np.float32)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fid_inception")
    ref = random_reference(seed=7)
    state = ref.state_dict()
    assert "bn.num_batches_tracked" in "".join(state)  # saved like a torch >= 0.4 state dict
    torch.save(state, folder / "pt_inception.pth")
    module, params = load_fid_inception(folder / "pt_inception.pth", input_scaling="pytorch_fid")
    images = photos()
    features = np.asarray(jax.jit(lambda p, x: module.apply({"params": p}, x))(params, images))
    with torch.no_grad():
        ref_features = ref(nchw(images)).numpy()
    return dict(ref=ref, folder=folder, module=module, params=params, features=features, ref_features=ref_features)


def test_pool3_parity(case):
    ours, ref = case["features"], case["ref_features"]
    assert ours.shape == (2, 2048) and ours.dtype == np.float32
    err = max_rel_error(ours, ref)
    print(f"pool3 rel err {err:.2e}, |ref| max {np.abs(ref).max():.3g} mean {np.abs(ref).mean():.3g}")  # -s
    assert err <= F32_TOL
    assert np.abs(ref).mean() > 1e-2 and np.abs(ours[0] - ours[1]).max() > 1e-2 * np.abs(ref).max()  # non-trivial


def test_converter_round_trip(case):
    """Every converted leaf equals its torch tensor (transposed for convs); 94 convs x 5 tensors."""
    state = case["ref"].state_dict()
    flat = {"/".join(k): np.asarray(v) for k, v in _flatten(case["params"]).items()}
    assert len(flat) == 470
    leaf = {
        "conv.weight": "conv/kernel",
        "bn.weight": "bn/scale",
        "bn.bias": "bn/bias",
        "bn.running_mean": "bn/mean",
        "bn.running_var": "bn/var",
    }
    seen = 0
    for key, tensor in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        layer, suffix = key.split(".conv.") if ".conv." in key else key.split(".bn.")
        suffix = ("conv." if ".conv." in key else "bn.") + suffix
        want = tensor.numpy()
        if want.ndim == 4:
            want = want.transpose(2, 3, 1, 0)
        np.testing.assert_array_equal(flat[layer.replace(".", "/") + "/" + leaf[suffix]], want, err_msg=key)
        seen += 1
    assert seen == 470


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def test_converter_errors(case, tmp_path):
    state = case["ref"].state_dict()
    del state["Mixed_6c.branch7x7dbl_3.bn.running_var"]  # missing
    state["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)  # unknown (torchvision's aux head)
    state["Mixed_7b.branch_pool.conv.weight"] = torch.zeros(192, 1024, 1, 1)  # wrong shape
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConversionError) as err:
        load_fid_inception(tmp_path / "bad.pth")
    msg = str(err.value)
    for fragment in (
        "Mixed_6c/branch7x7dbl_3/bn/var",
        "AuxLogits.conv0.conv.weight",
        "Mixed_7b.branch_pool.conv.weight",
        "[192, 1024, 1, 1]",
        "FID InceptionV3",
    ):
        assert fragment in msg, (fragment, msg)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="flat state dict"):
        load_fid_inception(tmp_path / "list.pth")


@pytest.mark.parametrize("in_hw,out_hw", [((7, 5), (11, 13)), ((20, 17), (6, 9)), ((32, 24), (299, 299))])
def test_resize_bilinear_matches_torch(in_hw, out_hw):
    x = np.random.RandomState(1).uniform(0, 255, (2, *in_hw, 3)).astype(np.float32)
    ours = np.asarray(resize_bilinear(jnp.asarray(x), out_hw))
    ref = F.interpolate(nchw(x), size=out_hw, mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    print(f"resize {in_hw} -> {out_hw}: max |diff| {err:.2e} on [0, 255]")
    assert err <= 1e-4  # separable vs. torch's 2-D sum: float32 rounding only
    # The interpolation weights themselves are torch's, bit for bit (resize a one-hot basis).
    n, o = in_hw[1], out_hw[1]
    basis = F.interpolate(torch.eye(n).reshape(n, 1, 1, n), size=(1, o), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(bilinear_weights(n, o), basis.reshape(n, o).T.numpy())


def test_clean_fid_resize():
    from PIL import Image

    img = np.random.RandomState(2).randint(0, 256, (40, 60, 3)).astype(np.uint8)
    out = clean_fid_resize(img)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    green = np.asarray(Image.fromarray(img[:, :, 1].astype(np.float32)).resize((299, 299), Image.BICUBIC))
    np.testing.assert_array_equal(out[:, :, 1], np.clip(green, 0, 255))
    np.testing.assert_array_equal(clean_fid_resize(np.full((10, 30, 3), 77, np.uint8)), 77.0)


def test_input_scaling():
    x = jnp.asarray([0.0, 128.0, 255.0])
    np.testing.assert_allclose(scale_input(x, "clean_fid"), [-1.0, 0.0, 127.0 / 128.0])
    np.testing.assert_allclose(scale_input(x, "pytorch_fid"), [-1.0, 1.0 / 255.0, 1.0], atol=1e-7)
    with pytest.raises(ValueError, match="input_scaling"):
        scale_input(x, "imagenet")
