#!/usr/bin/env bash
# The whole retrofitting experiment in one command: tokenize → pre-train a base Llama (DMC off)
# → retrofit it with DMC to CR 2, 4 and 8 (stages 1–3 each) → export every model in Hugging Face
# layout → evaluate on held-out text (DMC with hard decisions; the base model with the vanilla
# cache and with H2O and TOVA at the budget DMC achieved) → results/ with the side-by-side table,
# the training curves and the per-head CR heat maps.
#
#   launch/pipeline.sh            DMC_PIPELINE_CONFIG=cpu (default), minutes on a laptop: the
#                                 embedded King James text, byte tokenizer, "small" preset (0.9M)
#   DMC_PIPELINE_CONFIG=gpu       --device=cuda, "medium" preset (17M parameters, head dim 64),
#                                 seq 512, on the 13 MB English corpus of data/corpus/fetch_english.sh
#                                 with an 8k SentencePiece BPE trained on it by spm_train
#   DMC_PIPELINE_OUT=DIR          where runs and results go (default runs/pipeline-CONFIG)
#   DMC_PIPELINE_CRS="2 4 8"      the retrofit targets
#   DMC_PIPELINE_SHARDS=DIR       (gpu) a dmc-prep output to use instead of building the corpus
#   DMC_SKIP_SETUP=1              use an existing build (a machine where apt cannot run), in
#   DMC_BUILD_DIR=DIR             DIR (default build)
# Extra arguments go to every dmc-train call.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${DMC_SKIP_SETUP:-0}" = 1 ] || bash launch/setup.sh
config=${DMC_PIPELINE_CONFIG:-cpu}
out=${DMC_PIPELINE_OUT:-runs/pipeline-$config}
crs=${DMC_PIPELINE_CRS:-2 4 8}
bin=${DMC_BUILD_DIR:-build}
results="$out/results"
mkdir -p "$results"
log() { echo "== pipeline ($config): $*"; }

# 1. data and the configuration
case "$config" in
  cpu)
    shards="$out/shards"
    train_common=(--device=cpu --seq_len=128 --micro_batch=8)
    pretrain=(--model=small --pretrain_steps=600 --warmup_steps=20 --lr=3e-3 --min_lr=3e-4)
    retrofit=(--stage1_steps=20 --stage2_steps=300 --stage3_steps=60 --retrofit_lr=1e-3
              --retrofit_min_lr=1e-4)
    eval_common=(--seq_len=128 --max_sequences=32)
    if [ ! -f "$shards/train_index.json" ]; then
      log "tokenizing data/corpus"
      $bin/data/dmc-prep --input=data/corpus --output="$shards" --tokenizer=byte \
          --val_fraction=0.15 --shard_tokens=500000
    fi
    ;;
  gpu)
    shards=${DMC_PIPELINE_SHARDS:-$out/shards}
    train_common=(--device=cuda --seq_len=512 --micro_batch=32)
    pretrain=(--model=medium --pretrain_steps=600 --warmup_steps=30 --lr=2e-3 --min_lr=2e-4)
    retrofit=(--stage1_steps=100 --stage2_steps=1500 --stage3_steps=300 --retrofit_lr=1e-3
              --retrofit_min_lr=1e-4)
    eval_common=(--seq_len=512 --max_sequences=32)
    if [ ! -f "$shards/train_index.json" ]; then
      log "building the English corpus and its tokenizer"
      bash data/corpus/fetch_english.sh "$out/corpus"
      spm_train --input="$(ls "$out"/corpus/*.txt | paste -sd,)" --model_prefix="$out/bpe8k" \
          --vocab_size=8192 --model_type=bpe --character_coverage=1.0 --byte_fallback=true \
          --normalization_rule_name=identity --remove_extra_whitespaces=false --split_digits=true \
          --input_sentence_size=2000000 --shuffle_input_sentence=true --minloglevel=2
      $bin/data/dmc-prep --input="$out/corpus" --output="$shards" --tokenizer="$out/bpe8k.model" \
          --val_fraction=0.05 --shard_tokens=2000000
    fi
    ;;
  *) echo "pipeline: DMC_PIPELINE_CONFIG must be cpu or gpu, got '$config'" >&2; exit 2 ;;
esac
train_common+=(--data="$shards/train_index.json" --weight_decay=0.1 --grad_clip=1.0 --log_every=50)

# 2. pre-training (DMC off), exported in fp32 so the retrofits start from exactly these weights
if [ ! -f "$out/base/config.json" ]; then
  log "pre-training the base model"
  rm -rf "$out/pretrain" "$out/pretrain.jsonl"
  $bin/trainer/dmc-train "${train_common[@]}" "${pretrain[@]}" --checkpoint_dir="$out/pretrain" \
      --log_jsonl="$out/pretrain.jsonl" "$@"
  $bin/trainer/dmc-export "$out/pretrain" "$out/base" --dtype=fp32
fi

# 3. retrofits from the same base
plots=()
for cr in $crs; do
  if [ ! -f "$out/dmc_cr$cr/config.json" ]; then
    log "retrofitting to CR $cr"
    rm -rf "$out/retrofit_cr$cr" "$out/retrofit_cr$cr.jsonl"
    $bin/trainer/dmc-train --init_from="$out/base" "${train_common[@]}" "${retrofit[@]}" \
        --pretrain_steps=0 --cr_target="$cr" --checkpoint_dir="$out/retrofit_cr$cr" \
        --log_jsonl="$out/retrofit_cr$cr.jsonl" "$@"
    $bin/trainer/dmc-export "$out/retrofit_cr$cr" "$out/dmc_cr$cr" --dtype=fp32
  fi
  plots+=("CR$cr=$out/retrofit_cr$cr.jsonl")
done
if command -v gnuplot >/dev/null; then
  bash launch/plot_training.sh "$results/pretraining.png" base="$out/pretrain.jsonl"
  bash launch/plot_training.sh "$results/retrofit_training.png" "${plots[@]}"
else
  log "gnuplot is not installed: no training plots (launch/plot_training.sh draws them later)"
fi

# 4. held-out evaluation through the paged cache (on the CPU), at the training sequence length,
#    all windows decoded together so the peak KV memory / windows is the memory of one sequence.
tsv="$results/eval.tsv"
: >"$tsv"
windows=32
eval_common+=(--data="$shards/val_index.json" --max_batch=$windows --kv_budget_mb=4096
              --append_tsv="$tsv")
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

# 5. the side-by-side table; "max batch" = sequences whose KV cache fits in the memory that 16
#    sequences take with the full cache (DMC's includes its window state)
{
  echo "| target CR | method | achieved CR | held-out perplexity | Δ vs base | next-token accuracy | KV KiB per sequence | max batch in 16 full caches | decode tokens/s (CPU) |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  awk -F'\t' -v n=$windows '
    NR == FNR { if ($1 == "base" && $2 == "vanilla") { base = $5; budget = 16 * $7 / n } next }
    { per = $7 / n; d = sprintf("%+.1f%%", 100 * ($5 - base) / base)
      printf "| %s | %s | %.2f | %.3f | %s | %.3f | %.1f | %d | %.0f |\n",
             ($1 == "base" ? "1 (base)" : $1), $2, $4, $5, ($1 == "base" ? "-" : d), $6,
             per / 1024, int(budget / per), $8 }' "$tsv" "$tsv"
} >"$results/table.md"
cat "$results/table.md"
log "results in $results: table.md, pretraining.png, retrofit_training.png, head_cr_*.png"
