#!/usr/bin/env bash
# The whole retrofitting experiment in one command: tokenize → pre-train a base Llama (DMC off)
# → retrofit it with DMC to CR 2, 4 and 8 (stages 1–3 each) → export every model in Hugging Face
# layout → evaluate on held-out text (DMC with hard decisions; the base model with the vanilla
# cache and with H2O and TOVA at the budget DMC achieved) → results/ with the side-by-side table,
# the training curves and the per-head CR heat map.
#
#   launch/pipeline.sh                 tiny CPU configuration (minutes): byte tokenizer, the
#                                      embedded King James text, the "small" preset
#   DMC_PIPELINE_OUT=DIR               where runs and results go (default runs/pipeline)
#   DMC_PIPELINE_CRS="2 4 8"           the retrofit targets
# Extra arguments go to every dmc-train call (e.g. --device=cuda when that backend is built).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
out=${DMC_PIPELINE_OUT:-runs/pipeline}
crs=${DMC_PIPELINE_CRS:-2 4 8}
bin=build
mkdir -p "$out/results"
results="$out/results"
log() { echo "== pipeline: $*"; }

# 1. data
if [ ! -f "$out/shards/train_index.json" ]; then
  log "tokenizing data/corpus"
  $bin/data/dmc-prep --input=data/corpus --output="$out/shards" --tokenizer=byte \
      --val_fraction=0.15 --shard_tokens=500000
fi

# 2. pre-training (DMC off), exported in fp32 so the retrofits start from exactly these weights
train_common=(--seq_len=128 --micro_batch=8 --weight_decay=0.1 --grad_clip=1.0 --log_every=50)
if [ ! -f "$out/base/config.json" ]; then
  log "pre-training the base model"
  rm -rf "$out/pretrain"
  $bin/trainer/dmc-train --model=small "${train_common[@]}" --pretrain_steps=600 \
      --warmup_steps=20 --lr=3e-3 --min_lr=3e-4 --data="$out/shards/train_index.json" \
      --checkpoint_dir="$out/pretrain" --log_jsonl="$out/pretrain.jsonl" "$@"
  $bin/trainer/dmc-export "$out/pretrain" "$out/base" --dtype=fp32
fi

# 3. retrofits from the same base
plots=()
for cr in $crs; do
  if [ ! -f "$out/dmc_cr$cr/config.json" ]; then
    log "retrofitting to CR $cr"
    rm -rf "$out/retrofit_cr$cr" "$out/retrofit_cr$cr.jsonl"
    $bin/trainer/dmc-train --init_from="$out/base" "${train_common[@]}" --pretrain_steps=0 \
        --stage1_steps=20 --stage2_steps=300 --stage3_steps=60 --cr_target="$cr" \
        --retrofit_lr=1e-3 --retrofit_min_lr=1e-4 --data="$out/shards/train_index.json" \
        --checkpoint_dir="$out/retrofit_cr$cr" --log_jsonl="$out/retrofit_cr$cr.jsonl" "$@"
    $bin/trainer/dmc-export "$out/retrofit_cr$cr" "$out/dmc_cr$cr" --dtype=fp32
  fi
  plots+=("CR$cr=$out/retrofit_cr$cr.jsonl")
done
bash launch/plot_training.sh "$results/pretraining.png" base="$out/pretrain.jsonl"
bash launch/plot_training.sh "$results/retrofit_training.png" "${plots[@]}"

# 4. held-out evaluation through the paged cache. The KV budget holds 4 uncompressed sequences, so
#    "max batch" shows how many sequences each cache fits in the same memory.
tsv="$results/eval.tsv"
: >"$tsv"
eval_common=(--data="$out/shards/val_index.json" --seq_len=256 --max_sequences=24 --kv_budget_mb=4
             --max_batch=64 --append_tsv="$tsv")
log "evaluating the base model (vanilla cache)"
$bin/inference/dmc-eval --model="$out/base" --methods=vanilla --label=base "${eval_common[@]}" >/dev/null
for cr in $crs; do
  log "evaluating CR $cr: DMC, then H2O and TOVA on the base model at the CR DMC achieved"
  $bin/inference/dmc-eval --model="$out/dmc_cr$cr" --methods=dmc --label="$cr" \
      --heatmap="$results/head_cr_$cr.png" "${eval_common[@]}" >"$results/eval_dmc_cr$cr.txt"
  achieved=$(tail -1 "$tsv" | cut -f4)
  $bin/inference/dmc-eval --model="$out/base" --methods=h2o,tova --baseline_cr="$achieved" \
      --label="$cr" "${eval_common[@]}" >/dev/null
done

# 5. the side-by-side table
{
  echo "| target CR | method | achieved CR | held-out perplexity | Δ vs base | next-token accuracy | peak KV memory (KiB) | decode tokens/s | max batch at 4 MiB KV |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  awk -F'\t' 'NR == FNR { if ($1 == "base" && $2 == "vanilla") base = $5; next }
              { d = base > 0 ? sprintf("%+.1f%%", 100 * ($5 - base) / base) : "-";
                printf "| %s | %s | %.2f | %.3f | %s | %.3f | %.0f | %.0f | %d |\n",
                       ($1 == "base" ? "1 (base)" : $1), $2, $4, $5, ($1 == "base" ? "-" : d), $6,
                       $7 / 1024, $8, $9 }' "$tsv" "$tsv"
} >"$results/table.md"
cat "$results/table.md"
log "results in $results: table.md, pretraining.png, retrofit_training.png, head_cr_*.png"
