#!/usr/bin/env bash
# End-to-end resume test of the dmc-train binary on the embedded text (byte tokenizer, tiny model):
#   1. straight: the whole schedule in one run;
#   2. SIGTERM after step 120 → checkpoint and clean exit → --resume: every later step's loss and
#      the final weights and AdamW state equal the straight run's bit for bit;
#   3. SIGKILL inside saves, at both points where a save can be cut (the tensor files written but
#      not published; the step directory published but `latest` not yet moved) → --resume each
#      time → the same final bytes again: an interrupted save never damages the previous checkpoint;
#   4. a run on 2 data-parallel ranks, stopped by SIGTERM and resumed on 1 rank with the same global
#      batch: the checkpoint does not depend on the data-parallel layout;
#   5. DMS (query-channel variant, retrofitting a short pre-training): SIGTERM -> --resume is
#      bit-exact, and a resume against other teacher weights is refused.
# Every stop comes at an exact step or point of a save, from dmc-train's fault injection
# (DMC_FAULTS, trainer/fault_injection.h), never from a timer: the test does not depend on speed.
# Usage: resume.sh DMC_TRAIN DMC_PREP SOURCE_DIR MPIEXEC [MPIEXEC_FLAGS...]
books="kjv_08_ruth kjv_32_jonah"
source "$(dirname "$0")/mpi_test_setup.sh" "$@"

total=400
common=(--model=tiny --data="$work/shards/train_index.json" --seq_len=32 --pretrain_steps=150
        --warmup_steps=5 --lr=3e-3 --min_lr=3e-4 --stage1_steps=50 --stage2_steps=150
        --stage3_steps=50 --retrofit_lr=3e-3 --retrofit_min_lr=3e-4 --cr_target=2 --log_every=100000
        --keep_last=2)

# step -> loss, one "step loss" line per step (the loss printed with 17 significant digits)
losses() { sed -E 's/.*"loss":([^,]*),.*"step":([0-9]+),.*/\2 \1/' "$1" | sort -n; }
final_dir() { echo "$1/$(cat "$1/latest")"; }
same_state() {  # same_state DIR_A DIR_B: weights and optimizer state identical bytes
  local a b
  a=$(final_dir "$1") b=$(final_dir "$2")
  [ "$(basename "$a")" = "step_$(printf %08d $total)" ] || fail "$2 did not finish: $(basename "$b")"
  [ "$(basename "$b")" = "$(basename "$a")" ] || fail "$2 ended at $(basename "$b")"
  cmp -s "$a/model-tp0.safetensors" "$b/model-tp0.safetensors" || fail "$2: weights differ"
  cmp -s "$a/optim-tp0.safetensors" "$b/optim-tp0.safetensors" || fail "$2: AdamW state differs"
}
# 1. straight
"$train" "${common[@]}" --micro_batch=4 --checkpoint_dir="$work/straight" \
    --log_jsonl="$work/straight.jsonl" >/dev/null
[ "$(wc -l <"$work/straight.jsonl")" -eq $total ] || fail "straight run logged $(wc -l <"$work/straight.jsonl") steps"

# 2. SIGTERM after step 120, then resume
DMC_FAULTS=stop_after=120 "$train" "${common[@]}" --micro_batch=4 --checkpoint_dir="$work/term" \
    --log_jsonl="$work/term.jsonl" >/dev/null
[ "$(cat "$work/term/latest")" = step_00000120 ] || fail "SIGTERM after step 120 left $(cat "$work/term/latest")"
"$train" "${common[@]}" --micro_batch=4 --checkpoint_dir="$work/term" --log_jsonl="$work/term.jsonl" \
    --resume >/dev/null
diff <(losses "$work/straight.jsonl") <(losses "$work/term.jsonl") >/dev/null ||
  fail "losses after the SIGTERM resume (stopped after step 120) differ from the straight run"
same_state "$work/straight" "$work/term"
echo "SIGTERM after step 120, resumed: bit-exact"

