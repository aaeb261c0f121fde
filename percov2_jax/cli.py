"""The ``percov2`` command.

  percov2 convert --input SRC --output DST [--dtype bfloat16] [--scan-layers] [--components transformer,vae]
          [--tokenizers PIPELINE_FOLDER]
  percov2 inspect CHECKPOINT

  percov2 compress IMAGE|FOLDER -o OUT --checkpoint STAGE1_WORKDIR
          [--caption TEXT | --captions FILE | --captioner MODEL_DIR [--captioner-batch N]]
          [--schedule qlds --steps S] [--hybrid-groups k [--temperature T --hybrid-seed N]]
          [--entropy-mode prior|uniform] [--prior PRIOR_WORKDIR] [--resize-policy pad|resize]
  percov2 decompress OUT.pcv2|FOLDER -o IMAGE.png|FOLDER --checkpoint STAGE1_WORKDIR [--steps N --guidance G --seed S]
  percov2 info OUT.pcv2|FOLDER
  percov2 export STAGE1_WORKDIR BUNDLE [--step N] [--prior PRIOR_WORKDIR|none] [--overwrite]

``--checkpoint`` takes a stage-1 workdir or a bundle made by ``percov2 export`` (the same codec,
quicker to load). compress, decompress and export keep compiled programs in a persistent cache
(``--compilation-cache DIR``, ``--no-compilation-cache``; `percov2_jax.compilation_cache`).

The stage-2 prior is read from ``STAGE1_WORKDIR/prior`` unless ``--prior`` names another run
(``--prior none``: uniform coding only). Bad bitstreams exit with status 2 and one line naming
the problem; so does a damaged or partial bundle.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from percov2_jax import compilation_cache


def _convert(args) -> int:
    from percov2_jax import pretrained
    from percov2_jax.convert import CheckpointFormatError, ConversionError

    components = [c for c in args.components.split(",") if c] if args.components else None
    try:
        overrides = pretrained.parse_overrides(args.override)
    except ValueError as e:
        raise SystemExit(f"percov2 convert: {e}") from None
    from percov2_jax import storage

    if storage.path(args.output).exists() and not args.overwrite:
        raise SystemExit(f"percov2 convert: {args.output} exists; pass --overwrite to replace it")
    try:
        summary = pretrained.convert(
            args.input,
            args.output,
            dtype=args.dtype,
            scan_layers=args.scan_layers,
            components=components,
            config_overrides=overrides,
            tokenizers=args.tokenizers,
            overwrite=args.overwrite,
        )
    except (ConversionError, CheckpointFormatError) as e:
        raise SystemExit(f"percov2 convert: {e}") from None
    print(pretrained.describe(summary, args.output))
    return 0


def _inspect(args) -> int:
    import jax

    from percov2_jax import pretrained

    for name, (module, params) in pretrained.load(args.checkpoint).items():
        leaves = jax.tree.leaves(params)
        dtypes = sorted({str(x.dtype) for x in leaves})
        print(
            f"{name}: {type(module).__name__}, {sum(x.size for x in leaves):,} parameters in {len(leaves)} arrays "
            f"({', '.join(dtypes)})"
        )
        print("  " + json.dumps(module.config.to_dict(), sort_keys=True))
    return 0


def _inputs(path: str, suffixes) -> list[pathlib.Path]:
    """A file, or every matching file under a folder (sorted)."""
    p = pathlib.Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes and f.is_file())
        if not files:
            raise SystemExit(f"percov2: no {'/'.join(suffixes)} files under {p}")
        return files
    if not p.is_file():
        raise SystemExit(f"percov2: {p}: no such file or folder")
    return [p]


def _output(source: pathlib.Path, root: str, out: str, many: bool, suffix: str) -> pathlib.Path:
    if not many:
        return pathlib.Path(out)
    rel = source.relative_to(root) if pathlib.Path(root).is_dir() else pathlib.Path(source.name)
    return pathlib.Path(out) / rel.with_suffix(suffix)


def _prior_arg(value):
    return False if value == "none" else value


def _compress_captions(args, files: list[pathlib.Path], many: bool) -> list[str]:
    """The caption each of ``files`` is sent with: ``--caption``, else ``--captions FILE``, else
    ``--captioner DIR`` (batched), else the empty caption, said once on stderr."""
    if args.captioner is not None and (args.caption is not None or args.captions):
        raise SystemExit("percov2 compress: --captioner cannot be combined with --caption or --captions")
    if args.caption is not None:
        return [args.caption] * len(files)
    if args.captions:
        from percov2_jax.captions import CaptionFile

        caption_file = CaptionFile(args.captions)
        try:
            return [caption_file.caption_for(f.name) for f in files]
        except KeyError as e:
            raise SystemExit(f"percov2 compress: {e.args[0]}") from None
    if args.captioner is None:
        print(
            "percov2 compress: no caption given (--caption, --captions or --captioner): coding the empty caption",
            file=sys.stderr,
        )
        return [""] * len(files)
    from tqdm import tqdm

    from percov2_jax.captions.captioner import Captioner
    from percov2_jax.data.sources import read_image

    batch = args.captioner_batch
    if batch < 1:
        raise SystemExit(f"percov2 compress: --captioner-batch must be at least 1, got {batch}")
    try:
        captioner = Captioner(args.captioner)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise SystemExit(f"percov2 compress: --captioner: {e}") from None
    captions: list[str] = []
    for start in tqdm(range(0, len(files), batch), disable=not many, desc="caption"):
        captions += captioner.captions([read_image(f) for f in files[start : start + batch]])
    return captions


def _write_caption_record(args, files: list[pathlib.Path], captions: list[str]) -> pathlib.Path:
    """``OUTPUT/captions.tsv`` (``relative path<TAB>caption`` per image, a ``--captions`` file),
    or ``captions.jsonl`` when a caption or path has a line break or a path a tab."""
    rows = [(f.relative_to(args.input).as_posix(), caption) for f, caption in zip(files, captions)]
    one_line = all("\t" not in rel and len(f"{rel}\t{caption}".splitlines()) == 1 for rel, caption in rows)
    record = pathlib.Path(args.output) / ("captions.tsv" if one_line else "captions.jsonl")
    if args.captions and record.resolve() == pathlib.Path(args.captions).resolve():
        raise SystemExit(f"percov2 compress: {record} is the --captions file; write the streams elsewhere")
    if one_line:
        text = "".join(f"{rel}\t{caption}\n" for rel, caption in rows)
    else:
        text = "".join(
            json.dumps({"image": rel, "caption": caption}, ensure_ascii=False) + "\n" for rel, caption in rows
        )
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(text, encoding="utf-8")
    return record


def _compress(args) -> int:
    from tqdm import tqdm

    from percov2_jax.codec.api import Codec
    from percov2_jax.codec.bitstream import BitstreamError, bit_budget
    from percov2_jax.data.sources import IMAGE_EXTENSIONS, read_image

    files = _inputs(args.input, IMAGE_EXTENSIONS)
    many = pathlib.Path(args.input).is_dir()
    captions = _compress_captions(args, files, many)
    if many:  # before compressing: a run that stops can resume with --captions OUTPUT/captions.tsv
        _write_caption_record(args, files, captions)
    codec = Codec.from_workdir(args.checkpoint, prior=_prior_arg(args.prior), text_checkpoint=args.text_checkpoint)
    coding = {
        k: v
        for k, v in dict(
            entropy_mode=args.entropy_mode,
            schedule=args.schedule,
            steps=args.steps,
            hybrid_groups=args.hybrid_groups,
            temperature=args.temperature,
            seed=args.hybrid_seed,
        ).items()
        if v is not None
    }
    for f, caption in tqdm(zip(files, captions), total=len(files), disable=not many, desc="compress"):
        try:
            data = codec.compress(
                read_image(f), caption, caption_coder=args.caption_coder, resize_policy=args.resize_policy, **coding
            )
        except ValueError as e:
            if isinstance(e, BitstreamError):
                raise
            raise SystemExit(f"percov2 compress: {f}: {e}") from None
        dst = _output(f, args.input, args.output, many, ".pcv2")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        if not many:
            budget = bit_budget(data)
            print(
                f"{dst}: {len(data)} bytes, {budget['total_bits']} bits, {budget['total_bpp']:.5f} bpp "
                f"(the papers count caption + tokens: {budget['paper_bpp']:.5f} bpp), caption {caption!r}"
            )
    return 0


def _decompress(args) -> int:
    from PIL import Image
    from tqdm import tqdm

    from percov2_jax.codec.api import Codec

    files = _inputs(args.input, (".pcv2",))
    codec = Codec.from_workdir(
        args.checkpoint,
        prior=_prior_arg(args.prior),
        text_checkpoint=args.text_checkpoint,
        **({} if args.steps is None else {"sample_steps": args.steps}),
        **({} if args.guidance is None else {"guidance_scale": args.guidance}),
    )
    many = pathlib.Path(args.input).is_dir()
    for f in tqdm(files, disable=not many, desc="decompress"):
        pixels = codec.decompress(f.read_bytes(), seed=args.seed)
        dst = _output(f, args.input, args.output, many, ".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(dst)
    return 0


def _export(args) -> int:
    from percov2_jax.codec import bundle

    try:
        manifest = bundle.export(
            args.run,
            args.output,
            step=args.step,
            prior=_prior_arg(args.prior),
            prior_step=args.prior_step,
            text_checkpoint=args.text_checkpoint,
            overwrite=args.overwrite,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"percov2 export: {e}") from None
    source, prior = manifest["source"], manifest["prior_model_id"]
    with_prior = f"prior of {source.get('prior_run')} step {source.get('prior_step')} (model {prior or 0:06x})"
    print(
        f"{args.output}: the codec of {source['run']} step {source['step']} ({source['weights']}), "
        f"model {manifest['model_id']:06x}, {with_prior if prior else 'no prior'}"
    )
    return 0


def _info(args) -> int:
    from percov2_jax.codec import bitstream
    from percov2_jax.entropy import schedules

    for f in _inputs(args.input, (".pcv2",)):
        data = f.read_bytes()
        stream = bitstream.unpack(data)
        budget = bitstream.bit_budget(data)
        h = stream.header
        print(
            f"{f}: {h.width}x{h.height} px, rate {h.rate}, "
            f"{h.entropy_mode} tokens {h.token_grid[1]}x{h.token_grid[0]}, "
            f"model {h.model_id:06x}, caption {stream.caption()!r}"
        )
        if h.has_schedule:
            try:
                name = schedules.schedule_from_id(h.schedule_id)
            except ValueError:
                name = f"unknown id {h.schedule_id}"
            hybrid = (
                ""
                if not h.hybrid_groups
                else (
                    f"; hybrid: first {h.hybrid_groups} groups sent, the rest generated "
                    + ("by argmax" if not h.temperature else f"at temperature {h.temperature:g}, seed {h.seed}")
                )
            )
            print(f"  schedule {name}, {h.steps} groups{hybrid}")
        for part in ("header", "caption", "tokens", "padding", "checksum", "total"):
            print(f"  {part:9s} {budget[part + '_bits']:6d} bits  {budget[part + '_bpp']:.5f} bpp")
        print(f"  (the papers count caption + tokens: {budget['paper_bits']} bits, {budget['paper_bpp']:.5f} bpp)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="percov2", description="PerCoV2 in JAX: the codec and its checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert an SD3 PyTorch checkpoint to a percov2-jax orbax checkpoint")
    conv.add_argument("--input", required=True, help="diffusers pipeline/component folder or single .safetensors file")
    conv.add_argument(
        "--output", required=True, help="the checkpoint directory to write (a local path or gs://bucket/...)"
    )
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    conv.add_argument("--scan-layers", action="store_true", help="store MM-DiT blocks stacked for scan_layers=True")
    conv.add_argument("--components", default=None, help="comma-separated components (default: all in the input)")
    conv.add_argument(
        "--override",
        action="append",
        default=[],
        help="config field the weights do not determine, e.g. transformer.attention_head_dim=64",
    )
    conv.add_argument(
        "--tokenizers",
        default=None,
        metavar="DIR",
        help="a diffusers SD3 pipeline folder whose tokenizer/, tokenizer_2/ (and tokenizer_3/) go into the "
        "checkpoint (a single file has none; default: the input pipeline's, or those beside the single file)",
    )
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(func=_convert)
    insp = sub.add_parser("inspect", help="list the components, configs and parameter counts of a checkpoint")
    insp.add_argument("checkpoint")
    insp.set_defaults(func=_inspect)
    comp = sub.add_parser("compress", help="image (or folder of images) -> .pcv2")
    comp.add_argument("input")
    comp.add_argument("-o", "--output", required=True, help="output .pcv2 file, or folder when the input is a folder")
    comp.add_argument(
        "--checkpoint", required=True, help="a stage-1 training workdir (python -m percov2_jax.train) or a bundle"
    )
    comp.add_argument(
        "--caption",
        default=None,
        help="the caption to send for every image (default: from --captions or --captioner, else empty)",
    )
    comp.add_argument(
        "--captions",
        default=None,
        help="captions file (TSV, JSONL or COCO) keyed by image file name; an image it does not caption is an error",
    )
    comp.add_argument(
        "--captioner",
        default=None,
        metavar="DIR",
        help="caption each image with the local transformers image-to-text model (e.g. BLIP-2) saved in DIR "
        "with save_pretrained; never downloads; not with --caption or --captions",
    )
    comp.add_argument(
        "--captioner-batch", type=int, default=8, metavar="N", help="images per captioner call (default 8)"
    )
    comp.add_argument(
        "--caption-coder",
        default="word-ngram-v1",
        help="word-ngram-v1 (default, the shortest), zlib (the papers' coder), word-ngram-v1+crc8, deflate-dict-v1",
    )
    comp.add_argument(
        "--prior",
        default=None,
        help="stage-2 prior workdir (default: CHECKPOINT/prior if trained; 'none': uniform coding)",
    )
    comp.add_argument(
        "--entropy-mode",
        default=None,
        choices=["auto", "prior", "uniform"],
        help="token coding (default with a prior: auto, the shorter of prior and uniform coding; without: uniform)",
    )
    comp.add_argument(
        "--schedule",
        default=None,
        help="coding schedule: qlds (default), implicit_var, quincunx, checkerboard, raster, random",
    )
    comp.add_argument("--steps", type=int, default=None, help="schedule groups (qlds, raster, random; default 12)")
    comp.add_argument(
        "--hybrid-groups",
        type=int,
        default=None,
        help="send only the first k groups; the decoder generates the rest with the prior",
    )
    comp.add_argument("--temperature", type=float, default=None, help="hybrid generation temperature (0 = argmax)")
    comp.add_argument("--hybrid-seed", type=int, default=None, help="hybrid sampling seed (recorded in the stream)")
    comp.add_argument(
        "--resize-policy",
        default=None,
        choices=["pad", "resize"],
        help="sides that are not multiples of 64: pad (default; cropped on decode) or resize",
    )
    comp.set_defaults(func=_compress)
    dec = sub.add_parser("decompress", help=".pcv2 (or a folder of them) -> PNG at the original size")
    dec.add_argument("input")
    dec.add_argument("-o", "--output", required=True, help="output .png file, or folder when the input is a folder")
    dec.add_argument("--checkpoint", required=True, help="the stage-1 workdir or bundle that compressed the stream")
    dec.add_argument("--prior", default=None, help="stage-2 prior workdir (default: CHECKPOINT/prior if trained)")
    for command in (comp, dec):
        command.add_argument(
            "--text-checkpoint",
            default="",
            help="percov2 convert checkpoint with the SD3 text encoders (a run trained on precomputed text needs "
            "one unless its config names it)",
        )
    dec.add_argument("--steps", type=int, default=None, help="Euler steps (default: the run's sample.num_steps)")
    dec.add_argument("--guidance", type=float, default=None, help="caption-only CFG scale")
    dec.add_argument("--seed", type=int, default=None, help="sampler seed (default 0)")
    dec.set_defaults(func=_decompress)
    info = sub.add_parser("info", help="sizes and bpp of a .pcv2 split into header, caption and tokens")
    info.add_argument("input")
    info.set_defaults(func=_info)
    exp = sub.add_parser("export", help="a stage-1 run (and its prior) -> an inference bundle that loads fast")
    exp.add_argument("run", help="a stage-1 training workdir")
    exp.add_argument("output", help="the bundle folder to write (a local path or gs://bucket/...)")
    exp.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the latest)")
    exp.add_argument("--prior", default=None, help="stage-2 prior workdir (default: RUN/prior if trained; 'none')")
    exp.add_argument("--prior-step", type=int, default=None, help="the prior's checkpoint step (default: the latest)")
    exp.add_argument(
        "--text-checkpoint",
        default="",
        help="the SD3 text encoders the bundle refers to (default: those the run's config names; not copied)",
    )
    exp.add_argument("--overwrite", action="store_true")
    exp.set_defaults(func=_export)
    for command in (comp, dec, exp):
        compilation_cache.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from percov2_jax.codec.bitstream import BitstreamError
    from percov2_jax.codec.bundle import BundleError

    try:
        if not hasattr(args, "compilation_cache_enabled"):
            return args.func(args)
        with compilation_cache.configured(args.compilation_cache, args.compilation_cache_enabled):
            return args.func(args)
    except BitstreamError as e:
        print(f"percov2: {getattr(args, 'input', '')}: {e}", file=sys.stderr)
        return 2
    except BundleError as e:  # a damaged or partial --checkpoint bundle
        print(f"percov2: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
