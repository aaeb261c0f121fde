"""FLOP counts and model FLOP utilisation (MFU) for the training loop's logs.

Three counts of the same thing, used as cross-checks of each other:

* ``compiled_flops``: XLA's own cost analysis of a compiled function. It counts every HLO op
  (matmuls as ``2·m·n·k``, elementwise ops as one FLOP per element; transcendentals are
  reported apart and not included). For an SPMD-partitioned program it is the count of the
  per-device program.
* ``traced_matmul_flops``: the matmuls and convolutions of a function's jaxpr, without
  compiling; backend-independent.
* ``mmdit_forward_flops``: an analytic count of the SD3 MM-DiT forward, matmuls only; equal
  to ``traced_matmul_flops`` of the model, and a few % below ``compiled_flops`` at real widths
  (elementwise work is O(D) per token against the matmuls' O(D²); at D = 16 it is ~13 %).

MFU = model FLOPs per step / (step time · sum of the devices' peak FLOP/s). A training step
(forward + backward) is conventionally 3× the forward FLOPs; rematerialisation adds work the
hardware does but that MFU does not credit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from percov2_jax.models.mmdit import SD3TransformerConfig, block_runs


def compiled_flops(jitted_fn, *args, **kwargs) -> float | None:
    """FLOPs of one call of ``jitted_fn(*args, **kwargs)`` from XLA's cost analysis, or None.

    ``jitted_fn`` is a ``jax.jit``-wrapped function; ``args`` may be arrays or
    ``jax.ShapeDtypeStruct``s. Lowering and compiling do not run the function. Older jax
    returns a list of per-module dicts, newer a single dict; some backends return None or
    raise, and then this returns None. Errors of lowering or compiling are not caught.
    """
    return cost_analysis_flops(jitted_fn.lower(*args, **kwargs).compile())


def cost_analysis_flops(compiled) -> float | None:
    """The ``flops`` of a compiled function's cost analysis (per device), or None if unknown."""
    try:
        analysis = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):  # a backend without cost analysis
        return None
    if analysis is None:
        return None
    if isinstance(analysis, Mapping):
        analysis = [analysis]
    values = [entry.get("flops") for entry in analysis if isinstance(entry, Mapping)]
    values = [float(v) for v in values if v is not None]
    if not values or any(v < 0 for v in values):  # XLA reports -1 when it cannot count
        return None
    return sum(values)


def traced_matmul_flops(fn, *args, **kwargs) -> int:
    """``2·m·n·k`` FLOPs of every ``dot_general`` and convolution in ``fn``'s jaxpr.

    Nested jaxprs (jit, remat, custom_vjp, ...) are walked; a ``scan`` body counts ``length``
    times, a ``cond`` its most expensive branch, a ``while`` body once (its trip count is not
    static).
    """
    return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def _jaxpr_matmul_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract_lhs, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            k = math.prod(lhs_shape[i] for i in contract_lhs)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs_shape = eqn.invars[1].aval.shape
            out_features = rhs_shape[eqn.params["dimension_numbers"].rhs_spec[0]]
            # Each output element is a dot over (kernel window x in_features / groups).
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * (math.prod(rhs_shape) // out_features)
        sub = [_jaxpr_matmul_flops(j) for j in _sub_jaxprs(eqn.params)]
        if name == "scan":
            total += eqn.params["length"] * sum(sub)
        elif name == "cond":
            total += max(sub, default=0)
        else:
            total += sum(sub)
    return total


def _sub_jaxprs(params: Mapping[str, Any]):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):  # Jaxpr
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):  # ClosedJaxpr
                yield item.jaxpr


# Dense (no structured sparsity) bf16 peak FLOP/s per *JAX device*. Sources are the vendors'
# spec pages and datasheets:
#   TPU: Google Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v2 ... v6e),
#        "peak compute per chip (bf16)". v2 and v3 chips have two TensorCores and JAX shows
#        each TensorCore as one device, so their per-device peak is half the chip's; v4 and
#        v5p chips are one "megacore" device; v5e and v6e chips have one TensorCore.
#   GPU: NVIDIA datasheets, "BF16 Tensor Core" row, which quotes with-sparsity numbers; the
#        dense peak is half of that. V100 has no bf16 tensor cores: its FP16 tensor peak.
#        NVIDIA publishes no A10G datasheet (it is AWS's variant of the A10, 125 TFLOP/s);
#        70 TFLOP/s is the figure commonly measured and quoted for it.
_TPU_PEAK_FLOPS = {
    "TPU v2": 45e12 / 2,
    "TPU v3": 123e12 / 2,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}

# (all substrings that must occur in the lower-cased device_kind, peak); first match wins, so
# the more specific entries (PCIe, NVL) come before the general one.
_GPU_PEAK_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h100", "pcie"), 756e12),  # H100 PCIe: 1,513 TFLOP/s with sparsity
    (("h100", "nvl"), 835e12),  # H100 NVL: 1,671 with sparsity
    (("h100",), 989e12),  # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    (("gh200",), 989e12),  # same Hopper GPU as H100 SXM
    (("h200",), 989e12),  # H200 SXM: 1,979 with sparsity
    (("b200",), 2250e12),  # B200 (HGX B200): 4.5 PFLOP/s with sparsity
    (("a100",), 312e12),  # A100 SXM4 and PCIe: 624 with sparsity
    (("a10g",), 70e12),  # see the note above
    (("l4",), 121e12),  # L4: 242 with sparsity
    (("v100", "pcie"), 112e12),  # V100 PCIe, FP16 tensor
    (("v100",), 125e12),  # V100 SXM2, FP16 tensor
)


