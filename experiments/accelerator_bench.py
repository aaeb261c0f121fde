"""percov2-jax against diffusers on one accelerator, at SD3-medium size in bfloat16, in one run.

  PYTHONPATH=. python3 experiments/accelerator_bench.py --out DIR     # the full run, in a 450 s budget
  python experiments/accelerator_bench.py --quick --out /tmp/accel   # smoke test on CPU: tiny sizes

docs/performance.md gives the recipe for a machine without the project's environment. Sizes come
from the project's stage-1 config ``configs/sd3_medium_ultralow.py`` (SD3-medium: 24 blocks of width
1536; 512² images, so 1,024 image tokens, and 77 + 256 = 333 caption tokens); weights are random.
``--quick``: 3 blocks of width 64 at 64², a VAE of width 32, no remat, 2 Euler steps, 3 timed calls,
XLA without LLVM optimisation, PyTorch on one thread, no torch.compile; the numbers mean nothing.

Tasks, most important first. A task starts only while the budget left (``--budget-s``, counted
from the start, compiles included) covers its estimated cost; the others read "skipped: time budget".

- ``matmul``: 8192³ bf16 in both frameworks; the faster is the measured peak.
- ``forward``: the MM-DiT forward with PerCoV2's widened input (16 latent + 320 token-feature
  channels) on ``2 x --decode-batch`` images, bf16 weights and activations, with the config's
  attention (``"auto"``: cuDNN on a GPU).
- ``train``: one flow-matching step of the bare SD3 transformer (logit-normal sigmas, forward, MSE
  to the velocity, backward, clipping to norm 1, AdamW). diffusers as its SD3 scripts train it
  (float32 weights, bf16 autocast, no gradient checkpointing) at the largest of ``--train-batches``
  that fits; JAX at that batch with the config's dtypes, attention and remat policy.
- ``stage1``: the project's stage-1 step (``percov2_jax.train.step.make_train_step``: float32 VAE
  encode, hyper-encoder, VQ, flow loss, clipped AdamW, remat) at the largest of
  ``--stage1-batches`` whose compiled memory fits; JAX only, with its MFU.
- ``decode``: ``percov2_jax.codec.networks.decode_tokens`` (20 Euler steps with caption-only CFG 3,
  then the VAE decoder) on ``--decode-batch`` images, against the diffusers SD3 pipeline's loop
  (``FlowMatchEulerDiscreteScheduler``, the same transformer, ``AutoencoderKL.decode``).
- ``vae_encode``, ``vae_decode``: the SD3 VAE at 512², bf16, ``--decode-batch`` images.
- ``attention``: each attention kernel the chip has (XLA; cuDNN on GPU; splash on TPU) on the
  forward's joint sequence, against ``scaled_dot_product_attention``; max abs difference from XLA,
  of the output and (relative to their scale) of the gradients.
- ``forward_fast``: the forward with the chip's fast attention kernel.
- ``forward_compile``, ``decode_compile``, ``train_compile``: torch.compile (inductor, default
  mode; decoding reuses the forward's compiled module: same shapes). A failure is reported.

Times are wall-clock medians after warm-ups: 3 warm-ups and 5-10 timed calls, or 1 and 3 for calls
over a second. JAX compiles ahead of time (``lower`` + ``compile``, reported apart). Ratio =
PyTorch median / JAX median (above 1: JAX faster). MFU = model FLOPs / (time x peak), against the
measured and the datasheet peak (``percov2_jax.flops``); model FLOPs are matmul counts: the
MM-DiT's (``mmdit_forward_flops``, 3x for a training step), for the stage-1 step the jaxpr of the
step without remat (VAE encode and hyper-encoder included).

Memory: JAX preallocates ``--jax-memory-fraction`` of the GPU (0.5 unless
``XLA_PYTHON_CLIENT_MEM_FRACTION`` says otherwise) when its backend starts; PyTorch, in the same
process, allocates from the rest and empties its cache after each task, so neither starves the
other and every batch is chosen within a known share.

Output: ``accelerator_bench.json`` (settings, versions, every time) and ``accelerator_bench.md`` in
``--out``, rewritten after every task: a run stopped at its time limit leaves what it did.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import results_io
from stage1_program import Stage1Program

from percov2_jax import build, flow
from percov2_jax.flops import mmdit_forward_flops, peak_flops_per_device, traced_matmul_flops
from percov2_jax.models.attention import auto_implementation
from percov2_jax.models.layers import unboxed
from percov2_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

BF16 = jnp.bfloat16
GUIDANCE = 3.0
# Task -> rough seconds on one H200, compiles included (guesses): a task starts only while the
# budget left covers it. In this order.
ESTIMATE_S = dict(
    matmul=10,
    forward=35,
    train=75,
    stage1=100,
    decode=60,
    vae_encode=20,
    vae_decode=25,
    attention=15,
    forward_fast=30,
    forward_compile=90,
    decode_compile=25,
    train_compile=200,
)
TASKS = tuple(ESTIMATE_S)
COMPILE_COLUMNS = {"forward_compile": "forward", "decode_compile": "decode", "train_compile": "train"}
FAST_ATTENTION = {"gpu": "cudnn", "tpu": "splash"}
FIT = 0.9  # share of the free device memory a compiled step may use
# Per-image bytes of the SD3-medium stage-1 step at 512² (remat dots_no_batch; measured on an H200:
# 20.3 GiB at 12 images, 24.6 at 16, cuDNN attention), for the first batch
# tried; XLA's memory analysis of that compile corrects it.
STAGE1_BYTES_PER_IMAGE_GUESS = 1.2 * 2**30


# ------------------------------------------------------------------------------ timing


def timed_calls(call: Callable[[], Any], sync: Callable[[Any], Any], quick: bool, target_s: float = 3.0) -> dict:
    """Wall-clock of ``sync(call())``: the first call apart, then warm-ups and timed calls (see the
    module docstring; ``quick``: the first call and 3 timed)."""

    def once() -> float:
        start = time.perf_counter()
        sync(call())
        return time.perf_counter() - start

    first = once()
    if quick:
        times, warmups = [once() for _ in range(3)], 1
    else:
        second = once()
        if second > 1.0:
            times, warmups = [second, once(), once()], 1
        else:
            once()
            times, warmups = [once() for _ in range(int(min(10, max(5, target_s / second))))], 3
    return {"first_call_s": first, "warmups": warmups, "timed": len(times), **results_io.spread_ms(times, raw=True)}


def jax_compile(jitted, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def jax_timed(jitted, args: tuple, quick: bool, dynamic: slice = slice(None)) -> dict:
    """AOT-compile ``jitted`` for ``args`` and time calls with ``args[dynamic]`` (the others static)."""
    compiled, compile_s = jax_compile(jitted, *args)
    return {"compile_s": compile_s, **timed_calls(lambda: compiled(*args[dynamic]), jax.block_until_ready, quick)}


def error_entry(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {str(e)[:1500]}", "traceback": traceback.format_exc()[-3000:]}


# ------------------------------------------------------------------------------ sizes and weights


def bench_config(quick: bool):
    """The stage-1 config the sizes come from (``configs/sd3_medium_ultralow.py``), shrunk with ``quick``."""
    from configs import sd3_medium_ultralow

    config = sd3_medium_ultralow.get_config()
    if quick:
        config.image_size = 64
        config.model.transformer.update(
            num_layers=3,
            num_attention_heads=2,
            attention_head_dim=32,
            caption_projection_dim=64,
            joint_attention_dim=64,
            pooled_projection_dim=64,
            sample_size=16,
            pos_embed_max_size=16,
        )
        # remat off: it doubles the training steps' compile time
        config.model.update(hyper_channels=32, hyper_out_channels=32, codebook_dim=8, remat_policy="none")
        config.text.max_sequence_length = 16
    return config


def with_model_options(config, **options):
    config = config.copy_and_resolve_references()
    config.model.update(options)
    return config


def random_variables(module, inputs: tuple, rng_names=("params",), shardings=None, seed: int = 0) -> dict:
    """The variables ``module.init(*inputs)`` would make, filled without running ``init``: kernels
    N(0, 1/fan_in), biases 0, norm scales and VQ cluster sizes 1, other floats N(0, 1). Each draw is
    a window of one random pool (one generator call, not hundreds to compile)."""
    abstract = unboxed(jax.eval_shape(lambda: module.init({n: jax.random.key(0) for n in rng_names}, *inputs)))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    largest = max(math.prod(leaf.shape) for _, leaf in leaves)
    pool = jax.random.normal(jax.random.key(seed), (2 * largest,), jnp.float32)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        names = [str(getattr(p, "key", p)) for p in path]
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or names[-1] == "bias":
            out.append(jnp.zeros(leaf.shape, leaf.dtype))
        elif names[-1] in ("scale", "cluster_size"):
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            scale = 1.0
            if names[-1] == "kernel":
                stacked = any("_to_" in n for n in names)  # scanned block runs: [layers, ...]
                scale = 1.0 / math.sqrt(math.prod(leaf.shape[1 if stacked else 0 : -1]))
            offset = jnp.int32((i * 1_000_003) % (largest + 1))
            out.append(_window(pool, offset, leaf.shape, jnp.dtype(leaf.dtype), scale))
    del pool
    tree = jax.tree_util.tree_unflatten(treedef, out)
    return tree if shardings is None else jax.device_put(tree, shardings)


@jax.jit(static_argnums=(2, 3, 4))
def _window(pool, offset, shape, dtype, scale):
    return (jax.lax.dynamic_slice(pool, (offset,), (math.prod(shape),)).reshape(shape) * scale).astype(dtype)


class Setup:
    """The sizes, and the JAX inference models with random bf16 weights (as diffusers' torch_dtype)."""

    def __init__(self, args):
        from percov2_jax.models import percov2
        from percov2_jax.planning.plan import SD3_VAE

        self.args, self.quick = args, args.quick
        self.config = bench_config(args.quick)
        self.rate = build.validate_config(self.config, process_count=1)
        self.plain = build.transformer_config(self.config)  # the SD3 release's transformer
        self.model_config = build.model_config(self.config, self.rate)
        self.widened = self.model_config.conditioned_transformer  # + the token-feature channels
        self.text_len, self.image = self.model_config.text_length, int(self.config.image_size)
        self.latent = self.image // 8
        self.grid = self.rate.token_grid(self.image, self.image)
        self.vae_fields = dict(
            SD3_VAE, **(dict(block_out_channels=(32,) * 4, layers_per_block=1) if args.quick else {})
        )
        self.model = build.build_model(with_model_options(self.config, param_dtype="bfloat16"), self.rate)
        example = percov2.example_inputs(self.model_config, 1, 64, 64, 8)
        variables = random_variables(self.model, example, ("params", "vq"), seed=1)
        self.params, self.vq_stats = variables["params"], variables["vq_stats"]
        self.vae = AutoencoderKL(AutoencoderKLConfig(**self.vae_fields), dtype=BF16, param_dtype=BF16)
        self.vae_params = random_variables(self.vae, (jnp.zeros((1, 8, 8, 3)),), seed=2)["params"]
        self.tokens = (self.latent // self.widened.patch_size) ** 2

    def forward_flops(self, batch: int, config=None) -> float:
        return float(mmdit_forward_flops(config or self.widened, batch, self.latent, self.latent, self.text_len))


class TorchSide:
    """diffusers on the same chip: the widened transformer and the VAE in bf16."""

    def __init__(self, setup: Setup, device: str):
        import diffusers
        import torch

        diffusers.utils.logging.set_verbosity_error()  # its notes on casting with .to()
        self.torch, self.device, self.setup = torch, device, setup
        torch.manual_seed(0)
        with torch.device(device):
            self.transformer = self.transformer_of(setup.widened).to(torch.bfloat16).eval()
            self.vae = diffusers.AutoencoderKL(**setup.vae_fields).to(torch.bfloat16).eval()
        self.compiled = None  # torch.compile(transformer), once the forward_compile task made it

    @staticmethod
    def transformer_of(config):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})

    def sync(self, _=None):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def randn(self, *shape, dtype=None):
        return self.torch.randn(*shape, device=self.device, dtype=dtype or self.torch.bfloat16)


