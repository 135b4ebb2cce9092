#!/usr/bin/env bash
# Set-up (launch/setup.sh), then every test: CPU unit and gradient tests, MPI tests under mpirun,
# and the GPU tests, which report SKIPPED on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# OpenMPI refuses root unless told; CI containers run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ctest --test-dir build --output-on-failure -j "${DMC_TEST_JOBS:-2}"
