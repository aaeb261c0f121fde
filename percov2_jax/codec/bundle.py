"""The inference bundle: what a codec needs from its training runs and nothing else, in files that
load fast. ``percov2 export RUN OUT`` writes one; ``Codec.from_workdir(OUT)`` (and ``--checkpoint
OUT``) reads it, and codes exactly as the run does: the same streams byte for byte, the same
pixels, the same model ids.

  OUT/
    bundle.json        format and version; the model ids; where it came from (run, step, which
                       weights, prior run and step); the run's config; the latent codec's
                       module; the prior's config; the text encoders' checkpoint (a reference:
                       the SD3 encoders are not copied); every array's name, shape, dtype and
                       logical axes
    stage1.npz         the PerCoV2 parameters the codec decodes with (the run's weight EMA when
                       it kept one, as `percov2_jax.runs.stage1.load_stage1` chooses) under
                       ``params/...`` and the VQ statistics under ``vq_stats/...``
    latent_codec.npz   the frozen latent codec: the SD3 VAE, or the fitted stand-in of tiny runs
    prior.npz          the stage-2 prior's parameters (absent when the bundle has no prior)

Why not the run itself: a run's checkpoint is an orbax train state (optimizer moments, data
position), read through orbax's machinery; a bundle is plain ``.npz`` files (uncompressed zip,
CRC-checked) and JSON, read with NumPy and placed on the devices in one step, with no training
code imported. Arrays NumPy has no dtype for (bfloat16) are stored as same-width unsigned
integers and viewed back through the dtype ``bundle.json`` names.

The arrays are written first and ``bundle.json`` last, so an interrupted export leaves a folder
that `load` refuses (as it refuses a missing or damaged file, a wrong shape, or arrays whose
model id is not the one recorded), with one `BundleError` naming the problem. Paths may be local
or ``gs://`` (`percov2_jax.storage`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from typing import Any

import numpy as np
from etils import epath

from percov2_jax import storage

# JAX is imported where arrays are placed: the command line imports `BundleError` without it.

FORMAT = "percov2-jax/codec-bundle"
VERSION = 1
MANIFEST = "bundle.json"
STAGE1, LATENT_CODEC, PRIOR = "stage1", "latent_codec", "prior"
PARTS = (STAGE1, LATENT_CODEC, PRIOR)


class BundleError(ValueError):
    """A folder is not a complete, undamaged codec bundle (or one of a newer format)."""


@dataclasses.dataclass
class Bundle:
    """A loaded bundle: ``stage1`` (a `percov2_jax.runs.stage1.Stage1Model`), the stage-1
    ``model_id`` and the ``prior`` (a `percov2_jax.codec.token_payload.TokenPrior`, or None)."""

    root: epath.Path
    manifest: dict
    stage1: Any
    model_id: int
    prior: Any


def part_file(part: str) -> str:
    return f"{part}.npz"


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a bundle, whole or partial (its manifest or any of its array files)."""
    root = storage.path(path)
    return any((root / name).exists() for name in (MANIFEST, *map(part_file, PARTS)))


# ---------------------------------------------------------------------------------------- export


