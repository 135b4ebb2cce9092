#!/usr/bin/env bash
# Builds the CUDA targets on the lent GPU machine and runs the GPU test suite, compute-sanitizer
# (memcheck + racecheck) on the attention, LoMA, paged-decode and vocabulary-parallel kernels,
# and the attention benchmark beside PyTorch's SDPA flash anchor. Logs go to $OUT (or
# ./device-out when OUT is unset).
#
# The device image lacks some of the root CMakeLists.txt's find_package dependencies (Abseil,
# sentencepiece, nlohmann_json). Carry them as Debian packages:
#   here, once:  echo /.debs/ >> .git/info/exclude; mkdir -p .debs; (cd .debs && apt-get download \
#                libabsl-dev libabsl20220623 libsentencepiece-dev libsentencepiece0 \
#                nlohmann-json3-dev pkgconf pkgconf-bin libpkgconf3 \
#                libcpp-httplib-dev libcpp-httplib0.11 libbrotli-dev libbrotli1)
#   device call: run with carry [".debs"] and command `bash tests/cuda/run_on_device.sh`
# They are unpacked under /tmp/dev (never into /) and found through CMAKE_PREFIX_PATH and
# PKG_CONFIG_PATH.
#
# Environment knobs: DMC_DEVICE_STEPS (default "build test sanitize bench"; "hf" adds the Hugging
# Face logits check of tests/hf/check_hf_logits.py, which needs transformers; "train" runs
# dmc-train --device=cuda on the embedded text, straight and stopped + resumed; "configure" alone
# only configures; "sass" adds an instruction count of the attention kernels; "trainstep" runs
# bench/cuda/bench_train_step (the 1.36B and medium training steps, host enqueue vs device time);
# "profile" writes per-kernel time tables of one 1.36B training step, DMC off and on, to
# $OUT/profile.md, through nsys where it works and ncu otherwise), DMC_BENCH_CONFIGS
# (tile settings to compare, e.g. "default DMC_ATTN_BWD_NW=4"), DMC_BENCH_REPS (20),
# DMC_GTEST_FILTER (default all), DMC_DEVICE_BUILD (see below).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
STEPS="${DMC_DEVICE_STEPS:-build test sanitize bench}"
REPS="${DMC_BENCH_REPS:-20}"
# DMC_DEVICE_BUILD: the build folder (default build-device). Binaries built on another machine
# with the same CUDA major version can be carried there and run without the "build" step.
BUILD="${DMC_DEVICE_BUILD:-build-device}"
summary="$OUT/summary.txt"
: >"$summary"
note() { echo "== $*" | tee -a "$summary"; }
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv,noheader 2>&1)
note "GPU: $gpu  date: $(date -u +%Y-%m-%dT%H:%MZ)"

# shellcheck source=../device_deps.sh
source tests/device_deps.sh

if has_step build || has_step configure; then
  start=$(date +%s)
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDMC_CUDA=ON \
    -DCMAKE_PREFIX_PATH="$DEV/usr" "${pkgcfg_args[@]}" >"$OUT/build.log" 2>&1
  rc=$?
  note "configure rc=$rc ($(( $(date +%s) - start )) s)"
  if [ $rc -ne 0 ]; then tail -30 "$OUT/build.log"; exit 1; fi
fi
if has_step build; then
  start=$(date +%s)
  targets=(dmc_cuda_tests)
  has_step hf && targets+=(hf_logits)
  has_step train && targets+=(dmc-train dmc-prep)
  for b in bench/cuda/bench_*.cu bench/cuda/bench_*.cpp; do
    [ -f "$b" ] && targets+=("$(basename "${b%.*}")")
  done
  ninja -C "$BUILD" -j16 "${targets[@]}" >>"$OUT/build.log" 2>&1
  rc=$?
  note "build ${targets[*]} rc=$rc ($(( $(date +%s) - start )) s)"
  if [ $rc -ne 0 ]; then grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; fi
fi

TEST_BIN="$BUILD/tests/dmc_cuda_tests"
if has_step test; then
  start=$(date +%s)
  "$TEST_BIN" --gtest_filter="${DMC_GTEST_FILTER:-*}" >"$OUT/tests.log" 2>&1
  rc=$?
  note "dmc_cuda_tests rc=$rc ($(( $(date +%s) - start )) s): $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/tests.log" | tr '\n' ' ')"
  grep -E "^\[ error \]" "$OUT/tests.log" | awk '{ if ($0 ~ /rel (inf|nan)/) print "BAD " $0; else print }' >"$OUT/errors.txt"
  grep -E "FAILED|Failure" "$OUT/tests.log" | head -20 | tee -a "$summary"
fi

if has_step hf; then
  start=$(date +%s)
  PYTHONUNBUFFERED=1 python3 tests/hf/check_hf_logits.py --bin "$BUILD/tests/hf/hf_logits" \
    --work /tmp/hf_check >"$OUT/hf.log" 2>&1
  note "hf logits check rc=$? ($(( $(date +%s) - start )) s)"
  tail -5 "$OUT/hf.log" | tee -a "$summary"