# ------------------------------------------------------------------------------ workloads


def bench_matmul(setup: Setup, side: TorchSide | None) -> dict:
    n = 512 if setup.quick else 8192
    a, b = (jax.random.normal(jax.random.key(i), (n, n), BF16) for i in (3, 4))
    row = {"settings": {"batch": f"{n}³", "dtype": "bfloat16"}}
    row["jax"] = jax_timed(jax.jit(jnp.matmul), (a, b), setup.quick)
    if side is not None:
        at, bt = side.randn(n, n), side.randn(n, n)
        row["torch_eager"] = timed_calls(lambda: at @ bt, side.sync, setup.quick)
    row["model_flops"] = 2.0 * n**3
    return row


def jax_forward(setup: Setup, batch: int, implementation: str | None) -> dict:
    from percov2_jax.models.mmdit import SD3Transformer2DModel

    module = SD3Transformer2DModel(
        setup.widened, dtype=BF16, param_dtype=BF16, scan_layers=True, attention_implementation=implementation
    )
    keys, c = jax.random.split(jax.random.key(5), 4), setup.widened
    inputs = (
        jax.random.normal(keys[0], (batch, setup.latent, setup.latent, c.in_channels), BF16),
        jax.random.normal(keys[1], (batch, setup.text_len, c.joint_attention_dim), BF16),
        jax.random.normal(keys[2], (batch, c.pooled_projection_dim), BF16),
        jax.random.uniform(keys[3], (batch,), jnp.float32, 0, 1000),
    )
    forward = jax.jit(lambda p, *x: module.apply({"params": p}, *x))
    return jax_timed(forward, (setup.params["transformer"], *inputs), setup.quick)


