"""Parity of the Flax LPIPS (``percov2_jax.metrics.lpips``) with a plain-torch reference.

Reference: ``TorchLPIPS`` below mirrors lpips v0.1's ``LPIPS.forward(in0, in1, normalize=False)``
with ``spatial=False``, ``lpips=True``, eval mode: ``ScalingLayer`` -> torchvision ``features``
(``alexnet``/``vgg16`` layer lists written out, since torchvision does not import beside torch
2.13 here) -> ``normalize_tensor`` at the taps -> squared difference -> ``lin{k}`` (Dropout,
1x1 conv without bias) -> ``spatial_average`` -> sum. Checked once against the real lpips 0.1.4
source (its wheel, with a stub torchvision serving these same layer lists and weights): identical,
max |diff| = 0 on every pair used here.

Weights are random (seeded; He-scaled backbone so activations survive 13 VGG layers, positive
heads as trained lpips heads are) and go through the production converter from files in the
torchvision and lpips key formats. Images: uniform noise and crops of skimage's astronaut, 64x64
for AlexNet and 48x48 for VGG16 (real channel widths). Tolerance: float32, max |ours - ref| <=
1e-5 * max |ref|; measured 5e-8 .. 4e-7 on the distances, 8e-7 .. 3e-6 on the tap activations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn
from torch_reference import max_rel_error, nchw

from percov2_jax.convert.core import ConversionError
from percov2_jax.convert.lpips_weights import load_lpips
from percov2_jax.convert.safetensors_io import write_safetensors

pytestmark = pytest.mark.parity  # against PyTorch reference models

F32_TOL = 1e-5
SHIFT = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
SCALE = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
IMAGE_SIZE = {"alex": 64, "vgg": 48}


def torchvision_features(net: str) -> tuple[tnn.Sequential, tuple[int, ...]]:
    """torchvision's ``alexnet().features`` / ``vgg16().features`` and lpips' tap indices."""
    relu = lambda: tnn.ReLU(inplace=True)  # noqa: E731
    if net == "alex":
        layers = [
            tnn.Conv2d(3, 64, 11, stride=4, padding=2),
            relu(),
            tnn.MaxPool2d(3, 2),
            tnn.Conv2d(64, 192, 5, padding=2),
            relu(),
            tnn.MaxPool2d(3, 2),
            tnn.Conv2d(192, 384, 3, padding=1),
            relu(),
            tnn.Conv2d(384, 256, 3, padding=1),
            relu(),
            tnn.Conv2d(256, 256, 3, padding=1),
            relu(),
            tnn.MaxPool2d(3, 2),
        ]
        return tnn.Sequential(*layers), (1, 4, 7, 9, 11)  # lpips slices end at 2, 5, 8, 10, 12
    layers, c_in = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(tnn.MaxPool2d(2, 2))
        else:
            layers += [tnn.Conv2d(c_in, v, 3, padding=1), relu()]
            c_in = v
    return tnn.Sequential(*layers), (3, 8, 15, 22, 29)  # lpips slices end at 4, 9, 16, 23, 30


class NetLinLayer(tnn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(channels, 1, 1, bias=False))


class TorchLPIPS(tnn.Module):
    def __init__(self, net: str):
        super().__init__()
        self.features, self.taps = torchvision_features(net)
        channels = [
            [m for m in self.features[: t + 1] if isinstance(m, tnn.Conv2d)][-1].out_channels for t in self.taps
        ]
        self.lins = tnn.ModuleList(NetLinLayer(c) for c in channels)

    def tap_features(self, x):
        h, out = (x - SHIFT) / SCALE, []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                out.append(h.clone())
        return out

    def forward(self, x, y):
        per_tap = []
        for fx, fy, lin in zip(self.tap_features(x), self.tap_features(y), self.lins):
            nx = fx / (torch.sqrt(torch.sum(fx**2, dim=1, keepdim=True)) + 1e-10)
            ny = fy / (torch.sqrt(torch.sum(fy**2, dim=1, keepdim=True)) + 1e-10)
            per_tap.append(lin.model((nx - ny) ** 2).mean([2, 3], keepdim=True))
        total = 0
        for r in per_tap:
            total = total + r
        return total, per_tap  # [B, 1, 1, 1] as lpips, and each tap's share

    def torchvision_state_dict(self):
        sd = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        sd["classifier.1.weight"] = torch.zeros(4, 9216)  # the published files carry the classifier too
        sd["classifier.1.bias"] = torch.zeros(4)
        return sd

    def lpips_state_dict(self):
        return {f"lin{k}.model.1.weight": lin.model[1].weight.detach().clone() for k, lin in enumerate(self.lins)}


def random_reference(net: str, seed: int) -> TorchLPIPS:
    g = torch.Generator().manual_seed(seed)
    model = TorchLPIPS(net).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lins"):
                p.copy_(torch.rand(p.shape, generator=g) / p.shape[1])
            elif p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / np.prod(p.shape[1:])))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def image_pairs(size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``[2, size, size, 3]`` pairs in [-1, 1]: noise, and astronaut crops vs. noisy / shifted crops."""
    from skimage import data

    rng = np.random.RandomState(3)
    photo = data.astronaut().astype(np.float32) / 127.5 - 1.0
    a = np.stack([photo[100 : 100 + size, 180 : 180 + size], photo[300 : 300 + size, 60 : 60 + size]])
    shifted = np.stack([photo[104 : 104 + size, 183 : 183 + size], photo[300 : 300 + size, 200 : 200 + size]])
    noisy = np.clip(a + rng.normal(0, 0.1, a.shape), -1, 1).astype(np.float32)
    return {
        "noise": tuple(rng.uniform(-1, 1, (2, 2, size, size, 3)).astype(np.float32)),
        "photo_noisy": (a, noisy),
        "photo_shifted": (a, shifted),
    }


