"""Build a stage-1 run's pieces from its config, for training and inference alike: the PerCoV2
model, the frozen latent codec (VAE), the caption conditioner, the pretrained SD3 weights and the
data source. Every config problem raises one clear error."""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax import rates, storage
from percov2_jax.models import mmdit
from percov2_jax.models.hyper_encoder import HyperEncoderConfig
from percov2_jax.models.mmdit import SD3TransformerConfig
from percov2_jax.models.percov2 import PerCoV2, PerCoV2Config, widen_patch_embedding
from percov2_jax.models.quantizer import QuantizerConfig
from percov2_jax.text.prompt_encoder import CLIP_MAX_LENGTH

LATENT_SIDE_AT_512 = 512 // rates.LATENT_DOWNSAMPLE  # 64: the hyper-encoder's reference input side


def validate_config(config, process_count: int | None = None, mesh=None) -> rates.BitRate:
    """Check the fields that must agree with each other; return the bit-rate."""
    rate = rates.get_rate(config.rate)
    rates.check_image_size(int(config.image_size), int(config.image_size))
    process_count = jax.process_count() if process_count is None else process_count
    gbs = int(config.train.global_batch_size)
    if gbs <= 0:
        raise ValueError(f"train.global_batch_size must be positive, got {gbs}")
    if gbs % process_count:
        raise ValueError(f"train.global_batch_size {gbs} is not divisible by the {process_count} processes")
    if mesh is not None:
        batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
        if gbs % batch_devices:
            raise ValueError(
                f"train.global_batch_size {gbs} is not divisible by the mesh's data x fsdp = "
                f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {batch_devices} batch shards"
            )
    if not 0.0 <= float(config.text.caption_dropout) < 1.0:
        raise ValueError(f"text.caption_dropout must be in [0, 1), got {config.text.caption_dropout}")
    if int(config.train.num_steps) <= 0:
        raise ValueError(f"train.num_steps must be positive, got {config.train.num_steps}")
    vae_dtype(config)
    return rate


def transformer_config(config) -> SD3TransformerConfig:
    """The MM-DiT architecture of a run: every field ``model.transformer`` sets, the rest from the
    converted checkpoint's own config (``pretrained.checkpoint``) or, without one, from the release
    ``model.variant`` names (`percov2_jax.models.mmdit.RELEASES`). A field set in the config that
    differs from the checkpoint's is a ValueError naming it: the weights fix the architecture.
    A run stores the result, so reading it back needs no checkpoint."""
    named = {k: v for k, v in dict(config.model.transformer).items() if v is not None}
    if isinstance(named.get("qk_norm"), str) and named["qk_norm"].lower() in ("", "none"):
        named["qk_norm"] = None  # "none" is how a command line states it; None means unset
    fields = [f.name for f in dataclasses.fields(SD3TransformerConfig)]
    unknown = sorted(set(named) - set(fields))
    if unknown:
        raise ValueError(f"model.transformer has unknown fields {unknown}; SD3 transformer fields are {fields}")
    if set(fields) <= set(named):
        return SD3TransformerConfig.from_dict(named)
    checkpoint = config.pretrained.get("checkpoint", "")
    if checkpoint:
        from percov2_jax import pretrained

        base = pretrained.component_config(checkpoint, "transformer")
        base = {k: v for k, v in base.items() if not k.startswith("_")}
        _check_architecture(checkpoint, {k: (v, base.get(k)) for k, v in named.items()})
        return SD3TransformerConfig.from_dict({**base, **named})
    variant = config.model.get("variant", "")
    if not variant:
        missing = sorted(set(fields) - set(named))
        raise ValueError(
            f"model.transformer leaves {missing} unset, and there is neither pretrained.checkpoint nor "
            "model.variant to take them from"
        )
    if variant not in mmdit.RELEASES:
        raise ValueError(f"unknown model.variant {variant!r}; choose one of {sorted(mmdit.RELEASES)}")
    return SD3TransformerConfig.from_dict({**mmdit.RELEASES[variant].to_dict(), **named})