def torch_forward(side: TorchSide, model, batch: int) -> dict:
    s, c = side.setup, side.setup.widened
    x = side.randn(batch, c.in_channels, s.latent, s.latent)
    context, pooled = side.randn(batch, s.text_len, c.joint_attention_dim), side.randn(batch, c.pooled_projection_dim)
    t = (side.torch.rand(batch, device=side.device) * 1000).contiguous()  # as the sampler's: compile guards hold
    with side.torch.inference_mode():
        return timed_calls(lambda: model(x, context, pooled, t, return_dict=False)[0], side.sync, s.quick)


def jax_flow_step(setup: Setup, batch: int) -> dict:
    """The bare transformer's flow-matching step in JAX, with the config's dtypes, remat and optimizer."""
    import optax

    from percov2_jax.models.mmdit import SD3Transformer2DModel, example_inputs
    from percov2_jax.train.optimizer import make_optimizer

    m, c = setup.config.model, setup.plain
    module = SD3Transformer2DModel(
        c,
        dtype=jnp.dtype(m.dtype),
        scan_layers=True,
        remat_policy=str(m.remat_policy),
        attention_implementation=m.attention_implementation,
    )
    params = {"transformer": random_variables(module, example_inputs(c, 1, context_length=8), seed=6)["params"]}
    tx, _, _ = make_optimizer(setup.config.optim, params)  # the position table stays frozen
    keys = jax.random.split(jax.random.key(7), 3)
    data = {
        "latents": jax.random.normal(keys[0], (batch, setup.latent, setup.latent, c.in_channels)),
        "context": jax.random.normal(keys[1], (batch, setup.text_len, c.joint_attention_dim)),
        "pooled": jax.random.normal(keys[2], (batch, c.pooled_projection_dim)),
    }

    def step(params, opt_state, data, key):
        k_noise, k_sigma = jax.random.split(key)
        x0 = data["latents"]
        noise = jax.random.normal(k_noise, x0.shape)
        sigmas = flow.sample_training_sigmas(k_sigma, x0.shape[0])
        x_t = flow.noisy_latents(x0, noise, sigmas)

        def loss_fn(p):
            v = module.apply({"params": p["transformer"]}, x_t, data["context"], data["pooled"], sigmas * 1000.0)
            return flow.flow_matching_loss(v.astype(jnp.float32), flow.velocity_target(x0, noise))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state, key = [params, jax.jit(tx.init)(params)], jax.random.key(8)
    del params
    compiled, compile_s = jax_compile(jax.jit(step, donate_argnums=(0, 1)), *state, data, key)

    def call():
        state[0], state[1], loss = compiled(state[0], state[1], data, key)
        return loss

    return {"compile_s": compile_s, **timed_calls(call, jax.block_until_ready, setup.quick)}


