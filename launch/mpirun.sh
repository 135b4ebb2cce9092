#!/usr/bin/env bash
# Runs dmc-train under mpirun: one rank per GPU (or per CPU slot with --cpu), data- and
# tensor-parallel.
#
#   launch/mpirun.sh -np 8 --tp 4 -- --flagfile=launch/configs/llama2_7b_8gpu_cr4.flags \
#       --init_from=/models/Llama-2-7b-hf --data=/data/llama2/train_index.json
#   launch/mpirun.sh -np 16 --tp 4 --hostfile hosts -- --flagfile=...   (2 nodes of 8 GPUs)
#   launch/mpirun.sh -np 4 --tp 2 --cpu -- --flagfile=launch/configs/tiny_cpu.flags --data=...
#
# Options (before "--"; everything after it goes to dmc-train):
#   -np N         number of ranks (GPUs). Default 1.
#   --tp T        tensor-parallel size; T divides N (and the model's heads), DP size = N / T.
#                 Passed as --tp=T after the other flags, so it overrides a --tp in a flagfile.
#   --hostfile F  Open MPI hostfile, one line per node: "node1 slots=8".
#   --cpu         CPU ranks: no GPU binding, and ranks may outnumber cores (--oversubscribe).
#   --bin PATH    the dmc-train binary (default: build/trainer/dmc-train, or $DMC_TRAIN).
#   --dry-run     print the mpirun command instead of running it.
# Extra mpirun options: MPIRUN_ARGS="--mca btl_tcp_if_include eth0" launch/mpirun.sh ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

np=1 tp="" hostfile="" cpu=0 dry=0
bin="${DMC_TRAIN:-$root/build/trainer/dmc-train}"
while (($#)); do
  case "$1" in
    -np|-n|--np) np="$2"; shift 2 ;;
    --tp) tp="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --bin) bin="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "mpirun.sh: unknown option '$1' (dmc-train flags go after --)" >&2; exit 2 ;;
  esac
done
dmc_args=("$@")
[[ -n "$tp" ]] && dmc_args+=("--tp=$tp")
if [[ -n "$tp" ]] && ((np % tp != 0)); then
  # dmc-train would say the same on every rank; saying it here saves starting the job.
  echo "mpirun.sh: --tp $tp does not divide -np $np" >&2
  exit 2
fi

cmd=(mpirun -np "$np")
# Open MPI refuses root unless told (containers often run as root).
[[ "$(id -u)" == 0 ]] && cmd+=(--allow-run-as-root)
[[ -n "$hostfile" ]] && cmd+=(--hostfile "$hostfile")
# Fill each node's slots in rank order: with the TP-fastest layout, ranks k*T..k*T+T-1 (one TP
# group) then share a node, so the TP all-reduces of every layer stay on NVLink and only the DP
# gradient all-reduce crosses nodes.
cmd+=(--map-by slot)
# Prefix every output line with [job,rank]: an error printed by one rank says which one.
cmd+=(--tag-output)
if ((cpu)); then
  # Ranks bound to cores by default; allow more ranks than cores (small machines, CI).
  cmd+=(--oversubscribe)
else
  # A rank drives one GPU from a few host threads (data prefetch, NCCL proxy): let the OS place
  # them instead of pinning the whole rank to one core.
  cmd+=(--bind-to none)
fi

# NCCL environment, exported to every rank (also on remote nodes) with -x.
#   NCCL_DEBUG=WARN: only problems (INFO prints the topology and rings, for debugging).
#   NCCL_NVLS_ENABLE=0: NVLink multicast (NVLS) off. On shared machines a program using it can
#   take the host's GPUs out of service; set NCCL_NVLS_ENABLE=1 on your own NVSwitch cluster for
#   faster all-reduces.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# Any other NCCL_* / CUDA_* / UCX_* settings of the caller (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...)
# travel too, and PATH / LD_LIBRARY_PATH so remote ranks find the same libraries.
while IFS= read -r name; do
  cmd+=(-x "$name")
done < <(compgen -e | grep -E '^(NCCL_|CUDA_|UCX_|OMP_|DMC_)' || true)
for name in PATH LD_LIBRARY_PATH; do
  [[ -n "${!name:-}" ]] && cmd+=(-x "$name")
done
# shellcheck disable=SC2206  # MPIRUN_ARGS is a list of words on purpose
cmd+=(${MPIRUN_ARGS:-})

if ((cpu)); then
  cmd+=("$bin")
else
  cmd+=("$here/bind_gpu.sh" "$bin")
fi
cmd+=("${dmc_args[@]}")

if ((dry)); then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
