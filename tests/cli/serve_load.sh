#!/usr/bin/env bash
# bench/cuda/serve_load.sh on the CPU: two tiny models trained here (one with DMC) served one after
# the other under a load that saturates a small cache; the table has a row per model with the
# whole run's and the saturated window's figures, the first model's ratio 1.00×, and the rounds'
# table a row per model with the server's rounds without and with a prefill; a run of one
# client carries the note that the load may bound it, the runs of more clients than the server
# can batch do not; a model's own flags reach its server and are listed; and a server that
# cannot start stops the script with its log.
# Usage: serve_load.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$1 src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
fail() { echo "FAIL: $*" >&2; exit 1; }
mkdir "$work/corpus"
cp "$src"/data/corpus/kjv_08_ruth.txt "$src"/data/corpus/kjv_32_jonah.txt "$work/corpus/"
"$build/data/dmc-prep" --input="$work/corpus" --output="$work/shards" --tokenizer=byte \
    --val_fraction=0.5 --shard_tokens=16384 >/dev/null 2>&1
for m in vanilla dmc; do
  flags=(--pretrain_steps=8)
  [ $m = vanilla ] || flags=(--pretrain_steps=4 --stage1_steps=2 --stage2_steps=2 --stage3_steps=0 --cr_target=4)
  "$build/trainer/dmc-train" --model=tiny --data="$work/shards/train_index.json" --seq_len=32 \
      --micro_batch=4 "${flags[@]}" --log_every=1000 --checkpoint_dir="$work/ckpt_$m" >/dev/null
  "$build/trainer/dmc-export" "$work/ckpt_$m" "$work/$m" --dtype=fp32 >/dev/null
done
export DMC_BUILD_DIR=$build DEVICE=cpu PORT=$((20000 + $$ % 20000))
export SERVE_FLAGS="--kv_budget_mb=0.5 --max_batch=8 --max_queue=256"
export LOAD_FLAGS="--clients=32 --requests=320 --prompt_tokens=8:24 --max_tokens=32:64 --vocab=256 --check=false --timeout_s=120"
bash "$src/bench/cuda/serve_load.sh" "$work/table.md" vanilla="$work/vanilla" dmc="$work/dmc" \
    >"$work/log" 2>&1 || fail "serve_load.sh: $(cat "$work/log")"
table=$(cat "$work/table.md")
grep -q "^dmc-serve --device=cpu --kv_budget_mb=0.5" <<<"$table" || fail "no flags line: $table"
# model, requests/s, tokens/s, ..., CR, saturated tokens/s, ratio: numbers in every column
# then the rounds' table: model, without a prefill (count, mean ms, p99 bound), with one (the same)
awk -F' *\\| *' '($2 == "vanilla" || $2 == "dmc") && NF > 12 {
    rows++
    for (i = 3; i <= 10; i++) if ($i !~ /^[0-9.]+$/) bad = bad " " $2 ":" i "=" $i
    if ($2 == "vanilla" && $12 != "1.00×" && $11 != "-") bad = bad " ratio " $12 }
  ($2 == "vanilla" || $2 == "dmc") && NF == 9 {
    rounds++
    for (i = 3; i <= 8; i++) if ($i !~ /^([0-9.]+|inf)$/) bad = bad " rounds " $2 ":" i "=" $i
    if ($3 + $6 < 32) bad = bad " " $2 ": " $3 " + " $6 " rounds for 32 tokens at least" }
  END { if (rows != 2 || rounds != 2 || bad != "") { print rows " rows, " rounds " rounds rows;" bad; exit 1 } }' <<<"$table" ||
  fail "unexpected table: $table"
grep -q "load-bound\|max concurrent = clients" <<<"$table" && fail "load-bound note on a saturated run: $table"
# one client: its one sequence at a time is the most the server can run, whatever its room
LOAD_FLAGS="--clients=1 --requests=2 --prompt_tokens=8 --max_tokens=16 --vocab=256 --check=false --timeout_s=60" \
  SERVE_FLAGS="--kv_budget_mb=4 --max_batch=8 --max_queue=16" \
  bash "$src/bench/cuda/serve_load.sh" "$work/few.md" vanilla="$work/vanilla",--page_size=8 >"$work/log" 2>&1 ||
  fail "serve_load.sh with one client: $(cat "$work/log")"
grep -q "^vanilla: every client had a sequence running at once" "$work/few.md" ||
  fail "no load-bound note with one client: $(cat "$work/few.md")"
grep -qx "vanilla: $work/vanilla --page_size=8" "$work/few.md" ||
  fail "no line of the model's own flags: $(cat "$work/few.md")"
# a model's own flags reach its server: one it refuses stops the script with the server's words
if bash "$src/bench/cuda/serve_load.sh" "$work/bad.md" vanilla="$work/vanilla",--page_size=-1 >"$work/log" 2>&1; then
  fail "a server with --page_size=-1 was loaded"
fi
grep -q "did not come up" "$work/log" && grep -q "page_size" "$work/log" ||
  fail "no reason for the refused flag: $(cat "$work/log")"
if bash "$src/bench/cuda/serve_load.sh" "$work/none.md" missing="$work/nowhere" >"$work/log" 2>&1; then
  fail "a missing model was served"
fi
grep -q "nowhere: no config.json" "$work/log" || fail "no reason for the missing model: $(cat "$work/log")"
echo "serve_load.sh: table as expected"