def _check_architecture(checkpoint, pairs) -> None:
    """ValueError naming every field whose ``(config value, checkpoint value)`` pair differs."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    shown = [
        f"model.transformer.{k}={a!r} but the checkpoint has {b!r}" for k, (a, b) in pairs.items() if norm(a) != norm(b)
    ]
    if shown:
        raise ValueError(
            f"the config asks for another architecture than {checkpoint} holds: {'; '.join(shown)}. The converted "
            "weights fix these fields; leave them unset to take the checkpoint's"
        )


def resolve_architecture(config) -> None:
    """Write the run's full transformer architecture (`transformer_config`) into
    ``config.model.transformer``, so that the config a run stores states it."""
    resolved = transformer_config(config).to_dict()
    resolved.pop("_class_name", None)
    with config.unlocked():
        for k, v in resolved.items():
            config.model.transformer[k] = tuple(v) if isinstance(v, list) else v


def model_config(config, rate: rates.BitRate) -> PerCoV2Config:
    transformer = transformer_config(config)
    hyper = HyperEncoderConfig(
        in_channels=transformer.in_channels,
        channels=int(config.model.hyper_channels),
        out_channels=int(config.model.hyper_out_channels),
        latent_side=LATENT_SIDE_AT_512,
        hyper_side=rate.hyper_side,
    )
    quantizer = QuantizerConfig(
        dim=hyper.out_channels,
        codebook_size=rate.codebook_size,
        codebook_dim=int(config.model.codebook_dim),
        decay=float(config.model.vq_decay),
        dead_code_threshold=float(config.model.dead_code_threshold),
    )
    return PerCoV2Config(
        transformer,
        hyper,
        quantizer,
        learned_null_text=bool(config.model.learned_null_text),
        text_length=caption_length(config.text),
    )


def caption_length(text) -> int:
    """Caption tokens the transformer sees, derived from ``config.text`` alone: for ``sd3`` and
    ``precomputed`` CLIP's 77 plus ``max_sequence_length`` T5 tokens (zeros without T5, as
    diffusers gives them); for ``hashed`` the ``max_sequence_length`` word slots."""
    if text.kind == "hashed":
        return int(text.max_sequence_length)
    return CLIP_MAX_LENGTH + int(text.max_sequence_length)


def build_model(config, rate: rates.BitRate) -> PerCoV2:
    m = config.model
    return PerCoV2(
        model_config(config, rate),
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        scan_layers=bool(m.scan_layers),
        remat_policy=str(m.remat_policy),
        attention_implementation=m.attention_implementation or None,
    )


def init_inputs(model: PerCoV2, rate: rates.BitRate):
    """The smallest inputs that build every parameter: one token's worth of image, batch 1."""
    from percov2_jax.models.percov2 import example_inputs

    side = max(rates.IMAGE_MULTIPLE, rate.pixels_per_token)
    return example_inputs(model.config, 1, side, side, model.config.text_length)


def build_train_iterator(source, data, global_batch_size: int, image_size: int, seed: int):
    """This process's grain iterator over ``source`` as a run's ``config.data`` asks (crops, flips,
    workers, prefetching): its rows of every global batch
    (`percov2_jax.data.pipeline.make_train_iterator`)."""
    import grain

    from percov2_jax.data.pipeline import make_train_iterator

    # Runs saved before these options existed read with the pipeline's defaults.
    read_options = grain.ReadOptions(
        num_threads=int(data.get("read_threads", 8)), prefetch_buffer_size=int(data.get("prefetch_batches", 8))
    )
    return make_train_iterator(
        source,
        global_batch_size=global_batch_size,
        image_size=image_size,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        random_crop=bool(data.random_crop),
        random_flip=bool(data.random_flip),
        worker_count=int(data.worker_count),
        read_options=read_options,
    )


def require_text_for(text, source) -> None:
    """Fail before training when a precomputed text store lacks ids of ``source`` (every id when
    they are cheap to list, else the first records'; `percov2_jax.data.sources.example_ids`)."""
    if not hasattr(text, "require"):
        return
    from percov2_jax.data.sources import example_ids

    ids, complete = example_ids(source)
    text.require(ids, repr(source) if complete else f"the first {len(ids)} records of {source!r}")


