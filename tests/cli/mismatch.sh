#!/usr/bin/env bash
# dmc-train under mpirun when something is wrong at start-up: (1) a launcher hands one rank
# other flags → every rank stops at once with an error naming the flag; (2) the data cannot be
# opened → the job ends with an error naming the file, and no rank hangs.
# Usage: mismatch.sh DMC_TRAIN DMC_PREP SOURCE_DIR MPIEXEC [MPIEXEC_FLAGS...]
books="kjv_08_ruth"
source "$(dirname "$0")/mpi_test_setup.sh" "$@"
mpi=("$mpiexec" "${mpi_flags[@]}")
common=(--model=tiny --data="$work/shards/train_index.json" --micro_batch=2 --pretrain_steps=5)

# MPMD launch: rank 0 and rank 1 get different --seq_len
if out=$(timeout 120 "${mpi[@]}" -np 1 "$train" "${common[@]}" --seq_len=32 : \
                                  -np 1 "$train" "${common[@]}" --seq_len=64 2>&1); then
  fail "ranks with different --seq_len trained: $out"
fi
for rank in 0 1; do
  grep -q "dmc-train (rank $rank).*--seq_len" <<<"$out" || fail "rank $rank did not name --seq_len: $out"
done

# a shard index that does not exist: the job ends with an error naming the file (no rank is
# left waiting in a collective for the others)
if out=$(timeout 120 "${mpi[@]}" -np 2 "$train" --model=tiny --data="$work/none/train_index.json" \
                                  --micro_batch=2 --pretrain_steps=5 --seq_len=32 2>&1); then
  fail "a missing --data trained: $out"
fi
grep -q "$work/none/train_index.json" <<<"$out" || fail "the error did not name the missing file: $out"
echo "mismatched flags and a missing shard index: clear errors, no hang"
