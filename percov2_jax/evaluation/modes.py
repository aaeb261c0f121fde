"""Operating modes of an evaluation: sampling steps x guidance scale x token coding.

  parse_modes("steps=20,guidance=3;steps=2,guidance=1;steps=20,guidance=3,hybrid_groups=2")

One mode per ``;``-separated item of ``key=value`` pairs:

- ``steps`` (``sample_steps``): Euler steps of the decoder's sampler;
- ``guidance`` (``cfg``, ``guidance_scale``): classifier-free guidance on the caption;
- token coding, as `percov2_jax.codec.token_codec.TokenCoding` fields: ``entropy_mode``
  (uniform | prior), ``schedule``, ``coding_steps`` (the schedule's steps), ``hybrid_groups``,
  ``temperature``, ``hybrid_seed``;
- ``name``: the label in tables and plots (default e.g. ``s20_g3`` or ``s20_g3_h2``).

Omitted fields take the codec's defaults (the checkpoint's ``sample`` config and coding). Modes
that share a token coding share their bitstreams: the image is compressed once per coding.
PerCo's observation (method §6): at low rates few steps give the best MS-SSIM and worse FID,
many steps the reverse; PerCoV2's Fig. 1 sweeps steps x guidance.
"""

from __future__ import annotations

import dataclasses

_ALIASES = {"steps": "sample_steps", "sample_steps": "sample_steps", "guidance": "guidance_scale",
            "cfg": "guidance_scale", "guidance_scale": "guidance_scale", "name": "name",
            "entropy_mode": "entropy_mode", "schedule": "schedule", "coding_steps": "steps",
            "hybrid_groups": "hybrid_groups", "temperature": "temperature", "hybrid_seed": "seed"}
_INT = ("sample_steps", "steps", "hybrid_groups", "seed")
_FLOAT = ("guidance_scale", "temperature")


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
        return {"name": self.name, "sample_steps": self.sample_steps, "guidance_scale": self.guidance_scale,
                "coding": self.coding_overrides}


def _default_name(steps: int, guidance: float, coding: dict) -> str:
    name = f"s{steps}_g{guidance:g}"
    if coding.get("entropy_mode"):
        name += "_" + coding["entropy_mode"]
    if coding.get("schedule"):
        name += "_" + coding["schedule"]
    if coding.get("hybrid_groups") is not None:
        name += f"_h{coding['hybrid_groups']}"
    return name


def parse_modes(spec: str, default_steps: int, default_guidance: float) -> list[Mode]:
    """``spec`` (module docstring) -> modes; an empty spec gives the one default mode.

    Raises ValueError naming the item for unknown keys, bad values or duplicate names."""
    modes = []
    for item in [part.strip() for part in (spec or "").split(";") if part.strip()] or [""]:
        fields: dict = {}
        for pair in [p.strip() for p in item.split(",") if p.strip()]:
            key, sep, value = pair.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in _ALIASES:
                raise ValueError(f"mode {item!r}: {pair!r} is not key=value with a key in {sorted(_ALIASES)}")
            field = _ALIASES[key]
            if field in fields:
                raise ValueError(f"mode {item!r}: {field} given twice")
            try:
                fields[field] = int(value) if field in _INT else float(value) if field in _FLOAT else value
            except ValueError:
                raise ValueError(f"mode {item!r}: {key}={value!r} is not a number") from None
        steps = int(fields.pop("sample_steps", default_steps))
        guidance = float(fields.pop("guidance_scale", default_guidance))
        if steps < 1:
            raise ValueError(f"mode {item!r}: steps must be >= 1, got {steps}")
        name = fields.pop("name", None)
        coding = dict(sorted(fields.items()))
        modes.append(Mode(name or _default_name(steps, guidance, coding), steps, guidance, tuple(coding.items())))
    names = [m.name for m in modes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"modes with the same name {duplicates}; give them distinct name=...")
    return modes
