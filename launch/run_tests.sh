#!/usr/bin/env bash
# Set-up (launch/setup.sh), then every test: CPU unit and gradient tests, MPI tests under mpirun,
# and the GPU tests, which report SKIPPED on a machine without a GPU.
#
#   bash launch/run_tests.sh            the suite once
#   bash launch/run_tests.sh --loaded   the suite DMC_LOADED_RUNS times in a row (default 3) while
#                                       a CPU-bound load spins on every core, as on a busy shared
#                                       machine: a test that depends on timing fails here
set -euo pipefail
cd "$(dirname "$0")/.."
loaded=false
case "${1:-}" in
  --loaded) loaded=true ;;
  "") ;;
  *) echo "usage: $0 [--loaded]" >&2; exit 2 ;;
esac
bash launch/setup.sh
# OpenMPI refuses root unless told; CI containers run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
suite() { ctest --test-dir build --output-on-failure -j "${DMC_TEST_JOBS:-2}"; }
if ! $loaded; then
  suite
  exit
fi
load=()
for _ in $(seq "$(nproc)"); do
  (while :; do :; done) &
  load+=($!)
done
trap 'kill "${load[@]}"' EXIT
failed=0
for run in $(seq "${DMC_LOADED_RUNS:-3}"); do
  echo "== run $run of ${DMC_LOADED_RUNS:-3}, with ${#load[@]} busy loops beside it"
  suite || failed=$((failed + 1))
done
echo "== $failed of ${DMC_LOADED_RUNS:-3} loaded runs had failures"
[ "$failed" -eq 0 ]
