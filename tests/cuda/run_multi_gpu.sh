#!/usr/bin/env bash
# Every NCCL case and the multi-GPU scaling benchmark in one call, on a machine with 1..N GPUs,
# one rank per GPU; cases that need more GPUs than the machine has are skipped with a line saying
# so, and the summary at the end lists what ran, what passed and what was skipped. Meant to fit in
# one 10-minute device call (build included) on 4 or more H200s. Logs go to $OUT (or ./device-out).
#
#   NCCL cases (tests/mpi/test_nccl_communicator.cpp, tests/cuda/mpi/test_cuda_parallel.cpp: the
#   CUDA model against the CPU model):
#     communicator collectives, process groups, a collective that times out when a rank is stuck
#     TP 2 and TP 4 (the LM head and cross-entropy vocabulary-parallel), DP 2 and DP 4 (the
#     gradient average in buckets overlapped with the backward pass), DP 2 × TP 2, ZeRO-1 at DP 2,
#     DP 4 and DP 2 × TP 2 (the parameter all-gather), the vocabulary-parallel kernels (1 GPU)
#   Scaling (bench/cuda/bench_scaling.cpp): the 1.36B training step at 1, 2 and 4 GPUs, DP weak
#   scaling (B 4 × 2048 per replica) and TP 2 and 4 (B 4 × 2048 in all).
#
# Dependencies missing on the GPU machine's image travel as Debian packages in .debs (the list and
# the apt-get download line are in tests/cuda/run_on_device.sh).
# Knobs: DMC_DEVICE_BUILD (build folder, default build-device-multi; binaries built there before
# are reused), DMC_SCALING_SHAPE (default 1b; 7b-8l for tensor parallelism at the 7B width),
# DMC_SCALING_REPS (default 5).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
BUILD="${DMC_DEVICE_BUILD:-build-device-multi}"
summary="$OUT/multi_gpu_summary.txt"
: >"$summary"
note() { echo "== $*" | tee -a "$summary"; }

# shellcheck source=../device_deps.sh
source tests/device_deps.sh

ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
note "$ngpu GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs)  date: $(date -u +%Y-%m-%dT%H:%MZ)"
start=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDMC_CUDA=ON \
  -DCMAKE_PREFIX_PATH="$DEV/usr" "${pkgcfg_args[@]}" >"$OUT/multi_build.log" 2>&1 &&
  ninja -C "$BUILD" dmc_mpi_tests dmc_cuda_mpi_tests dmc_cuda_tests bench_scaling \
    >>"$OUT/multi_build.log" 2>&1
rc=$?
note "build rc=$rc ($(( $(date +%s) - start )) s); $(grep 'dmc: NCCL' "$OUT/multi_build.log")"
if [ $rc -ne 0 ]; then grep -E "error|FAILED|Error" "$OUT/multi_build.log" | head -40; exit 1; fi

# NVLink multicast stays off on these shared machines (see launch/mpirun.sh); large messages
# between processes go through shared memory, not CMA, which containers forbid.
export NCCL_DEBUG=WARN NCCL_NVLS_ENABLE=0 OMPI_MCA_btl_vader_single_copy_mechanism=none
# mpirun's arguments before -np (one rank per GPU); an array, not a function, since run_case runs
# its command under `timeout`, which cannot call shell functions.
mpi=(mpirun --allow-run-as-root --bind-to none -x NCCL_DEBUG -x NCCL_NVLS_ENABLE
  -x OMPI_MCA_btl_vader_single_copy_mechanism -x LD_LIBRARY_PATH)
