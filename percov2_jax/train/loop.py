"""``train_and_evaluate(config, workdir)``: the stage-1 training loop.

The same code runs on one CPU device, on 8 virtual devices, across processes started with
``jax.distributed.initialize`` and on TPU/GPU meshes: every array is global, every process
feeds its own rows of the global batch, and process 0 alone writes logs and pictures.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from percov2_jax import sharding as sharding_lib
from percov2_jax.train import checkpointing, components
from percov2_jax.train.state import batch_sharding, build_state_spec, create_train_state
from percov2_jax.train.step import StepConfig, make_reconstruct_fn, make_train_step
from percov2_jax.train.text import build_text_conditioner


def step_config(config) -> StepConfig:
    f = config.flow
    return StepConfig(caption_dropout=float(config.text.caption_dropout), timestep_scheme=f.timestep_scheme,
                      logit_mean=float(f.logit_mean), logit_std=float(f.logit_std), mode_scale=float(f.mode_scale),
                      shift=float(f.shift), discrete_timesteps=bool(f.discrete_timesteps),
                      loss_weighting=f.loss_weighting, ema_decay=float(config.optim.ema_decay),
                      sample_posterior=bool(config.vae.sample_posterior),
                      learned_null_text=bool(config.model.learned_null_text))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, process_count: int) -> jax.Array | dict:
    """Process-local rows -> global arrays split over the batch axes."""
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        shape = (value.shape[0] * process_count,) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


class Trainer:
    """Holds one run's model, state, step function and I/O; ``run()`` trains to ``num_steps``."""

    def __init__(self, config, workdir: str):
        from percov2_jax.data.pipeline import make_train_iterator

        self.config, self.workdir = config, workdir
        m = config.mesh
        self.mesh = sharding_lib.make_mesh(int(m.data), int(m.fsdp), int(m.tensor))
        self.rate = components.validate_config(config, mesh=self.mesh)
        self.model = components.build_model(config, self.rate)
        self.source = components.build_data_source(config)
        self.codec, vae_params = components.build_latent_codec(config, self.source, workdir, mesh=self.mesh)
        self.text = build_text_conditioner(config.text, self.model.config.transformer)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.vae_params = jax.device_put(vae_params, replicated) if config.vae.kind == "patch_pca" else vae_params
        if config.model.learned_null_text:
            self.null_text = None
        else:
            self.null_text = jax.device_put(tuple(jnp.asarray(x) for x in self.text.null_embeddings()), replicated)
        self.text_length = self._text_length()
        inputs = components.init_inputs(self.model, self.rate, self.text_length)
        self.spec = build_state_spec(self.model, inputs, config.optim, self.mesh, ema=float(config.optim.ema_decay) > 0)
        self.batch_sharding = batch_sharding(self.mesh)
        frozen_shardings = {"vae": jax.tree_util.tree_map(lambda x: x.sharding, self.vae_params),
                            "null_text": None if self.null_text is None else (replicated, replicated)}
        self.step_fn = make_train_step(self.model, self.codec, self.spec, step_config(config), self.mesh,
                                       frozen_shardings)
        self.base_key = jax.device_put(jax.random.key(int(config.seed) + 1), replicated)
        self.process_count = jax.process_count()
        d = config.data
        self.iterator = make_train_iterator(
            self.source, global_batch_size=int(config.train.global_batch_size), image_size=int(config.image_size),
            seed=int(config.seed), process_index=jax.process_index(), process_count=self.process_count,
            random_crop=bool(d.random_crop), random_flip=bool(d.random_flip), worker_count=int(d.worker_count))
        t = config.train
        self.manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), max_to_keep=int(t.keep_checkpoints),
                                                  async_save=bool(t.async_checkpointing))
        if self.manager.latest_step() is not None:
            self.start_step, self.state = checkpointing.restore(self.manager, self.spec.abstract, self.spec.shardings,
                                                                self.iterator)
        else:
            pretrained = components.load_pretrained_transformer(config, self.model, self.mesh)
            extra = self.model.config.hyper_encoder.out_channels
            if pretrained is None:
                self.state = create_train_state(self.model, inputs, self.spec, int(config.seed))
            else:
                self.state = create_train_state(
                    self.model, inputs, self.spec, int(config.seed),
                    init_params=lambda p, pre: components.insert_pretrained(p, pre, extra), init_args=(pretrained,))
            self.start_step = 0

    def _text_length(self) -> int:
        seq, _ = self.text.null_embeddings() if hasattr(self.text, "null_embeddings") else (None, None)
        return int(np.asarray(seq).shape[1])

    def frozen(self) -> dict[str, Any]:
        return {"vae": self.vae_params, "null_text": self.null_text}

    def next_batch(self) -> tuple[dict[str, jax.Array], dict[str, np.ndarray]]:
        """The next global batch (images and caption embeddings) and this process's raw rows."""
        local = next(self.iterator)
        if hasattr(self.text, "lookup"):
            seq, pooled = self.text.lookup([str(i) for i in local["id"]])
        else:
            seq, pooled = self.text([str(c) for c in local["caption"]])
        arrays = {"image": np.asarray(local["image"], np.float32), "encoder_hidden_states": seq,
                  "pooled_projections": pooled}
        return global_batch(arrays, self.batch_sharding, self.process_count), local

    def train_steps(self, num_steps: int, on_step=None) -> list[dict[str, float]]:
        """Run ``num_steps`` steps without checkpoints or logs; returns the per-step metrics."""
        history = []
        for _ in range(num_steps):
            batch, _ = self.next_batch()
            self.state, metrics = self.step_fn(self.state, batch, self.frozen(), self.base_key)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            history.append(metrics)
            if on_step is not None:
                on_step(int(self.state.step), metrics)
        return history

    def save(self, force: bool = True) -> None:
        checkpointing.save(self.manager, int(self.state.step), self.state, self.iterator, self.config, force=force)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
