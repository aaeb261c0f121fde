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
import numpy as np

from percov2_jax import build, multihost
from percov2_jax import sharding as sharding_lib
from percov2_jax.runs import checkpointing
from percov2_jax.runs.layout import RunDir
from percov2_jax.train.state import build_state_spec, create_train_state
from percov2_jax.train.step import StepConfig, make_train_step


def step_config(config) -> StepConfig:
    f = config.flow
    return StepConfig(
        caption_dropout=float(config.text.caption_dropout),
        timestep_scheme=f.timestep_scheme,
        logit_mean=float(f.logit_mean),
        logit_std=float(f.logit_std),
        mode_scale=float(f.mode_scale),
        shift=float(f.shift),
        discrete_timesteps=bool(f.discrete_timesteps),
        loss_weighting=f.loss_weighting,
        ema_decay=float(config.optim.ema_decay),
        sample_posterior=bool(config.vae.sample_posterior),
        learned_null_text=bool(config.model.learned_null_text),
    )


class Trainer:
    """Holds one run's model, state, step function and I/O; ``run()`` trains to ``num_steps``."""

    def __init__(self, config, workdir: str | os.PathLike | RunDir, devices=None):

        # The architecture comes from the converted checkpoint unless the config states it; the
        # config the run stores then states it, so the codec and the prior need no checkpoint.
        build.resolve_architecture(config)
        self.config, self.run = config, RunDir(workdir)
        m = config.mesh
        self.mesh = sharding_lib.make_mesh(int(m.data), int(m.fsdp), int(m.tensor), devices=devices)
        self.rate = build.validate_config(config, mesh=self.mesh)
        self.model = build.build_model(config, self.rate)
        self.source = build.build_data_source(config)
        self.codec, vae_params = build.build_latent_codec(
            config, self.source, self.run.patch_autoencoder, mesh=self.mesh, dtype=build.vae_dtype(config)
        )
        self.text = build.build_text_conditioner(config, mesh=self.mesh)
        build.require_text_for(self.text, self.source)
        replicated = sharding_lib.replicated(self.mesh)
        self.vae_params = (
            sharding_lib.replicate(vae_params, self.mesh) if config.vae.kind == "patch_pca" else vae_params
        )
        if config.model.learned_null_text:
            self.null_text = None
        else:
            self.null_text = sharding_lib.replicate(tuple(self.text.null_embeddings()), self.mesh)
        self.text_length = self.model.config.text_length
        inputs = build.init_inputs(self.model, self.rate)
        self.spec = build_state_spec(self.model, inputs, config.optim, self.mesh, ema=float(config.optim.ema_decay) > 0)
        frozen_shardings = {
            "vae": jax.tree_util.tree_map(lambda x: x.sharding, self.vae_params),
            "null_text": None if self.null_text is None else (replicated, replicated),
        }
        self.step_fn = make_train_step(
            self.model, self.codec, self.spec, step_config(config), self.mesh, frozen_shardings
        )
        # Raw key bits (a typed key cannot be built from host data across processes).
        self.base_key = sharding_lib.replicate(jax.random.key_data(jax.random.key(int(config.seed) + 1)), self.mesh)
        self.iterator = build.build_train_iterator(
            self.source, config.data, int(config.train.global_batch_size), int(config.image_size), int(config.seed)
        )
        t = config.train
        self.manager = checkpointing.make_manager(
            self.run, max_to_keep=int(t.keep_checkpoints), async_save=bool(t.async_checkpointing)
        )
        if self.manager.latest_step() is not None:
            self.start_step, self.state = checkpointing.restore(
                self.manager, self.spec.abstract, self.spec.shardings, self.iterator
            )
        else:
            pretrained = build.load_pretrained_transformer(config, self.model, self.mesh)
            extra = self.model.config.hyper_encoder.out_channels
            if pretrained is None:
                self.state = create_train_state(self.model, inputs, self.spec, int(config.seed))
            else:
                self.state = create_train_state(
                    self.model,
                    inputs,
                    self.spec,
                    int(config.seed),
                    init_params=lambda p, pre: build.insert_pretrained(p, pre, extra),
                    init_args=(pretrained,),
                )
            self.start_step = 0

    def frozen(self) -> dict[str, Any]:
        return {"vae": self.vae_params, "null_text": self.null_text}

    def next_batch(self) -> tuple[dict[str, jax.Array], dict[str, np.ndarray]]:
        """The next global batch (images and caption embeddings) and this process's raw rows."""
        local = next(self.iterator)
        batch = sharding_lib.global_batch({"image": np.asarray(local["image"], np.float32)}, self.mesh)
        if hasattr(self.text, "encode"):  # encoders on the mesh: the embeddings never visit the host
            seq, pooled = self.text.encode([str(c) for c in local["caption"]])
        elif hasattr(self.text, "lookup"):
            seq, pooled = self.text.lookup([str(i) for i in local["id"]])
        else:
            seq, pooled = self.text([str(c) for c in local["caption"]])
        if not isinstance(seq, jax.Array):
            seq, pooled = sharding_lib.global_batch({"s": seq, "p": pooled}, self.mesh).values()
        return {**batch, "encoder_hidden_states": seq, "pooled_projections": pooled}, local

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
        self.iterator.close()