def build_data_source(config):
    from percov2_jax.data import sources

    d = config.data
    if d.source == "builtin":
        return _builtin()
    if d.source == "folder":
        if not d.path:
            raise ValueError("data.source='folder' needs data.path (an image folder)")
        return sources.ImageFolderSource(d.path, captions=d.captions or None)
    if d.source == "tfds":
        if not d.path:
            raise ValueError("data.source='tfds' needs data.path (a TFDS name or a prepared dataset directory)")
        return sources.TfdsSource(
            d.path, d.split, data_dir=d.tfds_data_dir or None, image_key=d.image_key, caption_key=d.caption_key or None
        )
    raise ValueError(f"unknown data.source {d.source!r}; choose builtin, folder or tfds")


def _builtin():
    from percov2_jax.data.builtin import BuiltinPhotos

    return BuiltinPhotos()


VAE_DTYPES = ("float32", "bfloat16")


def vae_dtype(config) -> str | None:
    """``vae.dtype`` checked: ``"float32"`` or ``"bfloat16"`` for the SD3 VAE; None for a stand-in
    (which keeps its own float32) when the field is float32 or absent (configs from before it)."""
    name = str(config.vae.get("dtype", "float32"))
    if name not in VAE_DTYPES:
        raise ValueError(f"vae.dtype must be one of {VAE_DTYPES}, got {name!r}")
    if config.vae.kind != "sd3" and name == "float32":
        return None
    return name


def build_latent_codec(
    config, source, fitted_path: str | os.PathLike, mesh=None, *, dtype: str | None = None
) -> tuple[Any, Any]:
    """``(module, params)`` of the frozen image <-> latent codec.

    ``sd3``: the AutoencoderKL of ``pretrained.checkpoint``, with parameters and compute in
    ``dtype`` (a dtype name; None: as stored; the trainer passes ``vae.dtype``). The stand-ins, fitted on the first
    ``vae.fit_images`` images of the training ``source`` and stored in the run directory, so a
    resumed run (and the codec) uses the same codec; with ``source`` None the file must exist:

    - ``patch_pca``: a PCA patch autoencoder, at ``fitted_path`` (the run's
      ``patch_autoencoder.npz``); seconds to fit, but it decodes each 8x8 patch on its own.
    - ``lapped_conv``: the convolutional autoencoder of ``models/conv_autoencoder.py``, next to
      ``fitted_path`` as ``conv_autoencoder.npz``; ``vae.fit_steps`` Adam steps (default 1000, about
      half a minute on two CPU cores) on the images at 1 to 3 times ``image_size``.

    With a ``mesh``, a stand-in's parameters come back replicated on it.
    """
    kind = config.vae.kind
    if kind == "sd3":
        if not config.pretrained.checkpoint:
            raise ValueError("vae.kind='sd3' needs pretrained.checkpoint (made by percov2 convert)")
        from percov2_jax import pretrained

        options = {} if dtype is None else {"vae": {"dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(dtype)}}
        return pretrained.load(config.pretrained.checkpoint, components=("vae",), mesh=mesh, options=options)["vae"]
    if dtype is not None and jnp.dtype(dtype) != jnp.float32:
        raise ValueError(f"vae.dtype {dtype!r}: the {kind} stand-in runs in float32; only vae.kind 'sd3' takes another")
    path = storage.path(fitted_path)
    if kind == "patch_pca":
        from percov2_jax.models.patch_autoencoder import PatchAutoencoder, PatchAutoencoderConfig, fit_patch_pca

        module = PatchAutoencoder(PatchAutoencoderConfig())

        def fit(images):
            return fit_patch_pca(images, module.config)

    elif kind == "lapped_conv":
        from percov2_jax.models.conv_autoencoder import (
            FITTED_FILE,
            ConvAutoencoder,
            ConvAutoencoderConfig,
            fit_conv_autoencoder,
        )

        module = ConvAutoencoder(ConvAutoencoderConfig())
        path = path.with_name(FITTED_FILE)
        size = int(config.image_size)

        def fit(images):
            return fit_conv_autoencoder(
                images,
                module.config,
                short_sides=tuple(int(size * f) for f in (1.0, 1.25, 1.5, 2.0, 3.0)),
                steps=int(config.vae.get("fit_steps", 1000)),
                seed=int(config.seed),
                progress=jax.process_index() == 0,
            )

    else:
        raise ValueError(f"unknown vae.kind {kind!r}; choose sd3, patch_pca or lapped_conv")
    params = _fitted_codec_params(module, path, source, int(config.vae.get("fit_images", 64)), fit)
    if mesh is not None:
        from percov2_jax import sharding

        return module, sharding.replicate(params, mesh)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def _fitted_codec_params(module, path, source, fit_images: int, fit) -> dict[str, Any]:
    """A stand-in codec's parameters (NumPy): read from ``path`` (an ``.npz`` of ``/``-joined
    names), else fitted on the first ``fit_images`` images of ``source`` and written there by
    process 0. Stored arrays must have the module's names and shapes."""
    from flax import traverse_util

    from percov2_jax.models.layers import unboxed

    if path.exists():
        with np.load(io.BytesIO(storage.read_bytes(path))) as arrays:
            params = traverse_util.unflatten_dict({k: arrays[k] for k in arrays.files}, sep="/")
        probe = jnp.zeros((1, 16, 16, 3), jnp.float32)
        want = jax.eval_shape(lambda: unboxed(module.init(jax.random.key(0), probe))["params"])
        got = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(want) or any(
            a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))
        ):
            raise ValueError(f"{path} does not hold {type(module).__name__} parameters of this config")
        return params
    if source is None:
        raise FileNotFoundError(f"{path} (the run's fitted latent codec) is missing")
    count = min(len(source), fit_images)
    params = fit(source[i]["image"] for i in range(count))
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, **traverse_util.flatten_dict(params, sep="/"))
        storage.write_bytes(path, buffer.getvalue())
    return params


