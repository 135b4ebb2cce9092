#!/usr/bin/env bash
# The embedded default job, from a fresh machine: install, build, tokenize the shipped English
# text into HDF5 shards, then pre-train a small Llama on the CPU and retrofit it with DMC to a
# compression ratio of 2 (stage 1 fades the control channel out, stage 2 ramps the CR target,
# stage 3 holds it), checkpointing into runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh

run=runs/quickstart
mkdir -p "$run"
if [ ! -f "$run/shards/train_index.json" ]; then
  build/data/dmc-prep --input=data/corpus --output="$run/shards" --tokenizer=byte \
      --val_fraction=0.15 --shard_tokens=500000
fi
rm -rf "$run/checkpoints" "$run/metrics.jsonl"
build/trainer/dmc-train --flagfile=launch/configs/quickstart.flags \
    --data="$run/shards/train_index.json" --checkpoint_dir="$run/checkpoints" \
    --log_jsonl="$run/metrics.jsonl" "$@"
bash launch/plot_training.sh "$run/training.png" quickstart="$run/metrics.jsonl"
