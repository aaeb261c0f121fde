"""The stage-2 (prior) config schema with its defaults; ``configs/prior_*.py`` start from
``base_prior_config()``. Its ``optim``, ``mesh`` and ``train`` blocks have stage 1's field names.

The paper states nothing about the prior's size or training, so every value is a choice. Tags:
[M2T] taken from M2T (Mentzer et al. 2023), [MaskGIT] from MaskGIT, [ours] ours.
"""

from __future__ import annotations

import ml_collections


def base_prior_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage1 = ""  # the stage-1 training workdir whose frozen hyper-encoder + VQ make the tokens
    c.seed = 0  # [ours]
    c.image_size = 0  # [ours] 0: the stage-1 run's image size

    c.prior = ml_collections.ConfigDict()  # the MaskedTokenPrior (percov2_jax.entropy.mim)
    c.prior.width = 768  # [M2T] "Base" prior: 12 layers x 768
    c.prior.num_layers = 12  # [M2T]
    c.prior.num_heads = 12  # [ours]
    c.prior.mlp_ratio = 4  # [ours]
    c.prior.max_side = 64  # [ours] largest token grid side (position tables)
    c.prior.condition_on_caption = True  # [ours] the caption is sent first, so it is free side information
    c.prior.mask_scheme = "uniform"  # [M2T] uniform 5-99% masked; "cosine" = [MaskGIT]
    c.prior.dtype = "float32"  # [ours] compute dtype
    c.prior.param_dtype = "float32"  # [ours]

    c.optim = ml_collections.ConfigDict()  # AdamW, every value [ours]; field names as stage 1's
    c.optim.learning_rate = 3e-4
    c.optim.schedule = "cosine"  # "cosine" | "constant" | "linear" decay after the warm-up
    c.optim.warmup_steps = 1000  # linear warm-up from 0
    c.optim.decay_steps = ml_collections.FieldReference(100_000)  # tied to train.num_steps below
    c.optim.end_learning_rate_factor = 0.1  # the learning rate at decay_steps, as a fraction (not for constant)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0  # global-norm clipping; 0 = none
    c.optim.trainable = "all"  # the prior trains every parameter

    c.data = ml_collections.ConfigDict()
    c.data.source = ""  # "" = the stage-1 run's data; else builtin | folder | tfds with data.path
    c.data.path = ""

    c.mesh = ml_collections.ConfigDict()  # devices = data * fsdp * tensor; one size may be -1 (the rest)
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 256  # [ours] over all processes
    c.train.num_steps = c.optim.get_ref("decay_steps")  # [ours]
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.max_minutes = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit

    # A jax.profiler trace of steps [start_step, start_step + num_steps) in WORKDIR/profile
    # (train/profiling.py); start_step 0 = no trace. [ours]
    c.profile = ml_collections.ConfigDict()
    c.profile.start_step = 0
    c.profile.num_steps = 5
    c.profile.all_processes = False  # trace every process, not only process 0
    return c
