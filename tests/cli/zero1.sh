#!/usr/bin/env bash
# dmc-train --zero1 end to end (the AdamW moments sharded over the data-parallel ranks) on the
# embedded text (byte tokenizer, tiny model). It must end in the same bytes (weights, AdamW state,
# every step's loss) as the same run without it:
#   1. on 1 rank, where there is nothing to shard and the flag is accepted and changes nothing;
#   2. on 2 data-parallel ranks, where each rank keeps and updates half of the moments;
#   3. on 2 ranks stopped by SIGTERM with --zero1 and resumed without it: the checkpoint holds the
#      full moments either way.
# Usage: zero1.sh DMC_TRAIN DMC_PREP SOURCE_DIR MPIEXEC [MPIEXEC_FLAGS...]
books="kjv_32_jonah"
source "$(dirname "$0")/mpi_test_setup.sh" "$@"

total=600
common=(--model=tiny --data="$work/shards/train_index.json" --seq_len=32 --micro_batch=2
        --pretrain_steps=300 --warmup_steps=5 --lr=3e-3 --min_lr=3e-4 --stage2_steps=300
        --retrofit_lr=3e-3 --retrofit_min_lr=3e-4 --cr_target=2 --log_every=100000 --keep_last=1)

losses() { sed -E 's/.*"loss":([^,]*),.*"step":([0-9]+),.*/\2 \1/' "$1" | sort -n; }
same_run() {  # same_run A B: the same losses and the same final checkpoint bytes
  local a b
  a="$work/$1/$(cat "$work/$1/latest")" b="$work/$2/$(cat "$work/$2/latest")"
  [ "$(basename "$a")" = "step_$(printf %08d $total)" ] || fail "$1 did not finish: $(basename "$a")"
  [ "$(basename "$b")" = "$(basename "$a")" ] || fail "$2 ended at $(basename "$b")"
  cmp -s "$a/model-tp0.safetensors" "$b/model-tp0.safetensors" || fail "$2: weights differ from $1"
  cmp -s "$a/optim-tp0.safetensors" "$b/optim-tp0.safetensors" || fail "$2: AdamW state differs from $1"
  diff <(losses "$work/$1.jsonl") <(losses "$work/$2.jsonl") >/dev/null || fail "$2: losses differ from $1"
}
run() {  # run NAME [mpirun -np N] -- FLAGS...
  local name=$1
  shift
  "$@" "${common[@]}" --checkpoint_dir="$work/$name" --log_jsonl="$work/$name.jsonl" >/dev/null
}

# 1. one rank
run one "$train"
run one_zero1 "$train" --zero1
same_run one one_zero1
echo "1 rank: --zero1 accepted, bit-identical"

# 2. two data-parallel ranks
run dp "$mpiexec" "${mpi_flags[@]}" -np 2 "$train"
run dp_zero1 "$mpiexec" "${mpi_flags[@]}" -np 2 "$train" --zero1
same_run dp dp_zero1
echo "2 data-parallel ranks: --zero1 bit-identical"

# 3. SIGTERM of the 2-rank --zero1 run after step 30 (fault injection: an exact step), then
#    --resume without --zero1
export DMC_FAULTS=stop_after=30
run term "$mpiexec" "${mpi_flags[@]}" -np 2 "$train" --zero1
unset DMC_FAULTS
[ "$(cat "$work/term/latest")" = step_00000030 ] || fail "SIGTERM after step 30 left $(cat "$work/term/latest")"
run term "$mpiexec" "${mpi_flags[@]}" -np 2 "$train" --resume
same_run dp term
echo "2 ranks, --zero1 stopped after step 30, resumed without it: bit-identical"
