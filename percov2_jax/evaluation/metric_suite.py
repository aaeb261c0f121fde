"""The evaluation's metric networks, loaded once and run batched on a process's mesh.

  suite = MetricSuite.from_config(config.metrics, mesh)
  suite.per_image(originals, reconstructions)   # {"psnr": [B], "ms_ssim": [B], "lpips": [B]} float64
  suite.inception_features(images)              # [B, 2048] float32 (FID / KID)
  suite.clip_image_embeds(images), suite.clip_text_embeds(captions)   # [B, D] (CLIP score)

Which metrics run is ``config.names`` (a comma-separated subset of `METRICS`). A network metric
needs its published weights (``lpips_backbone`` + ``lpips_heads``, ``inception``,
``clip_model``), converted by ``percov2_jax.convert``; a requested metric without weights is an
error at start-up, before any image is decoded. ``random_weights=True`` instead initialises
LPIPS and the Inception network randomly, for smoke runs on machines without the weights: the
code path is the real one, the numbers are meaningless, and every report says so. CLIP has no
random mode (its tokenizer needs the vocabulary files).

Conventions (PerCo's evaluation, docs/method.md §7.2): PSNR ``10 log10(255^2 / MSE)`` on
uint8 RGB (equal to its ``-10 log10(MSE)`` on [0, 1]); MS-SSIM with data range 255 on uint8
(equal to data range 1 on [0, 1]); LPIPS on [-1, 1] inputs; Inception features on clean-fid's
host resize to 299x299; CLIP score on the exact ``CLIPImageProcessor`` preprocessing. Images
whose shorter side is below MS-SSIM's minimum (160 px for five scales) get ``ms_ssim`` None.
Batches are padded (last row repeated) to ``batch_multiple`` and split over the mesh's
``(data, fsdp)`` axes; padding rows are dropped from every output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax import sharding
from percov2_jax.metrics import pixel

METRICS = ("psnr", "ms_ssim", "lpips", "fid", "kid", "clip_score")
MS_SSIM_MIN_SIDE = (11 - 1) * 2**4  # pixel.ms_ssim with the default window and five weights
RANDOM_NOTE = "random (smoke test: numbers are meaningless)"


def parse_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """``"psnr,lpips"`` or a sequence -> validated metric names in `METRICS` order."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = sorted(set(items) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in items)


