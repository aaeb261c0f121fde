"""The project's stage-1 training step on one device with random weights, at a benchmark's sizes.

Shared by ``accelerator_bench.py`` (the stage-1 row) and ``stage1_breakdown.py`` (its variants):
one training state and one set of frozen VAE weights, and a step compiled per variant (remat
policy, VAE dtype) that all take that state, so trying variants never holds two states (the
SD3-medium state is 24 GB: float32 weights and two AdamW moments).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from percov2_jax import build
from percov2_jax import sharding as sharding_lib
from percov2_jax.flops import traced_matmul_flops
from percov2_jax.models.vae import AutoencoderKL, AutoencoderKLConfig


class Stage1Program:
    """``make_train_step`` for ``setup.config`` (an ``accelerator_bench.Setup``), ready to compile.

    ``step(remat_policy, vae_dtype)``: the jitted step of that variant (None: the config's remat);
    ``args(batch, vae_dtype)``: its abstract arguments for ``lower``; ``call(compiled, batch,
    vae_dtype)``: a no-argument function running one step on random data (the state is donated
    and replaced, so every variant keeps stepping the same state).
    """

    def __init__(self, setup, random_variables, seed: int = 14):
        from percov2_jax.train.loop import step_config
        from percov2_jax.train.state import TrainState, build_state_spec

        self.setup, self.config, t = setup, setup.config, setup.plain
        self.mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.replicated, self.bs = sharding_lib.replicated(self.mesh), sharding_lib.batch_sharding(self.mesh)
        self.step_config = step_config(self.config)
        model = build.build_model(self.config, setup.rate)
        inputs = build.init_inputs(model, setup.rate)
        self.spec = build_state_spec(model, inputs, self.config.optim, self.mesh, ema=False)
        variables = random_variables(model, inputs, ("params", "vq"), seed=seed)
        params = jax.device_put(variables["params"], self.spec.shardings.params)
        self.param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        self.holder = [
            TrainState(
                step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
                params=params,
                opt_state=jax.jit(self.spec.tx.init, out_shardings=self.spec.shardings.opt_state)(params),
                vq_stats=jax.device_put(variables["vq_stats"], self.spec.shardings.vq_stats),
            )
        ]
        del variables, params
        # float32 as a converted checkpoint stores it; a bf16 copy is made when a variant asks.
        codec = AutoencoderKL(AutoencoderKLConfig(**setup.vae_fields))
        vae32 = random_variables(codec, (jnp.zeros((1, 8, 8, 3)),), shardings=self.replicated, seed=seed + 1)
        self.vae_params = {"float32": vae32["params"]}
        self.null = jax.device_put(
            (jnp.zeros((1, setup.text_len, t.joint_attention_dim)), jnp.zeros((1, t.pooled_projection_dim))),
            self.replicated,
        )
        self.key = jax.device_put(jax.random.key_data(jax.random.key(seed + 2)), self.replicated)
        self.shapes = {
            "image": (setup.image, setup.image, 3),
            "encoder_hidden_states": (setup.text_len, t.joint_attention_dim),
            "pooled_projections": (t.pooled_projection_dim,),
        }
        self._data: dict[int, dict] = {}

    def codec(self, vae_dtype: str) -> AutoencoderKL:
        dtype = jnp.dtype(vae_dtype)
        return AutoencoderKL(AutoencoderKLConfig(**self.setup.vae_fields), dtype=dtype, param_dtype=dtype)

    def frozen(self, vae_dtype: str) -> dict:
        if vae_dtype not in self.vae_params:
            self.vae_params[vae_dtype] = jax.tree.map(lambda x: x.astype(vae_dtype), self.vae_params["float32"])
        return {"vae": self.vae_params[vae_dtype], "null_text": self.null}

    def step(self, remat_policy: str | None = None, vae_dtype: str = "float32"):
        from percov2_jax.train.step import make_train_step

        config = self.config
        if remat_policy is not None:
            config = config.copy_and_resolve_references()
            config.model.remat_policy = remat_policy
        model = build.build_model(config, self.setup.rate)
        frozen = self.frozen(vae_dtype)
        shardings = {"vae": jax.tree.map(lambda x: x.sharding, frozen["vae"]), "null_text": (self.replicated,) * 2}
        return make_train_step(model, self.codec(vae_dtype), self.spec, self.step_config, self.mesh, shardings)

    def abstract_batch(self, batch: int) -> dict:
        return {k: jax.ShapeDtypeStruct((batch, *s), jnp.float32, sharding=self.bs) for k, s in self.shapes.items()}

    def args(self, batch: int, vae_dtype: str = "float32") -> tuple:
        return self.holder[0], self.abstract_batch(batch), self.frozen(vae_dtype), self.key

    def data(self, batch: int) -> dict:
        if batch not in self._data:
            keys = jax.random.split(jax.random.key(17), len(self.shapes))
            data = {k: jax.random.normal(keys[i], (batch, *s)) for i, (k, s) in enumerate(self.shapes.items())}
            self._data = {batch: jax.device_put({**data, "image": jnp.tanh(data["image"])}, self.bs)}
        return self._data[batch]

    def call(self, compiled, batch: int, vae_dtype: str = "float32"):
        data, frozen = self.data(batch), self.frozen(vae_dtype)

        def once() -> Any:
            self.holder[0], metrics = compiled(self.holder[0], data, frozen, self.key)
            return metrics["loss"]

        return once

    def model_flops(self, batch: int) -> float:
        """Matmul FLOPs of one step without remat (recomputation is work MFU does not credit):
        VAE encode, hyper-encoder, VQ, the MM-DiT forward and backward."""
        return float(traced_matmul_flops(self.step("none"), *self.args(batch)))