def torch_flow_step(side: TorchSide, batch: int, compile_it: bool = False) -> dict:
    """diffusers' SD3 transformer trained as its SD3 scripts do: float32 weights, bf16 autocast, AdamW."""
    torch, s = side.torch, side.setup
    c, optim = s.plain, s.config.optim
    with torch.device(side.device):
        model = TorchSide.transformer_of(c).train()
    run = torch.compile(model) if compile_it else model
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=float(optim.learning_rate),
        betas=(float(optim.b1), float(optim.b2)),
        eps=float(optim.eps),
        weight_decay=float(optim.weight_decay),
    )
    table = torch.from_numpy(flow.training_sigma_table()).to(side.device)
    x0 = side.randn(batch, c.in_channels, s.latent, s.latent, dtype=torch.float32)
    context = side.randn(batch, s.text_len, c.joint_attention_dim, dtype=torch.float32)
    pooled = side.randn(batch, c.pooled_projection_dim, dtype=torch.float32)

    def step():
        noise = torch.randn_like(x0)
        u = torch.sigmoid(torch.randn(batch, device=side.device))  # logit-normal(0, 1), as flow.py
        sigmas = table[(u * len(table)).long().clamp(max=len(table) - 1)]
        x_t = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
        with torch.autocast(side.device, dtype=torch.bfloat16):
            v = run(x_t, context, pooled, sigmas * 1000.0, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(optim.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return timed_calls(step, side.sync, s.quick)  # the caller frees the memory


def jax_decode(setup: Setup, batch: int, steps: int) -> dict:
    from percov2_jax.codec import networks

    keys, c = jax.random.split(jax.random.key(9), 3), setup.widened
    null = (jnp.zeros((1, setup.text_len, c.joint_attention_dim), BF16), jnp.zeros((1, c.pooled_projection_dim), BF16))
    args = (
        setup.model,
        setup.vae,
        setup.params,
        setup.vq_stats,
        setup.vae_params,
        jax.random.randint(keys[0], (batch, *setup.grid), 0, setup.rate.codebook_size),
        jax.random.normal(keys[1], (batch, setup.text_len, c.joint_attention_dim), BF16),
        jax.random.normal(keys[2], (batch, c.pooled_projection_dim), BF16),
        null,
        jax.random.key_data(jax.random.key(10)),
        steps,
        GUIDANCE,
        flow.SHIFT,
    )
    stats = jax_timed(networks.decode_tokens, args, setup.quick, dynamic=slice(2, 10))
    return {**stats, "images_per_s": batch / (stats["median_ms"] * 1e-3)}


def torch_decode(side: TorchSide, model, batch: int, steps: int) -> dict:
    """The diffusers SD3 pipeline's denoising loop and VAE decode, PerCoV2's token features (a codebook
    lookup, its projection, upsampled to the latent grid) beside the latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch, s = side.torch, side.setup
    c, q = s.widened, s.model_config.quantizer
    scheduler = FlowMatchEulerDiscreteScheduler(shift=flow.SHIFT)
    codebook = side.randn(q.codebook_size, q.codebook_dim)
    project_out = torch.nn.Linear(q.codebook_dim, q.dim, device=side.device, dtype=torch.bfloat16)
    indices = torch.randint(0, q.codebook_size, (batch, *s.grid), device=side.device)
    context = torch.cat([torch.zeros_like(text := side.randn(batch, s.text_len, c.joint_attention_dim)), text])
    pooled = torch.cat([torch.zeros_like(p := side.randn(batch, c.pooled_projection_dim)), p])
    vae, cells = side.vae, s.latent // s.grid[0]

    def decode():
        features = project_out(codebook[indices]).permute(0, 3, 1, 2)
        features = features.repeat_interleave(cells, dim=2).repeat_interleave(cells, dim=3).repeat(2, 1, 1, 1)
        latents = side.randn(batch, c.out_channels, s.latent, s.latent)
        scheduler.set_timesteps(steps, device=side.device)
        for t in scheduler.timesteps:
            x = torch.cat([torch.cat([latents, latents]), features], dim=1)
            v = model(x, context, pooled, t.expand(2 * batch).contiguous(), return_dict=False)[0]
            v_uncond, v_cond = v.chunk(2)
            latents = scheduler.step(v_uncond + GUIDANCE * (v_cond - v_uncond), t, latents, return_dict=False)[0]
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]

    with torch.inference_mode():
        stats = timed_calls(decode, side.sync, s.quick)
    return {**stats, "images_per_s": batch / (stats["median_ms"] * 1e-3)}


def bench_vae(setup: Setup, side: TorchSide | None, batch: int, encode: bool) -> dict:
    f, s = setup.vae.config.downsample_factor, setup.image
    if encode:
        x = jax.random.uniform(jax.random.key(11), (batch, s, s, 3), BF16, -1, 1)
    else:
        x = jax.random.normal(jax.random.key(12), (batch, s // f, s // f, 16), BF16)
    method = "encode_to_latents" if encode else "decode_latents"  # the posterior mean; scaled latents
    fn = jax.jit(lambda p, x: setup.vae.apply({"params": p}, x, method=method))
    row = {"settings": {"batch": batch, "image": s}, "jax": jax_timed(fn, (setup.vae_params, x), setup.quick)}
    row["model_flops"] = float(traced_matmul_flops(fn, setup.vae_params, x))
    if side is not None:
        vae, shift, scale = side.vae, side.vae.config.shift_factor, side.vae.config.scaling_factor
        if encode:
            xt = side.randn(batch, 3, s, s).clamp(-1, 1)
            call = lambda: (vae.encode(xt).latent_dist.mode() - shift) * scale
        else:
            zt = side.randn(batch, 16, s // f, s // f)
            call = lambda: vae.decode(zt / scale + shift).sample
        with side.torch.inference_mode():
            row["torch_eager"] = timed_calls(call, side.sync, setup.quick)
    return row


def bench_attention(setup: Setup, side: TorchSide | None, batch: int, implementations: list[str]) -> list[dict]:
    from percov2_jax.models.attention import dot_product_attention

    c = setup.widened
    shape = (batch, setup.tokens + setup.text_len, c.num_attention_heads, c.attention_head_dim)
    q, k, v = (jax.random.normal(jax.random.key(13 + i), shape, BF16) for i in range(3))
    settings = {"batch": batch, "shape": shape, "dtype": "bfloat16"}
    torch_stats = torch_out = None
    if side is not None:
        torch = side.torch
        qt, kt, vt = (torch.from_numpy(np.asarray(x, np.float32)).to(side.device, torch.bfloat16) for x in (q, k, v))
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (qt, kt, vt)))
        with torch.inference_mode():
            torch_stats = timed_calls(sdpa, side.sync, setup.quick)
            torch_out = sdpa().transpose(1, 2).float().cpu().numpy()
    rows, reference, reference_grads = [], None, None
    cotangent = jax.random.normal(jax.random.key(16), shape, BF16)
    for impl in implementations:
        row = {"settings": settings}
        try:
            fn = jax.jit(lambda q, k, v, impl=impl: dot_product_attention(q, k, v, None if impl == "xla" else impl))
            out = np.asarray(fn(q, k, v), np.float32)
            reference = out if reference is None else reference
            row["jax"] = jax_timed(fn, (q, k, v), setup.quick)
            row["max_abs_diff_vs_xla"] = float(np.abs(out - reference).max())
            # The backward too: at this odd joint length cuDNN runs on lengths padded to even ones.
            loss = lambda q, k, v, fn=fn: jnp.vdot(cotangent, fn(q, k, v)).astype(jnp.float32)
            grads = [np.asarray(g, np.float32) for g in jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)]
            reference_grads = grads if reference_grads is None else reference_grads
            row["grad_max_abs_diff_vs_xla"] = max(
                float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(grads, reference_grads, strict=True)
            )
            if torch_out is not None:
                row["max_abs_diff_torch_vs_this"] = float(np.abs(torch_out - out).max())
        except Exception as e:  # noqa: BLE001 - a kernel the chip lacks is a result
            row["jax"] = error_entry(e)
        if torch_stats is not None:
            row["torch_eager"] = torch_stats
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ the stage-1 step


def bench_stage1(setup: Setup, candidates: list[int]) -> dict:
    """The project's stage-1 step at the largest candidate batch whose compiled memory fits."""
    program = Stage1Program(setup, random_variables)
    step, t = program.step(), setup.plain
    free, tried = free_device_bytes(), {}
    size = (setup.tokens + setup.text_len) * t.inner_dim * t.num_layers / (1357 * 1536 * 24)
    per_image = STAGE1_BYTES_PER_IMAGE_GUESS * max(size, (setup.image / 512) ** 2)
    fixed = 2 * program.param_bytes  # gradients and the update's temporaries, beside the state
    batch = candidates[0] if free is None else fitting(candidates, fixed, per_image, free)
    while True:
        compiled, compile_s = jax_compile(step, *program.args(batch))
        need = extra_bytes(compiled)
        tried[batch] = {"compile_s": compile_s, "extra_bytes": need}
        if free is None or need is None or need < FIT * free:
            break
        smaller = [c for c in candidates if c < batch]
        if not smaller:
            raise MemoryError(
                f"the stage-1 step needs {need / 2**30:.1f} GiB at batch {batch}, {free / 2**30:.1f} free"
            )
        per_image = max((need - fixed) / batch, per_image / 4)
        batch = fitting(smaller, fixed, per_image, free)
    stats = timed_calls(program.call(compiled, batch), jax.block_until_ready, setup.quick)
    m = setup.config.model
    return {
        "settings": {
            "batch": batch,
            "candidates": candidates,
            "tried": tried,
            "free_bytes_at_start": free,
            "rate": setup.rate.name,
            "precision": f"{m.dtype} compute, {m.param_dtype} weights, float32 VAE, remat {m.remat_policy}",
        },
        "jax": {"compile_s": tried[batch]["compile_s"], **stats, "images_per_s": batch / (stats["median_ms"] * 1e-3)},
        "model_flops": program.model_flops(batch),
        "transformer_flops_3x_forward": 3.0 * setup.forward_flops(batch),
    }


def free_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)) if "bytes_limit" in stats else None


