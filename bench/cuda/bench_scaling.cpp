// The CUDA training step on several GPUs, one rank per GPU under mpirun: data parallelism (the
// gradient average in buckets overlapped with the backward pass), tensor parallelism, or both,
// over NCCL. Prints one table row on rank 0: ms per step, tokens/s over all GPUs and per GPU.
// tests/cuda/run_multi_gpu.sh runs it at 1, 2 and 4 GPUs and puts the rows side by side (DP weak
// scaling: the batch per replica stays; TP 2 and 4: the same batch split over more GPUs).
//
//   mpirun -np N bench_scaling [--shape=1b] [--batch=4] [--tp=1] [--dmc=false] [--zero1=false]
//                              [--reps=5] [--warmup=2]
//
// Every rank times the same steps between two barriers, on arbitrary weights and tokens.
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "bench/cuda/bench_shapes.h"
#include "kernels/cuda_check.h"
#include "model/llama_cuda.h"
#include "parallel/mpi_env.h"
#include "parallel/process_groups.h"
#if defined(DMC_HAVE_NCCL)
#include "parallel/nccl_communicator.h"
#endif

ABSL_FLAG(std::string, shape, "1b", "model shape: 1b, 1b-2l, 7b-8l or medium (bench/cuda/bench_shapes.h)");
ABSL_FLAG(int, batch, 4, "sequences per data-parallel replica per step");
ABSL_FLAG(int, tp, 1, "tensor-parallel size (divides the number of ranks)");
ABSL_FLAG(bool, dmc, false, "DMC on (relaxed decisions, CR loss)");
ABSL_FLAG(bool, zero1, false, "shard the AdamW moments over the data-parallel ranks");
ABSL_FLAG(int, reps, 5, "timed steps");
ABSL_FLAG(int, warmup, 2, "untimed steps first");

namespace {

absl::Status Run(dmc::parallel::ProcessGroups& groups) {
  const auto& layout = groups.layout();
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < layout.world_size)
    return absl::FailedPreconditionError(absl::StrFormat(
        "bench_scaling needs one GPU per rank: %d ranks, %d GPUs", layout.world_size, devices));
  DMC_CUDA_CHECK(cudaSetDevice(groups.world().rank()));
  const char* comms = "mpi";
#if defined(DMC_HAVE_NCCL)
  absl::StatusOr<dmc::parallel::NcclGroups> nccl = dmc::parallel::UseNccl(groups);
  if (!nccl.ok()) return nccl.status();
  if ((layout.tp_size == 1 || nccl->tp) && (layout.dp_size == 1 || nccl->dp)) comms = "nccl";
#endif
  dmc::bench::Shape shape = dmc::bench::MakeShape(absl::GetFlag(FLAGS_shape));
  dmc::model::LlamaConfig& config = shape.config;
  config.dmc.enabled = absl::GetFlag(FLAGS_dmc);
  const int B = absl::GetFlag(FLAGS_batch), T = shape.T;
  dmc::parallel::Communicator* dp = layout.dp_size > 1 ? &groups.dp() : nullptr;
  dmc::model::LlamaCuda model(config, &groups.tp(), absl::GetFlag(FLAGS_zero1) ? dp : nullptr);
  model.CopyParamsFromHost(dmc::bench::ArbitraryWeights(model.num_params(), 777 + groups.world().rank()));
  // Each replica its own tokens (the same on the TP ranks of a replica, as the loader gives them).
  std::vector<int32_t> in, tgt;
  dmc::bench::ArbitraryTokens(B, T, config.vocab_size, 99 + layout.dp_rank, &in, &tgt);
  dmc::model::StepOptions options;
  options.noise_seed = 1;
  options.cr_prior = config.dmc.enabled ? 0.5f : 0.0f;
  dmc::model::CudaAdamWSettings adam;
  adam.lr = 1e-5f;
  const int warmup = absl::GetFlag(FLAGS_warmup), reps = absl::GetFlag(FLAGS_reps);
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto t0 = now();
  for (int step = 0; step < warmup + reps; ++step) {
    if (step == warmup) {
      if (absl::Status st = groups.world().Barrier(); !st.ok()) return st;
      t0 = now();
    }
    options.step = static_cast<uint64_t>(step);
    model.ZeroGrad();
    model.ForwardAsync(in.data(), tgt.data(), B, T, options);
    model.Backward(1.0, dp);  // throws on a failed collective: the job aborts
    model.OptimizerStepAsync(adam);
    model.ForwardResults();
    model.OptimizerStepNorm();
  }
  if (absl::Status st = groups.world().Barrier(); !st.ok()) return st;
  const double ms = std::chrono::duration<double, std::milli>(now() - t0).count() / reps;
  const double tokens_per_s = static_cast<double>(layout.dp_size) * B * T / (ms / 1e3);
  if (groups.world().rank() == 0)
    std::printf("| %s%s | %d | dp %d × tp %d%s | %d × %d per replica | %.1f | %.1fk | %.1fk | %s |\n",
                shape.name.c_str(), config.dmc.enabled ? " DMC" : "", layout.world_size,
                layout.dp_size, layout.tp_size, absl::GetFlag(FLAGS_zero1) ? " ZeRO-1" : "", B, T,
                ms, tokens_per_s / 1e3, tokens_per_s / layout.world_size / 1e3, comms);
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  dmc::parallel::MpiEnv mpi(&argc, &argv);
  absl::StatusOr<dmc::parallel::ProcessGroups> groups =
      dmc::parallel::ProcessGroups::Create(MPI_COMM_WORLD, absl::GetFlag(FLAGS_tp));
  absl::Status status = groups.ok() ? Run(*groups) : groups.status();
  if (!status.ok()) {
    std::fprintf(stderr, "bench_scaling: %s\n", status.ToString().c_str());
    dmc::parallel::AbortJob(status);
  }
  return 0;
}
