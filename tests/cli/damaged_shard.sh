#!/usr/bin/env bash
# A shard damaged on disk inside its token data, in a way that keeps every token inside the
# vocabulary (one letter turned into another), under dmc-train on 2 data-parallel ranks: every
# rank stops with DATA_LOSS naming the file and the chunk, before any step uses the batch (no step
# is logged, no checkpoint written). The token chunk's Fletcher-32 checksum catches it
# (data/shard.h).
# Usage: damaged_shard.sh DMC_TRAIN DMC_PREP SOURCE_DIR MPIEXEC [MPIEXEC_FLAGS...]
books="kjv_32_jonah"
source "$(dirname "$0")/mpi_test_setup.sh" "$@"

shard="$work/shards/train_000000.h5"
[ -f "$shard" ] || fail "dmc-prep wrote no $shard"
# The byte tokenizer stores "Jonah" as the uint32 tokens J, o, n, a, h: turn its J into a K.
at=$(grep -obUaP 'J\x00\x00\x00o\x00\x00\x00n\x00\x00\x00a\x00\x00\x00h\x00\x00\x00' "$shard" |
     head -1 | cut -d: -f1)
[ -n "$at" ] || fail "no 'Jonah' in the token data of $shard"
printf K | dd of="$shard" bs=1 seek="$at" conv=notrunc status=none

if "$mpiexec" "${mpi_flags[@]}" -np 2 "$train" --model=tiny --data="$work/shards/train_index.json" \
    --seq_len=32 --micro_batch=2 --pretrain_steps=5 --checkpoint_dir="$work/ckpt" \
    --log_jsonl="$work/log.jsonl" >"$work/out" 2>&1; then
  fail "dmc-train trained on a damaged shard"
fi
for rank in 0 1; do
  grep -q "dmc-train (rank $rank): DATA_LOSS: .*$shard: token chunk 0 (tokens \[0, [0-9]*)) fails its Fletcher-32 checksum" \
      "$work/out" || fail "rank $rank did not report the damaged chunk: $(cat "$work/out")"
done
[ -s "$work/log.jsonl" ] && fail "a step ran on the damaged data"
[ -e "$work/ckpt/latest" ] && fail "a checkpoint was written"
echo "damaged token data: DATA_LOSS naming $(basename "$shard") and chunk 0 on both ranks, before any step"