def extra_bytes(compiled) -> int | None:
    """Device bytes a compiled call needs beyond its arguments (already allocated)."""
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        return None


def fitting(candidates: list[int], fixed: float, per_image: float, free: int) -> int:
    """The largest candidate predicted to fit, else the smallest."""
    return next((c for c in candidates if fixed + per_image * c < FIT * free), candidates[-1])


# ------------------------------------------------------------------------------ the run


class Bench:
    """Runs the tasks in order inside the budget; the report is rewritten after each."""

    def __init__(self, args, setup: Setup, side: TorchSide | None, no_torch: str | None, report: dict):
        self.args, self.setup, self.side, self.report = args, setup, side, report
        self.steps = 2 if args.quick else 20
        platform = jax.devices()[0].platform
        self.fast = FAST_ATTENTION.get(platform)
        names = {
            "matmul": "bf16 matmul",
            "forward": "MM-DiT forward",
            "train": "flow-matching step, transformer",
            "decode": f"decode: {self.steps} Euler steps, CFG, VAE",
            "vae_encode": "VAE encode",
            "vae_decode": "VAE decode",
            "attention_xla": "attention, XLA",
        }
        if self.fast:
            names |= {f"attention_{self.fast}": f"attention, {self.fast}", "forward_fast": f"forward, {self.fast}"}
        self.rows = report["rows"] = {k: {"name": v} for k, v in names.items()}
        self.stage1_row = report["stage1"] = {"name": "stage-1 step (project)"}
        compile_reason = no_torch or (None if args.torch_compile else "not run (--quick or --no-torch-compile)")
        for key, row in self.rows.items():
            if no_torch:
                row["torch_eager"] = {"skipped": no_torch}
            if compile_reason and key in COMPILE_COLUMNS.values():
                row["torch_compile"] = {"skipped": compile_reason}

    def cells(self, task: str) -> list[tuple[dict, str | None]]:
        """Where a task's results go: (row, column), column None for the whole row."""
        if task in COMPILE_COLUMNS:
            return [(self.rows[COMPILE_COLUMNS[task]], "torch_compile")]
        if task == "stage1":
            return [(self.stage1_row, None)]
        keys = [k for k in self.rows if k.startswith("attention_")] if task == "attention" else [task]
        return [(self.rows[k], None) for k in keys if k in self.rows]

    def mark(self, task: str, status: str) -> None:
        for row, column in self.cells(task):
            if column is None:
                row["status"] = status
            else:
                row[column] = {"skipped": status}

    def run(self) -> None:
        for task in TASKS:
            cells = self.cells(task)
            if not cells or any(c and "skipped" in r.get(c, {}) for r, c in cells):
                continue
            left = self.args.budget_s - (time.perf_counter() - self.report["_started"])
            if task not in self.args.rows:
                self.mark(task, "not selected (--rows)")
            elif left < (1 if self.args.quick else ESTIMATE_S[task]):
                self.mark(task, "skipped: time budget")
                print(f"{task}: skipped, {left:.0f} s of the budget left", flush=True)
            else:
                start = time.perf_counter()
                print(f"{task} ...", flush=True)
                try:
                    getattr(self, task)()
                except Exception as e:  # noqa: BLE001 - the failure is the task's result
                    entry = error_entry(e)
                    for row, column in cells:
                        row[column or "jax"] = entry
                if self.side is not None:
                    self.side.free()
                print(f"  {summary(cells)} ({time.perf_counter() - start:.0f} s)", flush=True)
            save(self.args, self.report)

    def torch_column(self, fn: Callable[[], dict]) -> dict:
        if self.side is None:
            return self.rows["matmul"]["torch_eager"]  # says why
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            return error_entry(e)

    # The tasks, in TASKS order.

    def matmul(self) -> None:
        self.rows["matmul"].update(bench_matmul(self.setup, self.side))

    def forward(self, key: str = "forward", implementation: str | None = None) -> None:
        row, b = self.rows[key], 2 * self.args.decode_batch
        implementation = implementation or self.setup.config.model.attention_implementation  # the default
        chosen = implementation
        if implementation == "auto":
            chosen = f"auto: {auto_implementation(BF16, self.setup.widened.attention_head_dim) or 'xla'}"
        row["settings"] = {"batch": b, "attention": chosen or "xla", "weights": "bfloat16"}
        row["model_flops"] = self.setup.forward_flops(b)
        row["jax"] = jax_forward(self.setup, b, implementation)
        if key == "forward":
            row["torch_eager"] = self.torch_column(lambda: torch_forward(self.side, self.side.transformer, b))
        else:
            row["torch_eager"] = self.rows["forward"].get("torch_eager")  # the same PyTorch forward

    def train(self) -> None:
        row, s, batch, oom = self.rows["train"], self.setup, None, {"torch": [], "jax": []}
        for b in self.args.train_batches if self.side is not None else []:
            try:
                row["torch_eager"], batch = torch_flow_step(self.side, b), b
            except self.side.torch.cuda.OutOfMemoryError:
                oom["torch"].append(b)
            except Exception as e:  # noqa: BLE001 - PyTorch's failure is its column's result
                row["torch_eager"] = error_entry(e)
            self.side.free()  # here, not in the except clause: its traceback holds the step's tensors
            if batch is not None or "error" in row.get("torch_eager", {}):
                break
        else:
            if self.side is not None:
                row["torch_eager"] = {"error": f"out of memory at every batch of {self.args.train_batches}"}
        for b in [batch] if batch is not None else self.args.train_batches:
            try:
                row["jax"], batch = jax_flow_step(s, b), b
                break
            except Exception as e:  # noqa: BLE001
                if "RESOURCE_EXHAUSTED" not in str(e) or b == batch:
                    raise
                oom["jax"].append(b)
            gc.collect()
        m = s.config.model
        row["settings"] = {
            "batch": batch,
            "candidates": self.args.train_batches,
            "out_of_memory_at": oom,
            "jax": f"float32 weights, {m.dtype} compute, remat {m.remat_policy}",
            "torch": "float32 weights, bf16 autocast, no gradient checkpointing",
        }
        row["model_flops"] = 3.0 * s.forward_flops(batch, s.plain)

    def stage1(self) -> None:
        self.stage1_row.update(bench_stage1(self.setup, self.args.stage1_batches))

    def decode(self, model=None) -> None:
        row, b = self.rows["decode"], self.args.decode_batch
        if model is not None:  # torch.compile's column
            entry = self.torch_column(lambda: torch_decode(self.side, model, b, self.steps))
            row["torch_compile"] = {**entry, "note": "the forward row's compiled module (same shapes)"}
            return
        row["settings"] = {"batch": b, "steps": self.steps, "guidance": GUIDANCE, "transformer_batch": 2 * b}
        row["model_flops"] = 2 * self.steps * self.setup.forward_flops(b)  # the transformer's alone
        row["jax"] = jax_decode(self.setup, b, self.steps)
        row["torch_eager"] = self.torch_column(lambda: torch_decode(self.side, self.side.transformer, b, self.steps))

    def vae_encode(self) -> None:
        self.rows["vae_encode"].update(bench_vae(self.setup, self.side, self.args.decode_batch, encode=True))

    def vae_decode(self) -> None:
        self.rows["vae_decode"].update(bench_vae(self.setup, self.side, self.args.decode_batch, encode=False))

    def attention(self) -> None:
        implementations = ["xla"] + ([self.fast] if self.fast else [])
        rows = bench_attention(self.setup, self.side, 2 * self.args.decode_batch, implementations)
        for impl, row in zip(implementations, rows):
            self.rows[f"attention_{impl}"].update(row)

    def forward_fast(self) -> None:
        self.forward("forward_fast", self.fast)

    def forward_compile(self) -> None:
        compiled = self.side.torch.compile(self.side.transformer)
        entry = self.torch_column(lambda: torch_forward(self.side, compiled, 2 * self.args.decode_batch))
        self.side.compiled = None if "error" in entry else compiled
        self.rows["forward"]["torch_compile"] = entry

    def decode_compile(self) -> None:
        if self.side.compiled is None:
            self.rows["decode"]["torch_compile"] = {"skipped": "no compiled forward (see the forward row)"}
        else:
            self.decode(self.side.compiled)

    def train_compile(self) -> None:
        batch = self.rows["train"].get("settings", {}).get("batch")
        if batch is None:
            self.rows["train"]["torch_compile"] = {"skipped": "the eager step did not run"}
        else:
            self.rows["train"]["torch_compile"] = self.torch_column(
                lambda: torch_flow_step(self.side, batch, compile_it=True)
            )


