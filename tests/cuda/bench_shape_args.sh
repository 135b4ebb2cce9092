#!/usr/bin/env bash
# bench_dmc_attention's shape argument: a shape it cannot run is refused by name, with exit 1,
# before the bench looks for a GPU (so this runs anywhere).
# Usage: bench_shape_args.sh BENCH_DMC_ATTENTION
set -uo pipefail
bench=$1
status=0
for shape in 4,33,8,1024,128 4,32,32,1024,96 4,32,32,0,128 4,32,32,1024 x; do
  out=$("$bench" 1 "$shape" 2>&1)
  rc=$?
  if [ $rc -ne 1 ] || ! grep -qF "shape '$shape' is not B,H,Hkv,T,D" <<<"$out"; then
    echo "shape '$shape': exit $rc, output: $out" >&2
    status=1
  fi
done
exit $status
