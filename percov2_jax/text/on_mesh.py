"""The frozen SD3 text encoders (CLIP-L, CLIP-G, T5-XXL) sharded on a training mesh.

Parameters are restored straight onto the mesh by the logical-axis rule table (T5-XXL's 4.8 B
weights split over ``fsdp`` / ``tensor`` like the MM-DiT's) in the encoders' own dtype, and the
captions of a batch are encoded in one jitted call whose outputs stay on the devices, split over
the batch axes like the images: nothing goes back to the host between the encoders and the step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax import pretrained
from percov2_jax import sharding as sharding_lib
from percov2_jax.text.prompt_encoder import PromptEncoder, embed_tokens, load_tokenizers


def encoder_dtype(name: str) -> jnp.dtype:
    """``config.text.dtype``: ``"auto"`` is bfloat16 on accelerators (the encoders are frozen:
    half the memory, MXU/tensor-core rate) and float32 on CPU (where bf16 is slow and tests compare
    to PyTorch in float32); anything else is a dtype name."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


class MeshTextEncoder:
    """SD3 conditioning computed on ``mesh``.

    ``encode(captions)``: this process's captions (its rows of a global batch) -> global
    ``(prompt_embeds [B, 77 + L, D], pooled [B, P])`` float32 arrays split over ``(data, fsdp)``.
    ``__call__(captions)``: the same captions on every process -> host float32 numpy arrays (for the
    empty prompt and preview grids). Every process must make the same calls (they are collective).
    """

    def __init__(self, prompt_encoder: PromptEncoder, mesh: jax.sharding.Mesh):
        self.prompt_encoder, self.mesh = prompt_encoder, mesh
        p = prompt_encoder
        modules = {name: p.encoders[name][0] for name in p.encoders}
        self.params = {name: p.encoders[name][1] for name in p.encoders}
        settings = (p.clip_skip, p.max_sequence_length, p.joint_attention_dim)
        self._sharded = embed_on_mesh(modules, mesh, sharding_lib.batch_sharding(mesh), *settings)
        self._replicated = embed_on_mesh(modules, mesh, sharding_lib.replicated(mesh), *settings)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        mesh: jax.sharding.Mesh,
        *,
        dtype: str = "auto",
        use_t5: bool = True,
        max_sequence_length: int = 256,
        joint_attention_dim: int = 4096,
    ) -> MeshTextEncoder:
        """The encoders of a ``percov2 convert`` checkpoint, restored onto ``mesh`` in
        `encoder_dtype` ``(dtype)`` (computation and parameters)."""
        dt = encoder_dtype(dtype)
        names = ("clip_l", "clip_g", "t5") if use_t5 else ("clip_l", "clip_g")
        options = {name: {"dtype": dt, "param_dtype": dt} for name in names}
        encoders = pretrained.load(checkpoint, components=names, mesh=mesh, options=options)
        encoder = PromptEncoder(
            encoders,
            load_tokenizers(checkpoint),
            max_sequence_length=max_sequence_length,
            joint_attention_dim=joint_attention_dim,
        )
        return cls(encoder, mesh)

    def encode(self, captions: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        ids = sharding_lib.global_batch(self.prompt_encoder.tokenize(list(captions)), self.mesh)
        return self._sharded(self.params, ids)

    def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(captions, str):
            raise TypeError("pass a sequence of captions, not one string")
        ids = sharding_lib.replicate(self.prompt_encoder.tokenize(list(captions)), self.mesh)
        seq, pooled = self._replicated(self.params, ids)
        return _local_copy(seq), _local_copy(pooled)

    def null_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        return self([""])


def embed_on_mesh(modules, mesh, out_sharding, clip_skip, max_sequence_length: int, joint_attention_dim: int):
    """``jit(params, ids) -> (prompt_embeds, pooled)`` float32, both placed on ``out_sharding``:
    the encoders ``modules`` (``{name: module}``) traced under the mesh's activation constraints
    (also what the planner compiles)."""
    names = tuple(sorted(modules.items()))

    def embed(params, ids):
        with sharding_lib.activation_constraints(mesh):
            seq, pooled = embed_tokens(names, clip_skip, max_sequence_length, joint_attention_dim, params, ids)
        return seq.astype(jnp.float32), pooled.astype(jnp.float32)

    return jax.jit(embed, out_shardings=(out_sharding, out_sharding))


def _local_copy(x: jax.Array) -> np.ndarray:
    """A replicated global array's value from this process's first shard (works across hosts)."""
    return np.asarray(x.addressable_data(0))
