"""Compile the full-size stage-1 training step and the decoder ahead of time for a mesh of
devices we do not have, and read off per-device memory and FLOPs.

Nothing is allocated: the train state, the frozen VAE and the batch are ``ShapeDtypeStruct``s
carrying the shardings the training loop would give them (the same ``build_state_spec``, the
same logical-axis rule table), and the functions compiled are the loop's own
(``make_train_step``) and the codec's own (``codec.networks.decode_tokens``).

Memory is XLA's ``memory_analysis()`` of the per-device program: arguments, outputs (minus the
donated buffers they alias) and temporaries; ``peak`` is their sum. FLOPs are XLA's cost
analysis of that program (per device) and, independently, the model FLOPs of the MM-DiT
(``percov2_jax.flops``: 3x the forward for a training step) from which the step time at a given MFU
follows: ``model FLOPs / (devices x peak FLOP/s x MFU)``.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding

from percov2_jax import build, rates
from percov2_jax import sharding as sharding_lib
from percov2_jax.planning.devices import DeviceKind

# The SD3 release VAE (stabilityai/stable-diffusion-3-medium-diffusers vae/config.json).
SD3_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)


# The SD3 release's frozen text encoders (text_encoder, text_encoder_2, text_encoder_3 config.json):
# CLIP-L (123 M), OpenCLIP bigG (695 M) and the T5-XXL v1.1 encoder (4.76 B).
SD3_TEXT_ENCODERS = {
    "clip_l": dict(
        _class_name="CLIPTextModelWithProjection",
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
    ),
    "clip_g": dict(
        _class_name="CLIPTextModelWithProjection",
        hidden_size=1280,
        intermediate_size=5120,
        projection_dim=1280,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
    ),
    "t5": dict(
        _class_name="T5EncoderModel",
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
    ),
}


@dataclasses.dataclass(frozen=True)
class CompiledCost:
    """What XLA reports for one compiled per-device program (bytes per device)."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    xla_flops: float | None  # per device, XLA's cost analysis
    model_flops: float  # whole step over the global batch, matmuls only (train.flops)
    compile_seconds: float
    out_of_memory: str | None = None  # the compiler's refusal when the program cannot fit the device

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not aliased to donated arguments + temporaries + code (with
        ``out_of_memory``: the temporaries the compiler asked for, a lower bound)."""
        if self.out_of_memory:
            return self.temp_bytes
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend gives no memory analysis")
    return dict(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        code_bytes=int(stats.generated_code_size_in_bytes),
    )


def compile_cost(name: str, jitted, args: tuple, model_flops: float) -> CompiledCost:
    """Lower and compile ``jitted(*args)`` for the devices the args' shardings name."""
    from percov2_jax.flops import cost_analysis_flops

    start = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program that cannot fit in HBM: "... memory required for HLO
        # temporaries (163.52G) exceeds available HBM (95.74G)". Report it as a plan result.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        found = re.search(r"temporaries \(([\d.]+)G\)", str(e))
        temp = int(float(found.group(1)) * 2**30) if found else -1
        return CompiledCost(
            name=name,
            argument_bytes=-1,
            output_bytes=-1,
            alias_bytes=0,
            temp_bytes=temp,
            code_bytes=0,
            xla_flops=None,
            model_flops=float(model_flops),
            compile_seconds=time.perf_counter() - start,
            out_of_memory=str(e).strip().splitlines()[0][:300],
        )
    seconds = time.perf_counter() - start
    return CompiledCost(
        name=name,
        xla_flops=cost_analysis_flops(compiled),
        model_flops=float(model_flops),
        compile_seconds=seconds,
        **_memory(compiled),
    )


def latent_codec(config):
    """The frozen image <-> latent codec module of ``config.vae.kind`` (no weights), in
    ``vae.dtype`` as the trainer runs it."""
    kind = config.vae.kind
    if kind == "sd3":
        from percov2_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, example_inputs

        dtype = jnp.dtype(build.vae_dtype(config))
        module = AutoencoderKL(AutoencoderKLConfig(**SD3_VAE), dtype=dtype, param_dtype=dtype)
        return module, example_inputs(module.config)
    if kind == "patch_pca":
        from percov2_jax.models.patch_autoencoder import PatchAutoencoder, PatchAutoencoderConfig

        module = PatchAutoencoder(PatchAutoencoderConfig())
        return module, (jnp.zeros((1, 16, 16, 3), jnp.float32),)
    if kind == "lapped_conv":
        from percov2_jax.models.conv_autoencoder import ConvAutoencoder, ConvAutoencoderConfig

        module = ConvAutoencoder(ConvAutoencoderConfig())
        return module, (jnp.zeros((1, 16, 16, 3), jnp.float32),)
    raise ValueError(f"unknown vae.kind {kind!r}; choose sd3, patch_pca or lapped_conv")


