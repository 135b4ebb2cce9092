# Sourced by the dmc-train tests under mpirun, with their arguments
# "DMC_TRAIN DMC_PREP SOURCE_DIR MPIEXEC [MPIEXEC_FLAGS...]": sets train, prep, src, mpiexec and
# mpi_flags, a scratch directory $work (removed on exit) and fail(), and tokenizes the embedded
# books named in $books (byte tokenizer) into $work/shards. One OpenMP thread per process: the
# tests run several ranks on few cores.
set -euo pipefail
train=$1 prep=$2 src=$3 mpiexec=$4
shift 4
mpi_flags=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
fail() { echo "FAIL: $*" >&2; exit 1; }

mkdir "$work/corpus"
for book in $books; do cp "$src/data/corpus/$book.txt" "$work/corpus/"; done
"$prep" --input="$work/corpus" --output="$work/shards" --tokenizer=byte --shard_tokens=16384 \
    >/dev/null 2>&1