def export(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    prior: str | os.PathLike | bool | None = None,
    prior_step: int | None = None,
    text_checkpoint: str = "",
    overwrite: bool = False,
) -> dict:
    """Write the bundle of a stage-1 run's latest (or ``step``) checkpoint to ``out``; returns its
    manifest. ``prior`` as in ``Codec.from_workdir``: None takes ``RUN/prior`` when trained, a
    path that stage-2 run, False none. ``text_checkpoint``: the SD3 text encoders the bundle's
    codec should load (a reference; default: those the run's config names)."""
    import jax
    import jax.numpy as jnp

    from percov2_jax import build
    from percov2_jax.codec.api import load_token_prior, model_fingerprint
    from percov2_jax.runs.layout import RunDir
    from percov2_jax.runs.stage1 import load_stage1

    root = storage.path(out)
    run = RunDir(run)
    if root == run.root or root == run.root / "prior":
        raise ValueError(f"{root}: the bundle must go to a folder of its own, not into the run")
    if (root / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{root} already holds a bundle; pass overwrite=True (--overwrite) to replace it")
    stage1 = load_stage1(run, step, with_text=False)
    model_id = model_fingerprint(stage1.config, stage1.vq_stats)
    source = {"run": os.fspath(run.root), "step": stage1.step, "weights": stage1.weights}
    token_prior = None
    if prior is None and run.prior.has_checkpoint():
        prior = run.prior
    if prior:
        from percov2_jax.runs import checkpointing
        from percov2_jax.runs.prior import read_prior_meta

        prior_run = RunDir(prior)
        token_prior = load_token_prior(prior_run, prior_step, expected_stage1_id=model_id)
        source["prior_run"] = os.fspath(prior_run.root)
        source["prior_step"] = checkpointing.latest_step(prior_run, prior_step)
        source["prior_meta"] = read_prior_meta(prior_run, prior_step)

    axes = _logical_axes(stage1.model, build.init_inputs(stage1.model, stage1.rate))
    arrays = {
        STAGE1: _flatten({"params": stage1.params, "vq_stats": stage1.vq_stats}),
        LATENT_CODEC: _flatten(stage1.latent_codec_params),
    }
    if token_prior is not None:
        arrays[PRIOR] = _flatten(token_prior.params)
    codec_module = stage1.latent_codec
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model_id": model_id,
        "prior_model_id": None,
        "source": source,
        "config": json.loads(stage1.config.to_json()),
        "latent_codec": {
            "class": type(codec_module).__name__,
            "config": codec_module.config.to_dict(),
            "dtype": jnp.dtype(codec_module.dtype).name,
            "param_dtype": jnp.dtype(codec_module.param_dtype).name,
        },
        "text_checkpoint": os.fspath(storage.path(text_checkpoint)) if text_checkpoint else "",
        "prior": None,
        "arrays": {},
    }
    if token_prior is not None:
        from percov2_jax.codec import bitstream

        manifest["prior"] = {"config": token_prior.model.config.to_dict(), "digest": token_prior.digest}
        manifest["prior_model_id"] = bitstream.model_fingerprint(
            json.dumps({"stage1": model_id, "prior": token_prior.digest})
        )
    if (root / MANIFEST).exists():
        (root / MANIFEST).unlink()  # a rewrite interrupted from here on is an incomplete bundle
    for part in PARTS:
        if part not in arrays:
            if (root / part_file(part)).exists():
                (root / part_file(part)).unlink()
            continue
        host = {k: np.asarray(jax.device_get(v)) for k, v in arrays[part].items()}
        manifest["arrays"][part] = {
            k: {"shape": list(a.shape), "dtype": a.dtype.name, **({"axes": axes.get(k, [])} if part == STAGE1 else {})}
            for k, a in host.items()
        }
        buffer = io.BytesIO()
        np.savez(buffer, **{k: _storable(a) for k, a in host.items()})
        storage.write_bytes(root / part_file(part), buffer.getvalue())
    storage.write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _logical_axes(model, example_inputs) -> dict[str, list]:
    """``{"params/a/b": [logical axis names]}`` of every variable of ``model`` (JSON: tuples as lists)."""
    import flax.linen as nn
    import jax
    from flax.core import unfreeze

    from percov2_jax import sharding

    specs = unfreeze(nn.get_partition_spec(sharding.abstract_boxed_variables(model, example_inputs)))
    spec = jax.sharding.PartitionSpec
    as_json = jax.tree.map(
        lambda s: [list(a) if isinstance(a, tuple) else a for a in s], specs, is_leaf=lambda x: isinstance(x, spec)
    )
    return _flatten(as_json)


def _storable(a: np.ndarray) -> np.ndarray:
    """``a`` as NumPy can save it: dtypes it lacks (bfloat16, float8) as unsigned integers."""
    if a.dtype.kind == "V" or type(a.dtype).__module__.startswith("ml_dtypes"):
        return a.view(np.dtype(f"u{a.dtype.itemsize}"))
    return a


# ------------------------------------------------------------------------------------------ load