def summary(cells) -> str:
    parts = []
    for row, column in cells:
        texts = [row["status"]] if row.get("status") else []
        for name in ("jax", "torch_eager", "torch_compile") if column is None else ("jax", column):
            e = row.get(name) or {}
            texts += [f"{name} {e['median_ms']:.2f} ms"] if "median_ms" in e else []
            texts += [f"{name} failed: {e['error'][:200]}"] if "error" in e else []
        parts.append(f"{row['name']}: {', '.join(texts)}")
    return "; ".join(parts)


def start_torch(args, setup: Setup) -> tuple[TorchSide | None, str | None]:
    """diffusers on JAX's chip, or None and why not."""
    if args.no_torch:
        return None, "not run (--no-torch)"
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as e:
        return None, f"not run: {e}"
    platform = jax.devices()[0].platform
    if platform not in ("cpu", "gpu") or (platform == "gpu" and not torch.cuda.is_available()):
        return None, f"not run: PyTorch has no device on this {platform} chip"
    if args.quick:
        torch.set_num_threads(1)  # tiny ops: threads only contend (quick numbers mean nothing)
    try:
        return TorchSide(setup, "cuda" if platform == "gpu" else "cpu"), None
    except Exception as e:  # noqa: BLE001
        return None, f"not run: building the diffusers models failed: {type(e).__name__}: {str(e)[:500]}"