ran=() passed=() failed=() skipped=()
# run_case NAME GPUS COMMAND...: runs COMMAND (5 minutes at most) when the machine has GPUS GPUs.
# A gtest run that only skipped counts as skipped, with gtest's reason.
run_case() {
  local name=$1 need=$2
  shift 2
  if [ "$ngpu" -lt "$need" ]; then
    skipped+=("$name: needs $need GPUs, this machine has $ngpu")
    echo "-- SKIPPED $name (needs $need GPUs, this machine has $ngpu)"
    return
  fi
  local log="$OUT/multi_$(echo "$name" | tr -c 'A-Za-z0-9\n' '_').log" t0 rc
  t0=$(date +%s)
  timeout 300 "$@" </dev/null >"$log" 2>&1  # mpirun would read the case list on stdin
  rc=$?
  ran+=("$name")
  if grep -q '^\[  PASSED  \] 0 tests' "$log" && grep -q '^\[  SKIPPED \]' "$log"; then
    skipped+=("$name: every test of it skipped ($log says why)")
    echo "-- SKIPPED by the test $name"
  elif [ $rc -eq 0 ]; then
    passed+=("$name ($(( $(date +%s) - t0 )) s)")
    echo "-- passed $name ($(( $(date +%s) - t0 )) s)"
  else
    failed+=("$name (rc $rc, $log)")
    echo "-- FAILED $name (rc $rc): see $log"
    grep -E "Failure|FAILED|error|Error" "$log" | head -10
  fi
}

run_case "vocabulary-parallel kernels, 1 GPU" 1 \
  "$BUILD/tests/dmc_cuda_tests" --gtest_filter='CudaVocabParallel.*'
# GPUS|BINARY (under tests/mpi)|GTEST FILTER|NAME: each under mpirun with one rank per GPU.
while IFS='|' read -r np binary filter name; do
  run_case "$name" "$np" "${mpi[@]}" -np "$np" "$BUILD/tests/mpi/$binary" --gtest_filter="$filter"
done <<'CASES'
2|dmc_mpi_tests|NcclCommunicator.*|NCCL communicator: collectives, groups, timeout of a stuck rank, 2 GPUs
4|dmc_mpi_tests|NcclCommunicator.*|NCCL communicator: collectives, groups, timeout of a stuck rank, 4 GPUs
2|dmc_cuda_mpi_tests|*TensorParallelTwoOnNccl*|TP 2 over NCCL (vocabulary-parallel LM head)
2|dmc_cuda_mpi_tests|*DataParallelOnNccl*:-CudaZero1.*|DP 2 over NCCL, bucketed and overlapped
2|dmc_cuda_mpi_tests|CudaZero1.DataParallelOnNccl*|ZeRO-1 at DP 2 over NCCL
4|dmc_cuda_mpi_tests|*TensorParallelFourOnNccl*|TP 4 over NCCL (vocabulary-parallel LM head)
4|dmc_cuda_mpi_tests|*DataParallelOnNccl*:-CudaZero1.*|DP 4 over NCCL, bucketed and overlapped
4|dmc_cuda_mpi_tests|*TensorParallelTwoOnNccl*|DP 2 x TP 2 over NCCL
4|dmc_cuda_mpi_tests|CudaZero1.*OnNccl*|ZeRO-1 at DP 4 and DP 2 x TP 2 over NCCL
CASES

# Scaling: one table, a row per layout.
shape="${DMC_SCALING_SHAPE:-1b}"
bench=("$BUILD/bench/bench_scaling" --shape="$shape" --batch=4 --reps="${DMC_SCALING_REPS:-5}")
for layout in "1 1" "2 1" "4 1" "2 2" "4 4"; do
  read -r np tp <<<"$layout"
  what="DP $((np / tp))"
  [ "$tp" -gt 1 ] && what="TP $tp"
  run_case "scaling $shape, $np GPU(s), $what" "$np" "${mpi[@]}" -np "$np" "${bench[@]}" --tp="$tp"
done

{
  echo
  echo "| shape | GPUs | layout | batch | ms/step | tokens/s | tokens/s per GPU | collectives |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  cat "$OUT"/multi_scaling_*.log 2>/dev/null | grep '^| ' 
  echo
  echo "ran ${#ran[@]} case(s): ${#passed[@]} passed, ${#failed[@]} failed; ${#skipped[@]} skipped"
  for c in "${passed[@]}"; do echo "  passed   $c"; done
  for c in "${failed[@]}"; do echo "  FAILED   $c"; done
  for c in "${skipped[@]}"; do echo "  skipped  $c"; done
} | tee -a "$summary"
[ ${#failed[@]} -eq 0 ]
