#!/usr/bin/env bash
# dmc-eval end to end on a tiny model trained here: the side-by-side table for a model without
# DMC, the comparison at byte budgets (--kv_fraction), the clear refusals (a method the model
# cannot run, a missing model directory, shards of another vocabulary), a DMS retrofit at a byte
# budget, and a LoMA retrofit's row.
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
for method in think-k h2o-pyramid-[0-9]+ tova-zigzag-[0-9]+; do
  grep -qE "^[a-z0-9_]+ +$method" <<<"$budgets" || fail "no $method row at --kv_fraction=3/4: $budgets"
done
shared=$("$eval_" --model="$work/hf" --data="$work/shards/val_index.json" --seq_len=32 \
    --max_sequences=2 --calibration_sequences=2 --kv_fraction=1 --methods=kvsharer)
grep -q "^KVSharer pairs" <<<"$shared" && grep -qE "^kvsharer +kvsharer-[0-9]" <<<"$shared" ||
  fail "no KVSharer calibration or row: $shared"
think=$("$eval_" --model="$work/hf" --data="$work/shards/val_index.json" --seq_len=32 \
    --max_sequences=2 --kv_fraction=1/2 --methods=think) || fail "--methods=think at 1/2: $think"
grep -qE "^think +cannot meet it: no setting of think meets" <<<"$think" ||
  fail "think at 1/2: no reason given: $think"

expect_error "is not a DMC model" "$eval_" --model="$work/hf" --data="$work/shards/val_index.json" \
    --seq_len=32 --methods=dmc
expect_error "is not a DMC model" "$eval_" --model="$work/hf" --data="$work/shards/val_index.json" \
    --seq_len=32 --kv_fraction=1/2 --methods=dmc_think
expect_error "is not a LoMA model" "$eval_" --model="$work/hf" --data="$work/shards/val_index.json" \
    --seq_len=32 --methods=loma
expect_error "$work/missing" "$eval_" --model="$work/missing" --data="$work/shards/val_index.json"
expect_error "needs --device=cuda" "$eval_" --model="$work/hf" --data="$work/shards/val_index.json" \
    --seq_len=32 --methods=vanilla --against_cpu
"$prep" --input="$work/corpus" --output="$work/other" --tokenizer=byte --val_fraction=0.5 \
    --shard_tokens=16384 >/dev/null 2>&1
sed -i 's/"vocab_size": *259/"vocab_size": 300/' "$work/other/val_index.json"
expect_error "vocab" "$eval_" --model="$work/hf" --data="$work/other/val_index.json" --seq_len=32 \
    --methods=vanilla
# --kv_fraction: the reference once, then each method's knob at each budget, or the reason none
# meets it (a line of its own; the run goes on). TSV: label, budget, method, policy, budget bytes,
# mean and max bytes per sequence, perplexity, accuracy, tokens/s, note.
"$eval_" --model="$work/hf" --data="$work/shards/val_index.json" --seq_len=64 --page_size=8 \
    --max_sequences=4 --methods=vanilla,quant,h2o --kv_fraction=1/2,1/8 --label=tiny \
    --append_tsv="$work/budget.tsv" >"$work/budget.log" 2>&1 || fail "--kv_fraction: $(cat "$work/budget.log")"
[ "$(wc -l <"$work/budget.tsv")" = 5 ] || fail "--kv_fraction: expected 5 lines: $(cat "$work/budget.tsv")"
awk -F'\t' '$1 != "tiny" { exit 1 }
    $2 == "1" && $3 == "vanilla" && $6 == $5 && $11 == "-" { reference++ }
    $2 == "1/2" && $3 == "quant" && $4 ~ /^vanilla-int[248]$/ && $6 <= $5 && $8 > 0 { met++ }
    $3 == "h2o" && $4 ~ /^h2o-[0-9]+$/ && $6 <= $5 && $8 > 0 { met++ }
    $2 == "1/8" && $3 == "quant" && $8 == "-" && $11 ~ /^no setting of quant meets/ { refused++ }
    END { exit !(reference == 1 && met == 3 && refused == 1) }' "$work/budget.tsv" ||
  fail "--kv_fraction: unexpected lines: $(cat "$work/budget.tsv")"
grep -q "quant      cannot meet it: no setting of quant meets" "$work/budget.log" ||
  fail "--kv_fraction: no reason printed for quant at 1/8: $(cat "$work/budget.log")"
# A DMS retrofit of the model (window 4): at budgets, its knob includes per-token keys, whose
# residual is the window and the newest token (a page less than per channel's).
"$train" --method=dms --dms_window=4 --init_from="$work/hf" --data="$work/shards/train_index.json" \
    --seq_len=32 --micro_batch=4 --stage1_steps=0 --stage2_steps=8 --stage3_steps=2 --cr_target=4 \
    --log_every=100000 --checkpoint_dir="$work/dms_ckpt" >/dev/null
"$export_" "$work/dms_ckpt" "$work/dms_hf" --dtype=fp32 >/dev/null
dms=$("$eval_" --model="$work/dms_hf" --data="$work/shards/val_index.json" --seq_len=64 \
    --page_size=8 --max_sequences=4 --methods=dms --kv_fraction=1/2) || fail "dms at 1/2: $dms"
grep -qE "^dms +dms-int[248]-token " <<<"$dms" || fail "dms at 1/2: no per-token setting: $dms"
# A LoMA retrofit of the model (t 2, c 4): --methods=loma decodes through the engine, every
# window of 32 tokens ending as 4 compressed segments of 2 slots (CR 4), and h2o's budget follows.
"$train" --method=loma --loma_t=2 --loma_c=4 --init_from="$work/hf" \
    --data="$work/shards/train_index.json" --seq_len=32 --micro_batch=4 --pretrain_steps=4 \
    --log_every=1000 --checkpoint_dir="$work/loma_ckpt" >/dev/null
"$export_" "$work/loma_ckpt" "$work/loma_hf" --dtype=fp32 >/dev/null
loma=$("$eval_" --model="$work/loma_hf" --data="$work/shards/val_index.json" --seq_len=32 \
    --max_sequences=4 --methods=loma,h2o)
grep -qE "^loma +- +4\.00 " <<<"$loma" && grep -qE "^h2o +8 +4\.00 " <<<"$loma" ||
  fail "--methods=loma,h2o on a LoMA model: $loma"
echo "dmc-eval: table and refusals as expected"
