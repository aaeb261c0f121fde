"""experiments/cpu_transformer_profile.py: the HLO classification on a hand-written module (dot
FLOPs from the shapes, batched dots apart, kinds of unfused instructions), the part each thunk
and aten op falls into, and the quick run (every part and matmul row written; JAX equal to eager
within float32 rounding). Nothing here checks a time: a quick run's numbers mean nothing."""

from __future__ import annotations

import math
import os
import sys

import pytest
from experiment_runs import ROOT, run_quick

sys.path.insert(0, os.path.join(ROOT, "experiments"))

HLO = """HloModule m

%fused_dot (param_0: f32[64,32], param_1: f32[32,48]) -> f32[64,48] {
  %param_0 = f32[64,32]{1,0} parameter(0)
  %param_1 = f32[32,48]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,48]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_bdot (param_0.1: f32[4,16,32]) -> f32[4,16,16] {
  %param_0.1 = f32[4,16,32]{2,1,0} parameter(0)
  ROOT %dot.2 = f32[4,16,16]{2,1,0} dot(%param_0.1, %param_0.1), lhs_batch_dims={0}, lhs_contracting_dims={2}
}

%fused_tanh (param_0.2: f32[64,48]) -> f32[64,48] {
  %param_0.2 = f32[64,48]{1,0} parameter(0)
  ROOT %tanh.0 = f32[64,48]{1,0} tanh(%param_0.2)
}

ENTRY %main (a: f32[64,32], b: f32[32,48]) -> f32[48,64] {
  %a = f32[64,32]{1,0} parameter(0)
  %b = f32[32,48]{1,0} parameter(1)
  %bitcast = f32[4,16,32]{2,1,0} bitcast(%a)
  %ynn_fusion = f32[64,48]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="f/M/attn/to_q/dot"}
  %ynn_fusion.1 = f32[4,16,16]{2,1,0} fusion(%bitcast), kind=kCustom, calls=%fused_bdot, metadata={op_name="f/attn/"}
  %dot.3 = f32[32,32]{1,0} dot(%a, %a), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  %wrapped_tanh = f32[64,48]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_tanh, metadata={op_name="f/ff"}
  ROOT %transpose.1 = f32[48,64]{1,0} transpose(%wrapped_tanh), dimensions={1,0}
}
"""


def test_instruction_kinds_from_hlo():
    import xla_cpu_trace

    kinds = xla_cpu_trace.instruction_kinds(HLO)
    dot = kinds["ynn_fusion"]
    assert (dot.kind, dot.flops, dot.op_name) == ("dot", 2.0 * 64 * 48 * 32, "f/M/attn/to_q/dot")
    assert dot.shape == "f32[64,32] x f32[32,48] -> f32[64,48]"
    assert (kinds["ynn_fusion.1"].kind, kinds["ynn_fusion.1"].flops) == ("bdot", 2.0 * 4 * 16 * 16 * 32)
    assert (kinds["dot.3"].kind, kinds["dot.3"].flops) == ("dot", 2.0 * 32 * 32 * 64)  # unfused: entry shapes
    assert kinds["wrapped_tanh"].kind == "elementwise"
    assert kinds["transpose.1"].kind == "copy/transpose"


def test_parts():
    from cpu_transformer_profile import jax_part, torch_part

    model = "jit(train_step)/transpose(jvp(SD3Transformer2DModel))/transformer_blocks_0"
    assert jax_part(f"{model}/attn/to_q/dot_general", "dot") == "dense matmuls"
    assert jax_part(f"{model}/attn/vmap()/div", "elementwise") == "attention"
    assert jax_part(f"{model}/attn/dot_general", "bdot") == "attention"
    assert jax_part(f"{model}/norm1/reduce_sum", "reduce") == "elementwise and norms"
    assert jax_part(f"{model}/ff/net_0/proj/transpose", "copy/transpose") == "copies and transposes"
    assert jax_part("", "copy/transpose") == "copies and transposes"  # XLA's own copies have no op_name
    assert jax_part("jit(train_step)/sqrt", "elementwise") == "loss and optimizer"
    assert torch_part("aten::addmm") == "dense matmuls"
    assert torch_part("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert torch_part("aten::_foreach_mul_") == "loss and optimizer"
    assert torch_part("aten::copy_") == "copies and transposes"
    assert torch_part("aten::native_layer_norm") == "elementwise and norms"


@pytest.mark.slow
@pytest.mark.parity
def test_quick_run(tmp_path):
    pytest.importorskip("diffusers")
    report, text = run_quick("cpu_transformer_profile", tmp_path)
    for key in ("forward", "train"):
        r = report["workloads"][key]
        assert set(r["time"]) == {"JAX", "JAX, YNNPACK for reductions only", "torch eager"} and all(
            t["median_ms"] > 0 for t in r["time"].values()
        )
        assert r["parity_rel_vs_eager"]["JAX"] < 1e-4, r["parity_rel_vs_eager"]
        for side in ("JAX", "torch eager"):
            assert r["parts_ms"][side]["dense matmuls"] > 0, (key, side)
            assert r["matmuls"][side]["gflop"] > 0 and math.isfinite(r["matmuls"][side]["gflops"])
        # Both sides count the same dense-matmul work: the linear layers' FLOPs agree.
        assert r["matmuls"]["JAX"]["gflop"] == pytest.approx(r["matmuls"]["torch eager"]["gflop"], rel=1e-6), key
    assert "## training step" in text and "| dense matmuls |" in text
    for shape in report["matmul_libraries"].values():
        assert shape["time"]["torch"]["median_ms"] > 0 and shape["time"]["default"]["median_ms"] > 0, shape
    assert "## One matmul, by XLA:CPU kernel library" in text
