#!/usr/bin/env bash
# The offline demo: build the synthetic corpus and prepare it, train the quickstart model on the
# CPU, and print three sampled stories. Run from the repository root inside the project's
# environment (the README's first command does both). Reruns reuse what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
DATA=runs/quickstart-data
WORKDIR=runs/quickstart

echo "== 1/3 prepare: synthetic stories -> tokenizer -> token shards ($DATA)"
python -m tinystories_jax.prepare --input=synthetic --output_dir="$DATA" --vocab_size=1024

echo "== 2/3 train: configs/quickstart.py -> $WORKDIR"
python -m tinystories_jax.train --config=configs/quickstart.py --workdir="$WORKDIR" \
  --config.data.dir="$DATA"

echo "== 3/3 sample: three stories from the trained model"
python -m tinystories_jax.sample --workdir="$WORKDIR" --prompt="Once upon a time" --num_samples=3