def versions(side: TorchSide | None) -> dict:
    names = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu", "flax", "optax", "numpy")
    found = results_io.versions(*names, "ml-collections", "torch", "diffusers", "triton", "huggingface-hub")
    try:
        from jax._src.lib import cuda_versions  # private; None without CUDA

        found["cuda runtime (jax)"] = str(cuda_versions.cuda_runtime_get_version())
        found["cudnn (jax)"] = str(cuda_versions.cudnn_get_version())
    except Exception:  # noqa: BLE001 - versions are best effort
        pass
    if side is not None and side.device == "cuda":
        found |= {
            "cuda (torch)": str(side.torch.version.cuda),
            "cudnn (torch)": str(side.torch.backends.cudnn.version()),
        }
    return found


# ------------------------------------------------------------------------------ report


def save(args, report: dict, final: bool = False) -> None:
    """Both files; the table is printed once, at the end."""
    report["elapsed_s"] = time.perf_counter() - report["_started"]
    out = {k: v for k, v in report.items() if not k.startswith("_")}
    if final:
        results_io.finish_machine(out["machine"])
        out["total_s"] = out["elapsed_s"]
    with contextlib.nullcontext() if final else contextlib.redirect_stdout(io.StringIO()):
        results_io.write_report(args.out, results_io.stem("accelerator_bench", args.quick), out, markdown(out))


def annotate(report: dict) -> None:
    """Ratios; model TFLOP/s and MFU wherever a row has model FLOPs."""
    peaks = report["peak"]
    matmul = [report["rows"]["matmul"].get(c) or {} for c in ("jax", "torch_eager")]
    rates = [
        2 * (8192 if not report["config"]["quick"] else 512) ** 3 / (m["median_ms"] * 1e9)
        for m in matmul
        if "median_ms" in m
    ]
    peaks["measured_tflops"] = max(rates, default=None)
    for row in [*report["rows"].values(), report["stage1"]]:
        jax_ms = (row.get("jax") or {}).get("median_ms")
        for column in ("jax", "torch_eager", "torch_compile"):
            stats = row.get(column) or {}
            if column != "jax":
                row[f"ratio_{column}"] = stats["median_ms"] / jax_ms if jax_ms and "median_ms" in stats else None
            if "median_ms" in stats and row.get("model_flops"):
                stats["model_tflops"] = tflops = row["model_flops"] / stats["median_ms"] / 1e9
                for name in ("measured", "datasheet"):
                    peak = peaks.get(f"{name}_tflops")
                    stats[f"mfu_{name}"] = tflops / peak if peak else None


def _cell(stats: dict | None, digits: int = 2) -> str:
    stats = stats or {}
    if "median_ms" in stats:
        return f"{stats['median_ms']:.{digits}f}"
    return "failed" if "error" in stats else stats.get("skipped", "—")


