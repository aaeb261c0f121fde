"""The stage-1 config schema with its defaults; files in ``configs/`` start from ``base_config()``.

Tags in comments: [paper] a PerCoV2 fact, [PerCo] taken from PerCo / PerCo (SD) (the paper does
not state it for PerCoV2), [SD3] an SD3 convention, [ours] our default.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from percov2_jax.models.mmdit import SD3TransformerConfig


def transformer_fields() -> ml_collections.ConfigDict:
    """Every ``SD3TransformerConfig`` field as an unset, typed placeholder: a run takes the
    architecture from its converted checkpoint (``pretrained.checkpoint``), else from
    ``model.variant``; a field set here (config file or ``--config.model.transformer.X=...``)
    overrides it, and with a checkpoint must agree with it (`percov2_jax.build.transformer_config`).
    ``qk_norm="none"`` states "no qk-norm" explicitly."""
    c = ml_collections.ConfigDict()
    for field in dataclasses.fields(SD3TransformerConfig):
        kind = {"dual_attention_layers": tuple, "qk_norm": str}.get(field.name, int)
        c[field.name] = config_dict.placeholder(kind)
    return c


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # [ours]
    c.rate = "ultra-low"  # a name in percov2_jax.rates.RATES
    c.image_size = 512  # [PerCo] 512x512 crops; any multiple of 64

    c.model = ml_collections.ConfigDict()
    # [paper] "PerCoV2 (SD v3.0)": SD3-medium [inferred]. The architecture used when there is no
    # converted checkpoint to read it from (the planner, shape checks): a name in
    # percov2_jax.models.mmdit.RELEASES ("sd3-medium", "sd3.5-medium", "sd3.5-large").
    c.model.variant = "sd3-medium"
    c.model.transformer = transformer_fields()
    c.model.hyper_channels = 192  # [PerCo] ELIC-style hyper-encoder N
    c.model.hyper_out_channels = 320  # [PerCo] M; also the token-feature channels concatenated to x_t
    c.model.codebook_dim = 32  # [PerCo] low-dimensional code space
    c.model.vq_decay = 0.8  # [PerCo (SD)] vector-quantize-pytorch default EMA decay
    c.model.dead_code_threshold = 0.0  # [PerCo (SD)] no dead-code restart
    c.model.learned_null_text = False  # [SD3] empty-prompt embedding for dropped captions; PerCo learned one
    c.model.dtype = "bfloat16"  # [ours] compute dtype; params stay float32 masters
    c.model.param_dtype = "float32"
    c.model.scan_layers = True  # [ours] compile one block per homogeneous run
    # [ours] a name in models.layers.REMAT_POLICIES. Planned for SD3-medium at 5 images per chip:
    # 12.2 GiB per chip (fits v4, v5e, v5p); "none" needs 53.4 GiB (v5p only) and saves the recompute.
    c.model.remat_policy = "dots_no_batch"
    # [ours] "auto": cuDNN's fused kernel on GPUs in bf16/fp16, XLA's softmax attention elsewhere
    # (models.attention.auto_implementation); None or "xla", "cudnn" (GPU), "splash" (TPU) choose one
    c.model.attention_implementation = ml_collections.FieldReference("auto", field_type=str)

    c.pretrained = ml_collections.ConfigDict()
    c.pretrained.checkpoint = ""  # percov2-jax checkpoint from `percov2 convert` (transformer, vae, text)

    c.vae = ml_collections.ConfigDict()
    c.vae.kind = "sd3"  # "sd3" (AutoencoderKL from pretrained.checkpoint); stand-ins "patch_pca", "lapped_conv"
    c.vae.sample_posterior = True  # [SD3] scripts sample z ~ q(z|x)
    # [SD3 scripts] the frozen VAE's parameters and compute in the training step ("sd3" only):
    # diffusers' SD3 scripts keep it in float32; "bfloat16" halves its memory and runs its
    # convolutions at the bf16 rate (the latents are sampled and scaled in float32 either way)
    c.vae.dtype = "float32"

    c.text = ml_collections.ConfigDict()
    c.text.kind = "sd3"  # "sd3" | "precomputed" | "hashed" (see percov2_jax.text.conditioners)
    c.text.checkpoint = ""  # empty: use pretrained.checkpoint
    c.text.store = ""  # for "precomputed"
    # [SD3] diffusers' default T5 length; the caption is 77 CLIP + this many T5 tokens (333), or
    # this many word slots for "hashed" (build.caption_length derives it, learned null text included)
    c.text.max_sequence_length = 256
    c.text.use_t5 = True
    # [ours] dtype of the frozen SD3 encoders on the training mesh (parameters and compute): "auto" is
    # bfloat16 on TPU/GPU (T5-XXL: 9.5 GB instead of 19 GB, split over the mesh) and float32 on CPU
    c.text.dtype = "auto"
    c.text.caption_dropout = 0.1  # [paper] "drop z_g in 10% of training iterations"

    c.flow = ml_collections.ConfigDict()
    c.flow.timestep_scheme = "logit_normal"  # [SD3] not stated for PerCoV2
    c.flow.logit_mean = 0.0  # [SD3]
    c.flow.logit_std = 1.0  # [SD3]
    c.flow.mode_scale = 1.29  # [SD3 scripts] for the "mode" scheme
    c.flow.shift = 3.0  # [SD3] scheduler shift
    c.flow.discrete_timesteps = True  # [SD3 scripts] index the 1000-entry shifted sigma table
    c.flow.loss_weighting = "none"  # [SD3 scripts]

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-5  # [PerCo (SD)]
    c.optim.warmup_steps = 0  # [PerCo (SD)] effectively none ("constant" ignores warm-up in diffusers)
    c.optim.schedule = "constant"  # [PerCo (SD)]
    c.optim.decay_steps = ml_collections.FieldReference(50_000)  # tied to train.num_steps below
    c.optim.end_learning_rate_factor = 0.0
    c.optim.b1 = 0.9  # [PerCo (SD)]
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-2  # [PerCo (SD)]
    c.optim.grad_clip = 1.0  # [PerCo (SD)]
    c.optim.ema_decay = 0.0  # [PerCo (SD)] EMA off; e.g. 0.9999 to keep one
    c.optim.trainable = "all"  # [PerCo (SD)] whole denoiser + hyper-encoder; "linear" is PerCo's recipe

    c.data = ml_collections.ConfigDict()
    c.data.source = "builtin"  # "builtin" | "folder" | "tfds"
    c.data.path = ""  # folder root, or TFDS name / prepared directory
    c.data.captions = ""  # captions file for "folder"
    c.data.split = "train"
    c.data.tfds_data_dir = ""
    c.data.image_key = "image"
    c.data.caption_key = ""
    c.data.random_crop = True  # [ours] PerCo (SD) center-crops; random crops are PerCo's
    c.data.random_flip = True  # [PerCo (SD)]
    c.data.worker_count = 0  # grain worker processes (0 = in the main process)
    c.data.read_threads = 8  # grain threads decoding examples (in each worker, if any)
    c.data.prefetch_batches = 8  # batches grain keeps ready ahead of the step

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 160  # [PerCo (SD)] 8 GPUs x 20
    c.train.num_steps = c.optim.get_ref("decay_steps")  # [PerCo (SD)] released models: 50k steps
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.async_checkpointing = True
    c.train.image_every = 1000  # PNG grid of originals and reconstructions; 0 = never
    c.train.max_minutes = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit

    # A jax.profiler trace of steps [start_step, start_step + num_steps) in WORKDIR/profile
    # (train/profiling.py); start_step 0 = no trace. [ours]
    c.profile = ml_collections.ConfigDict()
    c.profile.start_step = 0
    c.profile.num_steps = 5
    c.profile.all_processes = False  # trace every process, not only process 0

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 20  # [PerCo] 20 steps at the lowest rates; PerCoV2 [unknown]
    c.sample.guidance_scale = 3.0  # [PerCo] text-only CFG 3; PerCoV2 [unknown]
    c.sample.num_images = 4
    return c


def release_config(variant: str, rate: str) -> ml_collections.ConfigDict:
    """Stage 1 on an SD3 release (a name in ``percov2_jax.models.mmdit.RELEASES``) at ``rate``: the
    architecture comes from the converted checkpoint (``variant`` only states it for the planner
    and for runs without one)."""
    c = base_config()
    c.model.variant = variant
    c.rate = rate
    # [ours] FSDP over every chip: `python -m percov2_jax.plan` at global batch 160 on 32 chips needs
    # 12.2 GiB per chip for SD3-medium with fsdp=32 (fits v4, v5e, v5p) but 47.4 GiB with plain data
    # parallelism (v5p only); docs/sharding.md has the tables.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
