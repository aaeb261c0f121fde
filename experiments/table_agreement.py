"""Do encoder and decoder build the same integer frequency tables when they run the prior under
different conditions (threads, devices, batching, compile options, another machine)?

  python experiments/table_agreement.py                         # full run here (~8 min, 2 cores)
  python experiments/table_agreement.py --quick --out /tmp/ta   # smoke run: 2 conditions, 10 maps
  python experiments/table_agreement.py --make_fixture          # rebuild the fixture (~10 min)
  PYTHONPATH=. python3 experiments/table_agreement.py --dump $OUT/tables_gpu.npz   # another machine (~50 s)
  python experiments/table_agreement.py --dump /tmp/tables_cpu.npz --dump_conditions cpu   # here
  python experiments/table_agreement.py --compare /tmp/tables_cpu.npz tables_gpu.npz --name compare_gpu

Fixture (``experiments/results/table_agreement_fixture.npz``, made once by ``--make_fixture``
and shipped, so every machine uses the same parameters and maps): per setup (V = 256 on 8x8
maps, V = 1024 on 16x16) the project's prior (`percov2_jax.entropy.mim.MaskedTokenPrior`,
width 128, 4 layers, 4 heads) trained here for a few hundred steps on token maps of nine
scikit-image photos, and held-out token maps of ten other photos (random position, 1-3x
downscale and flip). The tokeniser is a fixed stand-in for the hyper-encoder + VQ: per 8x8-pixel
patch of the luma, its mean, horizontal and vertical gradient and contrast, each quantised at
the training patches' quantiles, mixed-radix into one of V codes. A trained prior gives realistic
tables (peaked where the context predicts the token, flat elsewhere), which a randomly
initialised one (near uniform everywhere) would not. Parameters are stored as float16 values
and run in float32. The fixture also holds the row hashes of the ``default`` condition on the
machine that made it (``--compare`` recomputes a dump's missing float rows when they are those).

Rows: the codec's tables come from the prior's softmax at the positions of each ``qlds`` step
(12 steps), given the tokens of the earlier steps; one row per token of a map. For every
condition a subprocess (its own ``XLA_FLAGS``, thread count, device count) range-codes every map
with `token_coding.encode_with_prior`, recording the probabilities it quantised. Against
``default`` each condition reports rows whose float32 probabilities differ (and the largest
difference in ulps), rows whose tables (`coder.quantize_probabilities`) differ, and real
cross-decodes with `token_coding.decode_with_prior`: streams of ``default`` decoded under the
condition and back, for every map whose tables differ (at most ``--max_decodes``) and a sample
of maps whose tables agree. Batched conditions evaluate each map inside a batch whose other
slots hold the other maps (or the map's other steps) at the same step, as a batched coder would.

``--dump`` (jax, flax, numpy and the package only; where constriction is missing the pure-NumPy
quantiser is imported with a stand-in for it) runs the prior in one process under each condition
of that machine: its default backend at batch 1 (all maps), at ``highest`` matmul precision and
at batch 8, and its CPU (a quarter of the maps each), and writes per row a 64-bit hash of the
float32 probabilities and of the table at 3 mantissa bits (32-bit ones at 2, 1, 0 bits), plus the
float rows of the first maps of each setup, as many as fit in 9.5 MB. ``--compare`` counts the
differences between every two conditions of two dumps over all rows (hashes), the largest ulps
and simulated streams (encode under one side's tables, decode under the other's with the real
coder) over the maps whose floats both sides provide.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import results_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(results_io.RESULTS, "table_agreement_fixture.npz")
SCHEDULE = "qlds"
PATCH = 8  # pixels per token side
PRIOR = dict(width=128, num_layers=4, num_heads=4, mlp_ratio=4, max_side=16)
BATCH = 8
DUMP_BUDGET = 9_500_000  # bytes of a dump
HASH_BYTES = 8 + 8 + 3 * 4  # per row in a dump: float row, table, tables at 2, 1, 0 mantissa bits
MANTISSA_SWEEP = (3, 2, 1, 0)
REFERENCE = ("reference_float_hash", "reference_table_hash")  # this machine's default rows, in the fixture
# scikit-image photos: the prior trains on the first, the measured maps come from the second.
TRAIN_PHOTOS = "astronaut chelsea coffee rocket hubble_deep_field motorcycle_left cell text page".split()
HELD_OUT = "camera coins moon brick grass gravel clock motorcycle_right retina immunohistochemistry".split()


@dataclasses.dataclass(frozen=True)
class Setup:
    vocab: int
    side: int  # token map side
    levels: tuple[int, int, int, int]  # tokeniser levels of (mean, x gradient, y gradient, contrast)
    maps: int  # held-out maps in the fixture
    train_steps: int
    train_batch: int


SETUPS = {
    "v256_8x8": Setup(256, 8, (8, 4, 4, 2), 320, 600, 32),
    "v1024_16x16": Setup(1024, 16, (16, 4, 4, 4), 80, 300, 16),
}
QUICK_MAPS = {"v256_8x8": 8, "v1024_16x16": 2}


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str
    note: str
    flags: tuple[str, ...] = ()
    mode: str = "single"  # single | eager | maps_batched | steps_batched | sharded
    devices: int = 1
    one_core: bool = False
    store: str = ""  # "save" / "load": the codec's executable store (percov2_jax.compilation_cache)
    map_share: int = 1  # slow conditions run on the first 1/map_share of the maps


CONDITIONS = (
    Condition("default", "the codec's step function: jit, batch 1, 1 device, default XLA flags, all cores"),
    Condition("repeat", "default again, in another process"),
    Condition(
        "one_thread",
        "taskset -c 0, OMP_NUM_THREADS=1, --xla_cpu_multi_thread_eigen=false",
        ("--xla_cpu_multi_thread_eigen=false",),
        one_core=True,
    ),
    Condition("devices8", "8 virtual devices (--xla_force_host_platform_device_count=8), batch 1", devices=8),
    Condition("sharded8", "8 virtual devices, 8 maps per call split over a data=8 mesh", mode="sharded", devices=8),
    Condition("batch8", "8 maps per call (a batched decoder)", mode="maps_batched"),
    Condition("steps_batched", "a map's 12 steps in one call (an encoder only can)", mode="steps_batched"),
    Condition(
        "opt_level0",
        "--xla_backend_optimization_level=0 (the test suite's flag)",
        ("--xla_backend_optimization_level=0",),
    ),
    Condition("fast_math", "--xla_cpu_enable_fast_math=true", ("--xla_cpu_enable_fast_math=true",)),
    Condition("avx2", "--xla_cpu_max_isa=AVX2 (code for a CPU without AVX-512)", ("--xla_cpu_max_isa=AVX2",)),
    Condition("stored_save", "the codec's executable store: compiled, serialised, used", store="save"),
    Condition("stored_load", "the codec's executable store: deserialised in a fresh process", store="load"),
    Condition("eager", "no jit: op by op (every tenth of the maps: slow)", mode="eager", map_share=10),
)
BY_NAME = {c.name: c for c in CONDITIONS}
QUICK_CONDITIONS = ("default", "batch8")


# ------------------------------------------------------------------------------ fixture


def photo(name: str) -> np.ndarray:
    """Luma float64 ``[H, W]`` in [0, 255] of a scikit-image sample."""
    from skimage import data

    if name.startswith("motorcycle_"):
        image = data.stereo_motorcycle()[0 if name.endswith("left") else 1]
    else:
        image = getattr(data, name)()
    image = np.asarray(image, np.float64)
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114])
    return image if image.max() > 1 else image * 255.0


def random_crops(grey: np.ndarray, count: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """``count`` crops ``[size, size]`` at a random 1-3x box downscale, position and flip."""
    factors = [f for f in (1, 2, 3) if min(grey.shape) // f >= size]
    smalls = {}
    out, where = [], []
    for _ in range(count):
        f = factors[int(rng.integers(len(factors)))]
        if f not in smalls:
            h, w = grey.shape[0] // f, grey.shape[1] // f
            smalls[f] = grey[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3))
        small = smalls[f]
        y, x = int(rng.integers(small.shape[0] - size + 1)), int(rng.integers(small.shape[1] - size + 1))
        flip = int(rng.integers(4))  # bit 0: left-right, bit 1: up-down
        crop = small[y : y + size, x : x + size]
        crop = crop[:, ::-1] if flip & 1 else crop
        out.append(crop[::-1] if flip & 2 else crop)
        where.append([f, y, x, flip])
    return np.stack(out), where


def patch_features(crops: np.ndarray) -> np.ndarray:
    """``[N, S, S]`` pixels -> ``[N, S/8, S/8, 4]``: mean, x and y gradient, contrast per patch."""
    n, size, _ = crops.shape
    g, half = size // PATCH, PATCH // 2
    x = crops.reshape(n, g, PATCH, g, PATCH)
    mean = x.mean(axis=(2, 4))
    gx = x[..., half:].mean(axis=(2, 4)) - x[..., :half].mean(axis=(2, 4))
    gy = x[:, :, half:].mean(axis=(2, 4)) - x[:, :, :half].mean(axis=(2, 4))
    return np.stack([mean, gx, gy, x.std(axis=(2, 4))], axis=-1)


def tokenize(features: np.ndarray, edges: list, levels) -> np.ndarray:
    tokens = np.zeros(features.shape[:-1], np.int64)
    for i, count in enumerate(levels):
        tokens = tokens * count + np.searchsorted(edges[i], features[..., i], side="right")
    return tokens


def prior_model(setup: Setup):
    from percov2_jax.entropy import mim

    return mim.MaskedTokenPrior(mim.MIMConfig(vocab_size=setup.vocab, **PRIOR))


def train_prior(setup: Setup, maps: np.ndarray, seed: int) -> dict:
    """The prior trained on ``maps`` with M2T's masking (AdamW, warm-up + cosine); float32 tree."""
    import jax
    import optax

    from percov2_jax.entropy import mim
    from percov2_jax.models.layers import unboxed

    model = prior_model(setup)
    params = unboxed(mim.init_params(model, jax.random.key(seed), setup.side, setup.side))
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 50, setup.train_steps), weight_decay=1e-2)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, tokens, key):
        loss, grads = jax.value_and_grad(lambda p: mim.prior_loss(model.apply, p, tokens, key)[0])(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    for i in range(setup.train_steps):
        batch = maps[rng.integers(len(maps), size=setup.train_batch)]
        params, state, loss = step(params, state, batch, jax.random.key(i))
        if i % 100 == 0 or i == setup.train_steps - 1:
            print(f"  step {i}: {float(loss):.3f} bits per masked token", flush=True)
    return jax.device_get(params)


def make_fixture(path: str) -> None:
    """Tokenise the photos, train one prior per setup, store float16 parameters, maps and this
    machine's reference hashes."""
    import jax
    from flax import traverse_util

    arrays, meta = {}, {"prior": PRIOR, "schedule": SCHEDULE, "patch": PATCH, "setups": {}}
    train_grey = {name: photo(name) for name in TRAIN_PHOTOS}
    held_grey = {name: photo(name) for name in HELD_OUT}
    for seed, (key, setup) in enumerate(SETUPS.items()):
        size = setup.side * PATCH
        rng = np.random.default_rng(seed)
        train = np.concatenate([random_crops(g, 250, size, rng)[0] for g in train_grey.values()])
        train_features = patch_features(train)
        edges = [np.quantile(train_features[..., i], np.arange(1, n) / n) for i, n in enumerate(setup.levels)]
        per_photo = setup.maps // len(HELD_OUT)
        held, where = {}, {}
        for name, grey in held_grey.items():
            held[name], where[name] = random_crops(grey, per_photo, size, rng)
        # Map i is crop i // 10 of photo i % 10: any prefix of the maps spans the photos.
        order = [(name, j) for j in range(per_photo) for name in HELD_OUT]
        held_tokens = tokenize(patch_features(np.stack([held[n][j] for n, j in order])), edges, setup.levels)
        print(f"{key}: training on {len(train)} maps", flush=True)
        params = train_prior(setup, tokenize(train_features, edges, setup.levels).astype(np.int32), seed)
        flat = traverse_util.flatten_dict(params, sep="/")
        arrays.update({f"{key}/params/{p}": np.asarray(v, np.float16) for p, v in flat.items()})
        arrays[f"{key}/tokens"] = held_tokens.astype(np.int16)
        meta["setups"][key] = {
            **dataclasses.asdict(setup),
            "edges": [e.tolist() for e in edges],
            "maps": [[n, *where[n][j]] for n, j in order],
            "train_photos": list(TRAIN_PHOTOS),
            "train_maps": len(train),
        }
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(path, **arrays)
    fixture = load_fixture(path)  # the float16-rounded parameters, as every user sees them
    for key, item in fixture["setups"].items():
        rows = compute_rows(item, CONDITIONS[0], jax.devices()[0])
        arrays[f"{key}/reference_float_hash"] = row_hashes(rows)
        arrays[f"{key}/reference_table_hash"] = row_hashes(quantizer()(rows))
        meta["setups"][key]["heldout_bits_per_token"] = ideal_bits(rows, item)
    meta["reference"] = {"machine": results_io.machine(), "versions": results_io.versions("jax", "jaxlib", "flax")}
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


def load_fixture(path: str = FIXTURE) -> dict:
    """``{"meta", "digest", "setups": {key: {"setup", "tokens", "params", "reference_*"}}}``."""
    from flax import traverse_util

    if not os.path.exists(path):
        raise SystemExit(f"no fixture at {path}: python experiments/table_agreement.py --make_fixture")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        setups = {}
        for key in meta["setups"]:
            prefix = f"{key}/params/"
            flat = {k[len(prefix) :]: data[k].astype(np.float32) for k in data.files if k.startswith(prefix)}
            setups[key] = {
                "key": key,
                "setup": SETUPS[key],
                "tokens": data[f"{key}/tokens"].astype(np.int32),
                "params": traverse_util.unflatten_dict(flat, sep="/"),
                **{n: data[f"{key}/{n}"] for n in REFERENCE if f"{key}/{n}" in data},
            }
    return {"meta": meta, "digest": digest, "setups": setups}


# ------------------------------------------------------------------------------ the prior under a condition


def quantizer():
    """`coder.quantize_probabilities` (pure NumPy). Where constriction is missing (the GPU
    machine), coder.py is imported with a stand-in for the range coder, which is never called."""
    try:
        import constriction  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("constriction")
        stand_in.stream = types.SimpleNamespace(model=types.SimpleNamespace(Categorical=lambda **_: None))
        sys.modules["constriction"] = stand_in
    from percov2_jax.entropy import coder

    return coder.quantize_probabilities


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """uint64 ``[n]``: 64-bit BLAKE2b of each row's little-endian bytes."""
    data = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    digests = b"".join(hashlib.blake2b(r.tobytes(), digest_size=8).digest() for r in data)
    return np.frombuffer(digests, "<u8").astype(np.uint64)


def schedule_of(setup: Setup):
    from percov2_jax.entropy import schedules

    return schedules.make_schedule(SCHEDULE, setup.side, setup.side)


class InBatch:
    """Batch-1 step functions (`token_coding`'s signature) that evaluate their map inside a batch:
    the other slots hold the other maps of its group of 8 (``maps_batched``, ``sharded``) or the
    map's other steps (``steps_batched``), with their true tokens revealed up to that step. With
    ``cache`` a batch is computed once for all its members (encoding); without, every call runs it
    with the caller's own state in its slot (decoding)."""

    def __init__(self, batch_fn, tokens: np.ndarray, schedule, mode: str):
        self.batch_fn, self.tokens, self.mode, self.cache = batch_fn, tokens, mode, True
        self.masks = schedule.masks()
        self.step_of_count = {int(m.sum()): i for i, m in enumerate(self.masks)}
        self.saved: dict = {}

    def members(self, m: int, step: int) -> tuple[list, int]:
        if self.mode == "steps_batched":
            return [(m, s) for s in range(len(self.masks))], step
        start = m - m % BATCH
        return [(min(start + j, len(self.tokens) - 1), step) for j in range(BATCH)], m % BATCH

    def for_map(self, m: int):
        def probabilities(params, tokens, revealed, caption):
            tokens, revealed = np.asarray(tokens)[0], np.asarray(revealed)[0]
            members, slot = self.members(m, self.step_of_count[int(revealed.sum())])
            key = tuple(members)
            if self.cache and key in self.saved:
                return self.saved[key][slot]
            batch_tokens = np.stack([self.tokens[i] * self.masks[s] for i, s in members]).astype(np.int32)
            batch_revealed = np.stack([self.masks[s] for _, s in members])
            batch_tokens[slot], batch_revealed[slot] = tokens * revealed, revealed
            out = np.asarray(self.batch_fn(params, batch_tokens, batch_revealed))
            if self.cache:
                if len(self.saved) >= 2 * len(self.masks):
                    self.saved.clear()
                self.saved[key] = out
            return out[slot]

        return probabilities


class Unbatched:
    def __init__(self, fn):
        self.fn = fn

    def for_map(self, m: int):
        return self.fn


def step_functions(model, item: dict, mode: str, mesh=None):
    """``.for_map(m)``: the batch-1 step function for map ``m`` under ``mode``."""
    import jax
    import jax.numpy as jnp

    from percov2_jax import sharding
    from percov2_jax.entropy import token_coding

    if mode == "single":
        return Unbatched(token_coding.make_step_probabilities(model.apply))
    if mode == "eager":

        def eager(params, tokens, revealed, caption):
            logits = model.apply({"params": params}, tokens, revealed, caption)
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, logits.shape[-1])

        return Unbatched(eager)

    @jax.jit
    def batched(params, tokens, revealed):  # token_coding's step function, [B, ...]
        logits = model.apply({"params": params}, tokens, revealed, None)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(logits.shape[0], -1, logits.shape[-1])

    def run(params, tokens, revealed):
        if mesh is None:
            return batched(params, tokens, revealed)
        placed = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (tokens, revealed)]
        with sharding.activation_constraints(mesh):
            return batched(params, *placed)

    return InBatch(run, item["tokens"], schedule_of(item["setup"]), mode)


