#!/usr/bin/env bash
# The README's main job, from a fresh machine: set up and build (launch/setup.sh), then the whole
# retrofitting pipeline in its tiny CPU configuration (launch/pipeline.sh, DMC_PIPELINE_CONFIG=cpu):
# tokenize the embedded King James text, pre-train a 0.9M-parameter Llama with DMC off, retrofit
# it with DMC and with DMS to CR 2, 4 and 8, export the models, evaluate them on held-out books beside the
# vanilla cache, H2O and TOVA, and print the table; then compare every KV compressor (quantization,
# ZipCache, ThinK, H2O and TOVA with uniform and per-layer budgets, KVSharer, the retrofits alone
# and composed with quantization) at 1/2, 1/4 and 1/8 of the vanilla cache's bytes, one table
# per budget and a plot. Outputs go to runs/quickstart/
# (results/ in it); a rerun redoes only what is missing there (an interrupted training resumes
# from its last checkpoint). Arguments go to every dmc-train call.
set -euo pipefail
cd "$(dirname "$0")/.."
DMC_PIPELINE_CONFIG=cpu DMC_PIPELINE_OUT="${DMC_PIPELINE_OUT:-runs/quickstart}" \
  exec bash launch/pipeline.sh "$@"
