"""Where an XLA:CPU executable and a PyTorch function spend their time, by kind of work.

Shared by the CPU profiling experiments (``cpu_vae_profile.py``, ``cpu_transformer_profile.py``):

- ``alternate``: time several functions in alternating blocks within one process, so load from
  elsewhere falls on all of them alike.
- ``hlo_summary``: counts over an optimised HLO module (fusions, convolutions, copies, ...).
- ``thunk_trace``: run an executable compiled with ``TRACE`` under ``jax.profiler`` and sum the
  time of every thunk (one per entry instruction) by kind: convolutions and dots by shape (with
  their FLOPs), elementwise fusions, reductions, copies and transposes; and by the ``op_name``
  each instruction carries (the flax module path), for callers that group by model part.
  XLA:CPU's own (Eigen) convolutions leave no trace event: what the trace misses is reported as
  untraced.
- ``torch_profile``: ``torch.profiler`` self CPU time per aten op, matmuls and convolutions by
  input shape (matmuls with their FLOPs).
- ``xla_cpu_flags``: the ``xla_cpu_*`` option names this jaxlib knows.
"""

from __future__ import annotations

import collections
import glob
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import results_io
import torch

# Compile option that makes XLA:CPU emit one trace event per thunk.
TRACE = {"xla_cpu_enable_xprof_traceme": True}

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


# ------------------------------------------------------------------------------ timing


def alternate(
    fns: dict[str, Callable[[], object]], rounds: int, block: int, grad: bool = False
) -> tuple[dict[str, dict], list[float]]:
    """Each round: for every fn in turn, one untimed call then ``block`` timed calls. Median etc. in
    ms per fn, and the 1-minute load average after each round. Blocks keep each side's thread pool
    warm: back-to-back single calls of JAX and torch slow each other down (torch's OpenMP threads
    and XLA's pools contend for the same cores). ``grad``: torch autograd on (training steps)."""
    times, loads = {k: [] for k in fns}, []
    with torch.set_grad_enabled(grad):
        for _ in range(rounds):
            for name, fn in fns.items():
                fn()
                for _ in range(block):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            loads.append(os.getloadavg()[0])
    return {k: results_io.spread_ms(v, raw=True) for k, v in times.items()}, loads


# ------------------------------------------------------------------------------ the HLO


def hlo_summary(text: str) -> dict:
    """Counts over the optimised HLO's entry computation and its fusions."""
    entry = text[text.index("\nENTRY") :]
    ops = collections.Counter(m.group(1) for m in re.finditer(r"= \S+ ([a-z][\w-]*)\(", entry))
    convs = re.findall(r"= (\S+) convolution\((.*?)window=\{([^}]*)\}, dim_labels=(\S+?)[,\s]", text)
    kinds = collections.Counter(m.group(1) for m in re.finditer(r'"kind":"(__\w+)"', entry))
    fusion_kinds = collections.Counter(m.group(1) for m in re.finditer(r"fusion\(.*?kind=(k\w+)", entry))
    return {
        "entry_ops": dict(ops),
        "fusions_by_kind": dict(fusion_kinds),
        "library_fusions": dict(kinds),
        "convolutions": len(convs),
        "conv_dim_labels": dict(collections.Counter(c[3] for c in convs)),
        "copies": len(re.findall(r" copy\(", text)),
        "transposes": len(re.findall(r" transpose\(", text)),
        "pads": len(re.findall(r" pad\(", text)),
        "reduces": len(re.findall(r" reduce\(", text)),
        "dots": len(re.findall(r" dot\(", text)),
    }


@dataclass(frozen=True)
class Thunk:
    """What one entry instruction computes. ``kind``: conv, dot (no batch dimensions), bdot
    (batched, e.g. attention's), reduce, copy/transpose or elementwise; ``shape``: operand and
    result shapes of a conv or dot; ``flops`` of a dot (0 otherwise); ``op_name`` from its metadata."""

    kind: str
    shape: str = ""
    flops: float = 0.0
    op_name: str = ""


def _dims(shape: str) -> list[int]:
    inner = shape[shape.index("[") + 1 : shape.index("]")]
    return [int(d) for d in inner.split(",") if d]


def _operand_shape(name: str, lookup: str) -> str:
    found = re.search(rf"%{re.escape(name)} = (\w+\[[\d,]*\])", lookup)
    return found.group(1) if found else "?"


def _classify(body: str, lookup: str) -> Thunk:
    conv = re.search(r"convolution\(%(\S+), %(\S+)\), window=\{([^}]*)\}", body)
    if conv:
        lhs, rhs = (_operand_shape(n, lookup) for n in conv.group(1, 2))
        return Thunk("conv", f"{lhs} * {rhs} ({conv.group(3)})")
    dot = re.search(r"= (\w+\[[\d,]*\])\S* dot\(%(\S+), %(\S+)\), (.*)", body)
    if dot:
        out, lhs, rhs = dot.group(1), *(_operand_shape(n, lookup) for n in dot.group(2, 3))
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot.group(4))
        flops = 0.0
        if lhs != "?" and contracting:
            lhs_dims = _dims(lhs)
            k = math.prod(lhs_dims[int(i)] for i in contracting.group(1).split(",") if i)
            flops = 2.0 * math.prod(_dims(out)) * k
        kind = "bdot" if "lhs_batch_dims" in dot.group(4) else "dot"
        return Thunk(kind, f"{lhs} x {rhs} -> {out}", flops)
    for op, kind in ((" reduce(", "reduce"), (" copy(", "copy/transpose"), (" transpose(", "copy/transpose")):
        if op in body:
            return Thunk(kind)
    return Thunk("elementwise")