class MetricSuite:
    """Holds the metric networks; see the module docstring."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        lpips=None,
        inception=None,
        clip=None,
        weights: dict | None = None,
        mesh=None,
        fid_method: str = "sqrtm",
    ):
        self.names = parse_names(names)
        self.fid_method = fid_method
        self.mesh = mesh
        self.weights = dict(weights or {})
        self._lpips = _replicated(lpips, mesh)
        self._inception = _replicated(inception, mesh)
        self._clip = clip
        if clip is not None:
            self._clip_params = (_put(clip.text_params, mesh), _put(clip.vision_params, mesh))

    @classmethod
    def from_config(cls, cfg, mesh=None) -> MetricSuite:
        """From ``config.metrics``: names, weight paths, ``random_weights``, ``lpips_net``."""
        names = parse_names(cfg.names)
        random_weights = bool(cfg.get("random_weights", False))
        missing, weights, lpips, inception, clip = [], {}, None, None, None
        if "lpips" in names:
            net = str(cfg.get("lpips_net", "alex"))
            if cfg.get("lpips_backbone") and cfg.get("lpips_heads"):
                from percov2_jax.convert.lpips_weights import load_lpips

                lpips = load_lpips(net, cfg.lpips_backbone, cfg.lpips_heads)
                weights["lpips"] = f"{net}: {cfg.lpips_backbone} + {cfg.lpips_heads}"
            elif random_weights:
                from percov2_jax.metrics.lpips import LPIPS

                module = LPIPS(net=net)
                x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
                lpips = (module, random_params(module, (x, x), seed=1))
                weights["lpips"] = f"{net}: {RANDOM_NOTE}"
            else:
                missing.append("lpips (metrics.lpips_backbone and metrics.lpips_heads)")
        if "fid" in names or "kid" in names:
            if cfg.get("inception"):
                from percov2_jax.convert.inception_weights import load_fid_inception

                inception = load_fid_inception(cfg.inception)
                weights["inception"] = str(cfg.inception)
            elif random_weights:
                from percov2_jax.metrics.inception import INPUT_SIZE, FIDInceptionV3

                module = FIDInceptionV3()
                x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
                inception = (module, random_params(module, (x,), seed=2))
                weights["inception"] = RANDOM_NOTE
            else:
                missing.append("fid/kid (metrics.inception: pytorch-fid's pt_inception-2015-12-05 .pth)")
        if "clip_score" in names:
            if cfg.get("clip_model"):
                from percov2_jax.convert.clip_vision_weights import load_clip_scorer

                clip = load_clip_scorer(cfg.clip_model, cfg.get("clip_tokenizer") or None)
                weights["clip"] = str(cfg.clip_model)
            else:
                missing.append("clip_score (metrics.clip_model: a transformers CLIPModel folder)")
        if missing:
            raise ValueError(
                "these metrics need weights that were not given: "
                + "; ".join(missing)
                + ". Give the paths, set metrics.random_weights=True for a smoke run (LPIPS and "
                "Inception only), or drop them from metrics.names."
            )
        for name in ("psnr", "ms_ssim"):
            if name in names:
                weights[name] = "no weights"
        fid_method = str(cfg.get("fid_method", "sqrtm"))
        from percov2_jax.metrics.fid import FID_METHODS

        if fid_method not in FID_METHODS:
            raise ValueError(f"metrics.fid_method must be one of {FID_METHODS}, got {fid_method!r}")
        return cls(
            names, lpips=lpips, inception=inception, clip=clip, weights=weights, mesh=mesh, fid_method=fid_method
        )

    # ---------------------------------------------------------------- batching

    @property
    def batch_multiple(self) -> int:
        return sharding.batch_multiple(self.mesh)

    def _shard(self, x: np.ndarray):
        return sharding.place_padded_batch(x, self.mesh)

    # ---------------------------------------------------------------- metrics

    def per_image(self, originals: np.ndarray, reconstructions: np.ndarray) -> dict[str, list]:
        """uint8 ``[B, H, W, 3]`` pairs -> ``{metric: [B] floats (None where undefined)}`` for the
        per-image metrics in ``names`` (psnr, ms_ssim, lpips)."""
        originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
        if originals.shape != reconstructions.shape or originals.dtype != np.uint8 or reconstructions.dtype != np.uint8:
            raise ValueError(
                f"per_image expects two uint8 [B, H, W, 3] batches of one shape, got "
                f"{originals.shape} {originals.dtype} and {reconstructions.shape} {reconstructions.dtype}"
            )
        n = len(originals)
        values = _pixel_metrics(
            self.names,
            self._lpips[0] if self._lpips else None,
            self._lpips[1] if self._lpips else None,
            self._shard(originals),
            self._shard(reconstructions),
        )
        out = {k: [float(v) for v in np.asarray(values[k], np.float64)[:n]] for k in values}
        if "ms_ssim" in self.names and "ms_ssim" not in out:
            out["ms_ssim"] = [None] * n
        return out

    @property
    def wants_inception(self) -> bool:
        return self._inception is not None

    def inception_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 ``[H, W, 3]`` images (any sizes) -> pool3 features ``[B, 2048]`` float32, after
        clean-fid's resize to 299x299."""
        from percov2_jax.metrics.inception import clean_fid_resize

        x = np.stack([clean_fid_resize(np.asarray(image)) for image in images]).astype(np.float32)
        module, params = self._inception
        return np.asarray(_apply(module, params, self._shard(x)), np.float32)[: len(images)]

    @property
    def wants_clip(self) -> bool:
        return self._clip is not None

    def clip_image_embeds(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 ``[H, W, 3]`` images -> projected CLIP image embeddings ``[B, D]`` float32."""
        from percov2_jax.metrics.clip_score import preprocess

        x = preprocess(list(images), self._clip.image_size)
        out = _apply(self._clip.vision_module, self._clip_params[1], self._shard(x)).image_embeds
        return np.asarray(out, np.float32)[: len(images)]

    def clip_text_embeds(self, captions: Sequence[str]) -> np.ndarray:
        """Captions -> projected CLIP text embeddings ``[B, D]`` float32."""
        from percov2_jax.metrics.clip_score import tokenize

        ids, mask = tokenize(self._clip.tokenizer, list(captions), self._clip.text_length)
        out = _apply(self._clip.text_module, self._clip_params[0], self._shard(ids), self._shard(mask)).text_embeds
        return np.asarray(out, np.float32)[: len(captions)]


# Module-level jitted functions with the (hashable) Flax modules as static arguments: a new
# MetricSuite over the same networks reuses the compiled code.


@jax.jit(static_argnums=(0,))
def _apply(module, params, *inputs):
    return module.apply({"params": params}, *inputs)


@jax.jit(static_argnums=(0, 1))
def _pixel_metrics(names, lpips_module, lpips_params, a, b):
    out = {}
    if "psnr" in names:
        out["psnr"] = pixel.psnr(a, b)
    if "ms_ssim" in names and min(a.shape[1:3]) >= MS_SSIM_MIN_SIDE:
        out["ms_ssim"] = pixel.ms_ssim(a, b, data_range=255.0)
    if lpips_module is not None:
        to_unit = lambda x: x.astype(jnp.float32) / 127.5 - 1.0  # noqa: E731
        out["lpips"] = lpips_module.apply({"params": lpips_params}, to_unit(a), to_unit(b))
    return out


def random_params(module, example_inputs: tuple, seed: int) -> Any:
    """Random parameters drawn on the host (no compile): kernels He-normal over their fan-in,
    BatchNorm ``scale``/``var`` 1, everything else 0, so activations keep their scale through a
    deep network (flax's own init of the Inception network takes ~30 s of op-by-op compiles on
    a CPU)."""
    from flax import linen as nn

    abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *example_inputs)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _put(tree: Any, mesh) -> Any:
    if mesh is None:
        return tree
    return jax.device_put(tree, sharding.replicated(mesh))


def _replicated(pair, mesh):
    if pair is None:
        return None
    module, params = pair
    return module, _put(params, mesh)