def preview_images(source, count: int, image_size: int) -> tuple[np.ndarray, list[str]]:
    """The first ``count`` examples of ``source``, center-cropped to ``image_size``, in [-1, 1]:
    identical on every process, so the reconstruction grid is the same global computation."""
    from percov2_jax.data.pipeline import resize_and_crop

    images, captions = [], []
    for i in range(min(count, len(source))):
        record = source[i]
        image = resize_and_crop(np.asarray(record["image"], np.uint8), (image_size, image_size))
        images.append(image.astype(np.float32) / 127.5 - 1.0)
        captions.append(str(record.get("caption", "")))
    return np.stack(images), captions


def train_and_evaluate(config, workdir: str | os.PathLike | RunDir) -> dict[str, float]:
    """Train to ``config.train.num_steps`` (resuming from ``workdir`` if it holds checkpoints),
    logging, checkpointing and writing reconstruction grids. Returns the last logged metrics."""
    from jax.experimental import multihost_utils

    from percov2_jax.codec import networks
    from percov2_jax.flops import mmdit_forward_flops, model_flops_utilization, peak_flops_per_device
    from percov2_jax.train.image_grid import reconstruction_grid, save_png
    from percov2_jax.train.monitoring import MetricWriter, ProgressBar, StepTimer
    from percov2_jax.train.profiling import StepProfiler

    trainer = Trainer(config, workdir)
    run = trainer.run
    t = config.train
    lead = jax.process_index() == 0
    num_steps, start = int(t.num_steps), trainer.start_step
    writer = MetricWriter(run, enabled=lead, purge_step=start or None)
    bar = ProgressBar(num_steps, start, enabled=lead)
    timer = StepTimer(int(t.global_batch_size))
    preview, preview_captions = preview_images(trainer.source, int(config.sample.num_images), int(config.image_size))
    # A precomputed text store holds the training ids' captions only: no grid without a text encoder.
    grids = int(t.image_every) > 0 and not hasattr(trainer.text, "lookup")
    if grids:
        seq, pooled = trainer.text(preview_captions)
        grid_images, grid_seq, grid_pooled = sharding_lib.replicate((preview, seq, pooled), trainer.mesh)
        grid_key = sharding_lib.replicate(jax.random.key_data(jax.random.key(int(config.seed))), trainer.mesh)
    tcfg = trainer.model.config.transformer
    latent = int(config.image_size) // 8
    train_flops = 3.0 * mmdit_forward_flops(tcfg, int(t.global_batch_size), latent, latent, trainer.text_length)
    known_peak = all(peak_flops_per_device(d) for d in jax.devices())
    deadline = time.time() + 60.0 * float(t.max_minutes) if float(t.max_minutes) > 0 else None
    last: dict[str, float] = {}

    def write_grid(step: int) -> None:
        if not grids:
            return
        s = trainer.state
        indices = networks.encode_tokens(
            trainer.model, trainer.codec, s.params, s.vq_stats, trainer.vae_params, grid_images
        )
        recon = networks.decode_tokens(
            trainer.model,
            trainer.codec,
            s.params,
            s.vq_stats,
            trainer.vae_params,
            indices,
            grid_seq,
            grid_pooled,
            trainer.null_text,
            grid_key,
            int(config.sample.num_steps),
            float(config.sample.guidance_scale),
            float(config.flow.shift),
        )
        recon = multihost_utils.process_allgather(recon, tiled=True)
        grid = reconstruction_grid(preview, np.asarray(recon))
        if lead:
            save_png(run.grid(step), grid)
            save_png(run.latest_grid, grid)
            writer.write_images(step, {"reconstructions": grid})
        timer.restart_window()

    watch = multihost.PreemptionWatch()
    profiler = StepProfiler(config.get("profile", {}), run.profile)
    try:
        step = start
        while step < num_steps:
            with profiler.step(step + 1, ready=lambda: trainer.state):
                waited = time.perf_counter()
                batch, _ = trainer.next_batch()
                timer.add_input_time(time.perf_counter() - waited)
                trainer.state, metrics = trainer.step_fn(trainer.state, batch, trainer.frozen(), trainer.base_key)
            step += 1
            log_now = step % int(t.log_every) == 0 or step == num_steps
            timer.tick(metrics if (log_now or step == start + 1) else None)
            if log_now:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                window = timer.window()
                if window is not None:
                    last["images_per_second"] = window.images_per_second
                    last["images_per_second_per_chip"] = window.images_per_second / jax.device_count()
                    last["input_wait_fraction"] = window.input_fraction
                    if known_peak:
                        last["mfu"] = model_flops_utilization(train_flops, window.seconds_per_step, jax.devices())
                writer.write_scalars(step, last)
                bar.update(
                    step, loss=last["loss"], lr=last["learning_rate"], images_per_second=last.get("images_per_second")
                )
                if not np.isfinite(last["loss"]):
                    raise FloatingPointError(f"loss is {last['loss']} at step {step}")
            else:
                bar.update(step)
            out_of_time = deadline is not None and multihost.process0_decides(time.time() > deadline)
            preempted = watch.reached(step)
            if step % int(t.checkpoint_every) == 0 or step == num_steps or out_of_time or preempted:
                trainer.save()
                timer.restart_window()
            if preempted:
                trainer.manager.wait_until_finished()
                bar.write(watch.saved_line(step, run.checkpoints))
                break
            if int(t.image_every) > 0 and (step % int(t.image_every) == 0 or step == num_steps or out_of_time):
                write_grid(step)
            if out_of_time:
                bar.write(f"stopping at step {step}: train.max_minutes={t.max_minutes} reached")
                break
    finally:
        profiler.close()
        watch.close()
        bar.close()
        writer.close()
        trainer.close()
    return last
