#!/usr/bin/env bash
# Download into .whl/ the wheels that experiments/accelerator_bench.py needs and the accelerator
# machine lacks (docs/performance.md, "Accelerators"). That machine (x86-64, Python 3.12, no
# network) has jax, flax, optax, orbax-checkpoint, torch, transformers, huggingface-hub 1.33,
# safetensors, pillow, requests, pyyaml, absl-py and zipp, but neither diffusers nor ml-collections.
#
#   tools/accelerator_wheels.sh        # from anywhere; writes REPO/.whl/ (ignored by git)
#
# Versions are this project's environment's. Their dependencies, checked against that machine:
#   diffusers:          importlib_metadata (carried; only imported before Python 3.8), filelock,
#                       huggingface-hub>=1.32 (1.33 there), numpy, regex, requests, safetensors>=0.8,
#                       Pillow: there
#   ml-collections:     absl-py, PyYAML: there
#   importlib-metadata: zipp>=3.20: there; lazy-importer: carried
#   lazy-importer:      nothing
# On the machine: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#   --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers==0.42.1 ml-collections==1.1.0 importlib-metadata==10.2.0 lazy-importer==0.1.0)

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

rm -rf .whl  # one version of each: two stop the install there
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"

for wheel in .whl/*.whl; do
  echo "$wheel: $(unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | cut -d' ' -f2- |
    paste -sd, -)"
done
du -sh .whl
