"""A trained stage-1 model read back from its run for inference (the codec, prior training).

Only what inference needs is read: the config, the parameters (the weight EMA when the run
kept one), the VQ statistics and the frozen latent codec and text conditioner; the optimizer
state stays on disk.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from percov2_jax import build, rates, sharding
from percov2_jax.models.percov2 import PerCoV2
from percov2_jax.runs.layout import RunDir


@dataclasses.dataclass
class Stage1Model:
    """The networks of a stage-1 run on ``mesh`` (this process's devices).

    ``params``: the PerCoV2 parameters (EMA weights if the run kept them); ``vq_stats``: the VQ
    codebook and statistics; ``latent_codec`` / ``latent_codec_params``: the frozen VAE (or its
    tiny stand-in), replicated; ``text``: the caption conditioner of ``config.text``;
    ``weights``: the state field the parameters came from (``ema_params`` or ``params``).
    """

    config: ml_collections.ConfigDict
    rate: rates.BitRate
    model: PerCoV2
    params: Any
    vq_stats: Any
    latent_codec: Any
    latent_codec_params: Any
    text: Any
    mesh: Mesh
    step: int
    weights: str = "params"


def load_stage1(
    workdir: str | os.PathLike | RunDir,
    step: int | None = None,
    *,
    mesh: Mesh | None = None,
    encode_captions: bool = False,
    text_checkpoint: str = "",
    with_text: bool = True,
) -> Stage1Model:
    """The latest (or ``step``) checkpoint of a stage-1 run, on this process's first local device or
    on ``mesh`` (a ``(data, fsdp, tensor)`` mesh of this process's devices; parameters placed by the
    logical-axis rule table).

    ``text``: the run's training conditioner (a precomputed store looks captions up by example
    id), or with ``encode_captions`` what encodes any caption (`build.build_text_conditioner`: the
    SD3 encoders of ``text_checkpoint`` or of the run's config, for a run trained on
    precomputed embeddings); None without ``with_text`` (`percov2_jax.codec.bundle.export` keeps
    a reference to the encoders, not the encoders)."""
    from percov2_jax.runs import checkpointing  # orbax: only for a run, not for a bundle

    run = RunDir(workdir)
    if not run.checkpoints.is_dir():
        raise FileNotFoundError(f"{run.root}: no checkpoints/ folder (is it a stage-1 training workdir?)")
    step = checkpointing.latest_step(run, step)
    stored = checkpointing.read_json(run, checkpointing.CONFIG, step)
    if stored is None or "model" not in stored:
        raise ValueError(f"{run.root}: checkpoint {step} holds no stage-1 config")
    config = ml_collections.ConfigDict(stored)
    if mesh is None:
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    elif not all(d.process_index == jax.process_index() for d in mesh.devices.flat):
        raise ValueError("the inference mesh must hold only this process's devices (inference runs per process)")
    rate = build.validate_config(config, process_count=1)
    model = build.build_model(config, rate)
    text = None
    if with_text:
        text = build.build_text_conditioner(
            config, encode_captions=encode_captions, text_checkpoint=text_checkpoint, what=f"the stage-1 run {run.root}"
        )
    latent_codec, codec_params = build.build_latent_codec(config, None, run.patch_autoencoder, mesh=mesh)
    abstract, shardings = sharding.abstract_variables(model, build.init_inputs(model, rate), mesh)
    params = sharding.with_shardings(abstract["params"], shardings["params"])
    vq_stats = sharding.with_shardings(abstract.get("vq_stats", {}), shardings.get("vq_stats", {}))
    saved = checkpointing.state_metadata(run, step)
    weights = "ema_params" if saved.get("ema_params") is not None else "params"
    restored = checkpointing.restore_subtree(run, step, {weights: params, "vq_stats": vq_stats})
    return Stage1Model(
        config,
        rate,
        model,
        restored[weights],
        restored["vq_stats"],
        latent_codec,
        sharding.replicate(codec_params, mesh),
        text,
        mesh,
        step,
        weights,
    )
