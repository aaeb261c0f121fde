"""Bits per token of the hyper-latent tokens of real photographs: uniform coding, a unigram
model, the MIM prior under each coding schedule, and the explicit VAR, at 8x8 and 32x32.

  python experiments/entropy_schedules.py --stage1 /tmp/percov2_demo        # after `make demo`
  python experiments/entropy_schedules.py --stage1 DIR --steps 8:1200,32:400 --out experiments/results
  python experiments/entropy_schedules.py --plot_only   # redraw the PNG from the JSON in --out, no training
  python experiments/entropy_schedules.py --stage1 DIR --quick --out /tmp/entropy   # smoke run: 8x8, files *_quick*

Tokens: the frozen stage-1 model of ``--stage1`` (the demo's tiny PerCoV2 at the ``extreme``
rate, 16 px per token) on random crops of the 12 scikit-image photos (colour and grey):
128 px crops give 8x8 maps, 512 px crops 32x32 maps. Crops take a random scale (1-1.6x the
cover size), position and flip. Three photos are held out (``--test``): the priors are trained
on crops of the other nine and evaluated on crops of the held-out three, so every number below
is for images the prior never saw. (The stage-1 model did see the colour photos; it only makes
the tokens.)

Models, per grid size, trained here for the same number of steps (``--steps``) each:
- MIM: the masked-image-model prior (percov2_jax.entropy.mim), M2T's uniform 5-99% masking,
  no caption; ONE model is evaluated under every schedule (as M2T does).
- VAR: the explicit-hierarchical VAR (percov2_jax.entropy.var) over a non-residual pyramid
  with scales 1, 2, 4, 6, 8 (8x8) or 1, 2, 4, 8, 16, 32 (32x32); its cost is the bits of every
  scale per final token.
- unigram: the training tokens' histogram (add-one smoothed): the best context-free code.
Numbers are ideal code lengths (``-log2 p``); one held-out map per schedule is also range coded
to show the payload matches. Output: a markdown table, JSON and a PNG bar chart in ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import results_io

from percov2_jax.entropy import mim, schedules, token_coding, var
from percov2_jax.models.layers import unboxed

SCHEDULES = ("checkerboard", "quincunx", "qlds", "implicit_var", "raster", "random")
GRIDS = {8: 128, 32: 512}  # token side -> crop side (16 px per token)


# ------------------------------------------------------------------------------ tokens


def crops(photos, side: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random crops per photo, uint8 ``[N, side, side, 3]``."""
    from PIL import Image

    out = []
    for image in photos:
        h, w = image.shape[:2]
        for _ in range(count):
            scale = side / min(h, w) * rng.uniform(1.0, 1.6)
            nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
            resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))
            top, left = rng.integers(0, nh - side + 1), rng.integers(0, nw - side + 1)
            crop = resized[top : top + side, left : left + side]
            out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return np.stack(out)