def gib(n: float | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict) -> str:
    annotate(report)
    dev, peaks, quick = report["device"], report["peak"], report["config"]["quick"]
    lines = [f"# percov2-jax vs diffusers on {dev['device_kind']}", ""]
    lines += ["**QUICK run: tiny sizes, no torch.compile; the numbers mean nothing.**", ""] if quick else []
    lines += [
        f"Command: `{report['command']}`",
        "",
        f"Host: {results_io.describe_machine(report['machine'])}",
        "",
        f"Versions: {results_io.describe_versions(report['versions'])}.",
        "",
        f"Sizes: {report['sizes']}.",
        "",
        "| workload | batch | JAX ms | JAX compile s | PyTorch eager ms | ratio | torch.compile ms | ratio | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"].values():
        j, notes = row.get("jax") or {}, [row["status"]] if row.get("status") else []
        for column in ("jax", "torch_eager", "torch_compile"):
            notes += [f"{column} failed: {row[column]['error'][:200]}"] if "error" in (row.get(column) or {}) else []
        if "attention" in (row.get("settings") or {}):
            notes.append(f"attention {row['settings']['attention']}")
        if j.get("mfu_measured") is not None:
            notes.append(f"JAX {j['model_tflops']:.3g} TFLOP/s, MFU {_pct(j['mfu_measured'])} of measured peak")
        if "images_per_s" in j:
            t = (row.get("torch_eager") or {}).get("images_per_s")
            notes.append(f"images/s: JAX {j['images_per_s']:.2f}" + (f", PyTorch {t:.2f}" if t else ""))
        if "max_abs_diff_vs_xla" in row:
            notes.append(f"max abs diff vs XLA {row['max_abs_diff_vs_xla']:.1e}")
        if "grad_max_abs_diff_vs_xla" in row:
            notes.append(f"gradients: max abs diff vs XLA {row['grad_max_abs_diff_vs_xla']:.1e} of their scale")
        if "max_abs_diff_torch_vs_this" in row:
            notes.append(f"PyTorch vs this {row['max_abs_diff_torch_vs_this']:.1e}")
        compile_s = f"{j['compile_s']:.1f}" if "compile_s" in j else "—"
        ratios = [f"{r:.2f}" if r else "—" for r in (row.get("ratio_torch_eager"), row.get("ratio_torch_compile"))]
        lines.append(
            f"| {row['name']} | {(row.get('settings') or {}).get('batch', '')} | {_cell(j)} | {compile_s} "
            f"| {_cell(row.get('torch_eager'))} | {ratios[0]} | {_cell(row.get('torch_compile'))} | {ratios[1]} "
            f"| {'; '.join(notes)} |"
        )
    stage1 = report["stage1"]
    j = stage1.get("jax") or {}
    lines += ["", "## The project's stage-1 step", ""]
    if "median_ms" in j:
        s = stage1["settings"]
        tried = ", ".join(f"{b} images {gib(t['extra_bytes'])}" for b, t in s["tried"].items())
        lines += [
            "| batch | step ms | images/s | model TFLOP per step | TFLOP/s | MFU, measured peak | MFU, datasheet | "
            "compile s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {s['batch']} | {j['median_ms']:.1f} | {j['images_per_s']:.2f} | {stage1['model_flops'] / 1e12:.2f} "
            f"| {j['model_tflops']:.3g} | {_pct(j['mfu_measured'])} | {_pct(j['mfu_datasheet'])} "
            f"| {j['compile_s']:.1f} |",
            "",
            f"{s['precision']}. Batches compiled, with the device memory each needs beside its arguments: "
            f"{tried}; free: {gib(s['free_bytes_at_start'])}. Model FLOPs: the step's matmuls without remat (VAE "
            f"encode, hyper-encoder, VQ, the MM-DiT forward and backward); 3x the MM-DiT forward alone: "
            f"{stage1['transformer_flops_3x_forward'] / 1e12:.2f} TFLOP.",
        ]
    else:
        lines.append(f"Not measured: {stage1.get('status') or j.get('error', 'not run')[:300]}.")
    lines += ["", "## Targets", ""]
    for key, label in (("forward", "MM-DiT forward"), ("train", "training step"), ("decode", "decoding")):
        r = report["rows"][key].get("ratio_torch_eager")
        verdict = f"{r:.2f} ({'met' if r >= 1.2 else 'not met'})" if r else "not measured"
        lines.append(f"- {label} >= 1.2x diffusers eager: {verdict}")
    mfu = j.get("mfu_datasheet")
    lines += [
        "- stage-1 step >= 45% bf16 MFU of the datasheet peak: "
        + (f"{_pct(mfu)} ({'met' if mfu >= 0.45 else 'not met'})" if mfu else "not measured"),
        "",
        f"Peaks: measured {peaks['measured_tflops'] or 0:.3g} TFLOP/s (the faster bf16 matmul), datasheet "
        f"{peaks['datasheet_tflops'] or '—'} TFLOP/s (dense bf16). Ratio = PyTorch / JAX (above 1: JAX faster). "
        f"Times are medians; the JSON has every time, p10 and p90. JAX memory fraction "
        f"{dev['jax_memory_fraction']}; budget {report['config']['budget_s']:.0f} s, elapsed "
        f"{report['elapsed_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    batches = lambda s: sorted({int(b) for b in s.split(",")}, reverse=True)  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget; later tasks are skipped")
    ap.add_argument("--decode-batch", type=int, default=None, help="images decoded (default 8; 2 with --quick)")
    ap.add_argument("--train-batches", type=batches, default=None, help="default 8,4,2 (2 with --quick)")
    ap.add_argument("--stage1-batches", type=batches, default=None, help="default 32,24,16,12,8,4 (2 with --quick)")
    ap.add_argument("--rows", type=lambda s: s.split(","), default=list(TASKS), help=f"tasks to run, of {TASKS}")
    ap.add_argument("--no-torch", action="store_true", help="JAX only; the PyTorch columns say why they are empty")
    ap.add_argument(
        "--torch-compile", action=argparse.BooleanOptionalAction, default=None, help="default: on, off with --quick"
    )
    ap.add_argument("--jax-memory-fraction", type=float, default=None, help="of the GPU; PyTorch gets the rest")
    results_io.add_output_arguments(ap, "tiny sizes on CPU, no torch.compile, for a smoke test")
    args = ap.parse_args(argv)
    if set(args.rows) - set(TASKS):
        ap.error(f"unknown --rows {sorted(set(args.rows) - set(TASKS))}; choose from {TASKS}")
    args.decode_batch = args.decode_batch or (2 if args.quick else 8)
    args.train_batches = args.train_batches or ([2] if args.quick else [8, 4, 2])
    args.stage1_batches = args.stage1_batches or ([2] if args.quick else [32, 24, 16, 12, 8, 4])
    args.torch_compile = not args.quick if args.torch_compile is None else args.torch_compile
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    # Both are read when JAX's backend starts (the first device query below), not at import.
    if args.jax_memory_fraction is not None:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.jax_memory_fraction)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    if args.quick and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    device = jax.devices()[0]
    datasheet = peak_flops_per_device(device)
    setup = Setup(args)
    side, no_torch = start_torch(args, setup)
    c = setup.widened
    report = {
        "_started": started,
        "command": results_io.command(),
        "config": vars(args),
        "machine": results_io.machine(),
        "device": {
            "platform": device.platform,
            "device_kind": device.device_kind,
            "jax_bytes_limit": (device.memory_stats() or {}).get("bytes_limit"),
            "jax_memory_fraction": os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "versions": versions(side),
        "jax_environment": jax.print_environment_info(return_string=True),
        "peak": {"datasheet_tflops": datasheet / 1e12 if datasheet else None},
        "sizes": (
            f"{'configs/sd3_medium_ultralow.py' + (' shrunk (--quick)' if args.quick else '')}: {c.num_layers} "
            f"blocks of width {c.inner_dim} ({c.num_attention_heads} heads x {c.attention_head_dim}), "
            f"{setup.image}² images ({setup.tokens} image + {setup.text_len} caption tokens), {c.in_channels} "
            f"input channels (16 latent + token features), VAE channels {setup.vae_fields['block_out_channels']}; "
            "random weights, bf16"
        ),
    }
    print(f"{device.device_kind}: {results_io.describe_versions(report['versions'])}", flush=True)
    Bench(args, setup, side, no_torch, report).run()
    save(args, report, final=True)


if __name__ == "__main__":
    main()