# 3. SIGKILL inside the saves of a run that checkpoints every step
for kill in 60:tensors 140:renamed 230:tensors 330:renamed; do
  step=${kill%:*} point=${kill#*:}
  resume=()
  [ -f "$work/kill/latest" ] && resume=(--resume)
  DMC_FAULTS=kill_in_save=$kill "$train" "${common[@]}" --micro_batch=4 \
      --checkpoint_dir="$work/kill" --checkpoint_every=1 --log_jsonl="$work/kill.jsonl" \
      "${resume[@]}" >/dev/null 2>&1 && fail "kill_in_save=$kill: dmc-train was not killed"
  previous=step_$(printf %08d $((step - 1)))
  [ "$(cat "$work/kill/latest")" = "$previous" ] ||
    fail "killed in the save of step $step ($point): latest names $(cat "$work/kill/latest")"
  if [ "$point" = tensors ]; then
    [ -d "$work/kill/.tmp-step_$(printf %08d "$step")" ] || fail "kill_in_save=$kill: no temporary directory"
  else
    [ -d "$work/kill/step_$(printf %08d "$step")" ] || fail "kill_in_save=$kill: step directory missing"
  fi
done
"$train" "${common[@]}" --micro_batch=4 --checkpoint_dir="$work/kill" --checkpoint_every=1 \
    --log_jsonl="$work/kill.jsonl" --resume >/dev/null
same_state "$work/straight" "$work/kill"
ls -a "$work/kill" | grep -q '^\.tmp' && fail "a temporary checkpoint directory was left behind"
echo "4 SIGKILLs inside per-step saves (before and after publishing), resumed each time: bit-exact"

# 4. 2 data-parallel ranks (2 sequences each) -> SIGTERM after step 120 -> resume on 1 rank (4 sequences)
DMC_FAULTS=stop_after=120 "$mpiexec" "${mpi_flags[@]}" -np 2 "$train" "${common[@]}" --micro_batch=2 \
    --checkpoint_dir="$work/dp" --log_jsonl="$work/dp.jsonl" >/dev/null
[ "$(cat "$work/dp/latest")" = step_00000120 ] || fail "the 2-rank run stopped at $(cat "$work/dp/latest")"
"$train" "${common[@]}" --micro_batch=4 --checkpoint_dir="$work/dp" --log_jsonl="$work/dp.jsonl" \
    --resume >/dev/null
last_straight=$(losses "$work/straight.jsonl" | tail -1 | cut -d' ' -f2)
last_dp=$(losses "$work/dp.jsonl" | tail -1 | cut -d' ' -f2)
awk -v a="$last_straight" -v b="$last_dp" 'BEGIN { d = (a - b) / a; exit !(d < 0.02 && d > -0.02) }' ||
  fail "after resuming a 2-rank checkpoint on 1 rank the last loss is $last_dp, straight $last_straight"
echo "2 ranks -> 1 rank: final loss $last_dp (straight $last_straight)"

# 5. DMS, query-channel variant (every weight trained, a frozen teacher that the checkpoint
#    records by hash): SIGTERM -> --resume is bit-exact, and a resume whose --init_from holds
#    other weights is refused
export_tool="$(dirname "$train")/dmc-export"
for seed in 1 2; do  # two short pre-trainings: the teacher, and other weights
  "$train" --model=tiny --data="$work/shards/train_index.json" --seq_len=32 --micro_batch=4 \
      --pretrain_steps=30 --lr=3e-3 --seed=$seed --log_every=100000 \
      --checkpoint_dir="$work/pre$seed" >/dev/null
  "$export_tool" "$work/pre$seed" "$work/base$seed" --dtype=fp32 >/dev/null
done
total=60
dms=(--method=dms --dms_variant=query_channel --dms_window=4 --init_from="$work/base1"
     --data="$work/shards/train_index.json" --seq_len=32 --micro_batch=4 --stage1_steps=10
     --stage2_steps=40 --stage3_steps=10 --cr_target=4 --retrofit_lr=3e-3 --retrofit_min_lr=3e-4
     --log_every=100000 --keep_last=2)
"$train" "${dms[@]}" --checkpoint_dir="$work/dms_straight" --log_jsonl="$work/dms_straight.jsonl" \
    >/dev/null
grep -q '"distill_loss":0,' <(tail -1 "$work/dms_straight.jsonl") && fail "DMS did not distil"
DMC_FAULTS=stop_after=25 "$train" "${dms[@]}" --checkpoint_dir="$work/dms_term" \
    --log_jsonl="$work/dms_term.jsonl" >/dev/null
[ "$(cat "$work/dms_term/latest")" = step_00000025 ] || fail "DMS: SIGTERM after step 25 left $(cat "$work/dms_term/latest")"
"$train" "${dms[@]}" --checkpoint_dir="$work/dms_term" --log_jsonl="$work/dms_term.jsonl" \
    --resume >/dev/null
diff <(losses "$work/dms_straight.jsonl") <(losses "$work/dms_term.jsonl") >/dev/null ||
  fail "DMS losses after the SIGTERM resume (stopped after step 25) differ from the straight run"
same_state "$work/dms_straight" "$work/dms_term"
echo "DMS: SIGTERM after step 25, resumed: bit-exact"
# (of two --init_from flags the last counts)
if "$train" "${dms[@]}" --init_from="$work/base2" --checkpoint_dir="$work/dms_term" \
    --resume >"$work/teacher.log" 2>&1; then
  fail "a DMS resume against other teacher weights was accepted"
fi
grep -q "teacher's weights differ" "$work/teacher.log" ||
  fail "the other-teacher resume failed without naming the teacher: $(cat "$work/teacher.log")"
echo "DMS: a resume against other teacher weights is refused"
