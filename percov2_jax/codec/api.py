"""Compress and decompress images with a trained model: the Python API behind
``percov2 compress / decompress / info``.

  codec = Codec.from_workdir("/tmp/percov2_demo")   # stage-1 workdir; its prior/ subfolder if trained
  data = codec.compress(Image.open("photo.jpg"), caption="a cat on a sofa")
  data = codec.compress(image, caption, schedule="implicit_var", hybrid_groups=3)
  picture = codec.decompress(data)                    # uint8 [H, W, 3], original size

Encoder: image -> RGB (EXIF orientation applied) -> coded size, multiples of 64 (``pad``: edge
padding, cropped off on decode; ``resize``: bicubic to the nearest multiples, resized back on
decode) -> latent codec -> hyper-encoder -> VQ indices -> token payload (`token_payload`: uniform,
or range-coded with the stage-2 prior along a schedule, optionally hybrid); the caption is coded
by a caption coder; `bitstream.pack` wraps both.
Decoder: payload -> indices (completing hybrid streams with the prior) -> VQ features -> Euler
sampler (caption-only CFG, fixed seed) -> latent codec decode -> crop or resize back.

Model ids: a uniform stream without hybrid groups carries the stage-1 id (config plus a digest
of the VQ codebook), so any holder of the stage-1 model decodes it; a stream that needs the
prior carries an id that also covers the prior's config and weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from percov2_jax import rates, sharding
from percov2_jax.captions.coders import DEFAULT_CODER
from percov2_jax.codec import bitstream, networks, token_payload
from percov2_jax.codec.token_payload import TokenCoding, TokenPrior
from percov2_jax.data.sources import array_to_rgb, to_rgb
from percov2_jax.entropy import schedules
from percov2_jax.runs.layout import RunDir
from percov2_jax.runs.stage1 import load_stage1

RESIZE_POLICIES = ("pad", "resize")


@dataclasses.dataclass
class Codec:
    """A loaded model. ``sample_steps`` / ``guidance_scale`` / ``seed`` set decoding; ``coding``
    the default token coding of `compress`; ``resize_policy`` how sides that are not multiples of
    64 are handled."""

    config: Any
    model: Any
    params: Any
    vq_stats: Any
    latent_codec: Any
    vae_params: Any
    text: Any
    model_id: int
    prior: TokenPrior | None = None
    null_text: Any = None  # the unconditional caption ([1, L, D], [1, P]); None: the model's learned one
    sample_steps: int = 20
    guidance_scale: float = 3.0
    shift: float = 3.0  # the sampler's sigma shift (the run's flow.shift)
    seed: int = 0
    coding: TokenCoding | None = None
    resize_policy: str = "pad"
    mesh: Any = None  # where params live; batches are split over its (data, fsdp) axes

    def __post_init__(self):
        if self.coding is None:
            self.coding = TokenCoding(entropy_mode="auto" if self.prior is not None else "uniform")
        if self.resize_policy not in RESIZE_POLICIES:
            raise ValueError(f"resize_policy must be one of {RESIZE_POLICIES}, got {self.resize_policy!r}")
        if self.prior is not None:
            if self.prior.model.config.vocab_size != self.rate.codebook_size:
                raise ValueError(
                    f"the prior codes {self.prior.model.config.vocab_size} symbols but rate "
                    f"{self.config.rate!r} has V={self.rate.codebook_size}"
                )
            if self.prior.conditioned and self.prior.model.config.caption_dim != self._pooled_dim:
                raise ValueError(
                    f"the prior takes {self.prior.model.config.caption_dim}-d captions but the "
                    f"text encoder gives {self._pooled_dim}"
                )

    @classmethod
    def from_workdir(
        cls,
        workdir: str | os.PathLike | RunDir,
        step: int | None = None,
        *,
        prior: str | os.PathLike | bool | None = None,
        prior_step: int | None = None,
        mesh=None,
        text_checkpoint: str = "",
        **options,
    ) -> Codec:
        """Load the latest (or ``step``) checkpoint of a stage-1 training run, or a bundle
        (``percov2 export``, `percov2_jax.codec.bundle`: the same codec, loaded faster), on this
        process's first local device, or on ``mesh`` (a ``(data, fsdp, tensor)`` mesh of this process's
        devices, from `percov2_jax.sharding.make_mesh`): parameters are placed by the logical-axis
        rule table and `compress_batch` / `decompress_batch` split their batch over
        ``(data, fsdp)``.

        ``prior``: a stage-2 workdir (``python -m percov2_jax.train_prior``); None loads the
        run's ``prior/`` when it holds a checkpoint; False loads none (uniform coding only).
        ``text_checkpoint``: a ``percov2 convert`` checkpoint with the SD3 text encoders, for a run
        trained on precomputed caption embeddings (default: the run's ``text.checkpoint`` or
        ``pretrained.checkpoint``), or to replace a run's encoders.
        ``options``: dataclass fields (``sample_steps``, ``guidance_scale``, ``coding`` ...).
        """
        from percov2_jax.codec import bundle

        if bundle.is_bundle(workdir):
            if step is not None:
                raise ValueError(f"{workdir} is a bundle: it holds one step, step= does not apply")
            loaded = bundle.load(workdir, mesh=mesh, text_checkpoint=text_checkpoint, with_prior=prior is None)
            stage1, model_id, token_prior = loaded.stage1, loaded.model_id, loaded.prior
        else:
            run = RunDir(workdir)
            stage1 = load_stage1(run, step, mesh=mesh, encode_captions=True, text_checkpoint=text_checkpoint)
            model_id = model_fingerprint(stage1.config, stage1.vq_stats)
            token_prior = None
            if prior is None and run.prior.has_checkpoint():
                prior = run.prior
        config = stage1.config
        if prior:
            token_prior = load_token_prior(prior, prior_step, expected_stage1_id=model_id)
        # Without encoders (MissingTextEncoder) an unlearned null text is needed only to decode:
        # the error then says what to pass.
        null_text = None if config.model.learned_null_text else _null_text(stage1.text)
        fields = dict(
            sample_steps=int(config.sample.num_steps),
            guidance_scale=float(config.sample.guidance_scale),
            shift=float(config.flow.shift),
        )
        fields.update(options)
        return cls(
            config,
            stage1.model,
            stage1.params,
            stage1.vq_stats,
            stage1.latent_codec,
            stage1.latent_codec_params,
            stage1.text,
            model_id,
            token_prior,
            null_text=null_text,
            mesh=stage1.mesh,
            **fields,
        )

    @property
    def rate(self) -> rates.BitRate:
        return rates.get_rate(self.config.rate)

    @property
    def prior_model_id(self) -> int | None:
        """The id of streams that need the prior (None without one)."""
        if self.prior is None:
            return None
        return bitstream.model_fingerprint(json.dumps({"stage1": self.model_id, "prior": self.prior.digest}))

    @property
    def max_side(self) -> int:
        """The largest coded image side in pixels: the transformer's position table, and the
        prior's ``max_side`` tokens when a prior is loaded."""
        t = self.model.config.transformer
        side = int(t.pos_embed_max_size) * int(t.patch_size) * rates.LATENT_DOWNSAMPLE
        if self.prior is not None:
            side = min(side, self.prior.model.config.max_side * self.rate.pixels_per_token)
        return side

    @property
    def _pooled_dim(self) -> int:
        # The conditioner gives the transformer's pooled width (build.build_text_conditioner).
        return int(self.model.config.transformer.pooled_projection_dim)

    # ------------------------------------------------------------------ encoder

    def coded_image(self, image, resize_policy: str | None = None) -> tuple[np.ndarray, tuple[int, int], str | None]:
        """RGB uint8 ``[h, w, 3]`` at the coded size (multiples of 64), the original ``(H, W)``
        and the policy that was applied (None when the sides already were multiples of 64)."""
        policy = resize_policy or self.resize_policy
        if policy not in RESIZE_POLICIES:
            raise ValueError(f"resize_policy must be one of {RESIZE_POLICIES}, got {policy!r}")
        pixels = to_rgb(image) if isinstance(image, Image.Image) else array_to_rgb(np.asarray(image))
        h, w = pixels.shape[:2]
        if max(h, w) > bitstream.MAX_SIDE:
            raise ValueError(f"image {w}x{h} is larger than the format's {bitstream.MAX_SIDE} px per side")
        m = rates.IMAGE_MULTIPLE
        if h % m == 0 and w % m == 0:
            policy = None
        ch, cw = bitstream.coded_size(h, w, policy)
        if max(ch, cw) > self.max_side:
            raise ValueError(
                f"image {w}x{h} is coded at {cw}x{ch}, beyond this model's {self.max_side} px per side "
                "(its position table); downscale it first"
            )
        if policy == "resize":
            pixels = np.asarray(Image.fromarray(pixels).resize((cw, ch), Image.Resampling.BICUBIC))
        elif policy == "pad":
            pixels = np.pad(pixels, ((0, ch - h), (0, cw - w), (0, 0)), mode="edge")
        return pixels, (h, w), policy

    def tokens(self, image, resize_policy: str | None = None) -> tuple[np.ndarray, tuple[int, int], str | None]:
        """RGB uint8 ``[H, W, 3]`` (or a PIL image) -> ``(indices [h, w] int32, (H, W), resize policy)``."""
        indices, sizes, policies = self.tokens_batch([image], resize_policy)
        return indices[0], sizes[0], policies[0]

    def tokens_batch(self, images, resize_policy: str | None = None):
        """Images whose coded sizes are equal -> ``(indices [B, h, w] int32, [(H, W)], [policy])``;
        one encoder call, the batch split over the mesh."""
        coded = [self.coded_image(image, resize_policy) for image in images]
        shapes = sorted({c[0].shape for c in coded})
        if len(shapes) != 1:
            raise ValueError(f"tokens_batch needs images of one coded size, got {shapes}; group them by size")
        x = np.stack([c[0] for c in coded]).astype(np.float32) / 127.5 - 1.0
        with sharding.activation_constraints(self.mesh):
            indices = networks.encode_tokens(
                self.model,
                self.latent_codec,
                self.params,
                self.vq_stats,
                self.vae_params,
                sharding.place_padded_batch(x, self.mesh),
            )
        return np.asarray(indices)[: len(coded)], [c[1] for c in coded], [c[2] for c in coded]

    def caption_embedding(self, caption: str) -> np.ndarray | None:
        """The prior's caption input: the pooled text embedding ``[P]`` float32 (None if unconditioned)."""
        if self.prior is None or not self.prior.conditioned:
            return None
        return np.asarray(self.text([caption])[1], np.float32)[0]

    def compress(
        self,
        image,
        caption: str = "",
        caption_coder: str = DEFAULT_CODER,
        *,
        resize_policy: str | None = None,
        **coding,
    ) -> bytes:
        """One image to a .pcv2 byte string. ``coding``: `TokenCoding` fields overriding
        ``self.coding`` (``entropy_mode``, ``schedule``, ``steps``, ``hybrid_groups``,
        ``temperature``, ``seed``)."""
        return self.compress_batch([image], [caption], caption_coder, resize_policy=resize_policy, **coding)[0]

    def compress_batch(
        self, images, captions, caption_coder: str = DEFAULT_CODER, *, resize_policy: str | None = None, **coding
    ) -> list[bytes]:
        """Images of one coded size -> .pcv2 byte strings, each equal to `compress` of that image:
        the encoder runs once on the batch; the token payloads are coded one by one."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        options = dataclasses.replace(self.coding, **coding)
        indices, sizes, policies = self.tokens_batch(images, resize_policy)
        return [
            self.pack(i, size, policy, caption, caption_coder, options)
            for i, size, policy, caption in zip(indices, sizes, policies, captions)
        ]

    def pack(
        self,
        indices: np.ndarray,
        size: tuple[int, int],
        policy: str | None,
        caption: str,
        caption_coder: str,
        coding: TokenCoding,
    ) -> bytes:
        """One image's token map ``[h, w]`` and caption -> a .pcv2 byte string (``size``: the original
        ``(H, W)``; ``policy``: the resize policy applied, None when none was). Entropy mode
        ``auto``: the shorter of the uniform and the prior-coded streams (uniform on a tie: it
        decodes faster, and without the prior when no groups are generated)."""
        from percov2_jax.captions import get_coder

        caption_bytes = get_coder(caption_coder).encode(caption)
        streams = []
        for candidate in coding.candidates():
            payload = token_payload.encode(
                indices,
                self.rate.codebook_size,
                candidate,
                self.prior,
                self.caption_embedding(caption) if candidate.needs_prior else None,
            )
            header = self.stream_header(indices.shape, size, policy, caption_coder, candidate)
            streams.append(bitstream.pack(bitstream.CompressedImage(header, caption_bytes, payload)))
        return min(streams, key=len)

    def stream_header(
        self, grid: tuple[int, int], size: tuple[int, int], policy: str | None, caption_coder: str, coding: TokenCoding
    ) -> bitstream.StreamHeader:
        """The header of the stream of a ``grid`` token map coded with ``coding`` (not ``auto``)."""
        fields = {}
        if coding.has_schedule:
            schedule = token_payload.build_schedule(coding, *grid)
            fields = dict(
                schedule_id=schedules.schedule_id(coding.schedule),
                steps=schedule.num_steps,
                hybrid_groups=coding.hybrid_groups,
                temperature=coding.temperature,
                seed=coding.seed,
            )
        h, w = size
        return bitstream.StreamHeader(
            model_id=self.prior_model_id if coding.needs_prior else self.model_id,
            height=h,
            width=w,
            rate=self.config.rate,
            entropy_mode=coding.entropy_mode,
            resize_policy=policy,
            caption_coder=caption_coder,
            **fields,
        )

    # ------------------------------------------------------------------ decoder

    def decode_tokens(self, data: bytes) -> tuple[np.ndarray, bitstream.CompressedImage]:
        """A .pcv2 byte string -> ``(indices [h, w] int32, parsed stream)``; `BitstreamError` if the
        stream is corrupt, made by another model or needs a prior this codec lacks."""
        stream = bitstream.unpack(data)
        header = stream.header
        coding = TokenCoding.of_header(header)
        token_payload.require_prior(coding, self.prior)  # before the model id: say why, not just "other model"
        expected = self.prior_model_id if coding.needs_prior else self.model_id
        if header.model_id != expected:
            raise bitstream.BitstreamError(
                "model",
                f"stream made by model {header.model_id:06x}, this codec is "
                f"{expected:06x} (another checkpoint, rate or prior)",
            )
        if header.rate != self.config.rate:
            raise bitstream.BitstreamError(
                "field", f"stream rate {header.rate!r} but the model codes {self.config.rate!r}"
            )
        caption = stream.caption()
        embedding = self.caption_embedding(caption) if coding.needs_prior else None
        indices = token_payload.decode(
            stream.token_bytes, header.token_grid, self.rate.codebook_size, coding, self.prior, embedding
        )
        return indices, stream

    def decompress(self, data: bytes, *, seed: int | None = None) -> np.ndarray:
        """A .pcv2 byte string to uint8 ``[H, W, 3]`` at the original size."""
        return self.decompress_batch([data], seed=seed)[0]

    def decompress_batch(self, streams, *, seed: int | None = None) -> list[np.ndarray]:
        """.pcv2 byte strings with one token grid -> uint8 images, each equal to `decompress` of
        that stream (every row starts from the same seeded noise): one sampler run on the batch,
        split over the mesh."""
        decoded = [self.decode_tokens(data) for data in streams]
        grids = sorted({indices.shape for indices, _ in decoded})
        if len(grids) != 1:
            raise ValueError(f"decompress_batch needs streams of one token grid, got {grids}; group them by size")
        indices = np.stack([i for i, _ in decoded])
        seq, pooled = self.text([stream.caption() for _, stream in decoded])
        null_text = None if self.null_text is None else tuple(jnp.asarray(x) for x in self.null_text)
        key_data = jax.random.key_data(jax.random.key(self.seed if seed is None else seed))
        place = functools.partial(sharding.place_padded_batch, mesh=self.mesh)
        with sharding.activation_constraints(self.mesh):
            image = networks.decode_tokens(
                self.model,
                self.latent_codec,
                self.params,
                self.vq_stats,
                self.vae_params,
                place(indices),
                place(np.asarray(seq)),
                place(np.asarray(pooled)),
                null_text,
                key_data,
                int(self.sample_steps),
                float(self.guidance_scale),
                float(self.shift),
            )
        pixels = np.asarray(jnp.clip((image + 1.0) * 127.5, 0, 255).round().astype(jnp.uint8))
        return [restore_size(p, stream.header) for p, (_, stream) in zip(pixels, decoded)]


def restore_size(pixels: np.ndarray, header: bitstream.StreamHeader) -> np.ndarray:
    """The decoded coded-size picture -> the original size (undo the stream's resize policy)."""
    if header.resize_policy == "resize":
        return np.asarray(Image.fromarray(pixels).resize((header.width, header.height), Image.Resampling.BICUBIC))
    return pixels[: header.height, : header.width]


def load_token_prior(
    workdir: str | os.PathLike | RunDir, step: int | None = None, expected_stage1_id: int | None = None
) -> TokenPrior:
    """A stage-2 prior; refuses one trained on another stage-1 model's tokens."""
    from percov2_jax.runs import prior as prior_runs

    trained_on = prior_runs.read_prior_meta(workdir, step)["stage1_model_id"]
    if expected_stage1_id is not None and trained_on != expected_stage1_id:
        raise ValueError(
            f"the prior in {RunDir(workdir).root} was trained on the tokens of stage-1 model "
            f"{trained_on:06x}, not {expected_stage1_id:06x}"
        )
    return TokenPrior.load(workdir, step)


def model_fingerprint(config, vq_stats: Any = None) -> int:
    """24-bit id of everything a decoder must share with the encoder: rate, model, latent codec
    and text configs, and (given ``vq_stats``) a digest of the VQ codebook."""
    keep = {
        k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
        for k in ("rate", "model", "vae", "text")
        if k in config
    }
    if vq_stats is not None:
        keep["codebook"] = hashlib.sha256(token_payload.params_digest(vq_stats).encode()).hexdigest()
    return bitstream.model_fingerprint(json.dumps(keep, sort_keys=True, default=str))


def _null_text(text):
    """``text.null_embeddings()``, or None for a run without text encoders (decoding then fails
    where the caption is encoded, with the encoder's message)."""
    from percov2_jax.text.conditioners import MissingTextEncoder

    return None if isinstance(text, MissingTextEncoder) else text.null_embeddings()
