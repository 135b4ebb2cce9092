#!/usr/bin/env bash
# dmc-train's non-finite guard end to end on the embedded text (byte tokenizer, tiny model). A NaN
# is injected into layer 1's gradient at step 12 on the LAST rank (DMC_FAULTS=nan_grad, before the
# gradient average), and the run must end in the same bytes (weights, AdamW state, every good
# step's loss) as a reference that skipped that batch: stopped after step 11, its checkpoint's data
# cursor moved one batch on, resumed. On 1 rank, on 2 data-parallel ranks and on 2
# tensor-parallel ranks, so the rank that logs (0) skips for a NaN it never saw. Then 3 NaN
# attempts in a row with --max_bad_steps=3 stop the run with an error, keeping the last checkpoint.
# Usage: nan_guard.sh DMC_TRAIN DMC_PREP SOURCE_DIR MPIEXEC [MPIEXEC_FLAGS...]
books="kjv_32_jonah"
source "$(dirname "$0")/mpi_test_setup.sh" "$@"

total=30
common=(--model=tiny --data="$work/shards/train_index.json" --seq_len=32 --pretrain_steps=$total
        --warmup_steps=2 --lr=3e-3 --min_lr=3e-4 --log_every=100000 --keep_last=1)
# step -> loss of the steps that were taken (skipped attempts left out)
losses() { grep '"skipped":false' "$1" | sed -E 's/.*"loss":([^,]*),.*"step":([0-9]+),.*/\2 \1/' | sort -n; }

check() {  # check NAME LAUNCH...: the NaN run against the reference that skipped its batch
  local name=$1 nan="$work/$1-nan" ref="$work/$1-ref"
  shift
  DMC_FAULTS=nan_grad=12:1 "$@" "${common[@]}" --checkpoint_dir="$nan" --log_jsonl="$nan.jsonl" >"$nan.out"
  [ "$(grep -c '"skipped":true' "$nan.jsonl")" -eq 1 ] || fail "$name: not exactly one skipped step"
  grep '"skipped":true' "$nan.jsonl" | grep -q '"step":12,' || fail "$name: the skip was not at step 12"
  grep -q 'step    12/30 .*SKIPPED' "$nan.out" || fail "$name: no progress line for the skipped step"
  DMC_FAULTS=stop_after=11 "$@" "${common[@]}" --checkpoint_dir="$ref" --log_jsonl="$ref.jsonl" >/dev/null
  sed -i 's/\\"batch\\":11,/\\"batch\\":12,/' "$ref/step_00000011/trainer.json"
  grep -q '\\"batch\\":12,' "$ref/step_00000011/trainer.json" || fail "$name: cursor not moved"
  "$@" "${common[@]}" --checkpoint_dir="$ref" --log_jsonl="$ref.jsonl" --resume >/dev/null
  diff <(losses "$nan.jsonl") <(losses "$ref.jsonl") >/dev/null || fail "$name: losses differ"
  local files=0
  for f in "$ref/step_00000030"/*.safetensors; do
    cmp -s "$f" "$nan/step_00000030/$(basename "$f")" || fail "$name: $(basename "$f") differs"
    files=$((files + 1))
  done
  [ "$files" -ge 2 ] || fail "$name: the reference has no final checkpoint"
  echo "$name: NaN at step 12 skipped; equal to the run without that batch, bit for bit"
}

check "1 rank" "$train" --micro_batch=4
check "dp 2" "$mpiexec" "${mpi_flags[@]}" -np 2 "$train" --micro_batch=2
check "tp 2" "$mpiexec" "${mpi_flags[@]}" -np 2 "$train" --micro_batch=4 --tp=2

# 3 bad attempts in a row at step 9 with --max_bad_steps=3: an error, the step-8 checkpoint kept
DMC_FAULTS=nan_grad=9:0:3 "$train" "${common[@]}" --micro_batch=4 --checkpoint_dir="$work/bad" \
    --checkpoint_every=4 --max_bad_steps=3 >/dev/null 2>"$work/bad.err" && fail "3 bad steps in a row did not stop the run"
grep -q "3 attempts in a row at step 9 had a non-finite loss or gradient norm" "$work/bad.err" ||
  fail "unclear error: $(cat "$work/bad.err")"
[ "$(cat "$work/bad/latest")" = step_00000008 ] || fail "latest is $(cat "$work/bad/latest"), not step 8"
echo "--max_bad_steps=3: stopped with the error, last good checkpoint (step 8) kept"
