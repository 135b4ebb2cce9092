#!/usr/bin/env bash
# launch/pipeline.sh interrupted mid-training loses nothing, on a shortened CPU configuration
# (pre-training 30 steps and one warm restart of the base of 10, one DMC retrofit to CR 2 of 10
# steps, checkpoints every 10 steps):
#   1. dmc-train killed (SIGKILL) inside the save of step 20: the pipeline fails, and the
#      pre-training's checkpoint of step 10 stays;
#   2. run again, stopped by SIGTERM after step 25 (dmc-train saves and exits cleanly): the
#      pre-training resumes at step 10, and the pipeline stops, naming the step, rather than
#      export a base trained 25 of 30 steps;
#   3. run again without faults: it resumes at step 25, restarts the base's schedule for the
#      control's 10 steps from the 30-step model, and runs to the table. The pre-training's
#      metrics log holds steps 1..30 once each (the steps after the killed save's checkpoint ran
#      twice);
#   4. run again: nothing is trained or evaluated again (every evaluation is newer than its model),
#      and the table is the same.
#   0. first, a bad value of each setting (a restart count of 'two', a CR of 1, two stages, ...):
#      refused by name, before anything is written.
# The faults come at exact steps (DMC_FAULTS, trainer/fault_injection.h), never from a timer.
# Usage: pipeline_resume.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$(cd "$1" && pwd) src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
out=$work/run
export DMC_SKIP_SETUP=1 DMC_BUILD_DIR=$build DMC_PIPELINE_OUT=$out DMC_PIPELINE_PRETRAIN_STEPS=30 \
    DMC_PIPELINE_STAGES="2 6 2" DMC_PIPELINE_CRS=2 DMC_PIPELINE_METHODS=dmc \
    DMC_PIPELINE_BASE_RESTARTS=1
pipeline() { bash "$src/launch/pipeline.sh" --checkpoint_every=10 >"$work/$1.log" 2>&1; }

# 0. each setting that is not what it must be is refused by name before anything runs
for bad in DMC_PIPELINE_BASE_RESTARTS=two DMC_PIPELINE_CRS=x DMC_PIPELINE_CRS=1 \
           DMC_PIPELINE_STAGES=1 "DMC_PIPELINE_STAGES=a b c" DMC_PIPELINE_RETROFIT_LR=1e-3 \
           DMC_PIPELINE_PRETRAIN_STEPS=0 "DMC_PIPELINE_METHODS=dmc foo" \
           DMC_PIPELINE_DMS_VARIANT=bogus DMC_PIPELINE_CONFIG=tpu; do
  if env "$bad" bash "$src/launch/pipeline.sh" >"$work/refused.log" 2>&1; then fail "$bad ran"; fi
  grep -q "^pipeline: ${bad%%=*} must be .*, got '${bad#*=}'$" "$work/refused.log" ||
    fail "$bad was not refused by name: $(tail -3 "$work/refused.log")"
  [ ! -e "$out" ] || fail "$bad left $out"
done

# 1.
if DMC_FAULTS=kill_in_save=20:tensors pipeline killed; then fail "the killed run succeeded"; fi
[ "$(cat "$out/pretrain/latest")" = step_00000010 ] || fail "latest after the kill: $(cat "$out/pretrain/latest")"
[ "$(wc -l <"$out/pretrain.jsonl")" -eq 20 ] || fail "the killed run logged $(wc -l <"$out/pretrain.jsonl") steps"

# 2.
if DMC_FAULTS=stop_after=25 pipeline stopped; then fail "the stopped run succeeded"; fi
grep -q "resuming $out/pretrain at step 10 of 30" "$work/stopped.log" || fail "no resume at 10: $(tail "$work/stopped.log")"
grep -q "dmc-train: resumed at step 10" "$work/stopped.log" || fail "dmc-train did not resume"
grep -q "the training in $out/pretrain stopped at step 25 of 30" "$work/stopped.log" ||
  fail "the stop was not named: $(tail "$work/stopped.log")"
[ ! -e "$out/base" ] || fail "a base was exported from 25 of 30 steps"

# 3.
pipeline finished || fail "the resumed pipeline failed: $(tail -30 "$work/finished.log")"
grep -q "resuming $out/pretrain at step 25 of 30" "$work/finished.log" || fail "no resume at 25"
steps=$(sed -E 's/.*"step":([0-9]+).*/\1/' "$out/pretrain.jsonl" | tr '\n' ' ')
[ "$steps" = "$(seq -s ' ' 1 30) " ] || fail "the pre-training log's steps: $steps"
grep -q "restarting the base's schedule (1 of 1" "$work/finished.log" || fail "no restart of the base"
[ "$(cat "$out/pretrain_restart1/latest")" = step_00000010 ] || fail "the base's restart did not finish"
grep -Eq "step +1/10 \| pretrain \|.*\| lr 1\.00e-03" "$work/finished.log" ||
  fail "the restart did not start at the control's peak rate"
[ "$(cat "$out/retrofit_dmc_cr2/latest")" = step_00000010 ] || fail "the retrofit did not finish"
grep -q '^| 2 | dmc |' "$out/results/table.md" || fail "no DMC row in the table: $(cat "$out/results/table.md")"

# 4.
stamps() { stat -c '%n %.9Y' "$out"/results/eval_*_*.tsv "$out"/results/budget_*.tsv "$out"/*/latest; }
before=$(stamps)
cp "$out/results/table.md" "$work/table.md"
pipeline again || fail "the rerun failed: $(tail -30 "$work/again.log")"
[ "$(stamps)" = "$before" ] || fail "the rerun trained or evaluated again: $(diff <(echo "$before") <(stamps))"
cmp -s "$out/results/table.md" "$work/table.md" || fail "the rerun's table differs"
echo "pipeline resume: killed at 20 and stopped at 25, resumed both times, finished with the table;" \
     "a rerun redid nothing"
