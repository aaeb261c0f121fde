"""The ``percov2`` command.

  percov2 convert --input SRC --output DST [--dtype bfloat16] [--scan-layers] [--components transformer,vae]
  percov2 inspect CHECKPOINT

(``compress``, ``decompress`` and ``info`` for .pcv2 bitstreams arrive with the codec.)
"""

from __future__ import annotations

import argparse
import json
import sys


def _convert(args) -> int:
    from percov2_jax.convert.to_checkpoint import convert_to_checkpoint, describe, parse_overrides

    components = [c for c in args.components.split(",") if c] if args.components else None
    try:
        overrides = parse_overrides(args.override)
    except ValueError as e:
        raise SystemExit(f"percov2 convert: {e}") from None
    summary = convert_to_checkpoint(args.input, args.output, dtype=args.dtype, scan_layers=args.scan_layers,
                                    components=components, config_overrides=overrides, overwrite=args.overwrite)
    print(describe(summary, args.output))
    return 0


def _inspect(args) -> int:
    import jax

    from percov2_jax import checkpoints

    for name, (module, params) in checkpoints.load(args.checkpoint).items():
        leaves = jax.tree.leaves(params)
        dtypes = sorted({str(x.dtype) for x in leaves})
        print(f"{name}: {type(module).__name__}, {sum(x.size for x in leaves):,} parameters in {len(leaves)} arrays "
              f"({', '.join(dtypes)})")
        print("  " + json.dumps(module.config.to_dict(), sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="percov2", description="PerCoV2 in JAX: checkpoints and (soon) the codec.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert an SD3 PyTorch checkpoint to a percov2-jax orbax checkpoint")
    conv.add_argument("--input", required=True, help="diffusers pipeline/component folder or single .safetensors file")
    conv.add_argument("--output", required=True, help="orbax checkpoint directory to write")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    conv.add_argument("--scan-layers", action="store_true", help="store MM-DiT blocks stacked for scan_layers=True")
    conv.add_argument("--components", default=None, help="comma-separated components (default: all in the input)")
    conv.add_argument("--override", action="append", default=[],
                      help="config field the weights do not determine, e.g. transformer.attention_head_dim=64")
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(func=_convert)
    insp = sub.add_parser("inspect", help="list the components, configs and parameter counts of a checkpoint")
    insp.add_argument("checkpoint")
    insp.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
