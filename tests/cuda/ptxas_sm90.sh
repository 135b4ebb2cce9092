#!/usr/bin/env bash
# ptxas's report on the Hopper kernels (kernels/*_sm90.cu): fails if it serialises a kernel's
# wgmma instructions ("Potential Performance Loss", C75xx: each wgmma then waits for the one
# before it, as when the accumulators in flight do not fit the registers, or when instructions
# other than wgmma write them). That changes no result, so no test on the GPU sees it, but it
# costs the kernel its overlap (bench/RESULTS.md entry 36: a serialised backward ran 12% slower).
# Prints each kernel's registers and spills. Needs nvcc, no GPU.
# Usage: ptxas_sm90.sh NVCC SOURCE_DIR
set -euo pipefail
nvcc=$1
src=$2
status=0
for cu in "$src"/kernels/*_sm90.cu; do
  name=${cu#"$src"/}
  report=$("$nvcc" -O3 -DNDEBUG -std=c++17 --expt-relaxed-constexpr \
    --generate-code=arch=compute_90a,code=[sm_90a] -I"$src" -Xptxas -v -c "$cu" -o /dev/null 2>&1)
  echo "$report" | grep -E "Compiling entry|Used [0-9]+ registers|spill" | sed "s|^|$name: |"
  if grep -q "Potential Performance Loss" <<<"$report"; then
    echo "$name: ptxas serialises wgmma instructions:" >&2
    grep "Potential Performance Loss" <<<"$report" >&2
    status=1
  fi
done
exit $status