def peak_flops_per_device(device: Any) -> float | None:
    """The dense bf16 peak FLOP/s of one JAX device from its ``device_kind``; None for CPU or unknown."""
    if getattr(device, "platform", None) == "cpu":
        return None
    return peak_flops_of_kind(str(getattr(device, "device_kind", "")))


def peak_flops_of_kind(kind: str) -> float | None:
    """The dense bf16 peak FLOP/s of a ``device_kind`` string (``"TPU v5p"``, ``"NVIDIA H100 80GB
    HBM3"``); None when unknown."""
    kind = kind.strip()
    if not kind:
        return None
    if kind in _TPU_PEAK_FLOPS:
        return _TPU_PEAK_FLOPS[kind]
    lowered = kind.lower()
    if "tpu" in lowered:
        return None
    for needles, peak in _GPU_PEAK_FLOPS:
        # "l4" must be a word of its own ("NVIDIA L4"), not part of another name.
        if all((n in lowered.split() if n == "l4" else n in lowered) for n in needles):
            return peak
    return None


def model_flops_utilization(flops_per_step: float | None, step_seconds: float, devices: Iterable[Any]) -> float | None:
    """``flops_per_step / (step_seconds · Σ peak)``: the fraction of the devices' peak used.

    ``flops_per_step`` is the model FLOPs of one step over the *global* batch (all devices).
    None when it is unknown, ``step_seconds`` is not positive, there are no devices, or any
    device's peak is unknown (CPU).
    """
    devices = list(devices)
    if flops_per_step is None or step_seconds <= 0 or not devices:
        return None
    peaks = [peak_flops_per_device(d) for d in devices]
    if any(p is None for p in peaks):
        return None
    return float(flops_per_step) / (step_seconds * sum(peaks))


def mmdit_forward_flop_breakdown(
    config: SD3TransformerConfig, batch: int, latent_h: int, latent_w: int, text_len: int
) -> dict[str, int]:
    """Matmul FLOPs (``2·m·n·k``) of one ``SD3Transformer2DModel`` forward, by part.

    ``latent_h × latent_w`` is the latent size (before patchify), ``text_len`` the number of
    context tokens. Elementwise work (norms, softmax, GELU, modulation, residuals) is not
    counted. Attention over the concatenated [image, context] sequence is counted in full
    (no masking), as the model computes it.
    """
    p = config.patch_size
    if latent_h % p or latent_w % p:
        raise ValueError(f"latent size {latent_h}x{latent_w} is not a multiple of patch_size={p}")
    d = config.inner_dim
    n = (latent_h // p) * (latent_w // p)  # image tokens
    c = text_len  # context tokens
    s = n + c  # joint sequence

    def mm(m: int, k: int, n_out: int) -> int:
        return 2 * m * k * n_out

    parts = {
        "patch_embed": mm(n, p * p * config.in_channels, d),
        # timestep_embedder (256 -> D -> D) and text_embedder (pooled -> D -> D), once per sample.
        "time_text_embed": mm(1, 256, d) + mm(1, d, d) + mm(1, config.pooled_projection_dim, d) + mm(1, d, d),
        "context_embedder": mm(c, config.joint_attention_dim, d),
        "adaln": 0,
        "attention_projections": 0,
        "attention_scores_values": 0,
        "mlp": 0,
        "norm_out": mm(1, d, 2 * d),
        "proj_out": mm(n, d, p * p * config.out_channels),
    }
    for run in block_runs(config, scan_layers=False):
        last, dual = run.kind == "last", run.kind == "dual"
        # norm1: 6 (or 9 with dual attention) D-vectors; norm1_context: 6, or 2 in the last block.
        parts["adaln"] += mm(1, d, (9 if dual else 6) * d) + mm(1, d, (2 if last else 6) * d)
        # q, k, v for both streams, to_out for the image, to_add_out for the context unless last.
        parts["attention_projections"] += mm(n, d, 3 * d) + mm(c, d, 3 * d) + mm(n, d, d) + (0 if last else mm(c, d, d))
        # QK^T and PV summed over heads: each 2·S·S·D.
        parts["attention_scores_values"] += 2 * mm(s, d, s)
        # FeedForward D -> 4D -> D for the image, and for the context unless last.
        parts["mlp"] += 2 * mm(n, d, 4 * d) + (0 if last else 2 * mm(c, d, 4 * d))
        if dual:  # attn2: image-only self-attention
            parts["attention_projections"] += mm(n, d, 3 * d) + mm(n, d, d)
            parts["attention_scores_values"] += 2 * mm(n, d, n)
    return {k: batch * v for k, v in parts.items()}


def mmdit_forward_flops(config: SD3TransformerConfig, batch: int, latent_h: int, latent_w: int, text_len: int) -> int:
    """Total matmul FLOPs of one MM-DiT forward; see ``mmdit_forward_flop_breakdown``."""
    return sum(mmdit_forward_flop_breakdown(config, batch, latent_h, latent_w, text_len).values())