def load_pretrained_transformer(config, model: PerCoV2, mesh) -> Any | None:
    """Pretrained SD3 transformer params (on the mesh, in the model's scan layout), or None."""
    if not config.pretrained.checkpoint:
        return None
    from percov2_jax import pretrained

    module, params = pretrained.load(
        config.pretrained.checkpoint,
        components=("transformer",),
        mesh=mesh,
        options={"transformer": {"scan_layers": model.scan_layers, "param_dtype": model.param_dtype}},
    )["transformer"]
    want = model.config.transformer
    _check_architecture(
        config.pretrained.checkpoint,
        {f.name: (getattr(want, f.name), getattr(module.config, f.name)) for f in dataclasses.fields(want)},
    )
    return params


def insert_pretrained(params: dict, transformer_params: Any, extra_channels: int) -> dict:
    """``params`` with the transformer replaced by pretrained SD3, widened for the token channels."""
    return {**params, "transformer": widen_patch_embedding(transformer_params, extra_channels)}


def build_text_conditioner(
    config, *, encode_captions: bool = False, text_checkpoint: str = "", what: str = "", mesh=None
):
    """The caption conditioner of ``config.text`` (`percov2_jax.text.conditioners`), producing
    ``caption_length(config.text)`` tokens of the transformer's widths: for training
    (a precomputed store looks captions up by example id), or with ``encode_captions`` for the
    codec (`percov2_jax.text.conditioners.caption_encoder`: a run trained on precomputed
    embeddings gets the SD3 encoders of ``text_checkpoint`` or of its config, since a new image's
    caption is in no store; ``what`` names the run in the error when it has none). With the
    training ``mesh`` the SD3 encoders are sharded on it (`percov2_jax.text.on_mesh`)."""
    from percov2_jax.text.conditioners import caption_encoder, text_conditioner

    t = transformer_config(config)
    args = (config.text, caption_length(config.text), t.joint_attention_dim, t.pooled_projection_dim)
    if encode_captions:
        return caption_encoder(
            *args, default_checkpoint=config.pretrained.checkpoint, text_checkpoint=text_checkpoint, what=what
        )
    return text_conditioner(*args, default_checkpoint=config.pretrained.checkpoint, mesh=mesh)
