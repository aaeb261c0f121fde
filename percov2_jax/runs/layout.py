"""The layout of a training run's directory: every path a run writes or reads goes through `RunDir`.

A stage-1 run (``python -m percov2_jax.train``)::

    WORKDIR/
      checkpoints/<step>/...          orbax: train state, data-iterator state, config (runs.checkpointing)
      metrics.jsonl                   one {"step": ..., name: value} object per log write
      tensorboard/                    TensorBoard event files (scalars, images)
      reconstructions.png             the newest grid of originals and reconstructions
      images/reconstructions_<step>.png   every grid
      patch_autoencoder.npz           the fitted PCA stand-in for the VAE (vae.kind "patch_pca")
      conv_autoencoder.npz            the fitted convolutional stand-in (vae.kind "lapped_conv")
      profile/plugins/profile/...     jax.profiler traces of config.profile's steps
      prior/                          the default place of the stage-2 run, itself a RunDir

A stage-2 run (``python -m percov2_jax.train_prior``) has the same layout without the images and
the stand-in codec. Paths are ``etils.epath.Path`` objects, which is what orbax takes, and the
root may be a local folder or a Cloud Storage URL (``gs://bucket/run``).
"""

from __future__ import annotations

import os

from etils import epath

from percov2_jax import storage

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"
IMAGES = "images"
LATEST_GRID = "reconstructions.png"
PATCH_AUTOENCODER = "patch_autoencoder.npz"
CONV_AUTOENCODER = "conv_autoencoder.npz"  # models.conv_autoencoder.FITTED_FILE
PRIOR = "prior"
PROFILE = "profile"


class RunDir:
    """The files of one training run under ``root`` (a path or another `RunDir`)."""

    def __init__(self, root: str | os.PathLike | RunDir):
        if isinstance(root, RunDir):
            self.root = root.root
            return
        # orbax reads and writes absolute paths only; a URL (gs://...) already is one.
        self.root = storage.path(root)

    def __repr__(self) -> str:
        return f"RunDir({os.fspath(self.root)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def checkpoints(self) -> epath.Path:
        """The orbax ``CheckpointManager`` directory (one subfolder per saved step)."""
        return self.root / CHECKPOINTS

    @property
    def metrics_file(self) -> epath.Path:
        return self.root / METRICS_FILE

    @property
    def tensorboard(self) -> epath.Path:
        return self.root / TENSORBOARD

    @property
    def latest_grid(self) -> epath.Path:
        return self.root / LATEST_GRID

    def grid(self, step: int) -> epath.Path:
        """The reconstruction grid written at ``step``."""
        return self.root / IMAGES / f"reconstructions_{step:07d}.png"

    @property
    def profile(self) -> epath.Path:
        """``jax.profiler`` traces (train/profiling.py), as TensorBoard's profile plugin lays them out."""
        return self.root / PROFILE

    @property
    def patch_autoencoder(self) -> epath.Path:
        return self.root / PATCH_AUTOENCODER

    @property
    def conv_autoencoder(self) -> epath.Path:
        return self.root / CONV_AUTOENCODER

    @property
    def prior(self) -> RunDir:
        """Where a stage-2 run of this stage-1 run lives by default (``Codec.from_workdir`` looks here)."""
        return RunDir(self.root / PRIOR)

    def checkpoint_steps(self) -> list[int]:
        """The steps with a checkpoint folder, ascending ([] without checkpoints). A folder may still
        be an unfinished save; orbax's ``latest_step()`` is the authority on complete ones."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit())

    def has_checkpoint(self) -> bool:
        return bool(self.checkpoint_steps())