fi

if has_step train; then
  # The "small-d64" preset (head dim 64) through every phase; then the same run stopped by SIGTERM
  # after step 160 and resumed. The attention backward accumulates dq with atomics, so GPU runs agree to
  # round-off, not bit for bit: the resumed run's last loss is compared with a tolerance.
  start=$(date +%s)
  train_dir=/tmp/dmc_train
  rm -rf "$train_dir"
  "$BUILD/data/dmc-prep" --input=data/corpus --output="$train_dir/shards" --tokenizer=byte \
    --val_fraction=0.1 >"$OUT/train.log" 2>&1
  train=("$BUILD/trainer/dmc-train" --device=cuda --model=small-d64 --seq_len=512 --micro_batch=16
         --data="$train_dir/shards/train_index.json" --pretrain_steps=150 --warmup_steps=10
         --lr=2e-3 --min_lr=2e-4 --stage1_steps=20 --stage2_steps=150 --stage3_steps=30
         --retrofit_lr=1e-3 --retrofit_min_lr=1e-4 --cr_target=2 --log_every=50)
  "${train[@]}" --checkpoint_dir="$train_dir/straight" --log_jsonl="$train_dir/straight.jsonl" \
    >>"$OUT/train.log" 2>&1
  rc=$?
  # SIGTERM after exactly step 160, from dmc-train's fault injection (trainer/fault_injection.h)
  DMC_FAULTS=stop_after=160 "${train[@]}" --checkpoint_dir="$train_dir/resumed" \
    --log_jsonl="$train_dir/resumed.jsonl" >>"$OUT/train.log" 2>&1
  stopped=$(wc -l <"$train_dir/resumed.jsonl")
  "${train[@]}" --checkpoint_dir="$train_dir/resumed" --log_jsonl="$train_dir/resumed.jsonl" \
    --resume >>"$OUT/train.log" 2>&1
  rc2=$?
  last() { tail -1 "$1" | sed -E 's/.*"loss":([^,]*),.*/\1/'; }
  note "dmc-train --device=cuda rc=$rc, stopped after step $stopped and resumed rc=$rc2 ($(( $(date +%s) - start )) s): last loss straight $(last "$train_dir/straight.jsonl") resumed $(last "$train_dir/resumed.jsonl")"
  grep -E "^step .*(/350|  50/|200/)" "$OUT/train.log" | head -12 | tee -a "$summary"
  cp "$train_dir/straight.jsonl" "$OUT/gpu_train.jsonl"
fi

if has_step sanitize; then
  for tool in memcheck racecheck; do
    start=$(date +%s)
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$TEST_BIN" \
      --gtest_filter='Shapes/CudaAttention.MatchesCpuReference/case0_*:Shapes/CudaAttention.MatchesCpuReference/case2_*:Shapes/CudaAttention.MatchesCpuReference/case5_*:Shapes/CudaAttention.MatchesCpuReference/case6_*:Shapes/CudaAttention.MatchesCpuReference/case18_*:Zones/CudaLomaAttention.MatchesCpuReference/case1:Zones/CudaLomaAttention.MatchesCpuReference/case5:Zones/CudaLomaAttention.MatchesCpuReference/case6:CudaDecode.PagedGroups:CudaDecode.PagedLongHeads:CudaVocabParallel.*' \
      >"$OUT/sanitize_one.log" 2>&1
    rc=$?
    cat "$OUT/sanitize_one.log" >>"$OUT/sanitize.log"
    note "compute-sanitizer $tool on attention, decode, vocabulary-parallel rc=$rc ($(( $(date +%s) - start )) s): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_one.log" | tr '\n' ' ')"
    rm -f "$OUT/sanitize_one.log"
  done
fi