class Tokenizer:
    """The stage-1 model's hyper-latent features ``[N, h, w, D]`` and tokens ``[N, h, w]``."""

    def __init__(self, codec):
        self.codec = codec
        model = codec.model
        variables = {"params": codec.params, "vq_stats": codec.vq_stats}

        @jax.jit
        def features(images):
            latents = codec.latent_codec.apply({"params": codec.vae_params}, images, None, method="encode_to_latents")
            return model.apply(
                variables, latents.astype(jnp.float32), method=lambda m, x: m.hyper_encoder(x).astype(jnp.float32)
            )

        @jax.jit
        def quantize(z):
            return model.apply(variables, z, method=lambda m, x: m.quantizer(x, train=False).indices)

        self.features, self.quantize = features, quantize

    def __call__(self, images: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
        feats, toks = [], []
        for i in range(0, len(images), batch):
            x = jnp.asarray(images[i : i + batch], jnp.float32) / 127.5 - 1.0
            z = self.features(x)
            feats.append(np.asarray(z))
            toks.append(np.asarray(self.quantize(z)))
        return np.concatenate(feats), np.concatenate(toks)


# ------------------------------------------------------------------------------ training


def train(loss_fn, params, data: dict, batch: int, max_steps: int, seed: int, lr: float):
    """Adam with warm-up and cosine decay for ``max_steps``; returns params, the step count, the
    losses and the seconds. ``loss_fn(params, batch_dict, key) -> (loss, metrics)``."""
    warmup = min(100, max_steps // 2)  # 100 for every full run; a quick run of 4 steps warms up for 2
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max_steps, lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, b, key):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, b, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    n = len(next(iter(data.values())))
    start, steps, losses = time.time(), 0, []
    while steps < max_steps:
        idx = rng.integers(0, n, batch)
        b = {k: jnp.asarray(v[idx]) for k, v in data.items()}
        params, opt_state, loss = step(params, opt_state, b, jax.random.key(seed * 100003 + steps))
        losses.append(float(loss))
        steps += 1
    return params, steps, losses, time.time() - start


def augment_tokens(tokens: np.ndarray) -> np.ndarray:
    """The four flips/transposes that keep a square map square (the crops are already flipped)."""
    return np.concatenate([tokens, tokens[:, ::-1], np.swapaxes(tokens, 1, 2), np.swapaxes(tokens, 1, 2)[:, ::-1]])


# ------------------------------------------------------------------------------ evaluation


def mim_bits(model, params, tokens: np.ndarray, side: int) -> dict[str, float]:
    apply = jax.jit(model.apply)
    out = {}
    for name in SCHEDULES:
        schedule = schedules.make_schedule(name, side, side)
        total = 0.0
        for grid in tokens:
            _, bits = mim.schedule_log2_probs(apply, params, grid, schedule)
            total += bits.sum()
        out[name] = total / tokens.size
    return out


def coded_check(model, params, grid: np.ndarray, side: int) -> dict[str, tuple[float, int]]:
    """Ideal bits vs range-coded payload bits of one map per schedule (the coder's overhead)."""
    probabilities = token_coding.make_step_probabilities(model.apply)
    apply = jax.jit(model.apply)
    out = {}
    for name in SCHEDULES:
        schedule = schedules.make_schedule(name, side, side)
        payload, _ = token_coding.encode_with_prior(probabilities, params, grid, schedule)
        decoded, _ = token_coding.decode_with_prior(probabilities, params, payload, schedule)
        assert np.array_equal(decoded, grid), name
        _, bits = mim.schedule_log2_probs(apply, params, grid, schedule)
        out[name] = (float(bits.sum()), 8 * len(payload))
    return out


def var_bits(model, params, pyramids: list[np.ndarray], batch: int = 16) -> tuple[float, list[float]]:
    """Bits per final token over all scales, and per scale."""
    apply = jax.jit(model.apply)
    n, final = len(pyramids[0]), pyramids[-1].shape[1] * pyramids[-1].shape[2]
    per_scale = np.zeros(len(pyramids))
    for i in range(0, n, batch):
        logp = var.pyramid_log2_probs(apply, params, [jnp.asarray(p[i : i + batch]) for p in pyramids])
        per_scale += [-float(np.asarray(lp, np.float64).sum()) for lp in logp]
    per_scale /= n * final
    return float(per_scale.sum()), per_scale.tolist()


def unigram_bits(train_tokens: np.ndarray, test_tokens: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train_tokens.ravel(), minlength=vocab) + 1.0
    p = counts / counts.sum()
    return float(-np.log2(p[test_tokens.ravel()]).mean())


# ------------------------------------------------------------------------------ output


def bar_chart(results: dict, path: str, vocab_bits: float) -> None:
    """A grouped bar chart (PNG, matplotlib): bits per token of each method per grid size, and the
    uniform code's log2 V as a line. Bars above the axis are cut at its top, their value shown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = ["unigram", *SCHEDULES, "VAR"]
    colours = ["grey"] + [f"C{i}" for i in range(len(methods) - 1)]
    grids = list(results)
    figure = Figure(figsize=(10, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    top = vocab_bits * 1.12  # the uniform line and a little room; an outlier would squash the differences
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        xs = [g + (m - (len(methods) - 1) / 2) * width for g in range(len(grids))]
        values = [results[grid]["bits"][method] for grid in grids]
        label = f"MIM, {method}" if method in SCHEDULES else method
        bars = ax.bar(xs, [min(v, top) for v in values], width * 0.9, color=colours[m], label=label)
        for bar, value in zip(bars, values):
            centre = bar.get_x() + bar.get_width() / 2
            if value > top:  # cut: the value in a box inside the bar's top, with an arrow
                ax.annotate(
                    f"{value:.2f}\n\u2191",
                    (centre, top),
                    xytext=(0, -4),
                    textcoords="offset points",
                    ha="center",
                    va="top",
                    fontsize=7,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none"},
                )
            else:
                ax.annotate(
                    f"{value:.2f}",
                    (centre, value),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.axhline(vocab_bits, color="black", linewidth=1.5, label=f"uniform: log2 V = {vocab_bits:g} bits/token")
    ax.set_xticks(range(len(grids)), [f"{grid} tokens" for grid in grids])
    ax.set_ylim(0, top)
    ax.set_ylabel("bits per token")
    ax.set_title("Held-out photographs: bits per token (lower is better)")
    ax.grid(True, axis="y", color="0.9")
    ax.set_axisbelow(True)
    figure.legend(loc="outside right upper", fontsize="small", frameon=False)
    figure.savefig(path, format="png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage1", default="/tmp/percov2_demo", help="stage-1 workdir (make demo's)")
    ap.add_argument("--out", default=results_io.RESULTS)
    ap.add_argument("--steps", default="8:1200,32:400", help="training steps per model, by token side")
    ap.add_argument("--test", default="skimage/chelsea,skimage/camera,skimage/motorcycle")
    ap.add_argument("--grids", default="8,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--plot_only",
        action="store_true",
        help="only redraw OUT/entropy_schedules.png from the entropy_schedules_*.json in --out",
    )
    ap.add_argument(
        "--vocab",
        type=int,
        default=256,
        help="codebook size V for --plot_only when the JSON has none (the demo's extreme rate: 256)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8x8 only, a few maps, tiny models, 4 steps (numbers meaningless)",
    )
    args = ap.parse_args()
    prefix = results_io.stem("entropy_schedules", args.quick)
    if args.quick:
        args.grids, args.steps = "8", "8:4"
    if args.plot_only:
        try:
            results, _ = load_results(args.out, prefix)
        except FileNotFoundError as error:
            ap.error(str(error))
        vocab = {r.get("vocab", args.vocab) for r in results.values()}
        if len(vocab) != 1:
            ap.error(f"the grids were measured with different codebooks: {sorted(vocab)}")
        bar_chart(results, os.path.join(args.out, f"{prefix}.png"), float(np.log2(vocab.pop())))
        return

    from percov2_jax.codec.api import Codec
    from percov2_jax.data.builtin import BuiltinPhotos

    os.makedirs(args.out, exist_ok=True)
    codec = Codec.from_workdir(args.stage1, prior=False)
    vocab = codec.rate.codebook_size
    tokenizer = Tokenizer(codec)
    photos = BuiltinPhotos(include_grayscale=True)
    test_ids = set(args.test.split(","))
    train_photos = [photos[i]["image"] for i in range(len(photos)) if photos[i]["id"] not in test_ids]
    test_photos = [photos[i]["image"] for i in range(len(photos)) if photos[i]["id"] in test_ids]
    assert len(test_photos) == len(test_ids), f"unknown test photos in {sorted(test_ids)}: have {photos.ids}"
    rng = np.random.default_rng(args.seed)
    results = {}
    steps_by_side = {int(k): int(v) for k, v in (item.split(":") for item in args.steps.split(","))}
    for side in (int(s) for s in args.grids.split(",")):
        n_steps = steps_by_side[side]
        size = GRIDS[side]
        n_train, n_test = (8, 4) if args.quick else (96, 24) if side == 8 else (12, 6)
        start = time.time()
        train_feats, train_tokens = tokenizer(crops(train_photos, size, n_train, rng))
        test_feats, test_tokens = tokenizer(crops(test_photos, size, n_test, rng))
        assert train_tokens.shape[1:] == (side, side), train_tokens.shape
        print(
            f"{side}x{side}: {len(train_tokens)} training maps, {len(test_tokens)} held-out maps "
            f"({time.time() - start:.0f} s to tokenise)",
            flush=True,
        )

        # MIM
        width, layers = (32, 1) if args.quick else (128, 4) if side == 8 else (96, 3)
        mim_model = mim.MaskedTokenPrior(
            mim.MIMConfig(vocab_size=vocab, width=width, num_layers=layers, num_heads=4, max_side=64)
        )
        params = unboxed(mim.init_params(mim_model, jax.random.key(args.seed), side, side))
        mim_loss = functools.partial(_mim_loss, mim_model.apply)
        batch = 4 if args.quick else 32 if side == 8 else 8
        params, mim_steps, mim_losses, mim_seconds = train(
            mim_loss, params, {"tokens": augment_tokens(train_tokens)}, batch, n_steps, args.seed, 1e-3
        )
        bits = mim_bits(mim_model, params, test_tokens, side)
        seen = mim_bits(mim_model, params, train_tokens[: len(test_tokens)], side)
        check = coded_check(mim_model, params, test_tokens[0], side)
        print(
            f"  MIM: {mim_steps} steps in {mim_seconds:.0f} s, training loss {np.mean(mim_losses[:20]):.2f} -> "
            f"{np.mean(mim_losses[-20:]):.2f}; held-out {bits}",
            flush=True,
        )

        # VAR
        scales = (1, 2, 4, 6, 8) if side == 8 else (1, 2, 4, 8, 16, 32)
        shapes = var.scale_shapes(side, side, scales)
        var_model = var.VARPrior(
            var.VARConfig(vocab_size=vocab, width=width, num_layers=layers, num_heads=4, max_side=64, scales=scales)
        )
        pyr_train = [np.asarray(p) for p in var.pyramid_tokens(jnp.asarray(train_feats), tokenizer.quantize, shapes)]
        pyr_test = [np.asarray(p) for p in var.pyramid_tokens(jnp.asarray(test_feats), tokenizer.quantize, shapes)]
        assert np.array_equal(pyr_test[-1], test_tokens)
        vparams = unboxed(var.init_params(var_model, jax.random.key(args.seed + 1), side, side))
        keys = [f"s{k}" for k in range(len(shapes))]
        var_loss = functools.partial(_var_loss, var_model.apply, tuple(keys))
        vparams, var_steps, var_losses, var_seconds = train(
            var_loss, vparams, dict(zip(keys, pyr_train)), batch, n_steps, args.seed, 1e-3
        )
        var_total, var_scales = var_bits(var_model, vparams, pyr_test)
        print(
            f"  VAR: {var_steps} steps in {var_seconds:.0f} s, training loss {np.mean(var_losses[:20]):.2f} -> "
            f"{np.mean(var_losses[-20:]):.2f}; held-out {var_total:.3f} bits/token, per scale {var_scales}",
            flush=True,
        )

        results[f"{side}x{side}"] = {
            "bits": {"unigram": unigram_bits(train_tokens, test_tokens, vocab), **bits, "VAR": var_total},
            "seen_photos_bits": seen,
            "var_scales": list(scales),
            "var_bits_per_scale": var_scales,
            "coded_check": check,
            "maps": {"train": len(train_tokens), "test": len(test_tokens)},
            "steps": {"MIM": mim_steps, "VAR": var_steps},
            "models": {"width": width, "layers": layers, "batch": batch},
            "seconds": {"MIM": round(mim_seconds), "VAR": round(var_seconds)},
            "vocab": vocab,
        }
        with open(os.path.join(args.out, f"{prefix}_{side}x{side}.json"), "w") as f:
            json.dump(
                {
                    f"{side}x{side}": results[f"{side}x{side}"],
                    "command": command(args),
                    "machine": results_io.machine(),
                },
                f,
                indent=2,
            )
    write(args.out, vocab, prefix)


def _mim_loss(apply, params, batch, key):
    return mim.prior_loss(apply, params, batch["tokens"], key)


def _var_loss(apply, keys, params, batch, key):
    return var.var_loss(apply, params, [batch[k] for k in keys])


def command(args) -> str:
    if args.quick:
        return f"python experiments/entropy_schedules.py --stage1 {args.stage1} --quick"
    return (
        f"python experiments/entropy_schedules.py --stage1 {args.stage1} --grids {args.grids} "
        f"--steps {args.steps} --test {args.test}"
    )


def load_results(out: str, prefix: str = "entropy_schedules") -> tuple[dict, list[str]]:
    """The results by grid ("8x8", ...) and the commands that made them, from every
    ``PREFIX_HxW.json`` in ``out`` (each grid may come from its own run), smaller grids first."""
    pattern = re.compile(re.escape(prefix) + r"_(\d+)x(\d+)\.json$")
    found = sorted((int(m.group(1)), name) for name in os.listdir(out) if (m := pattern.match(name)))
    results, commands = {}, []
    for _, name in found:
        with open(os.path.join(out, name)) as f:
            saved = json.load(f)
        commands.append(saved.pop("command"))
        saved.pop("machine", None)
        results.update(saved)
    if not results:
        raise FileNotFoundError(f"no {prefix}_HxW.json in {out}")
    return results, commands


def write(out: str, vocab: int, prefix: str = "entropy_schedules") -> None:
    """The table and the chart from every ``PREFIX_HxW.json`` in ``out``."""
    results, commands = load_results(out, prefix)
    uniform = float(np.log2(vocab))
    machine = results_io.describe_machine(results_io.machine())
    lines = [
        "# Token entropy coding: bits per token on held-out photographs",
        "",
        "Made by " + " and ".join(f"`{c}`" for c in commands) + f" ({machine}, jax {jax.__version__}).",
        "",
        "| method | " + " | ".join(f"{g} bits/token | saving vs uniform" for g in results) + " |",
        "|---|" + "---:|---:|" * len(results),
    ]
    lines.append("| uniform (PerCo) | " + " | ".join(f"{uniform:.3f} | 0.0%" for _ in results) + " |")
    for method in ["unigram", *SCHEDULES, "VAR"]:
        cells = []
        for g in results:
            b = results[g]["bits"][method]
            cells.append(f"{b:.3f} | {100 * (1 - b / uniform):.1f}%")
        label = f"MIM, {method}" if method in SCHEDULES else method
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Steps of groups: "
        + "; ".join(
            f"{g}: "
            + ", ".join(
                f"{s} {schedules.make_schedule(s, int(g.split('x')[0]), int(g.split('x')[0])).num_steps}"
                for s in SCHEDULES
            )
            for g in results
        ),
        "",
    ]
    for g, r in results.items():
        lines.append(
            f"- {g}: {r['maps']['train']} training maps (x4 flips/transposes for the MIM), "
            f"{r['maps']['test']} held-out maps; MIM {r['steps']['MIM']} steps, VAR {r['steps']['VAR']} "
            f"steps ({r['models']['layers']} layers x {r['models']['width']}, batch {r['models']['batch']}; "
            f"{r['seconds']['MIM']} s and {r['seconds']['VAR']} s of training). "
            f"VAR scales {r['var_scales']}, bits per final token by scale "
            f"{[round(v, 3) for v in r['var_bits_per_scale']]}. On the training photos the MIM "
            f"(qlds) reaches {r['seen_photos_bits']['qlds']:.3f}. Range-coded payload vs ideal bits, "
            "one held-out map: " + ", ".join(f"{s} {c[1]}/{c[0]:.1f}" for s, c in r["coded_check"].items()) + "."
        )
    with open(os.path.join(out, f"{prefix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    bar_chart(results, os.path.join(out, f"{prefix}.png"), uniform)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