def build_case(net: str, folder) -> dict:
    ref = random_reference(net, seed={"alex": 5, "vgg": 6}[net])
    torch.save(ref.torchvision_state_dict(), folder / "backbone.pth")
    torch.save(ref.lpips_state_dict(), folder / "heads.pth")
    module, params = load_lpips(net, folder / "backbone.pth", folder / "heads.pth")
    distance = jax.jit(lambda p, x, y: module.apply({"params": p}, x, y, per_tap=True))
    taps = jax.jit(lambda p, x: module.apply({"params": p}, x, method="tap_features"))
    return dict(
        net=net,
        ref=ref,
        folder=folder,
        module=module,
        params=params,
        distance=distance,
        taps=taps,
        pairs=image_pairs(IMAGE_SIZE[net]),
    )


@pytest.fixture(scope="module")
def alex_case(tmp_path_factory):
    return build_case("alex", tmp_path_factory.mktemp("lpips_alex"))


@pytest.fixture(scope="module")
def vgg_case(tmp_path_factory):
    return build_case("vgg", tmp_path_factory.mktemp("lpips_vgg"))


@pytest.fixture(params=["alex", "vgg"])
def case(request):
    return request.getfixturevalue(f"{request.param}_case")


def test_distance_parity(case):
    for name, (x, y) in case["pairs"].items():
        total, per_tap = case["distance"](case["params"], x, y)
        with torch.no_grad():
            ref_total, ref_taps = case["ref"](nchw(x), nchw(y))
        assert total.shape == (2,) and total.dtype == jnp.float32
        err = max_rel_error(total, ref_total.reshape(2).numpy())
        print(f"{case['net']} {name}: lpips {np.asarray(total)}, rel err {err:.2e}")  # shown with -s
        assert err <= F32_TOL, name
        ref_taps = torch.cat([t.reshape(2, 1) for t in ref_taps], dim=1).numpy()
        assert max_rel_error(per_tap, ref_taps) <= F32_TOL, name
        assert np.all(np.asarray(total) > 0), name


def test_tap_features_parity(case):
    x = case["pairs"]["photo_noisy"][0]
    ours = case["taps"](case["params"], x)
    with torch.no_grad():
        ref = case["ref"].tap_features(nchw(x))
    assert len(ours) == len(ref) == 5
    for k, (a, b) in enumerate(zip(ours, ref)):
        err = max_rel_error(a, b.numpy().transpose(0, 2, 3, 1))
        print(f"{case['net']} tap {k}: rel err {err:.2e}")
        assert err <= F32_TOL, k


def test_identity_and_symmetry(case):
    x, y = case["pairs"]["photo_shifted"]
    same, _ = case["distance"](case["params"], x, x)
    assert np.all(np.asarray(same) == 0.0)
    xy, _ = case["distance"](case["params"], x, y)
    yx, _ = case["distance"](case["params"], y, x)
    np.testing.assert_allclose(xy, yx, rtol=1e-6)


def test_shape_errors(case):
    x = case["pairs"]["noise"][0]
    with pytest.raises(ValueError, match="equal shape"):
        case["module"].apply({"params": case["params"]}, x, x[:1])


def test_safetensors_heads(alex_case, tmp_path):
    case = alex_case
    heads = {k: v.numpy() for k, v in case["ref"].lpips_state_dict().items()}
    write_safetensors(tmp_path / "heads.safetensors", heads)
    _, params = load_lpips("alex", case["folder"] / "backbone.pth", tmp_path / "heads.safetensors")
    np.testing.assert_array_equal(params["lin2"]["model_1"]["kernel"], case["params"]["lin2"]["model_1"]["kernel"])
    np.testing.assert_array_equal(params["features_3"]["kernel"], case["params"]["features_3"]["kernel"])


def test_converter_errors(alex_case, tmp_path):
    case = alex_case
    backbone = case["ref"].torchvision_state_dict()
    del backbone["features.3.bias"]  # missing
    backbone["features.13.weight"] = torch.zeros(8, 8, 3, 3)  # unexpected
    heads = case["ref"].lpips_state_dict()
    heads["lin2.model.1.weight"] = torch.zeros(1, 100, 1, 1)  # wrong shape
    heads["lin0.model.0.weight"] = torch.zeros(1)  # unexpected
    torch.save(backbone, tmp_path / "backbone.pth")
    torch.save(heads, tmp_path / "heads.pth")
    with pytest.raises(ConversionError) as err:
        load_lpips("alex", tmp_path / "backbone.pth", tmp_path / "heads.pth")
    msg = str(err.value)
    for fragment in (
        "features_3/bias",
        "features.13.weight",
        "lin2.model.1.weight",
        "[1, 100, 1, 1]",
        "lin0.model.0.weight",
        "torchvision alex backbone",
        "lpips v0.1 alex heads",
    ):
        assert fragment in msg, (fragment, msg)
    # The alex files do not fit the VGG model.
    with pytest.raises(ConversionError, match="missing parameters"):
        load_lpips("vgg", case["folder"] / "backbone.pth", case["folder"] / "heads.pth")
    with pytest.raises(ValueError, match="net must be one of"):
        load_lpips("squeeze", case["folder"] / "backbone.pth", case["folder"] / "heads.pth")