if has_step bench; then
  # DMC_BENCH_CONFIGS: space-separated list of comma-separated VAR=VALUE tile settings to compare
  for cfg in ${DMC_BENCH_CONFIGS:-default}; do
    echo "-- config: $cfg" | tee -a "$OUT/bench.log"
    (
      [ "$cfg" != default ] && for kv in ${cfg//,/ }; do export "$kv"; done
      "$BUILD/bench/bench_dmc_attention" "$REPS" 2>&1
    ) | tee -a "$OUT/bench.log"
  done
  PYTHONUNBUFFERED=1 python3 bench/cuda/sdpa_anchor.py "$REPS" 2>&1 | tee -a "$OUT/bench.log"
  for b in "$BUILD"/bench/bench_*; do  # the other CUDA benchmarks (memory-bound kernels, matmul)
    [ -x "$b" ] && [ "$(basename "$b")" != bench_dmc_attention ] && [ -f "bench/cuda/$(basename "$b").cu" ] &&
      "$b" "$REPS" 2>&1 | tee -a "$OUT/bench.log"
  done
fi

if has_step trainstep; then
  start=$(date +%s)
  "$BUILD/bench/bench_train_step" --reps="${DMC_TRAINSTEP_REPS:-10}" 2>&1 | tee "$OUT/train_step.log"
  note "bench_train_step rc=${PIPESTATUS[0]} ($(( $(date +%s) - start )) s)"
  grep -E "^\| |costs" "$OUT/train_step.log" | tee -a "$summary"
fi

if has_step profile; then
  # Per-kernel device time of one training step (DMC_PROFILE_SHAPE, default two layers of the
  # 1.36B model at B 4: every kernel shape of the full model, a tenth of the launches), once with
  # DMC off and once on, so the difference says where DMC's time goes. nsys when it can make a
  # report here; else ncu with the one duration metric (no replay, every kernel).
  start=$(date +%s)
  shape="${DMC_PROFILE_SHAPE:-1b-2l:4}"
  csvs=()
  for dmc in off on; do
    args=(--reps=1 --warmup=0 --queued=false --gemm=false --shapes="$shape" --dmc="$dmc")
    csv="$OUT/profile_kernels_$dmc.csv"
    if command -v nsys >/dev/null 2>&1 &&
       nsys profile --force-overwrite=true -o "/tmp/dmc_prof_$dmc" "$BUILD/bench/bench_train_step" \
         "${args[@]}" >"$OUT/profile_$dmc.log" 2>&1 &&
       nsys stats --report cuda_gpu_kern_sum --format csv --output "/tmp/dmc_prof_$dmc" \
         "/tmp/dmc_prof_$dmc.nsys-rep" >>"$OUT/profile_$dmc.log" 2>&1; then
      cp "/tmp/dmc_prof_${dmc}_cuda_gpu_kern_sum.csv" "$csv"
    else
      ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        "$BUILD/bench/bench_train_step" "${args[@]}" >"$csv" 2>"$OUT/profile_$dmc.log"
    fi
    csvs+=("$csv")
  done
  python3 bench/cuda/kernel_table.py "${csvs[@]}" >"$OUT/profile.md" 2>>"$OUT/profile_on.log"
  note "profile $shape rc=$? ($(( $(date +%s) - start )) s): see profile.md"
  head -40 "$OUT/profile.md" | tee -a "$summary"
fi

if has_step sass; then  # instruction mix of the attention kernels, from the built library
  obj=$(find "$BUILD" -name 'dmc_attention.cu.o' | head -1)
  obj90=$(find "$BUILD" -name 'dmc_attention_sm90.cu.o' | head -1)  # the Hopper forward: HGMMA
  obj90b=$(find "$BUILD" -name 'dmc_attention_bwd_sm90.cu.o' | head -1)  # the Hopper backward
  { cuobjdump -sass "$obj"; cuobjdump -sass "$obj90"; cuobjdump -sass "$obj90b"; } \
    >"$OUT/sass_full.txt" 2>&1
  awk '/Function :/ {f=$3} /HGMMA|HMMA|LDSM|MUFU|LDL|STL|BAR|SHFL|LDGSTS|UTMALDG|SYNCS|RED|ATOM/ {
         split($0, a, /;/); n=split(a[1], w, " "); for (i=1;i<=n;i++) if (w[i] ~ /^(HGMMA|HMMA|LDSM|MUFU|LDL|STL|BAR|SHFL|LDGSTS|UTMALDG|SYNCS|RED|ATOM)/) {c[f" "w[i]]++; break} }
       /^ +\/\*[0-9a-f]+\*\// {tot[f]++}
       END {for (k in c) print k, c[k]; for (f in tot) print f, "TOTAL", tot[f]}' "$OUT/sass_full.txt" | sort >"$OUT/sass.txt"
  fwd=$(grep -o 'Function : [^ ]*attn_fwd_kernelILi128ELi64E[^ ]*' "$OUT/sass_full.txt" | head -1 | cut -d' ' -f3)
  [ -n "$fwd" ] && cuobjdump -sass -fun "$fwd" "$obj" >"$OUT/sass_fwd.txt" 2>&1
  rm -f "$OUT/sass_full.txt"
fi

if has_step ncu; then  # one forward and one backward launch of the T4096 D128 benchmark shape
  ncu --clock-control none -k 'regex:attn_(fwd|bwd)_kernel' --launch-skip 14 --launch-count 2 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
    --metrics "$(for r in barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle \
      wait not_selected selected dispatch_stall lg_throttle no_instruction branch_resolving misc; do
      printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' "$r"; done)smsp__inst_executed.sum" \
    "$BUILD/bench/bench_dmc_attention" 1 >"$OUT/ncu.txt" 2>&1
  note "ncu rc=$? (see ncu.txt)"
fi

echo
cat "$OUT/errors.txt" 2>/dev/null
echo
cat "$summary"
if [ -f "$OUT/bench.log" ]; then cat "$OUT/bench.log"; fi  # absent when the bench step did not run
