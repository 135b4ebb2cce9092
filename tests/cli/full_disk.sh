#!/usr/bin/env bash
# dmc-train when checkpoints cannot be written (a full disk, simulated by a file-size limit of
# 100 KiB, under which the tiny model's tensor files fail part-way with EFBIG). The rule
# (README, "Checkpoints"): a failed interval save is reported and training goes on, retrying at the
# next interval; a failed last save ends the run with the error. Either way the previous checkpoint
# and `latest` are untouched and no temporary directory is left. Then the same run resumed without
# the limit ends in the same bytes as a straight run: the failed saves changed nothing.
# Usage: full_disk.sh DMC_TRAIN DMC_PREP SOURCE_DIR MPIEXEC [MPIEXEC_FLAGS...]
books="kjv_32_jonah"
source "$(dirname "$0")/mpi_test_setup.sh" "$@"

common=(--model=tiny --data="$work/shards/train_index.json" --seq_len=32 --micro_batch=2
        --pretrain_steps=20 --lr=3e-3 --log_every=100000 --checkpoint_every=5 --keep_last=2)

"$train" "${common[@]}" --checkpoint_dir="$work/straight" >/dev/null
DMC_FAULTS=stop_after=10 "$train" "${common[@]}" --checkpoint_dir="$work/full" >/dev/null
cp -r "$work/full/step_00000010" "$work/step10.copy"

# Resumed with the limit: the saves at steps 15 and 20 fail, the run reaches step 20 and fails.
# SIGXFSZ is ignored so that an oversized write fails with EFBIG instead of killing the process.
# The limit is set in the rank alone, under mpirun: MPI's own start-up files must not be limited.
# shellcheck disable=SC2016  # expanded by the rank's shell
if "$mpiexec" "${mpi_flags[@]}" -np 1 bash -c 'trap "" XFSZ; ulimit -f 100; exec "$@"' limited \
    "$train" "${common[@]}" --checkpoint_dir="$work/full" --log_jsonl="$work/full.jsonl" --resume \
    >"$work/full.err" 2>&1; then
  fail "the run succeeded although its last checkpoint could not be written"
fi
grep -q "WARNING: checkpoint $work/full/step_00000015 not saved: .*File too large.*training goes on" \
    "$work/full.err" || fail "no warning for the failed interval save: $(cat "$work/full.err")"
grep -q "checkpoint $work/full/step_00000020 not saved: .*File too large.*latest and the checkpoints it names are unchanged" \
    "$work/full.err" || fail "no error for the failed last save: $(cat "$work/full.err")"
grep -q '"step":20,' "$work/full.jsonl" || fail "training did not go on after the failed save at step 15"
[ "$(cat "$work/full/latest")" = step_00000010 ] || fail "latest changed to $(cat "$work/full/latest")"
diff -r "$work/step10.copy" "$work/full/step_00000010" >/dev/null || fail "the step-10 checkpoint changed"
[ -d "$work/full/step_00000005" ] || fail "the step-5 checkpoint was pruned"
ls -a "$work/full" | grep -q '^\.tmp' && fail "a temporary checkpoint directory was left behind"
ls "$work/full" | grep -q 'step_0000001[5-9]\|step_00000020' && fail "a failed save left a step directory"
echo "full disk: interval save failed and training went on; last save failed with the error; step 10 and latest intact"

"$train" "${common[@]}" --checkpoint_dir="$work/full" --resume >/dev/null
for f in model-tp0 optim-tp0; do
  cmp -s "$work/straight/step_00000020/$f.safetensors" "$work/full/step_00000020/$f.safetensors" ||
    fail "resumed after the full disk: $f differs from the straight run"
done
echo "resumed without the limit: bit-identical to the straight run"