def read_manifest(path: str | os.PathLike) -> dict:
    """``bundle.json`` of the bundle at ``path``, checked; `BundleError` when absent or unusable."""
    root = storage.path(path)
    try:
        text = storage.read_text(root / MANIFEST)
    except FileNotFoundError:
        present = [part_file(p) for p in PARTS if (root / part_file(p)).exists()]
        raise BundleError(
            f"{root}: an incomplete codec bundle: it has {', '.join(present) or 'no arrays'} but no {MANIFEST} "
            "(an interrupted export? run percov2 export again)"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{root / MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{root / MANIFEST}: not a percov2-jax codec bundle (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise BundleError(
            f"{root}: bundle format version {manifest.get('version')!r}; this percov2-jax reads version {VERSION}"
        )
    missing = [k for k in ("model_id", "config", "latent_codec", "arrays", "source") if k not in manifest]
    if missing or STAGE1 not in manifest["arrays"] or LATENT_CODEC not in manifest["arrays"]:
        raise BundleError(f"{root / MANIFEST}: incomplete manifest (missing {missing or 'array lists'})")
    return manifest


def load(
    path: str | os.PathLike,
    *,
    mesh: Any = None,
    text_checkpoint: str = "",
    with_prior: bool = True,
) -> Bundle:
    """A bundle onto this process's first local device, or onto ``mesh`` (a ``(data, fsdp,
    tensor)`` mesh of this process's devices: parameters placed by the logical-axis rule table, as
    `load_stage1` places them). ``text_checkpoint`` replaces the text encoders the bundle refers
    to; ``with_prior=False`` leaves its prior unread."""
    import flax.linen as nn
    import jax
    import ml_collections

    from percov2_jax import build, sharding
    from percov2_jax.codec.api import model_fingerprint
    from percov2_jax.runs.stage1 import Stage1Model

    root = storage.path(path)
    manifest = read_manifest(root)
    config = ml_collections.ConfigDict(manifest["config"])
    if mesh is None:
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    elif not all(d.process_index == jax.process_index() for d in mesh.devices.flat):
        raise ValueError("the inference mesh must hold only this process's devices (inference runs per process)")
    try:
        rate = build.validate_config(config, process_count=1)
        model = build.build_model(config, rate)
        latent_codec = _latent_codec_module(manifest["latent_codec"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{root / MANIFEST}: its configs do not build the codec's networks: {e}") from None

    stage1_host = _read_part(root, STAGE1, manifest)
    codec_host = _read_part(root, LATENT_CODEC, manifest)
    model_id = model_fingerprint(
        config, _unflatten({k[9:]: v for k, v in stage1_host.items() if k.startswith("vq_stats/")})
    )
    if model_id != manifest["model_id"]:
        raise BundleError(
            f"{root}: its VQ statistics and config give model id {model_id:06x}, not the {manifest['model_id']:06x} "
            "it records (a damaged or edited bundle)"
        )
    specs = {
        k: jax.sharding.PartitionSpec(*(tuple(a) if isinstance(a, list) else a for a in v["axes"]))
        for k, v in manifest["arrays"][STAGE1].items()
    }
    shardings = nn.logical_to_mesh_sharding(specs, mesh, sharding.LOGICAL_AXIS_RULES)
    placed = _unflatten({k: jax.device_put(v, shardings[k]) for k, v in stage1_host.items()})

    token_prior = None
    if with_prior and manifest.get("prior"):
        token_prior = _load_prior(root, manifest)
    text = build.build_text_conditioner(
        config,
        encode_captions=True,
        text_checkpoint=text_checkpoint or manifest.get("text_checkpoint", ""),
        what=f"the bundle {root}",
    )
    source = manifest["source"]
    stage1 = Stage1Model(
        config,
        rate,
        model,
        placed["params"],
        placed.get("vq_stats", {}),
        latent_codec,
        sharding.replicate(_unflatten(codec_host), mesh),
        text,
        mesh,
        int(source.get("step", 0)),
        source.get("weights", "params"),
    )
    return Bundle(root, manifest, stage1, model_id, token_prior)


def _load_prior(root: epath.Path, manifest: dict):
    import jax

    from percov2_jax.codec.token_payload import TokenPrior
    from percov2_jax.entropy import mim

    try:
        model = mim.MaskedTokenPrior(mim.MIMConfig.from_dict(manifest["prior"]["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{root / MANIFEST}: its prior config is unusable: {e}") from None
    host = _read_part(root, PRIOR, manifest)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    prior = TokenPrior.from_params(model, _unflatten({k: jax.device_put(v, device) for k, v in host.items()}))
    if prior.digest != manifest["prior"].get("digest"):
        raise BundleError(
            f"{root}: its prior's weights do not match the digest it records (a damaged or edited bundle)"
        )
    return prior


LATENT_CODECS = {
    "PatchAutoencoder": ("percov2_jax.models.patch_autoencoder", "PatchAutoencoder", "PatchAutoencoderConfig"),
    "ConvAutoencoder": ("percov2_jax.models.conv_autoencoder", "ConvAutoencoder", "ConvAutoencoderConfig"),
    "AutoencoderKL": ("percov2_jax.models.vae", "AutoencoderKL", "AutoencoderKLConfig"),
}


def _latent_codec_module(spec: dict):
    """The latent codec's Flax module from its manifest entry; dtypes passed only when they are
    not the module's defaults, so the module equals the one the run builds."""
    import importlib

    import jax.numpy as jnp

    if spec["class"] not in LATENT_CODECS:
        raise ValueError(f"unknown latent codec {spec['class']!r}; known: {sorted(LATENT_CODECS)}")
    module_name, cls_name, config_name = LATENT_CODECS[spec["class"]]
    module = importlib.import_module(module_name)
    cls, config_cls = getattr(module, cls_name), getattr(module, config_name)
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name in ("dtype", "param_dtype")}
    options = {k: jnp.dtype(spec[k]) for k, default in fields.items() if jnp.dtype(spec[k]) != jnp.dtype(default)}
    return cls(config=config_cls.from_dict(spec["config"]), **options)


def _read_part(root: epath.Path, part: str, manifest: dict) -> dict[str, np.ndarray]:
    """The arrays of ``PART.npz``, checked against the manifest's names, shapes and dtypes."""
    listed = manifest["arrays"].get(part)
    if listed is None:
        raise BundleError(f"{root / MANIFEST}: lists no arrays of {part}")
    where = root / part_file(part)
    try:
        if storage.is_url(where):
            source: Any = io.BytesIO(storage.read_bytes(where))
        else:
            source = os.fspath(where)
        with np.load(source, allow_pickle=False) as stored:
            names = set(stored.files)
            if names != set(listed):
                missing, extra = sorted(set(listed) - names), sorted(names - set(listed))
                raise BundleError(
                    f"{where}: its arrays do not match {MANIFEST} (missing {missing[:3]}, unlisted {extra[:3]})"
                )
            arrays = {k: stored[k] for k in listed}
    except FileNotFoundError:
        raise BundleError(f"{root}: {part_file(part)} is missing (an incomplete bundle)") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{where}: unreadable ({e}); the bundle is damaged") from None
    import jax.numpy as jnp

    out = {}
    for k, entry in listed.items():
        a, dtype = arrays[k], jnp.dtype(entry["dtype"])
        if a.dtype != dtype:
            if a.dtype.itemsize != dtype.itemsize or a.dtype.kind != "u":
                raise BundleError(f"{where}: {k} is {a.dtype}, {MANIFEST} says {dtype}")
            a = a.view(dtype)
        if list(a.shape) != list(entry["shape"]):
            raise BundleError(f"{where}: {k} has shape {list(a.shape)}, {MANIFEST} says {entry['shape']}")
        out[k] = a
    return out


# ------------------------------------------------------------------------------------ array trees


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A tree of nested dicts -> ``{"a/b/c": leaf}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        key = str(key)
        if "/" in key:
            raise ValueError(f"parameter name {key!r} contains '/'")
        out.update(_flatten(value, f"{prefix}/{key}" if prefix else key))
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