def prepared(item: dict, condition: Condition, device):
    """``(params on the device or mesh, step functions)`` for one setup under ``condition``."""
    import jax

    from percov2_jax import sharding

    mesh = None
    if condition.mode == "sharded":
        mesh = sharding.make_mesh(data=BATCH, devices=jax.devices()[:BATCH])
        params = sharding.replicate(item["params"], mesh)
    else:
        params = jax.device_put(item["params"], device)
    return params, step_functions(prior_model(item["setup"]), item, condition.mode, mesh)


def map_count(item: dict, condition: Condition, limit: int | None) -> int:
    n = len(item["tokens"]) if limit is None else min(limit, len(item["tokens"]))
    return max(1, n // condition.map_share)


def compute_rows(item: dict, condition: Condition, device, limit: int | None = None) -> np.ndarray:
    """float32 ``[maps * H * W, V]``: the probabilities each map's steps quantise, in coding order,
    from the same calls `token_coding.encode_with_prior` makes (no range coding)."""
    import jax

    schedule = schedule_of(item["setup"])
    params, functions = prepared(item, condition, device)
    out = []
    with jax.default_device(device):
        for m in range(map_count(item, condition, limit)):
            probabilities, tokens = functions.for_map(m), item["tokens"][m]
            passes = [probabilities(params, (tokens * r)[None], r[None], None) for r in schedule.masks()]
            out += [np.asarray(p)[g] for p, g in zip(passes, schedule.groups)]
    return np.concatenate(out)


# ------------------------------------------------------------------------------ one condition in a subprocess


def worker(args) -> None:
    """Under one condition: range-code every map (rows and payloads to ``--scratch``); with
    ``--against NAME``, compare the rows with NAME's and decode NAME's streams of the maps whose
    tables differ (and a sample of the others); with ``--decode``, decode the streams it names."""
    import jax

    from percov2_jax import compilation_cache
    from percov2_jax.entropy import coder, token_coding

    condition = BY_NAME[args.worker]
    jax.config.update("jax_enable_compilation_cache", False)
    info = {"devices": [str(d) for d in jax.devices()], "seconds": {}}
    if condition.store:
        store = os.path.join(args.scratch, "store")
        info["store_entries_at_start"] = len(os.listdir(store)) if os.path.isdir(store) else 0
        compilation_cache.configure(store)
    fixture = load_fixture(args.fixture)
    limits = json.loads(args.limits)
    here = os.path.join(args.scratch, condition.name)
    os.makedirs(here, exist_ok=True)
    tasks = json.loads(args.decode)
    for key, item in fixture["setups"].items():
        start = time.perf_counter()
        schedule = schedule_of(item["setup"])
        params, functions = prepared(item, condition, jax.devices()[0])
        if not args.decode_only:
            rows, payloads = [], []
            for m in range(map_count(item, condition, limits[key])):
                seen, probabilities = [], functions.for_map(m)

                def recording(*a, probabilities=probabilities, seen=seen):
                    seen.append(probabilities(*a))
                    return seen[-1]

                payloads.append(token_coding.encode_with_prior(recording, params, item["tokens"][m], schedule)[0])
                rows += [np.asarray(p)[g] for p, g in zip(seen, schedule.groups)]
            rows = np.concatenate(rows)
            np.save(os.path.join(here, f"{key}.npy"), rows)
            with open(os.path.join(here, f"{key}_payloads.json"), "w") as f:
                json.dump([p.hex() for p in payloads], f)
        info["seconds"][key] = time.perf_counter() - start
        if args.against:
            other = np.load(os.path.join(args.scratch, args.against, f"{key}.npy"))
            result = compare_rows(other, rows, item["setup"].side ** 2, quantizer())
            maps = decode_choice(result, item["setup"].side ** 2, args)
            with open(os.path.join(here, f"compare_{key}.json"), "w") as f:
                json.dump(result, f)
            if condition.mode != "steps_batched":  # no decoder can batch a map's steps
                tasks.append({"source": args.against, "setup": key, "maps": maps})
        functions.cache = False
        for task in (t for t in tasks if t["setup"] == key):
            with open(os.path.join(args.scratch, task["source"], f"{key}_payloads.json")) as f:
                payloads = [bytes.fromhex(p) for p in json.load(f)]
            outcomes = {}
            for m in task["maps"]:
                try:
                    tokens, _ = token_coding.decode_with_prior(functions.for_map(m), params, payloads[m], schedule)
                    outcomes[m] = "exact" if np.array_equal(tokens, item["tokens"][m]) else "wrong_tokens"
                except coder.CodingError:
                    outcomes[m] = "error"
            with open(os.path.join(here, f"decoded_{task['source']}_{key}.json"), "w") as f:
                json.dump(outcomes, f)
    with open(os.path.join(here, "decode_info.json" if args.decode_only else "info.json"), "w") as f:
        json.dump(info, f)


def decode_choice(result: dict, rows_per_map: int, args) -> list[int]:
    """The maps to cross-decode: those whose tables differ (``--max_decodes``), then ``--sample`` others."""
    agreeing = [m for m in range(result["rows"] // rows_per_map) if m not in result["table_maps"]]
    return result["table_maps"][: args.max_decodes] + agreeing[: args.sample]


def run_worker(condition: Condition, scratch: str, args, limits: dict, against="", decode=(), decode_only=False):
    flags = list(condition.flags)
    if condition.devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={condition.devices}")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PERCOV2_COMPILATION_CACHE")}
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    command = [sys.executable, os.path.abspath(__file__), "--worker", condition.name, "--scratch", scratch]
    command += ["--fixture", args.fixture, "--limits", json.dumps(limits), "--decode", json.dumps(list(decode))]
    command += ["--against", against, "--sample", str(args.sample), "--max_decodes", str(args.max_decodes)]
    if condition.one_core:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        command = ["taskset", "-c", "0", *command]
    if decode_only:
        command.append("--decode_only")
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"worker {condition.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ comparing rows


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the largest distance in float32 units in the last place (non-negative floats)."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max(axis=-1)


def compare_rows(a: np.ndarray, b: np.ndarray, rows_per_map: int, quantize) -> dict:
    """Float and table differences of two row arrays (tables only where the floats differ: equal
    floats give equal tables); with float differences, the table differences at fewer mantissa bits."""
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    differ = np.flatnonzero((a.view(np.uint32) != b.view(np.uint32)).any(axis=1))
    out = {"rows": n, "float_rows_differ": len(differ), "max_ulps": 0, "table_rows_differ": 0, "table_maps": []}
    if len(differ):
        u = ulps(a[differ], b[differ])
        out.update(max_ulps=int(u.max()), median_ulps_of_differing=float(np.median(u)))
        out["table_rows_differ_by_mantissa"] = {}
        for bits in MANTISSA_SWEEP:
            tables_a, tables_b = quantize(a[differ], mantissa_bits=bits), quantize(b[differ], mantissa_bits=bits)
            changed = differ[(tables_a != tables_b).any(axis=1)]
            out["table_rows_differ_by_mantissa"][str(bits)] = len(changed)
            if bits == MANTISSA_SWEEP[0]:
                out["table_rows_differ"] = len(changed)
                out["table_maps"] = sorted({int(r) // rows_per_map for r in changed})
    return out


def mantissa_cost(rows: np.ndarray, item: dict) -> dict:
    """Bits per token of the true tokens under the float rows and under the tables at each
    mantissa setting (the cost of a coarser quantisation grid)."""
    from percov2_jax.entropy import coder

    symbols = true_symbols(item, len(rows))
    out = {"float": ideal_bits(rows, item)}
    for bits in MANTISSA_SWEEP:
        tables = coder.quantize_probabilities(rows, mantissa_bits=bits)
        out[str(bits)] = coder.cross_entropy_bits(tables, symbols) / len(symbols)
    return out


def true_symbols(item: dict, n_rows: int) -> np.ndarray:
    order = schedule_of(item["setup"]).order
    return item["tokens"].reshape(len(item["tokens"]), -1)[:, order].reshape(-1)[:n_rows]


def ideal_bits(rows: np.ndarray, item: dict) -> float:
    symbols = true_symbols(item, len(rows))
    return float(-np.log2(rows[np.arange(len(rows)), symbols].astype(np.float64)).mean())


# ------------------------------------------------------------------------------ the local run


def run_local(args) -> dict:
    """Every condition against ``default``: its worker range-codes, compares and cross-decodes;
    at the end one ``default`` worker decodes every condition's streams of the same maps."""
    fixture = load_fixture(args.fixture)
    names = args.conditions.split(",") if args.conditions else [c.name for c in CONDITIONS]
    names = ["default"] + [
        n for n in (QUICK_CONDITIONS if args.quick and not args.conditions else names) if n != "default"
    ]
    limits = {k: (QUICK_MAPS[k] if args.quick else None) for k in fixture["setups"]}
    report = {"conditions": {}, "pairs": {}, "cost": {}}
    with tempfile.TemporaryDirectory(prefix="table_agreement_") as scratch:
        back = []  # (condition, setup, maps): its streams decoded under default at the end
        for name in names:
            condition = BY_NAME[name]
            seconds = run_worker(condition, scratch, args, limits, against="" if name == "default" else "default")
            with open(os.path.join(scratch, name, "info.json")) as f:
                report["conditions"][name] = {"note": condition.note, "process_s": seconds, **json.load(f)}
            print(f"{name}: {seconds:.0f} s", flush=True)
            if name == "default":
                continue
            pair = report["pairs"][name] = {}
            for key in fixture["setups"]:
                with open(os.path.join(scratch, name, f"compare_{key}.json")) as f:
                    pair[key] = json.load(f)
                decoded = os.path.join(scratch, name, f"decoded_default_{key}.json")
                if os.path.exists(decoded):
                    with open(decoded) as f:
                        pair[key]["default_to_condition"] = json.load(f)
                maps = decode_choice(pair[key], fixture["setups"][key]["setup"].side ** 2, args)
                back.append({"source": name, "setup": key, "maps": maps})
        if back:
            run_worker(BY_NAME["default"], scratch, args, limits, decode=back, decode_only=True)
            for task in back:
                with open(os.path.join(scratch, "default", f"decoded_{task['source']}_{task['setup']}.json")) as f:
                    report["pairs"][task["source"]][task["setup"]]["condition_to_default"] = json.load(f)
        for key, item in fixture["setups"].items():
            base = np.load(os.path.join(scratch, "default", f"{key}.npy"))
            reference = item.get("reference_float_hash")
            same = reference is not None and np.array_equal(row_hashes(base), reference[: len(base)])
            report["cost"][key] = {**mantissa_cost(base, item), "matches_fixture_reference": bool(same)}
    return report


def outcome_counts(outcomes: dict | None) -> str:
    if not outcomes:
        return "-"
    values = list(outcomes.values())
    return " / ".join(str(values.count(k)) for k in ("exact", "error", "wrong_tokens"))


def markdown(report: dict) -> str:
    meta = report["fixture"]
    quick = report["config"]["quick"]
    lines = [
        "# Do the prior's quantised tables agree across run conditions?" + (" (QUICK)" if quick else ""),
        "",
        *results_io.provenance(report),
        *results_io.busy_warning(report["machine"], "timings only; agreement does not depend on load"),
        f"Fixture `{os.path.relpath(FIXTURE, ROOT)}` (sha256 {report['fixture_digest'][:12]}): the project's "
        f"MIM prior (width {PRIOR['width']}, {PRIOR['num_layers']} layers, {PRIOR['num_heads']} heads) trained "
        f"on token maps of {len(TRAIN_PHOTOS)} scikit-image photos; held-out maps of {len(HELD_OUT)} others. "
        f"Schedule {SCHEDULE}, 12 steps; tables `quantize_probabilities(precision=24, mantissa_bits=3)`.",
        "",
        "Conditions (each in its own process; compared with `default`):",
        "",
    ]
    lines += [f"- `{name}`: {c['note']} ({c['process_s']:.0f} s)" for name, c in report["conditions"].items()]
    same = [n for n, p in report["pairs"].items() if not any(r["float_rows_differ"] for r in p.values())]
    lines += [
        "",
        f"**Bit-identical to `default` in every float row: {', '.join(same) or 'none'}. Differing: "
        + (", ".join(n for n in report["pairs"] if n not in same) or "none")
        + ".**",
        "",
        "Streams: each condition's streams of the maps whose tables differ (at most "
        f"{report['config']['max_decodes']}) and of {report['config']['sample']} maps whose tables agree, "
        "decoded by the other condition with `token_coding.decode_with_prior`: exact / error (a `CodingError`: "
        "detected) / wrong tokens (decoded without an error to other tokens: only the stream's checksum would "
        "catch it). `steps_batched` is an encoder-only condition: its streams are decoded by `default` only.",
        "",
    ]
    for key, meta_setup in meta["setups"].items():
        lines += [
            f"## {key}: V = {meta_setup['vocab']}, {meta_setup['side']}x{meta_setup['side']} maps "
            f"(prior: {meta_setup['heldout_bits_per_token']:.2f} bits/token on held-out maps, "
            f"uniform {np.log2(meta_setup['vocab']):.0f})",
            "",
            "| condition vs default | rows | rows whose floats differ | max ulps | rows whose tables differ "
            "| maps with table differences | streams default -> condition (exact / error / wrong tokens) "
            "| condition -> default |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for name, pair in report["pairs"].items():
            p = pair[key]
            lines.append(
                f"| {name} | {p['rows']} | {p['float_rows_differ']} | {p['max_ulps']} | {p['table_rows_differ']} "
                f"| {len(p['table_maps'])} | {outcome_counts(p.get('default_to_condition'))} "
                f"| {outcome_counts(p.get('condition_to_default'))} |"
            )
        lines.append("")
    sweep = [
        (name, key, p["table_rows_differ_by_mantissa"])
        for name, pair in report["pairs"].items()
        for key, p in pair.items()
        if p.get("table_rows_differ_by_mantissa")
    ]
    if sweep:
        lines += ["## Rows whose tables differ, by mantissa bits of the quantiser", ""]
        lines += ["| condition | setup | " + " | ".join(f"{b} bits" for b in MANTISSA_SWEEP) + " |"]
        lines += ["|---|---|" + "---:|" * len(MANTISSA_SWEEP)]
        for name, key, counts in sweep:
            lines.append(f"| {name} | {key} | " + " | ".join(str(counts[str(b)]) for b in MANTISSA_SWEEP) + " |")
        lines.append("")
    lines += ["## Cost of the quantisation grid (default's rows; bits per token of the true tokens)", ""]
    lines += ["| setup | float | " + " | ".join(f"{b} mantissa bits" for b in MANTISSA_SWEEP) + " |"]
    lines += ["|---|---:|" + "---:|" * len(MANTISSA_SWEEP)]
    for key, cost in report["cost"].items():
        cells = " | ".join(f"{cost[str(b)]:.4f}" for b in MANTISSA_SWEEP)
        lines.append(f"| {key} | {cost['float']:.4f} | {cells} |")
    lines += ["", "`default` reproduces the fixture's reference hashes (made in another process when the "
              "fixture was built): " + ", ".join(f"{k} {'yes' if c['matches_fixture_reference'] else 'NO'}"
                                                  for k, c in report["cost"].items()) + "."]  # fmt: skip
    lines += ["", f"Total {report['total_s']:.0f} s."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ dump and compare


def dump(path: str, fixture_path: str, conditions: list[str] | None, limit: int | None) -> None:
    """Per condition of this machine: hashes of every float row and of its tables at each mantissa
    setting, and the float rows of the first maps of each setup (the same maps for every condition)."""
    import contextlib

    import jax

    fixture = load_fixture(fixture_path)
    quantize = quantizer()
    backend = jax.default_backend()
    device = jax.devices()[0]
    runs = {  # label -> (condition, device, context, map share)
        backend: (BY_NAME["default"], device, contextlib.nullcontext, 1),
        f"{backend}_highest": (BY_NAME["default"], device, lambda: jax.default_matmul_precision("highest"), 4),
        f"{backend}_batch8": (BY_NAME["batch8"], device, contextlib.nullcontext, 4),
    }
    if backend != "cpu":
        runs["host_cpu"] = (BY_NAME["default"], jax.devices("cpu")[0], contextlib.nullcontext, 4)
    else:
        runs.pop(f"{backend}_highest")  # float32 CPU dots are exact-fp32 already
    labels = conditions or list(runs)
    setups = fixture["setups"]
    maps = {
        (label, key): len(item["tokens"][:limit]) // runs[label][3] or 1
        for label in labels
        for key, item in setups.items()
    }
    hash_bytes = sum(n * setups[key]["setup"].side ** 2 * HASH_BYTES for (_, key), n in maps.items())
    stored, left = {}, (DUMP_BUDGET - hash_bytes) // len(labels)
    for key in sorted(setups, key=lambda k: -setups[k]["setup"].side):  # the largest maps first: at least one
        size = setups[key]["setup"].side ** 2 * setups[key]["setup"].vocab * 4
        stored[key] = max(1, left // (len(setups) - len(stored)) // size)
        left -= stored[key] * size
    arrays, meta = {}, {"fixture_digest": fixture["digest"], "backend": backend, "conditions": {}, "failed": {}}
    for label in labels:
        condition, dev, context, _ = runs[label]
        start = time.perf_counter()
        found = {"devices": str(dev)}
        for key, item in setups.items():
            try:
                with context():
                    rows = compute_rows(item, condition, dev, maps[label, key])
            except Exception as e:  # a condition this jax cannot run: record it, go on
                meta["failed"][label] = f"{type(e).__name__}: {e}"
                break
            hw = item["setup"].side ** 2
            arrays[f"{label}/{key}/float_hash"] = floats = row_hashes(rows)
            for bits in MANTISSA_SWEEP:
                tables = row_hashes(quantize(rows, mantissa_bits=bits))
                arrays[f"{label}/{key}/table{bits}_hash"] = tables if bits == 3 else tables.astype(np.uint32)
            keep = min(stored[key], len(rows) // hw)
            arrays[f"{label}/{key}/probs"] = rows[: keep * hw]
            reference = item["reference_float_hash"][: len(rows)], item["reference_table_hash"][: len(rows)]
            found[key] = {
                "maps": len(rows) // hw,
                "stored_maps": keep,
                "maps_floats_differ_from_reference": int((floats != reference[0]).reshape(-1, hw).any(1).sum()),
                "maps_tables_differ_from_reference": int(
                    (arrays[f"{label}/{key}/table3_hash"] != reference[1]).reshape(-1, hw).any(1).sum()
                ),
            }
        else:
            meta["conditions"][label] = {**found, "seconds": time.perf_counter() - start}
        print(f"{label}: {json.dumps(meta['conditions'].get(label) or meta['failed'][label])}", flush=True)
    meta.update(machine=results_io.machine(), versions=results_io.versions("jax", "jaxlib", "flax"))
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


class DumpFile:
    """A ``--dump``: per condition label and setup, every row's hashes and some maps' float rows."""

    def __init__(self, path: str):
        with np.load(path) as data:
            self.arrays = {k: data[k] for k in data.files}
        self.meta = json.loads(str(self.arrays.pop("meta")))
        self.path = path

    def maps(self, label: str, key: str) -> int:
        return self.meta["conditions"][label][key]["maps"]

    def hashes(self, label: str, key: str, kind: str, n_rows: int) -> np.ndarray:
        return self.arrays[f"{label}/{key}/{kind}_hash"][:n_rows]

    def floats(self, label: str, key: str, m: int, item: dict, local=None) -> np.ndarray | None:
        """Map ``m``'s float rows: stored, or (with ``local``) recomputed here when they are the
        fixture's reference rows and the recomputation reproduces them; else None."""
        hw = item["setup"].side ** 2
        if m < self.meta["conditions"][label][key]["stored_maps"]:
            return self.arrays[f"{label}/{key}/probs"][m * hw : (m + 1) * hw]
        mine = self.arrays[f"{label}/{key}/float_hash"][m * hw : (m + 1) * hw]
        if local is None or not np.array_equal(mine, item["reference_float_hash"][m * hw : (m + 1) * hw]):
            return None
        rows = local(key, m)
        return rows if np.array_equal(row_hashes(rows), mine) else None


def simulate_stream(tables_a: list, tables_b: list, symbols: list) -> str:
    """Encode the steps with A's tables and decode with B's (the real coder): until a step decodes
    wrong tokens B's tables are the decoder's; after that its context is wrong, so stop there."""
    from percov2_jax.entropy import coder

    payload = coder.encode_tokens(zip(tables_a, symbols))
    decoder = coder.TokenDecoder(payload)
    try:
        for table, truth in zip(tables_b, symbols):
            if not np.array_equal(decoder.decode_step(table), truth):
                return "wrong_tokens"
        decoder.finish()
    except coder.CodingError:
        return "error"
    return "exact"


def compare(path_a: str, path_b: str, fixture_path: str) -> dict:
    """Every pair of conditions among the two dumps (A's and B's labels together)."""
    import itertools

    fixture = load_fixture(fixture_path)
    quantize = quantizer()
    dumps = {"A": DumpFile(path_a)}
    if os.path.abspath(path_b) != os.path.abspath(path_a):
        dumps["B"] = DumpFile(path_b)
    for d in dumps.values():
        if d.meta["fixture_digest"] != fixture["digest"]:
            raise SystemExit(f"{d.path} was made from another fixture than {fixture_path}")
    cache = {}

    def local(key, m):  # this machine's default rows of one map
        if (key, m) not in cache:
            import jax

            item = dict(fixture["setups"][key], tokens=fixture["setups"][key]["tokens"][m : m + 1])
            cache[key, m] = compute_rows(item, BY_NAME["default"], jax.devices()[0])
        return cache[key, m]

    entries = [(side, label) for side, d in dumps.items() for label in d.meta["conditions"]]
    report = {"dumps": {side: {"path": d.path, **d.meta} for side, d in dumps.items()}, "pairs": {}}
    for (sa, la), (sb, lb) in itertools.combinations(entries, 2):
        a, b = dumps[sa], dumps[sb]
        result = report["pairs"][f"{sa}:{la} vs {sb}:{lb}"] = {}
        for key, item in fixture["setups"].items():
            hw = item["setup"].side ** 2
            n = min(a.maps(la, key), b.maps(lb, key))
            fa, fb = a.hashes(la, key, "float", n * hw), b.hashes(lb, key, "float", n * hw)
            ta, tb = a.hashes(la, key, "table3", n * hw), b.hashes(lb, key, "table3", n * hw)
            table_maps = set(np.flatnonzero((ta != tb).reshape(n, hw).any(axis=1)).tolist())
            float_maps = np.flatnonzero((fa != fb).reshape(n, hw).any(axis=1)).tolist()
            r = result[key] = {
                "rows": n * hw,
                "float_rows_differ": int((fa != fb).sum()),
                "table_rows_differ": int((ta != tb).sum()),
                "maps": n,
                "maps_tables_differ": len(table_maps),
                "max_ulps": 0,
                "rows_with_floats_both_sides": 0,
                "streams_a_to_b": {},
                "streams_b_to_a": {},
                "by_mantissa": {},
            }
            for bits in MANTISSA_SWEEP:
                changed = a.hashes(la, key, f"table{bits}", n * hw) != b.hashes(lb, key, f"table{bits}", n * hw)
                r["by_mantissa"][str(bits)] = {
                    "rows": int(changed.sum()),
                    "maps": int(changed.reshape(n, hw).any(1).sum()),
                }
            symbols = true_symbols(item, n * hw).reshape(n, hw)
            bounds = np.cumsum(schedule_of(item["setup"]).group_sizes)[:-1]
            for m in float_maps:
                rows_a, rows_b = a.floats(la, key, m, item), b.floats(lb, key, m, item)
                if rows_a is None and rows_b is None:
                    continue
                rows_a = a.floats(la, key, m, item, local) if rows_a is None else rows_a
                rows_b = b.floats(lb, key, m, item, local) if rows_b is None else rows_b
                if rows_a is None or rows_b is None:
                    continue
                r["rows_with_floats_both_sides"] += hw
                r["max_ulps"] = max(r["max_ulps"], int(ulps(rows_a, rows_b).max()))
                if m in table_maps:
                    qa, qb, truth = (np.split(v, bounds) for v in (quantize(rows_a), quantize(rows_b), symbols[m]))
                    r["streams_a_to_b"][m] = simulate_stream(qa, qb, truth)
                    r["streams_b_to_a"][m] = simulate_stream(qb, qa, truth)
    return report


def compare_markdown(report: dict) -> str:
    lines = ["# Quantised tables: two dumps compared", "", f"Command: `{report['command']}`", ""]
    for side, d in report["dumps"].items():
        lines.append(
            f"- {side}: `{d['path']}`, backend {d['backend']}; {results_io.describe_machine(d['machine'])} "
            f"{results_io.describe_versions(d['versions'])}"
        )
    lines += [
        "",
        "Float rows and table rows are compared over all maps (by hashes); ulps and streams over the maps "
        "whose floats both sides provide. Streams, for those of them whose tables differ (identical tables "
        "decode exactly), simulated with the real coder: exact / error (a `CodingError`) / wrong tokens (a step "
        "decoded other tokens; the real decoder would go on from a wrong context and fail either way).",
        "",
        "| X vs Y | setup | rows | rows whose floats differ | rows whose tables differ | maps with table differences "
        "| max ulps (rows with floats on both sides) | streams X -> Y | streams Y -> X |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for pair, result in report["pairs"].items():
        for key, r in result.items():
            covered = len(r["streams_a_to_b"])
            lines.append(
                f"| {pair} | {key} | {r['rows']} | {r['float_rows_differ']} | {r['table_rows_differ']} "
                f"| {r['maps_tables_differ']} | {r['max_ulps']} ({r['rows_with_floats_both_sides']}) "
                f"| {outcome_counts(r['streams_a_to_b'])} of {covered} | {outcome_counts(r['streams_b_to_a'])} |"
            )
    lines += [
        "",
        "Rows (maps) whose tables differ when the quantiser keeps fewer mantissa bits "
        "(`quantize_probabilities(mantissa_bits=...)`; 3 is the codec's), over all rows.",
        "",
        "| X vs Y | setup | rows | " + " | ".join(f"{b} mantissa bits" for b in MANTISSA_SWEEP) + " |",
        "|---|---|---:|" + "---:|" * len(MANTISSA_SWEEP),
    ]
    for pair, result in report["pairs"].items():
        for key, r in result.items():
            cells = " | ".join(f"{c['rows']} ({c['maps']})" for c in r["by_mantissa"].values())
            lines.append(f"| {pair} | {key} | {r['rows']} | {cells} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", default=FIXTURE)
    ap.add_argument("--max_decodes", type=int, default=16, help="cross-decodes of maps whose tables differ")
    ap.add_argument("--sample", type=int, default=2, help="cross-decodes of maps whose tables agree")
    ap.add_argument("--conditions", help=f"comma-separated subset of {', '.join(BY_NAME)} (default: all)")
    ap.add_argument("--make_fixture", action="store_true", help="tokenise the photos and train the priors")
    ap.add_argument("--dump", metavar="FILE", help="write this machine's row hashes and float rows")
    ap.add_argument("--dump_conditions", help="comma-separated labels (default: all of this machine's)")
    ap.add_argument("--dump_maps", type=int, help="maps per setup in a dump (default: all)")
    ap.add_argument("--compare", nargs=2, metavar=("FILE_A", "FILE_B"), help="two --dump files (or one twice)")
    ap.add_argument("--name", default="compare", help="--compare writes table_agreement_NAME.{json,md} in --out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    ap.add_argument("--limits", help=argparse.SUPPRESS)
    ap.add_argument("--decode", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--against", default="", help=argparse.SUPPRESS)
    ap.add_argument("--decode_only", action="store_true", help=argparse.SUPPRESS)
    results_io.add_output_arguments(ap, "conditions default and batch8 on 10 maps")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.make_fixture:
        return make_fixture(args.fixture)
    if args.dump:
        labels = args.dump_conditions.split(",") if args.dump_conditions else None
        return dump(args.dump, args.fixture, labels, args.dump_maps)
    if args.compare:
        report = compare(*args.compare, args.fixture)
        report["command"] = results_io.command()
        results_io.write_report(args.out, f"table_agreement_{args.name}", report, compare_markdown(report))
        return None
    start = time.perf_counter()
    machine = results_io.machine()
    report = {
        "command": results_io.command(),
        "config": {"quick": args.quick, "max_decodes": args.max_decodes, "sample": args.sample, "batch": BATCH},
        "machine": machine,
        "versions": results_io.versions("jax", "jaxlib", "flax", "numpy"),
    }
    report.update(run_local(args))
    fixture = load_fixture(args.fixture)
    report["fixture"], report["fixture_digest"] = fixture["meta"], fixture["digest"]
    report["total_s"] = time.perf_counter() - start
    results_io.finish_machine(machine)
    results_io.write_report(args.out, results_io.stem("table_agreement", args.quick), report, markdown(report))
    return None


if __name__ == "__main__":
    main()
