"""Subprocess body of the multi-process evaluation test (tests/test_evaluate.py).

  python tests/eval_check.py --stage1 DIR --inputs inputs.json --out OUT \\
      [--num-processes 2 --process-id I --port P]

Evaluates the Kodak-style and the COCO-format folders of ``inputs.json`` (written by the test:
their paths and the tiny CLIP folder) into ``OUT/kodak`` and ``OUT/coco30k``, joining
``jax.distributed`` on 127.0.0.1 first when asked. The Kodak run is interrupted after one shard
per process and resumed (in the same process, so nothing compiles twice).
"""

from __future__ import annotations

import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage1", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    import jax

    if args.num_processes > 1:
        jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    import eval_setup

    from percov2_jax.evaluation.job import evaluate

    with open(args.inputs, encoding="utf-8") as f:
        inputs = json.load(f)
    for dataset in ("kodak", "coco30k"):
        config = eval_setup.eval_config(args.stage1, dataset, inputs[dataset], inputs.get("clip"))
        if dataset == "kodak":
            assert evaluate(config, f"{args.out}/{dataset}", max_shards=1, show_progress=False) is None
        evaluate(config, f"{args.out}/{dataset}", show_progress=False)


if __name__ == "__main__":
    main()