class Planner:
    """The model, abstract state and shardings of ``config`` on ``mesh`` (built once, no arrays)."""

    def __init__(self, config, mesh):
        from percov2_jax.train.state import build_state_spec

        self.config, self.mesh = config, mesh
        self.rate = build.validate_config(config, process_count=1, mesh=mesh)
        self.model = build.build_model(config, self.rate)
        self.text_length = self.model.config.text_length
        inputs = build.init_inputs(self.model, self.rate)
        self.spec = build_state_spec(self.model, inputs, config.optim, mesh, ema=float(config.optim.ema_decay) > 0)
        self.state = sharding_lib.with_shardings(self.spec.abstract, self.spec.shardings)
        self.codec, codec_inputs = latent_codec(config)
        boxed = jax.eval_shape(lambda: self.codec.init(jax.random.key(0), *codec_inputs))
        from percov2_jax.models.layers import unboxed

        codec_shardings = (
            sharding_lib.logical_shardings(boxed.get("params", {}), mesh)
            if config.vae.kind == "sd3"
            else jax.tree.map(lambda _: self.replicated, unboxed(boxed)["params"])
        )
        self.codec_params = sharding_lib.with_shardings(unboxed(boxed)["params"], codec_shardings)
        self.image_size = int(config.image_size)
        self.latent_side = self.image_size // rates.LATENT_DOWNSAMPLE

    @property
    def replicated(self) -> NamedSharding:
        return sharding_lib.replicated(self.mesh)

    def _text(self, batch: int, sharding) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        t = self.model.config.transformer
        return (
            jax.ShapeDtypeStruct((batch, self.text_length, t.joint_attention_dim), jnp.float32, sharding=sharding),
            jax.ShapeDtypeStruct((batch, t.pooled_projection_dim), jnp.float32, sharding=sharding),
        )

    def forward_flops(self, batch: int) -> float:
        from percov2_jax.flops import mmdit_forward_flops

        return float(
            mmdit_forward_flops(
                self.model.config.conditioned_transformer, batch, self.latent_side, self.latent_side, self.text_length
            )
        )

    def train_step_program(self) -> tuple[Any, tuple]:
        """``(jitted step, abstract args)``: the training loop's stage-1 step at ``train.global_batch_size``."""
        from percov2_jax.train.loop import step_config
        from percov2_jax.train.step import make_train_step

        b = int(self.config.train.global_batch_size)
        bs = sharding_lib.batch_sharding(self.mesh)
        null = None if self.config.model.learned_null_text else self._text(1, self.replicated)
        frozen_shardings = {
            "vae": jax.tree.map(lambda x: x.sharding, self.codec_params),
            "null_text": None if null is None else (self.replicated, self.replicated),
        }
        step = make_train_step(self.model, self.codec, self.spec, step_config(self.config), self.mesh, frozen_shardings)
        seq, pooled = self._text(b, bs)
        batch = {
            "image": jax.ShapeDtypeStruct((b, self.image_size, self.image_size, 3), jnp.float32, sharding=bs),
            "encoder_hidden_states": seq,
            "pooled_projections": pooled,
        }
        key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated)
        return step, (self.state, batch, {"vae": self.codec_params, "null_text": null}, key)

    def train_step(self) -> CompiledCost:
        step, args = self.train_step_program()
        return compile_cost(
            "train_step", step, args, 3.0 * self.forward_flops(int(self.config.train.global_batch_size))
        )

    def decode(self, batch: int, num_steps: int, guidance_scale: float) -> CompiledCost:
        """The codec's decoder (tokens + caption -> image) on ``batch`` images: ``num_steps`` Euler
        steps, CFG on the caption (two transformer passes per step when ``guidance_scale != 1``),
        then the VAE; traced under the activation constraints as ``Codec.decompress_batch`` does."""
        from percov2_jax.codec.networks import decode_tokens

        bs = sharding_lib.batch_sharding(self.mesh)
        grid = self.rate.token_grid(self.image_size, self.image_size)
        seq, pooled = self._text(batch, bs)
        null_text = None if self.config.model.learned_null_text else self._text(1, self.replicated)
        args = (
            self.model,
            self.codec,
            self.state.params,
            self.state.vq_stats,
            self.codec_params,
            jax.ShapeDtypeStruct((batch,) + grid, jnp.int32, sharding=bs),
            seq,
            pooled,
            null_text,
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated),
            num_steps,
            float(guidance_scale),
            float(self.config.flow.shift),
        )
        passes = num_steps * (2 if guidance_scale != 1.0 else 1)
        with sharding_lib.activation_constraints(self.mesh):
            return compile_cost("decode", decode_tokens, args, passes * self.forward_flops(batch))

    def text_encoder_program(self, batch: int) -> tuple[Any, tuple, float]:
        """``(jitted encoder call, abstract args, model FLOPs)``: the frozen SD3 text encoders of
        the run (`text_encoder_configs`; T5 only with ``text.use_t5``) on the mesh, sharded by the
        rule table in ``text.dtype`` (``auto``: bfloat16, as on an accelerator), encoding ``batch``
        captions as training does (`percov2_jax.text.on_mesh`)."""
        from percov2_jax.convert import registry
        from percov2_jax.text.on_mesh import embed_on_mesh
        from percov2_jax.text.prompt_encoder import CLIP_MAX_LENGTH

        text = self.config.text
        dtype = jnp.dtype(jnp.bfloat16 if text.get("dtype", "auto") == "auto" else text.dtype)
        names = ("clip_l", "clip_g", "t5") if text.use_t5 else ("clip_l", "clip_g")
        configs = text_encoder_configs(self.config, names)
        t5_length = int(text.max_sequence_length)
        modules, params, flops = {}, {}, 0.0
        bs = sharding_lib.batch_sharding(self.mesh)
        ids = {}
        for name in names:
            module, kind = registry.build_module(configs[name], dtype=dtype, param_dtype=dtype)
            boxed = registry.abstract_params(module, kind)
            abstract = nn.meta.unbox(boxed)
            modules[name] = module
            params[name] = sharding_lib.with_shardings(abstract, sharding_lib.logical_shardings(boxed, self.mesh))
            length = t5_length if name == "t5" else CLIP_MAX_LENGTH
            ids[name] = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=bs)
            # Matmul FLOPs: 2 per weight per token (the token tables are gathers, not matmuls).
            weights = sum(x.size for path, x in _flat(abstract) if "embed" not in path and "embedding" not in path)
            flops += 2.0 * weights * batch * length
        width = self.model.config.transformer.joint_attention_dim
        jitted = embed_on_mesh(modules, self.mesh, bs, None, t5_length, width)
        return jitted, (params, ids), flops

    def text_encoders(self, batch: int) -> CompiledCost:
        jitted, args, flops = self.text_encoder_program(batch)
        return compile_cost("text_encoders", jitted, args, flops)

    @property
    def param_count(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(self.spec.abstract.params)))


