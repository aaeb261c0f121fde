"""Operating modes of an evaluation: sampling steps x guidance scale x token coding.

``config.modes`` is a sequence of dicts, one per mode (an empty one: the single default mode)::

  c.modes = (
      dict(sample_steps=20, guidance_scale=3.0),
      dict(sample_steps=2, guidance_scale=1.0, coding=dict(entropy_mode="uniform"), name="fast"),
  )

Keys of a mode (all optional):

- ``sample_steps`` (int >= 1): Euler steps of the decoder's sampler;
- ``guidance_scale`` (float): classifier-free guidance on the caption;
- ``coding`` (dict): `percov2_jax.codec.token_payload.TokenCoding` fields overriding the codec's
  coding: ``entropy_mode`` ("auto" | "prior" | "uniform"), ``schedule`` (a schedule name), ``steps`` (int
  >= 1, the schedule's steps), ``hybrid_groups`` (int), ``temperature`` (float), ``seed`` (int);
- ``name`` (str): the label in tables and plots (default e.g. ``s20_g3`` or ``s2_g1_uniform_h2``).

Omitted fields take the codec's defaults (the checkpoint's ``sample`` config and coding).
`Mode.describe` gives a mode back in this form, so a summary's modes can be pasted into a config.
Modes that share a token coding share their bitstreams: the image is compressed once per coding.
PerCo's observation (docs/method.md §6.3): at low rates few steps give the best MS-SSIM and worse FID,
many steps the reverse; PerCoV2's Fig. 1 sweeps steps x guidance.

On the command line (``ml_collections`` parses a tuple field with ``ast.literal_eval``), give the
whole sequence in one flag: ``--config.modes="[{'sample_steps': 2}, {'sample_steps': 20,
'coding': {'entropy_mode': 'uniform'}}]"``. A lone dict there would be read as its keys; that,
like every malformed mode, is rejected by `modes_from_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import typing
from collections.abc import Mapping, Sequence
from typing import Any

MODE_KEYS = ("name", "sample_steps", "guidance_scale", "coding")


@dataclasses.dataclass(frozen=True)
class Mode:
    """One operating mode; ``coding`` holds `TokenCoding` overrides as sorted ``(field, value)`` pairs."""

    name: str
    sample_steps: int
    guidance_scale: float
    coding: tuple = ()

    @property
    def coding_overrides(self) -> dict:
        return dict(self.coding)

    def describe(self) -> dict:
        """JSON-able, and a valid mode of ``config.modes``: name, sample_steps, guidance_scale, coding."""
        return {
            "name": self.name,
            "sample_steps": self.sample_steps,
            "guidance_scale": self.guidance_scale,
            "coding": self.coding_overrides,
        }


@functools.cache
def coding_fields() -> dict[str, Any]:
    """`TokenCoding` field name -> its type (e.g. ``int | None``), the keys a mode's ``coding`` accepts."""
    from percov2_jax.codec.token_payload import TokenCoding

    return typing.get_type_hints(TokenCoding)


def _default_name(steps: int, guidance: float, coding: dict) -> str:
    name = f"s{steps}_g{guidance:g}"
    if coding.get("entropy_mode"):
        name += "_" + coding["entropy_mode"]
    if coding.get("schedule"):
        name += "_" + coding["schedule"]
    if coding.get("hybrid_groups") is not None:
        name += f"_h{coding['hybrid_groups']}"
    return name


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(value, kind, what: str, label: str):
    """``value`` converted to ``kind`` (int, float, str, or ``int | None``); ValueError naming the mode."""
    if value is None and kind is not type(None) and type(None) in typing.get_args(kind):
        return None
    kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)
    ok = {int: _is_int, float: _is_number, str: lambda v: isinstance(v, str)}[kind](value)
    if not ok:
        raise ValueError(f"{label}: {what} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return kind(value)


def _mode(spec: Any, label: str, default_steps: int, default_guidance: float) -> Mode:
    if hasattr(spec, "to_dict"):  # an ml_collections ConfigDict
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{label}: a mode must be a dict with keys from {MODE_KEYS}, got {type(spec).__name__} "
            f'{spec!r} (on the command line, give the whole list: --config.modes="[{{...}}, ...]")'
        )
    unknown = sorted(set(spec) - set(MODE_KEYS), key=str)
    if unknown:
        hint = ""
        if set(unknown) & set(coding_fields()):
            hint = f"; token coding fields ({', '.join(coding_fields())}) go in the mode's 'coding' dict"
        raise ValueError(f"{label}: unknown keys {unknown}; a mode has {list(MODE_KEYS)}{hint}")
    steps = _check(spec.get("sample_steps", default_steps), int, "sample_steps", label)
    if steps < 1:
        raise ValueError(f"{label}: sample_steps must be >= 1, got {steps}")
    guidance = _check(spec.get("guidance_scale", default_guidance), float, "guidance_scale", label)
    coding_spec = spec.get("coding", {})
    if hasattr(coding_spec, "to_dict"):
        coding_spec = coding_spec.to_dict()
    if not isinstance(coding_spec, Mapping):
        raise ValueError(f"{label}: coding must be a dict of TokenCoding fields, got {coding_spec!r}")
    fields = coding_fields()
    unknown = sorted(set(coding_spec) - set(fields), key=str)
    if unknown:
        raise ValueError(f"{label}: unknown coding keys {unknown}; TokenCoding has {list(fields)}")
    coding = {k: _check(v, fields[k], f"coding.{k}", label) for k, v in sorted(coding_spec.items())}
    if coding.get("steps") is not None and coding["steps"] < 1:
        raise ValueError(f"{label}: coding.steps must be >= 1 (or None: the schedule's default), got {coding['steps']}")
    name = spec.get("name")
    if name is None:
        name = _default_name(steps, guidance, coding)
    elif not isinstance(name, str) or not name:
        raise ValueError(f"{label}: name must be a non-empty str, got {name!r}")
    return Mode(name, steps, guidance, tuple(coding.items()))


def modes_from_config(specs: Sequence[Any] | None, default_steps: int, default_guidance: float) -> list[Mode]:
    """``config.modes`` (module docstring) -> modes; an empty sequence gives the one default mode.

    ``default_steps`` / ``default_guidance``: the codec's (checkpoint's) sampling defaults.
    Raises ValueError naming the mode (``modes[i]``) for a mode that is not a dict, unknown keys,
    wrong types, steps < 1, and for modes with the same name.
    """
    if isinstance(specs, (str, bytes, Mapping)) or hasattr(specs, "to_dict"):
        raise ValueError(
            f"config.modes must be a list of dicts (see percov2_jax.evaluation.modes), got "
            f"{type(specs).__name__} {specs!r}"
        )
    specs = list(specs or [])
    modes = [_mode(spec, f"modes[{i}] {spec!r}", default_steps, default_guidance) for i, spec in enumerate(specs)]
    modes = modes or [_mode({}, "the default mode", default_steps, default_guidance)]
    names = [m.name for m in modes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        where = [f"modes[{i}]" for i, n in enumerate(names) if n in duplicates]
        raise ValueError(f"{', '.join(where)} have the same name {duplicates}; give them distinct 'name's")
    return modes
