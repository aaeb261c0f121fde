"""Stage 2: train the masked-image-model prior on the tokens of a frozen stage-1 model.

  python -m percov2_jax.train_prior --config configs/prior_tiny.py --workdir /tmp/prior \\
      --config.stage1=/tmp/percov2_demo --config.mesh.data=-1

Each batch of images (the stage-1 run's data pipeline) goes through the frozen latent codec,
hyper-encoder and VQ to token maps ``[B, h, w]``; the prior learns them with random masks
(M2T's uniform 5-99% masking or MaskGIT's cosine schedule), optionally conditioned on the
pooled caption embedding. Loss = bits per masked token (the expected code length).

Sharding and processes: the stage-1 machinery. The prior's parameters and Adam state are
created on the ``config.mesh`` shardings of their logical axes (`percov2_jax.train.state`);
every process reads its own rows of each global batch, encodes them with its own replicated
copy of the small stage-1 model on its first local device, and the token maps and caption
embeddings become one global array split over ``(data, fsdp)``. The jitted step has explicit
shardings and donates the state, so one device, a mesh and several processes (each calling
``jax.distributed.initialize`` before `train_prior`) give the same training run. Checkpoints
(orbax) hold the sharded state, every process's data-iterator position, the run config, the
prior's `MIMConfig` and the stage-1 model id; they restore onto the current mesh and resume
exactly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from percov2_jax import build, multihost
from percov2_jax import sharding as sharding_lib
from percov2_jax.codec import networks
from percov2_jax.codec.api import model_fingerprint
from percov2_jax.entropy import mim
from percov2_jax.runs import checkpointing
from percov2_jax.runs.layout import RunDir
from percov2_jax.runs.stage1 import Stage1Model, load_stage1
from percov2_jax.train.state import StateSpec, TrainState, build_state_spec, create_train_state


def prior_model_config(config, vocab_size: int, caption_dim: int | None) -> mim.MIMConfig:
    p = config.prior
    return mim.MIMConfig(
        vocab_size=vocab_size,
        width=int(p.width),
        num_layers=int(p.num_layers),
        num_heads=int(p.num_heads),
        mlp_ratio=int(p.mlp_ratio),
        max_side=int(p.max_side),
        caption_dim=caption_dim if bool(p.condition_on_caption) else None,
    )


def make_prior_step(
    model: mim.MaskedTokenPrior, spec: StateSpec, mesh: Mesh, mask_scheme: str, captioned: bool
) -> Callable:
    """``step(state, batch, base_key) -> (state, metrics)``, jitted, the state donated.

    ``batch``: ``tokens [B, h, w]`` int32 and (``captioned``) ``caption [B, P]``, split over the
    batch axes of ``mesh``; ``base_key``: raw key bits, replicated. The masks of step ``n`` come
    from ``fold_in(base_key, n)`` (partitionable threefry: the same on any mesh).
    """

    def step(state: TrainState, batch, base_key):
        key = jax.random.fold_in(jax.random.wrap_key_data(base_key), state.step)

        def loss_fn(params):
            return mim.prior_loss(model.apply, params, batch["tokens"], key, batch.get("caption"), scheme=mask_scheme)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=spec.schedule(state.step))
        return state.replace(
            step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
        ), metrics

    def constrained_step(*args):
        with sharding_lib.activation_constraints(mesh):
            return step(*args)

    replicated = sharding_lib.replicated(mesh)
    rows = sharding_lib.batch_sharding(mesh)
    batch_shardings = {"tokens": rows, "caption": rows} if captioned else {"tokens": rows}
    return jax.jit(
        constrained_step,
        in_shardings=(spec.shardings, batch_shardings, replicated),
        out_shardings=(spec.shardings, replicated),
        donate_argnums=(0,),
    )


class PriorTrainer:
    """The frozen stage-1 model, the prior's sharded state and step; `train_steps` runs the loop.

    ``devices``: the mesh's devices (default all; ``config.mesh`` gives its shape). ``stage1``:
    the `Stage1Model` of ``config.stage1`` if already loaded (`load_stage1`).
    """

    def __init__(self, config, workdir: str | os.PathLike | RunDir, devices=None, stage1: Stage1Model | None = None):

        self.config, self.run = config, RunDir(workdir)
        if not config.stage1:
            raise ValueError("config.stage1 must name a stage-1 training workdir")
        m, t = config.mesh, config.train
        self.mesh = sharding_lib.make_mesh(int(m.data), int(m.fsdp), int(m.tensor), devices=devices)
        rows_split = sharding_lib.batch_multiple(self.mesh)
        if int(t.global_batch_size) % rows_split:
            raise ValueError(
                f"train.global_batch_size {t.global_batch_size} is not divisible by data x fsdp = {rows_split}"
            )
        self.stage1 = load_stage1(config.stage1) if stage1 is None else stage1
        self.stage1_model_id = model_fingerprint(self.stage1.config, self.stage1.vq_stats)
        s1 = self.stage1.config
        caption_dim = s1.model.transformer["pooled_projection_dim"]
        p = config.prior
        self.model = mim.MaskedTokenPrior(
            prior_model_config(config, self.stage1.rate.codebook_size, caption_dim),
            dtype=jnp.dtype(p.dtype),
            param_dtype=jnp.dtype(p.param_dtype),
        )
        self.image_size = int(config.image_size or s1.image_size)
        rows, cols = self.stage1.rate.token_grid(self.image_size, self.image_size)
        inputs = (jnp.zeros((1, rows, cols), jnp.int32), jnp.zeros((1, rows, cols), bool), None)
        self.spec = build_state_spec(self.model, inputs, config.optim, self.mesh, ema=False)
        self.schedule = self.spec.schedule
        captioned = self.model.config.caption_dim is not None
        self._step_fn = make_prior_step(self.model, self.spec, self.mesh, str(p.mask_scheme), captioned)
        # Raw key bits (a typed key cannot be built from host data across processes).
        self.base_key = sharding_lib.replicate(jax.random.key_data(jax.random.key(int(config.seed) + 7)), self.mesh)
        data_config = s1 if not config.data.source else _with_source(s1, config.data)
        source = build.build_data_source(data_config)
        if self.model.config.caption_dim is not None:
            build.require_text_for(self.stage1.text, source)
        self.iterator = build.build_train_iterator(
            source,
            data_config.data,
            int(t.global_batch_size),
            self.image_size,
            int(config.seed),
        )
        self.manager = checkpointing.make_manager(self.run, max_to_keep=int(t.keep_checkpoints), async_save=False)
        if self.manager.latest_step() is not None:
            self.restore()
        else:
            self.step, self.state = 0, create_train_state(self.model, inputs, self.spec, int(config.seed))

    @property
    def params(self) -> Any:
        """The prior's parameters (global arrays on the mesh)."""
        return self.state.params

    def next_batch(self) -> tuple[jax.Array, jax.Array | None]:
        """``(tokens [B, h, w] int32, caption [B, P] float32 or None)``: global arrays split over
        the batch axes, made from this process's rows by the frozen stage-1 model."""
        local = next(self.iterator)
        s = self.stage1
        tokens = networks.encode_tokens(
            s.model,
            s.latent_codec,
            s.params,
            s.vq_stats,
            s.latent_codec_params,
            jnp.asarray(local["image"], jnp.float32),
        )
        arrays = {"tokens": np.asarray(tokens, np.int32)}
        if self.model.config.caption_dim is not None:
            if hasattr(s.text, "lookup"):
                _, pooled = s.text.lookup([str(i) for i in local["id"]])
            else:
                _, pooled = s.text([str(t) for t in local["caption"]])
            arrays["caption"] = np.asarray(pooled, np.float32)
        batch = sharding_lib.global_batch(arrays, self.mesh)
        return batch["tokens"], batch.get("caption")

    def train_steps(self, count: int) -> list[dict[str, float]]:
        """Run ``count`` steps (no checkpoints or logs); returns the per-step metrics."""
        history = []
        for _ in range(count):
            tokens, caption = self.next_batch()
            batch = {"tokens": tokens} if caption is None else {"tokens": tokens, "caption": caption}
            self.state, metrics = self._step_fn(self.state, batch, self.base_key)
            self.step += 1
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()} | {"step": self.step})
        return history

    def save(self) -> None:
        checkpointing.save(
            self.manager,
            self.step,
            self.state,
            self.iterator,
            self.config,
            force=True,
            prior_config=self.model.config.to_dict(),
            meta={"stage1_model_id": self.stage1_model_id, "stage1": str(self.config.stage1)},
        )
        self.manager.wait_until_finished()

    def restore(self, step: int | None = None) -> None:
        """Load checkpoint ``step`` (default: the latest) onto this trainer's mesh, the data
        position of every process included."""
        self.step, self.state = checkpointing.restore(
            self.manager, self.spec.abstract, self.spec.shardings, self.iterator, step
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        self.iterator.close()


def _with_source(stage1_config, data):
    merged = ml_collections.ConfigDict(stage1_config.to_dict())
    merged.data.source, merged.data.path = data.source, data.path
    return merged


def train_prior(config, workdir: str | os.PathLike | RunDir) -> list[dict[str, float]]:
    """Train to ``config.train.num_steps`` (resuming), checkpointing every ``checkpoint_every``
    steps; ``max_minutes`` > 0 stops (and checkpoints) after that wall time. Process 0 writes the logs."""
    from percov2_jax.train.monitoring import MetricWriter, ProgressBar
    from percov2_jax.train.profiling import StepProfiler

    trainer = PriorTrainer(config, workdir)
    t = config.train
    num_steps = int(t.num_steps)
    lead = jax.process_index() == 0
    writer = MetricWriter(trainer.run, enabled=lead, purge_step=trainer.step or None)
    bar = ProgressBar(num_steps, trainer.step, enabled=lead)
    history: list[dict[str, float]] = []
    minutes = float(t.max_minutes)
    deadline = time.time() + 60.0 * minutes if minutes > 0 else None
    watch = multihost.PreemptionWatch()
    profiler = StepProfiler(config.get("profile", {}), trainer.run.profile)
    try:
        while trainer.step < num_steps:
            if deadline is not None and multihost.process0_decides(time.time() > deadline):
                bar.write(f"stopping at step {trainer.step}: train.max_minutes={minutes} reached")
                trainer.save()
                break
            with profiler.step(trainer.step + 1, ready=lambda: trainer.state):
                record = trainer.train_steps(1)[0]
            history.append(record)
            if trainer.step % int(t.log_every) == 0 or trainer.step == num_steps:
                writer.write_scalars(trainer.step, {k: v for k, v in record.items() if k != "step"})
                bar.update(trainer.step, loss=record["bits_per_token"], lr=record["learning_rate"])
            else:
                bar.update(trainer.step)
            preempted = watch.reached(trainer.step)
            if trainer.step % int(t.checkpoint_every) == 0 or trainer.step == num_steps or preempted:
                trainer.save()
            if preempted:
                trainer.manager.wait_until_finished()
                bar.write(watch.saved_line(trainer.step, trainer.run.checkpoints))
                break
    finally:
        profiler.close()
        watch.close()
        bar.close()
        writer.close()
        trainer.close()
    return history
