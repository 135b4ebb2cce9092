#!/usr/bin/env bash
# dmc-eval end to end on a tiny model trained here: the side-by-side table for a model without
# DMC, the KV compressors at a byte budget, and the clear refusals (a method the model cannot run, a missing model directory, shards
# of another vocabulary).
# Usage: eval.sh DMC_TRAIN DMC_PREP DMC_EXPORT DMC_EVAL SOURCE_DIR
set -euo pipefail
train=$1 prep=$2 export_=$3 eval_=$4 src=$5
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
fail() { echo "FAIL: $*" >&2; exit 1; }
expect_error() {  # expect_error TEXT CMD...: CMD fails and says TEXT
  local text=$1 out
  shift
  if out=$("$@" 2>&1); then fail "succeeded: $*"; fi
  grep -qF -- "$text" <<<"$out" || fail "'$*' did not say '$text': $out"
}

mkdir "$work/corpus"
cp "$src"/data/corpus/kjv_08_ruth.txt "$src"/data/corpus/kjv_32_jonah.txt "$work/corpus/"
"$prep" --input="$work/corpus" --output="$work/shards" --tokenizer=byte --val_fraction=0.5 \
    --shard_tokens=16384 >/dev/null 2>&1
"$train" --model=tiny --data="$work/shards/train_index.json" --seq_len=32 --micro_batch=4 \
    --pretrain_steps=30 --log_every=1000 --checkpoint_dir="$work/ckpt" >/dev/null
"$export_" "$work/ckpt" "$work/hf" --dtype=fp32 >/dev/null

table=$("$eval_" --model="$work/hf" --data="$work/shards/val_index.json" --seq_len=32 \
    --max_sequences=4 --methods=vanilla,h2o,tova --baseline_cr=2)
for method in vanilla h2o tova; do
  grep -qE "^$method +" <<<"$table" || fail "no $method row in: $table"
done
awk '$1 == "h2o" && $3 < 1.5 { exit 1 }' <<<"$table" || fail "h2o at --baseline_cr=2 did not compress: $table"

# --kv_fraction: the comparators at 3/4 of vanilla's bytes; KVSharer's calibration (this
# under-trained model may share no layer); ThinK (keys only) cannot reach 1/2.
budgets=$("$eval_" --model="$work/hf" --data="$work/shards/val_index.json" --seq_len=32 \
    --max_sequences=4 --calibration_sequences=2 --page_size=4 --kv_fraction=3/4 \
    --methods=think,h2o_pyramid,tova_zigzag)
for method in think-k h2o-pyramid tova-zigzag; do
  grep -qE "^$method" <<<"$budgets" || fail "no $method row at --kv_fraction=3/4: $budgets"
done
shared=$("$eval_" --model="$work/hf" --data="$work/shards/val_index.json" --seq_len=32 \
    --max_sequences=2 --calibration_sequences=2 --kv_fraction=1 --methods=kvsharer)
grep -q "^KVSharer pairs" <<<"$shared" && grep -qE "^kvsharer-[0-9]" <<<"$shared" ||
  fail "no KVSharer calibration or row: $shared"
expect_error "no setting of think meets" "$eval_" --model="$work/hf" \
    --data="$work/shards/val_index.json" --seq_len=32 --max_sequences=2 --kv_fraction=1/2 \
    --methods=think

expect_error "is not a DMC model" "$eval_" --model="$work/hf" --data="$work/shards/val_index.json" \
    --seq_len=32 --methods=dmc
expect_error "is not a LoMA model" "$eval_" --model="$work/hf" --data="$work/shards/val_index.json" \
    --seq_len=32 --methods=loma
expect_error "$work/missing" "$eval_" --model="$work/missing" --data="$work/shards/val_index.json"
"$prep" --input="$work/corpus" --output="$work/other" --tokenizer=byte --val_fraction=0.5 \
    --shard_tokens=16384 >/dev/null 2>&1
sed -i 's/"vocab_size": *259/"vocab_size": 300/' "$work/other/val_index.json"
expect_error "vocab" "$eval_" --model="$work/hf" --data="$work/other/val_index.json" --seq_len=32 \
    --methods=vanilla
echo "dmc-eval: table and refusals as expected"
