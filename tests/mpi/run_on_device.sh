#!/usr/bin/env bash
# Builds dmc_mpi_tests and dmc_cuda_mpi_tests with NCCL on a lent multi-GPU machine and runs
# dmc_mpi_tests under mpirun with one rank per GPU (the NcclCommunicator tests need that; the MPI
# tests run as on CI), then dmc_cuda_mpi_tests (the CUDA model's TP/DP against the CPU model) with
# 2 and 4 ranks on ONE GPU (MPI communicators, host-staged) and with one rank per GPU (NCCL), then
# the registered CTest MPI tests, and checks launch/bind_gpu.sh. Logs go to $OUT (or ./device-out).
# On a one-GPU machine the one-rank-per-GPU runs have one rank and their multi-rank cases skip.
#
# Dependencies missing on the device image travel as Debian packages in .debs (see
# tests/cuda/run_on_device.sh for the list and the apt-get download line); device call:
#   run(kind nvidia-h200-x2, carry [".debs"], command "bash tests/mpi/run_on_device.sh")
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
BUILD=build-device-mpi

# shellcheck source=../device_deps.sh
source tests/device_deps.sh

nvidia-smi -L
start=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDMC_CUDA=ON \
  -DCMAKE_PREFIX_PATH="$DEV/usr" "${pkgcfg_args[@]}" >"$OUT/build.log" 2>&1 &&
  ninja -C "$BUILD" dmc_mpi_tests dmc_cuda_mpi_tests >>"$OUT/build.log" 2>&1
rc=$?
echo "== build rc=$rc ($(( $(date +%s) - start )) s); $(grep 'dmc: NCCL' "$OUT/build.log")"
if [ $rc -ne 0 ]; then grep -E "error|FAILED|Error" "$OUT/build.log" | head -40; exit 1; fi

# NVLink multicast stays off on these shared machines (see launch/mpirun.sh).
export NCCL_DEBUG=WARN NCCL_NVLS_ENABLE=0
ngpu=$(nvidia-smi -L | wc -l)
echo "== mpirun -np $ngpu dmc_mpi_tests (one GPU per rank)"
mpirun --allow-run-as-root -np "$ngpu" --bind-to none -x NCCL_DEBUG -x NCCL_NVLS_ENABLE \
  -x LD_LIBRARY_PATH "$BUILD/tests/mpi/dmc_mpi_tests" --gtest_color=no 2>&1 | tee "$OUT/mpi_tests.log"
echo "== rc=${PIPESTATUS[0]}"

# The containers forbid Open MPI's cross-process copy (CMA) for large messages (as in CTest).
export OMPI_MCA_btl_vader_single_copy_mechanism=none
for np in 2 4; do
  echo "== CUDA_VISIBLE_DEVICES=0 mpirun -np $np dmc_cuda_mpi_tests (all ranks on one GPU, MPI)"
  CUDA_VISIBLE_DEVICES=0 mpirun --allow-run-as-root --oversubscribe -np "$np" --bind-to none \
    -x CUDA_VISIBLE_DEVICES -x OMPI_MCA_btl_vader_single_copy_mechanism -x LD_LIBRARY_PATH \
    "$BUILD/tests/mpi/dmc_cuda_mpi_tests" --gtest_color=no 2>&1 | tee "$OUT/cuda_mpi_np$np.log" |
    grep -E "^\[ (mpi|nccl) |^\[  (FAILED|PASSED|SKIPPED) |Failure|dmc_mpi_tests:|failed on rank"
  echo "== rc=${PIPESTATUS[0]}"
done
echo "== mpirun -np $ngpu dmc_cuda_mpi_tests (one GPU per rank: the NCCL cases)"
mpirun --allow-run-as-root -np "$ngpu" --bind-to none -x NCCL_DEBUG -x NCCL_NVLS_ENABLE \
  -x OMPI_MCA_btl_vader_single_copy_mechanism -x LD_LIBRARY_PATH \
  "$BUILD/tests/mpi/dmc_cuda_mpi_tests" --gtest_color=no 2>&1 | tee "$OUT/cuda_mpi_nccl.log" |
  grep -E "^\[ (mpi|nccl) |^\[  (FAILED|PASSED|SKIPPED) |Failure|dmc_mpi_tests:|failed on rank"
echo "== rc=${PIPESTATUS[0]}"

echo "== ctest -R 'dmc_(cuda_)?mpi'"
ctest --test-dir "$BUILD" -R 'dmc_(cuda_)?mpi' --output-on-failure 2>&1 | tail -30

echo "== bind_gpu.sh: each rank sees one GPU"
# shellcheck disable=SC2016  # expanded by each rank's shell, not here
mpirun --allow-run-as-root -np "$ngpu" --tag-output launch/bind_gpu.sh \
  bash -c 'echo "local rank $OMPI_COMM_WORLD_LOCAL_RANK: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: $(nvidia-smi -L)"'
