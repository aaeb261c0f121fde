"""Stage 2: train the masked-image-model prior on the tokens of a frozen stage-1 model.

  python -m percov2_jax.train_prior --config configs/prior_tiny.py --workdir /tmp/prior \\
      --config.stage1=/tmp/percov2_demo

Each batch of images (the stage-1 run's data pipeline) goes through the frozen latent codec,
hyper-encoder and VQ to token maps ``[B, h, w]``; the prior learns them with random masks
(M2T's uniform 5-99% masking or MaskGIT's cosine schedule), optionally conditioned on the
pooled caption embedding. Loss = bits per masked token (the expected code length).

Current scope: one process, the default device (the stage-1 sharding machinery is not wired in
yet); checkpoints (params, optimizer state, step, data-iterator state) resume exactly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from percov2_jax.entropy import mim
from percov2_jax.models.layers import unboxed


def prior_config(config, vocab_size: int, caption_dim: int | None) -> mim.MIMConfig:
    p = config.prior
    return mim.MIMConfig(vocab_size=vocab_size, width=int(p.width), num_layers=int(p.num_layers),
                         num_heads=int(p.num_heads), mlp_ratio=int(p.mlp_ratio), max_side=int(p.max_side),
                         caption_dim=caption_dim if bool(p.condition_on_caption) else None)


class PriorTrainer:
    """Holds the frozen stage-1 codec, the prior and its optimizer; `train_steps` runs the loop."""

    def __init__(self, config, workdir: str):
        from percov2_jax.codec.api import Codec, _encode
        from percov2_jax.data.pipeline import make_train_iterator
        from percov2_jax.train import components

        self.config, self.workdir = config, workdir
        if not config.stage1:
            raise ValueError("config.stage1 must name a stage-1 training workdir")
        self.codec = Codec.from_workdir(config.stage1)
        self._encode = _encode
        s1 = self.codec.config
        caption_dim = s1.model.transformer["pooled_projection_dim"]
        self.model = mim.MaskedTokenPrior(prior_config(config, self.codec.rate.codebook_size, caption_dim))
        self.image_size = int(config.image_size or s1.image_size)
        rows, cols = self.codec.rate.token_grid(self.image_size, self.image_size)
        params = unboxed(mim.init_params(self.model, jax.random.key(int(config.seed)), rows, cols))
        o = config.optim
        schedule = optax.warmup_cosine_decay_schedule(0.0, float(o.learning_rate), int(o.warmup_steps),
                                                      max(int(config.num_steps), int(o.warmup_steps) + 1),
                                                      float(o.learning_rate) * 0.1)
        self.tx = optax.chain(optax.clip_by_global_norm(float(o.grad_clip)),
                              optax.adamw(schedule, weight_decay=float(o.weight_decay)))
        self.schedule = schedule
        self.params, self.opt_state, self.step = params, self.tx.init(params), 0
        source = components.build_data_source(s1 if not config.data_source else _with_source(s1, config))
        self.iterator = make_train_iterator(source, global_batch_size=int(config.batch_size),
                                            image_size=self.image_size, seed=int(config.seed), process_index=0,
                                            process_count=1)
        self.manager = _manager(os.path.join(workdir, "checkpoints"), int(config.keep_checkpoints))
        if self.manager.latest_step() is not None:
            self.restore()
        self._step_fn = jax.jit(self._train_step)

    def _train_step(self, params, opt_state, tokens, caption, key):
        p = self.config.prior

        def loss(params):
            return mim.prior_loss(self.model.apply, params, tokens, key, caption, scheme=str(p.mask_scheme))

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    def next_batch(self):
        """``(tokens [B, h, w] int32, caption [B, P] or None)`` from the frozen stage-1 model."""
        batch = next(self.iterator)
        c = self.codec
        tokens = self._encode(c.model, c.latent_codec, c.params, c.vq_stats, c.vae_params,
                              jnp.asarray(batch["image"], jnp.float32))
        caption = None
        if self.model.config.caption_dim is not None:
            caption = jnp.asarray(c.text([str(t) for t in batch["caption"]])[1])
        return tokens, caption

    def train_steps(self, count: int) -> list[dict[str, float]]:
        history = []
        for _ in range(count):
            tokens, caption = self.next_batch()
            key = jax.random.fold_in(jax.random.key(int(self.config.seed) + 7), self.step)
            self.params, self.opt_state, metrics = self._step_fn(self.params, self.opt_state, tokens, caption, key)
            self.step += 1
            history.append({k: float(v) for k, v in metrics.items()} | {"step": self.step})
        return history

    def save(self) -> None:
        import grain

        self.manager.save(self.step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(self.params), opt_state=ocp.args.StandardSave(self.opt_state),
            prior_config=ocp.args.JsonSave(dataclasses.asdict(self.model.config)),
            meta=ocp.args.JsonSave({"stage1_model_id": self.codec.model_id,
                                    "stage1": os.path.abspath(self.config.stage1)}),
            data=grain.checkpoint.CheckpointSave(self.iterator)), force=True)
        self.manager.wait_until_finished()

    def restore(self) -> None:
        import grain

        step = self.manager.latest_step()
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(self.params), opt_state=ocp.args.StandardRestore(self.opt_state),
            data=grain.checkpoint.CheckpointRestore(self.iterator)))
        self.params, self.opt_state = restored["params"], restored["opt_state"]
        self.step = step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
    import grain

    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        item_handlers={"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                       "prior_config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})


def _with_source(stage1_config, config):
    merged = ml_collections.ConfigDict(stage1_config.to_dict())
    merged.data.source, merged.data.path = config.data_source, config.data_path
    return merged


def load_prior(workdir: str, step: int | None = None) -> tuple[mim.MaskedTokenPrior, Any]:
    """``(model, params)`` of a stage-2 run (the latest step by default)."""
    manager = _manager(os.path.join(workdir, "checkpoints"), 1)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no prior checkpoint in {workdir}")
        cfg = manager.restore(step, args=ocp.args.Composite(prior_config=ocp.args.JsonRestore()))["prior_config"]
        model = mim.MaskedTokenPrior(mim.MIMConfig(**cfg))
        abstract = unboxed(jax.eval_shape(lambda: mim.init_params(model, jax.random.key(0))))
        params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
    finally:
        manager.close()
    return model, params


def read_prior_meta(workdir: str, step: int | None = None) -> dict:
    """What a stage-2 checkpoint records about its stage-1 model (``stage1_model_id``, ``stage1``
    path); ``{}`` for checkpoints written before it was recorded."""
    manager = _manager(os.path.join(workdir, "checkpoints"), 1)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no prior checkpoint in {workdir}")
        if not os.path.isdir(os.path.join(workdir, "checkpoints", str(step), "meta")):
            return {}
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    finally:
        manager.close()


def train_prior(config, workdir: str) -> list[dict[str, float]]:
    """Train to ``config.num_steps`` (resuming), checkpointing every ``checkpoint_every`` steps;
    ``max_minutes`` > 0 stops (and checkpoints) after that wall time."""
    from percov2_jax.train.metrics import MetricWriter, ProgressBar

    trainer = PriorTrainer(config, workdir)
    writer = MetricWriter(os.path.join(workdir), purge_step=trainer.step or None)
    bar = ProgressBar(int(config.num_steps), trainer.step)
    history: list[dict[str, float]] = []
    minutes = float(config.get("max_minutes", 0.0))
    deadline = time.time() + 60.0 * minutes if minutes > 0 else None
    try:
        while trainer.step < int(config.num_steps):
            if deadline is not None and time.time() > deadline:
                bar.write(f"stopping at step {trainer.step}: max_minutes={minutes} reached")
                trainer.save()
                break
            record = trainer.train_steps(1)[0]
            history.append(record)
            if trainer.step % int(config.log_every) == 0 or trainer.step == int(config.num_steps):
                writer.write_scalars(trainer.step, {k: v for k, v in record.items() if k != "step"})
                bar.update(trainer.step, loss=record["bits_per_token"])
            else:
                bar.update(trainer.step)
            if trainer.step % int(config.checkpoint_every) == 0 or trainer.step == int(config.num_steps):
                trainer.save()
    finally:
        bar.close()
        writer.close()
        trainer.close()
    return history
