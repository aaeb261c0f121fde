"""The shared training-test config and helpers (used in-process and by train_check.py)."""

from __future__ import annotations

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config(x64: bool = False):
    """configs/tiny.py shrunk further: 64x64 crops (4x4 tokens), 2 MM-DiT layers, batch 8.

    ``x64``: float64 params and compute (needs ``jax_enable_x64``), for the sharded-equality
    tests: in float32, Adam's per-element normalisation turns rounding noise in near-zero
    gradients into update differences that no sharding bug caused."""
    from configs import tiny

    c = tiny.get_config()
    c.image_size = 64
    c.model.transformer = dict(c.model.transformer, num_layers=2)
    c.model.hyper_channels = 16
    c.model.hyper_out_channels = 16
    c.text.max_sequence_length = 8
    c.train.global_batch_size = 8
    c.train.num_steps = 1000
    c.optim.warmup_steps = 5
    c.train.async_checkpointing = False
    c.vae.fit_images = 6
    if x64:
        c.model.dtype = c.model.param_dtype = "float64"
    return c


def run_steps(config, workdir: str, steps: int, devices=None, save: bool = False):
    """Train ``steps`` steps (from the checkpoint in ``workdir`` if there is one), checkpoint at
    the end if ``save``; returns (losses, params gathered to host numpy)."""
    import jax
    from jax.experimental import multihost_utils

    from percov2_jax.train.loop import Trainer

    if devices is None and int(np.prod([config.mesh.data, config.mesh.fsdp, config.mesh.tensor])) == 1:
        import jax

        devices = jax.devices()[:1]  # a one-device reference inside a multi-device process
    trainer = Trainer(config, workdir, devices=devices)
    try:
        history = trainer.train_steps(steps)
        if save:
            trainer.save()
        params = multihost_utils.process_allgather(trainer.state.params, tiled=True)
    finally:
        trainer.close()
    return [h["loss"] for h in history], jax.tree.map(np.asarray, params)


def trained_stage1(workdir: str, steps: int = 1) -> str:
    """A stage-1 workdir with a checkpoint after ``steps`` steps of the test config."""
    from percov2_jax.train.loop import Trainer

    trainer = Trainer(test_config(), str(workdir))
    try:
        trainer.train_steps(steps)
        trainer.save()
    finally:
        trainer.close()
    return str(workdir)


def flat(params) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def save_result(path: str, losses, params) -> None:
    np.savez(path, losses=np.asarray(losses), **{"param:" + k: v for k, v in flat(params).items()})


def load_result(path: str):
    with np.load(path) as f:
        return f["losses"], {k[6:]: f[k] for k in f.files if k.startswith("param:")}


def prior_test_config(stage1: str):
    """configs/prior_tiny.py shrunk: a 32-wide, 2-layer prior, batch 8."""
    from configs import prior_tiny

    c = prior_tiny.get_config()
    c.stage1 = stage1
    c.train.global_batch_size = 8
    c.prior.width, c.prior.num_heads = 32, 2
    return c


def trained_prior(stage1: str, workdir: str, steps: int = 3) -> str:
    """A stage-2 workdir with a checkpoint after ``steps`` steps on ``stage1``'s tokens."""
    from percov2_jax.train.prior import PriorTrainer

    trainer = PriorTrainer(prior_test_config(stage1), str(workdir))
    try:
        trainer.train_steps(steps)
        trainer.save()
    finally:
        trainer.close()
    return str(workdir)