def text_encoder_configs(config, names) -> dict[str, dict]:
    """The text encoders' config.json dicts: those of the converted checkpoint the run would read
    them from (``text.checkpoint``, else ``pretrained.checkpoint``), else the SD3 release's."""
    checkpoint = config.text.get("checkpoint", "") or config.pretrained.get("checkpoint", "")
    if not checkpoint:
        return {name: SD3_TEXT_ENCODERS[name] for name in names}
    from percov2_jax import pretrained

    return {name: pretrained.component_config(checkpoint, name) for name in names}


def _flat(tree) -> list[tuple[str, Any]]:
    """``[("a/b/kernel", leaf), ...]`` of a nested dict."""
    from flax import traverse_util

    return [("/".join(k), v) for k, v in traverse_util.flatten_dict(dict(tree)).items()]


def with_resident(cost: CompiledCost, other: CompiledCost, name: str) -> CompiledCost:
    """``cost``'s program run while ``other``'s arguments (weights kept on the devices, e.g. the
    frozen text encoders beside the train state) stay resident, and ``other`` run while
    ``cost``'s arguments stay: the peak of the two alternating calls, FLOPs summed."""
    if cost.out_of_memory or other.out_of_memory:
        bad = cost if cost.out_of_memory else other
        return dataclasses.replace(bad, name=name, model_flops=cost.model_flops + other.model_flops)
    first = cost.peak_bytes + other.argument_bytes
    second = other.peak_bytes + cost.argument_bytes
    lead, rest = (cost, other) if first >= second else (other, cost)
    return CompiledCost(
        name=name,
        argument_bytes=cost.argument_bytes + other.argument_bytes,
        output_bytes=lead.output_bytes,
        alias_bytes=lead.alias_bytes,
        temp_bytes=lead.temp_bytes,
        code_bytes=lead.code_bytes + rest.code_bytes,
        xla_flops=None if cost.xla_flops is None or other.xla_flops is None else cost.xla_flops + other.xla_flops,
        model_flops=cost.model_flops + other.model_flops,
        compile_seconds=cost.compile_seconds + other.compile_seconds,
    )


def step_seconds(cost: CompiledCost, kind: DeviceKind, devices: int, mfu: float) -> float:
    """Step time on ``devices`` devices of ``kind`` if they ran at ``mfu`` of their peak."""
    return cost.model_flops / (devices * kind.peak_flops * mfu)