def instruction_kinds(text: str) -> dict[str, Thunk]:
    """Entry instruction name -> what it computes (fusions by their body)."""
    comps = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) \(.*?\{\n(.*?)\n\}", text, re.S | re.M)}
    entry = text[text.index("\nENTRY") :]
    out = {}
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ ([a-z][\w-]*)\((.*)", line)
        if not m:
            continue
        name, op, rest = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        if op == "fusion" and called:
            body = comps.get(called.group(1), "")
            thunk = _classify(body, body)
        else:  # an unfused instruction: its operands are entry instructions
            thunk = _classify(line, entry)
        op_name = re.search(r'op_name="([^"]*)"', line)
        out[name] = Thunk(thunk.kind, thunk.shape, thunk.flops, op_name.group(1) if op_name else "")
    return out


# ------------------------------------------------------------------------------ traces


def thunk_trace(hlo_text: str, call: Callable[[], object], calls: int) -> dict:
    """Per-thunk times (ms per call) from a profiler trace of ``calls`` calls of ``call`` (which runs
    the executable whose optimised HLO is ``hlo_text``, compiled with ``TRACE``, and blocks).

    Returns wall time per call under the trace, the traced and untraced ms, ms by kind, ms and FLOPs
    by conv/dot shape, and the list of (name, op_name, kind, ms) per instruction for grouping by caller."""
    kinds = instruction_kinds(hlo_text)
    for _ in range(2):
        call()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        with jax.profiler.trace(folder):
            for _ in range(calls):
                call()
        wall = (time.perf_counter() - start) / calls
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    per_instruction = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if event.name in kinds:  # others are executor and thread-pool bookkeeping
                    per_instruction[event.name] += event.duration_ns / 1e6 / calls
    by_kind, by_shape, shape_flops = collections.Counter(), collections.Counter(), {}
    for name, ms in per_instruction.items():
        thunk = kinds[name]
        by_kind[thunk.kind] += ms
        if thunk.shape:
            key = f"{thunk.kind} {thunk.shape}"
            by_shape[key] += ms
            shape_flops[key] = shape_flops.get(key, 0.0) + thunk.flops
    traced = sum(by_kind.values())
    return {
        "wall_ms_under_trace": wall * 1e3,
        "traced_ms": traced,
        "untraced_ms": max(wall * 1e3 - traced, 0.0),
        "by_kind_ms": dict(by_kind.most_common()),
        "by_shape_ms": dict(by_shape.most_common()),
        "shape_flops": shape_flops,
        "instructions": [(n, kinds[n].op_name, kinds[n].kind, ms) for n, ms in per_instruction.most_common()],
    }


def torch_profile(fn: Callable[[], object], calls: int, grad: bool = False, scopes: tuple[str, ...] = ()) -> dict:
    """torch.profiler self CPU ms per call: per op (every op, and the top 12), matmuls and
    convolutions by input shape, the matmuls' FLOPs by shape, and the wall time per call under
    the profiler. ``scopes``: names of enclosing events (e.g. ``Optimizer.step``, a prefix) whose
    ops are summed apart in ``scope_ms`` and left out of the per-op figures."""
    from torch.profiler import ProfilerActivity, profile

    with torch.set_grad_enabled(grad):
        fn()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                fn()
        wall = (time.perf_counter() - start) / calls

    def scope_of(event) -> str | None:
        while event is not None:
            for scope in scopes:
                if event.name.startswith(scope):
                    return scope
            event = event.cpu_parent
        return None

    ops, scoped = collections.Counter(), collections.Counter()
    convs, matmuls, matmul_flops = collections.Counter(), collections.Counter(), collections.Counter()
    for e in prof.events():
        ms = e.self_cpu_time_total / 1e3 / calls
        scope = scope_of(e) if scopes else None
        if scope is not None:
            scoped[scope] += ms
            continue
        if ms > 0:
            ops[e.name] += ms
        shapes = e.input_shapes or []
        if e.name == "aten::mkldnn_convolution" and len(shapes) >= 2:
            convs[f"{shapes[0]} * {shapes[1]}"] += ms
        elif e.name in MATMUL_OPS:
            a, b = shapes[1:3] if e.name in ("aten::addmm", "aten::baddbmm") else shapes[:2]
            if a and b:
                key = f"{e.name[6:]} {list(a)} x {list(b)}"
                matmuls[key] += ms
                matmul_flops[key] += 2.0 * math.prod(a) * b[-1] / calls
    return {
        "wall_ms_under_profiler": wall * 1e3,
        "total_ms": sum(ops.values()) + sum(scoped.values()),
        "ops_ms": dict(ops),
        "scope_ms": dict(scoped),
        "top_ops_ms": dict(ops.most_common(12)),
        "conv_by_shape_ms": dict(convs.most_common()),
        "matmul_by_shape_ms": dict(matmuls.most_common()),
        "matmul_flops": dict(matmul_flops),
    }


def xla_cpu_flags() -> list[str]:
    """The ``xla_cpu_*`` option names this jaxlib knows (from its shared library's strings)."""
    import jaxlib

    folder = os.path.dirname(jaxlib.__file__)
    names = set()
    for path in glob.glob(os.path.join(folder, "*.so")):
        if os.path.getsize(path) < 50e6:
            continue
        with open(path, "rb") as f:  # whole NUL-terminated strings: the option names themselves
            names.update(m.decode() for m in re.findall(rb"\x00(xla_cpu_[a-z0-9_]{3,80})\x00", f.read()))
    return sorted(names)
